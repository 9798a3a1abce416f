"""Text-video alignment from a contrastive image-text model (CLIP or SigLIP), frame by frame.

``clip_alignment`` embeds ``frames`` frames of each video (uniformly spread, first and last
included) and the video's prompt with a transformers ``AutoModel`` + ``AutoProcessor`` loaded
from a local directory (``local_files_only``), and averages the per-frame similarity mapped to
``[0, 1]``:

* CLIP (a model without ``logit_bias``): ``(cos + 1) / 2`` of the normalised image and text
  embeddings. Real CLIP cosines sit in a narrow band (about 0.15-0.35), so the reward moves in
  a narrow band too; group-relative advantages do not mind.
* SigLIP (a model with ``logit_bias``): ``sigmoid(exp(logit_scale) * cos + logit_bias)``, the
  model's own probability that image and text match.

Returns ``{"score": (B,), "cosine": (B,)}`` (the raw mean cosine, for logging).
"""

from __future__ import annotations


import torch

from .common import check_videos, checkpoint_dir, load_local, positive, read_json, resolve_device, resolve_dtype
from .registry import RewardError, register


def frame_indices(num_frames: int, frames: int) -> list[int]:
    """``frames`` indices spread uniformly over ``num_frames`` (first and last included); every
    frame when the video is shorter."""
    if num_frames <= frames:
        return list(range(num_frames))
    return torch.linspace(0, num_frames - 1, frames).round().long().tolist()


def _features(out: object) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@register("clip_alignment")
class ClipAlignment:
    """Mean frame-text similarity of a CLIP or SigLIP model, in ``[0, 1]`` (module docstring).

    Options: ``model`` (a local checkpoint directory), ``frames`` (frames per video),
    ``batch_size`` (videos per forward), ``device``, ``dtype`` (``auto``: bfloat16 on CUDA,
    float32 on CPU).
    """

    default_retries = 0

    def __init__(self, model: str, frames: int = 4, batch_size: int = 8, device: str = "auto",
                 dtype: str = "auto") -> None:
        self.frames, self.batch_size = positive("frames", frames, int), positive("batch_size", batch_size, int)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.path = path = checkpoint_dir(model)
        from transformers import AutoModel, AutoProcessor

        self.processor, self.model = load_local(AutoProcessor, AutoModel, path, self.dtype, "CLIP/SigLIP")
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise RewardError(f"{path} is a {type(self.model).__name__}, not a CLIP or SigLIP model")
        self.model.to(self.device).eval()
        self.siglip = hasattr(self.model, "logit_bias")
        # SigLIP was trained on max_length-padded text; CLIP pads to the longest prompt.
        model_type = read_json(path / "config.json").get("model_type", "")
        self.text_kwargs = {"padding": "max_length"} if self.siglip or "siglip" in model_type else {"padding": True}

    @torch.inference_mode()
    def cosines(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(b, n)`` cosine of each sampled frame of ``(b, F, H, W, 3)`` uint8 videos with its prompt."""
        b = videos.shape[0]
        idx = frame_indices(videos.shape[1], self.frames)
        frames = videos[:, idx].cpu().reshape(-1, *videos.shape[2:]).numpy()           # (b*n, H, W, 3)
        img = self.processor(images=list(frames), return_tensors="pt")["pixel_values"]
        txt = self.processor(text=list(prompts), return_tensors="pt", truncation=True, **self.text_kwargs)
        img_e = _features(self.model.get_image_features(pixel_values=img.to(self.device, self.dtype))).float()
        txt_e = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in txt.items()
                                                          if k in ("input_ids", "attention_mask")})).float()
        img_e = torch.nn.functional.normalize(img_e, dim=-1).view(b, len(idx), -1)
        txt_e = torch.nn.functional.normalize(txt_e, dim=-1)
        return torch.einsum("bnd,bd->bn", img_e, txt_e).cpu()

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)       # fps unused: frames are judged one by one
        cos = torch.cat([self.cosines(videos[s:s + self.batch_size], prompts[s:s + self.batch_size])
                         for s in range(0, videos.shape[0], self.batch_size)])             # (B, n)
        if self.siglip:
            scale, bias = self.model.logit_scale.float().exp().cpu(), self.model.logit_bias.float().cpu()
            per_frame = torch.sigmoid(cos * scale + bias)
        else:
            per_frame = (cos + 1) / 2
        return {"score": per_frame.mean(dim=1).float(), "cosine": cos.mean(dim=1).float()}
