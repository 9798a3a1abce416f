"""Wan image-to-video (diffusers ``WanImageToVideoPipeline``): Wan 2.1 I2V, Wan 2.2 I2V-A14B, and
the ``expand_timesteps`` layout (Wan 2.2 TI2V-5B driven by an image).

The condition is formed as diffusers 0.42's pipeline forms it, once per prompt:

* the first frame, resized to the video size (``VideoProcessor.preprocess``), followed by zeros for
  the other ``num_frames - 1`` frames, encoded by the VAE (mode of the posterior) and normalised
  with ``latents_mean`` / ``latents_std``;
* Wan 2.1 / 2.2 A14B: a mask of ``scale_temporal`` channels (1 on the first pixel frame's latents,
  0 elsewhere) before those latents; the transformer sees ``[x, mask, image latents]`` on the
  channel axis (``in_channels = 2 z + scale_temporal``);
* Wan 2.1 (transformer ``image_dim`` set): CLIP vision embeddings of the original image (the
  penultimate hidden states) passed as ``encoder_hidden_states_image``;
* ``expand_timesteps``: only the image is encoded (one latent frame); it replaces the first latent
  frame of ``x`` and those tokens get timestep 0. The first frame's velocity is returned as
  ``(x - c) / sigma`` (no parameters), which carries that frame to the image latent ``c`` by the end
  of the schedule, so the decoded video starts with the image, as the pipeline's final overwrite does.

All of it travels in the :class:`~.base.TextBatch` ``encode_prompts`` returns (``embeds``, ``cond``
and, for Wan 2.1, ``image``), so rollout, trajectories, replay and minibatches carry it row by row;
the unconditional (CFG) rows keep their image and change only the text, as in the pipeline.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from . import wan
from .base import ModelError, TextBatch
from .common import PromptImages, clip_processor_class, encoder_part, place, skeleton, vae_latent_stats
from .registry import FamilySpec, register
from .wan import TINY_INIT, WanAdapter

# diffusers' Wan attention splits the image tokens off as everything before the last 512 context
# tokens ("512 is the context length of the text encoder, hardcoded for now").
_TEXT_TOKENS_WITH_IMAGE = 512

# A tiny Wan 2.1 I2V: 4 latent channels + 4 mask channels + 4 image-latent channels in, CLIP
# embeddings of width 32 (a 2-layer CLIPVisionModel on 32x32 crops) through `image_dim`.
TINY_I2V_INIT: dict[str, dict[str, Any]] = {
    **TINY_INIT,
    "transformer": {**TINY_INIT["transformer"], "in_channels": 12, "out_channels": 4, "image_dim": 32,
                    "added_kv_proj_dim": 32},
    "image_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
}


class WanI2VAdapter(PromptImages, WanAdapter):
    """Wan image-to-video: the transformer(s) train; UMT5, the VAE and the CLIP image encoder are frozen.

    Each prompt's image is given by :meth:`set_images` before the prompt is encoded.
    """

    PIPELINE = "WanImageToVideoPipeline"
    TINY = TINY_I2V_INIT
    CONDITION_LABEL = "image condition channels"
    # The CLIP image states are cached with each prompt's row too: the image encoder goes with UMT5.
    TEXT_ENCODERS = ("text_encoder", "image_encoder")

    def __init__(self, *args: Any, image_encoder: torch.nn.Module | None = None, image_processor: Any = None,
                 **kwargs: Any) -> None:
        if kwargs.get("position_channels"):
            raise ModelError("position_channels are for text-to-video Wan models only")
        super().__init__(*args, **kwargs)
        image_dim = self.transformer.config.image_dim
        if image_dim is not None:
            if image_encoder is None or image_processor is None:
                raise ModelError(f"the transformer takes CLIP image embeddings (image_dim {image_dim}) but the "
                                 "checkpoint has no image_encoder/ and image_processor/")
            if int(image_encoder.config.hidden_size) != int(image_dim):
                raise ModelError(f"image_encoder hidden_size {image_encoder.config.hidden_size} != "
                                 f"transformer image_dim {image_dim}")
            if self.max_sequence_length != _TEXT_TOKENS_WITH_IMAGE:
                raise ModelError(f"model.max_sequence_length={self.max_sequence_length}: a Wan I2V transformer "
                                 f"with image_dim needs {_TEXT_TOKENS_WITH_IMAGE} (diffusers' attention splits the "
                                 "text off as the last 512 tokens)")
            self.image_encoder = place(image_encoder, self.device).eval().requires_grad_(False)
        else:
            self.image_encoder = None               # Wan 2.2: conditioning latents only
        self.image_processor = image_processor
        self._init_images()

    def _condition_channels(self) -> int:
        # expand_timesteps: the image replaces the first latent frame, no channels are added.
        return 0 if self.expand_timesteps else self.latent_channels + self.scale_temporal

    # ---------------------------------------------------------------- building
    @classmethod
    def _extra_pretrained(cls, path: Path, index: dict[str, Any]) -> dict[str, Any]:
        from transformers import CLIPVisionModel

        def named(part: str) -> bool:
            return (index.get(part) or [None])[0] is not None and (path / part).is_dir()

        if not named("image_encoder"):
            return {}
        if not named("image_processor"):
            raise ModelError(f"model.path {path} has an image_encoder/ but no image_processor/")
        # float32, as diffusers' Wan I2V example loads it
        return {"image_encoder": encoder_part(
                    lambda: CLIPVisionModel.from_pretrained(path / "image_encoder", dtype=torch.float32),
                    lambda: skeleton(CLIPVisionModel, path / "image_encoder", torch.float32)),
                "image_processor": clip_processor_class().from_pretrained(path / "image_processor")}

    @classmethod
    def _extra_config(cls, parts: dict[str, dict[str, Any]], transformer: torch.nn.Module) -> dict[str, Any]:
        if transformer.config.image_dim is None:
            return {}
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(**parts["image_encoder"])
        side = int(cfg.image_size)
        return {"image_encoder": encoder_part(lambda: CLIPVisionModel(cfg)),
                "image_processor": clip_processor_class()(size={"shortest_edge": side},
                                                           crop_size={"height": side, "width": side})}

    def save_pretrained(self, directory: Path) -> None:
        """A diffusers ``WanImageToVideoPipeline`` directory (``WanImageToVideoPipeline.from_pretrained``
        loads it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

        scheduler = FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **{
            k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}})
        plain, boundary = self.export_experts()      # routed by noise level: two experts
        pipe = WanImageToVideoPipeline(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, scheduler=scheduler,
            image_processor=self.image_processor, image_encoder=self.image_encoder, transformer=plain[0],
            transformer_2=plain[1] if len(plain) > 1 else None, boundary_ratio=self.boundary_ratio,
            expand_timesteps=self.expand_timesteps)
        pipe.save_pretrained(str(directory))
        self.copy_released_parts(Path(directory))

    # ---------------------------------------------------------------- images
    @torch.no_grad()
    def _condition(self, prompt: str) -> dict[str, torch.Tensor]:
        """``cond`` ``(C_c, F, H, W)`` (and ``image`` ``(N, D)`` CLIP states) of ``prompt``'s image."""
        if prompt not in self._cond_cache:
            from diffusers.video_processor import VideoProcessor

            image, (frames, height, width) = self._image(prompt), self._size
            pixels = VideoProcessor(vae_scale_factor=self.scale_spatial).preprocess(image, height=height, width=width)
            pixels = pixels.to(self.device, torch.float32).unsqueeze(2)                  # (1, 3, 1, H, W)
            if not self.expand_timesteps:                                                # zeros after frame 0
                pixels = torch.cat([pixels, pixels.new_zeros(1, 3, frames - 1, height, width)], dim=2)
            mean, std = vae_latent_stats(self.vae, self.device)
            latents = (self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode().float() - mean) / std
            if not self.expand_timesteps:
                # The pipeline's mask: 1 for the latents of pixel frame 0 (repeated scale_temporal
                # times so every latent frame holds scale_temporal pixel frames), 0 elsewhere.
                st, (_, f, h, w) = self.scale_temporal, latents.shape[1:]
                mask = torch.zeros(1, 1, frames + st - 1, h, w, device=self.device)
                mask[:, :, :st] = 1.0
                mask = mask.view(1, f, st, h, w).transpose(1, 2)                      # (1, st, F, h, w)
                latents = torch.cat([mask, latents], dim=1)
            out = {"cond": latents[0].to(self.dtype)}
            if self.image_encoder is not None:
                inputs = self.image_processor(images=image, return_tensors="pt").to(self.device)
                states = self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
                out["image"] = states[0].to(self.dtype)
            self._cond_cache[prompt] = out
        return self._cond_cache[prompt]

    def _with_images(self, embeds: torch.Tensor, prompts: list[str]) -> TextBatch:
        conds = [self._condition(p) for p in prompts]
        return TextBatch(embeds=embeds, **{k: torch.stack([c[k] for c in conds]) for k in conds[0]})

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextBatch:
        """Rows of ``embeds`` (UMT5), ``cond`` (mask + image latents, or the image latent frame) and,
        with a CLIP image encoder, ``image``; cached per prompt."""
        return self._with_images(super().encode_prompts(prompts), prompts)

    @torch.no_grad()
    def encode_negative(self, negative_prompt: str, prompts: list[str]) -> TextBatch:
        return self._with_images(super().encode_prompts([negative_prompt] * len(prompts)), prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: TextBatch, expert: int = 0) -> torch.Tensor:
        if not isinstance(text, TextBatch) or "cond" not in text.parts:
            raise ModelError("an image-to-video model needs the conditioning from its encode_prompts "
                             "(text embeddings with the image condition)")
        dev, dt = self.device, self.dtype
        sigma = sigma.to(device=dev, dtype=torch.float32)
        timestep = sigma * 1000.0
        h = x.to(device=dev, dtype=dt)
        cond = text.parts["cond"].to(device=dev, dtype=dt)
        if self.expand_timesteps:
            # The image latent is the first frame; its tokens are clean (timestep 0), the others at t.
            pt, ph, pw = self.patch_size
            per_frame = (x.shape[3] // ph) * (x.shape[4] // pw)
            n = (x.shape[2] // pt) * per_frame
            timestep = timestep[:, None].expand(-1, n).clone()
            timestep[:, :per_frame] = 0.0
            h = torch.cat([cond, h[:, :, 1:]], dim=2)
        else:
            h = torch.cat([h, cond], dim=1)
        image = text.parts.get("image")
        out = self.experts[expert](hidden_states=h, timestep=timestep,
                                   encoder_hidden_states=text.parts["embeds"].to(device=dev, dtype=dt),
                                   encoder_hidden_states_image=None if image is None else image.to(dev, dt),
                                   return_dict=False)[0].float()
        if self.expand_timesteps:
            # Frame 0 is not the model's to change: flow it to the image latent (no parameters, so
            # those tokens add nothing to the ratio or the KL).
            x0 = x[:, :, :1].to(device=dev, dtype=torch.float32)
            out = torch.cat([(x0 - cond[:, :, :1].float()) / sigma.view(-1, 1, 1, 1, 1), out[:, :, 1:]], dim=2)
        return out


# Wan 2.1 I2V (CLIP), Wan 2.2 I2V-A14B, the expand_timesteps layout: Wan's transformer, so Wan's
# activation model and sequence-parallel plan.
register(FamilySpec(name="wan_i2v", pipeline="WanImageToVideoPipeline", adapter=WanI2VAdapter,
                    build=functools.partial(wan.build, WanI2VAdapter), tiny_init=TINY_I2V_INIT,
                    activation_profile=wan.activation_profile, sequence_parallel_plan=wan.sequence_parallel_plan,
                    two_experts=True, staged=True))
