"""HunyuanVideo 1.5 image-to-video (diffusers ``HunyuanVideo15ImageToVideoPipeline``, e.g.
hunyuanvideo-community/HunyuanVideo-1.5-480p_i2v): the text-to-video family's transformer, VAE,
Qwen2.5-VL and ByT5 (:mod:`.hunyuan15`), plus a SigLIP vision encoder (``image_encoder/``,
``feature_extractor/``).

The conditioning is formed as diffusers 0.42's pipeline forms it, once per prompt:

* the image resized and centre-cropped to the video size (``HunyuanVideo15ImageProcessor.resize``,
  ``resize_mode="crop"``);
* ``image``: SigLIP's last hidden states of that image (729 tokens at 384 px), the transformer's
  ``image_embeds`` (projected and attended to beside the Qwen and ByT5 tokens);
* ``cond``: the image through the VAE (mode, times ``scaling_factor``) on latent frame 0, zeros on
  the other frames, and a mask channel (1 on frame 0): the transformer sees ``[x, cond]`` on the
  channel axis (``in_channels = 2 C + 1``, the channels the text-to-video pipeline fills with zeros).

Every latent frame, frame 0 included, is denoised by the model; nothing is overwritten. The
unconditional (CFG) rows keep each row's image latents and SigLIP states and change only the text,
as the pipeline's guider does. All of it travels in the :class:`~.base.TextBatch` rows
``encode_prompts`` returns (``embeds``, ``mask``, ``embeds_2``, ``mask_2``, ``cond``, ``image``).

One difference from the pipeline: it picks the video size from the image's aspect ratio and the
transformer's ``target_size`` (its nearest bucket); here the size is ``video.height`` x
``video.width`` (the same when those are the bucket of the image).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from . import hunyuan_common
from .base import ModelError, TextBatch, cat_text
from .common import PromptImages, built_in, clip_processor_class, encoder_part, place, skeleton
from .hunyuan15 import TINY_INIT, HunyuanVideo15Adapter, init_from_folder, text_tokens
from .registry import FamilySpec, register

_SIGLIP = "SiglipImageProcessor"

# A tiny HunyuanVideo 1.5 I2V: the text-to-video tiny model with target_size 32 (a square-ish image's
# bucket is the tiny configs' 32x32 video) and a 1-layer SigLIP of width 8 (= image_embed_dim) on
# 32x32 inputs (16 image tokens).
TINY_I2V_INIT: dict[str, dict[str, Any]] = {
    **TINY_INIT,
    "transformer": {**TINY_INIT["transformer"], "task_type": "i2v", "target_size": 32},
    "image_encoder": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
}


class HunyuanVideo15I2VAdapter(PromptImages, HunyuanVideo15Adapter):
    """HunyuanVideo 1.5 image-to-video: the transformer trains; Qwen2.5-VL, ByT5, SigLIP and the VAE
    are frozen. Each prompt's image is given by :meth:`set_images` before the prompt is encoded."""

    PIPELINE = "HunyuanVideo15ImageToVideoPipeline"
    FAMILY = "hunyuan_video_1.5_i2v"
    TINY = TINY_I2V_INIT
    # SigLIP's states are cached with each prompt's row: it goes with the text encoders.
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "image_encoder")

    def __init__(self, *args: Any, image_encoder: torch.nn.Module | None = None, feature_extractor: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if image_encoder is None or feature_extractor is None:
            raise ModelError("HunyuanVideo 1.5 image-to-video needs its SigLIP image_encoder/ and feature_extractor/")
        dim = int(self.transformer.config.image_embed_dim)
        if int(image_encoder.config.hidden_size) != dim:
            raise ModelError(f"image_encoder hidden_size {image_encoder.config.hidden_size} != transformer "
                             f"image_embed_dim {dim}")
        self.image_encoder = place(image_encoder, self.device).eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self._init_images()

    # ---------------------------------------------------------------- building
    @classmethod
    def _extra_pretrained(cls, path: Path, dtype: torch.dtype) -> dict[str, Any]:
        from transformers import SiglipVisionModel

        for sub in ("image_encoder", "feature_extractor"):
            if not (path / sub).is_dir():
                raise ModelError(f"model.path {path} has no {sub}/ folder")
        return {"image_encoder": encoder_part(lambda: SiglipVisionModel.from_pretrained(path / "image_encoder", dtype=dtype),
                                              lambda: skeleton(SiglipVisionModel, path / "image_encoder", dtype)),
                "feature_extractor": clip_processor_class(_SIGLIP).from_pretrained(path / "feature_extractor")}

    @classmethod
    def _extra_config(cls, parts: dict[str, dict[str, Any]], dtype: torch.dtype) -> dict[str, Any]:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        cfg = SiglipVisionConfig(**parts["image_encoder"])
        with built_in(dtype):
            encoder = encoder_part(lambda: SiglipVisionModel(cfg))
        side = int(cfg.image_size)
        return {"image_encoder": encoder.to(dtype),
                "feature_extractor": clip_processor_class(_SIGLIP)(size={"height": side, "width": side})}

    def _extra_pipeline_parts(self) -> dict[str, Any]:
        return {"image_encoder": self.image_encoder, "feature_extractor": self.feature_extractor}

    # ---------------------------------------------------------------- images
    @torch.no_grad()
    def _condition(self, prompt: str) -> dict[str, torch.Tensor]:
        """``cond`` ``(C + 1, F, H, W)`` (image latents on frame 0, mask) and ``image`` ``(N, D)``
        (SigLIP states) of ``prompt``'s image, by the pipeline's own functions."""
        if prompt not in self._cond_cache:
            from diffusers import HunyuanVideo15ImageToVideoPipeline as Pipeline
            from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

            image = self._image(prompt)
            frames, height, width = self._size          # type: ignore[misc]
            processor = HunyuanVideo15ImageProcessor(vae_scale_factor=self.scale_spatial, do_resize=False,
                                                     do_convert_rgb=True)
            image = processor.resize(image, height=height, width=width, resize_mode="crop")
            states = Pipeline._get_image_embeds(self.image_encoder, self.feature_extractor, image, self.device)
            z = Pipeline._get_image_latents(self.vae, processor, image, height, width, self.device).float()
            _, f, h, w = self.latent_shape(frames, height, width)
            latents = torch.cat([z, z.new_zeros(1, z.shape[1], f - 1, h, w)], dim=2)      # the image on frame 0
            mask = torch.zeros(1, 1, f, h, w, device=z.device)
            mask[:, :, 0] = 1.0
            self._cond_cache[prompt] = {"cond": torch.cat([latents, mask], dim=1)[0].to(self.dtype),
                                        "image": states[0].to(self.dtype)}
        return self._cond_cache[prompt]

    def _with_images(self, text: TextBatch, prompts: list[str]) -> TextBatch:
        conds = [self._condition(p) for p in prompts]
        return TextBatch(**text.parts, **{k: torch.stack([c[k] for c in conds]) for k in conds[0]})

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextBatch:
        """Rows of the text parts (Qwen, ByT5), ``cond`` and ``image``; cached per prompt."""
        return self._with_images(super().encode_prompts(prompts), prompts)

    @torch.no_grad()
    def encode_negative(self, negative_prompt: str, prompts: list[str]) -> TextBatch:
        """The negative prompt's text with each row's own image condition, as the pipeline's CFG."""
        text = cat_text([super().encode_prompts([negative_prompt])] * len(prompts))
        return self._with_images(text, prompts)

    def _image_inputs(self, x: torch.Tensor, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(text, TextBatch) or "cond" not in text.parts:
            raise ModelError("an image-to-video model needs the conditioning from its encode_prompts "
                             "(text embeddings with the image condition)")
        dev, dt = self.device, self.dtype
        return text.parts["cond"].to(device=dev, dtype=dt), text.parts["image"].to(device=dev, dtype=dt)


# The text-to-video family's transformer: its activation model, sequence-parallel plan (the image
# tokens join the replicated text stream) and text tokens (Qwen + ByT5 + 729 image tokens).
register(FamilySpec(name="hunyuan_video_1.5_i2v", pipeline="HunyuanVideo15ImageToVideoPipeline",
                    adapter=HunyuanVideo15I2VAdapter,
                    build=functools.partial(hunyuan_common.build, HunyuanVideo15I2VAdapter), tiny_init=TINY_I2V_INIT,
                    activation_profile=hunyuan_common.activation_profile, text_tokens=text_tokens,
                    init_from_folder=functools.partial(init_from_folder, parts=(
                        "transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder")),
                    sequence_parallel_plan=hunyuan_common.sequence_parallel_plan, staged=True))
