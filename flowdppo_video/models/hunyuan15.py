"""HunyuanVideo 1.5 text-to-video: diffusers ``HunyuanVideo15Transformer3DModel``,
``AutoencoderKLHunyuanVideo15`` (16x spatial), a Qwen2.5-VL text model (chat template, system
tokens cropped) and ByT5 for quoted glyph text.

Conditioning per prompt (a :class:`~.base.TextBatch`): Qwen states ``embeds`` with ``mask`` and
ByT5 states ``embeds_2`` with ``mask_2``. For text-to-video the transformer also takes zero
condition latents and mask (``2C + 1`` input channels) and zero image embeddings, as
``HunyuanVideo15Pipeline`` feeds it. CFG is true CFG (``sampler.guidance_scale``).
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import torch

from . import hunyuan_common
from .base import ModelError, TextBatch, VideoFlowAdapter, init_parts
from .common import (DTYPES, built_in, check_pipeline_folders, denoiser_part, drawn_denoiser, encoder_part,
                     skeleton)
from .hunyuan_common import HunyuanCommon
from .memory import read_part_configs
from .registry import FamilySpec, register
from .tokenizers import byte_tokenizer

# The tiny models' chat template (Qwen's layout); real checkpoints bring their own tokenizer.
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_PIPELINE_CROP = 108              # HunyuanVideo15Pipeline.prompt_template_encode_start_idx (its Qwen tokenizer)
BYT5_MAX_LENGTH = 256             # HunyuanVideo15Pipeline.tokenizer_2_max_length

TINY_INIT: dict[str, dict[str, Any]] = {
    "transformer": {"in_channels": 9, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
                    "num_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1,
                    "patch_size_t": 1, "text_embed_dim": 16, "text_embed_2_dim": 16, "image_embed_dim": 8,
                    "rope_axes_dim": [2, 2, 4], "target_size": 64, "task_type": "t2v"},
    "vae": {"latent_channels": 4, "block_out_channels": [8, 8, 8, 8, 8], "layers_per_block": 1,
            "spatial_compression_ratio": 16, "temporal_compression_ratio": 4},
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
    "text_encoder_2": {"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2},
}
_IMAGE_TOKENS = 729               # HunyuanVideo15Pipeline.vision_num_semantic_tokens


def _system_message() -> str:
    """The pipeline's own system prompt (the default of its text encoding function)."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def _crop_start(tokenizer: Any, system_message: str) -> int:
    """Chat-template tokens before the prompt: the pipeline's 108 for its Qwen tokenizer, else counted."""
    if "qwen" in type(tokenizer).__name__.lower():
        return _PIPELINE_CROP
    marker = "\x00"
    text = tokenizer.apply_chat_template([{"role": "system", "content": system_message},
                                          {"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    return len(tokenizer(text.split(marker)[0], add_special_tokens=False).input_ids)


class HunyuanVideo15Adapter(HunyuanCommon):
    """HunyuanVideo 1.5 T2V: the transformer trains; Qwen2.5-VL, ByT5 and the VAE are frozen.

    Its image-to-video sibling (:mod:`.hunyuan15_i2v`) subclasses it through the hooks below: the
    pipeline and family names, the tiny parts, the extra parts a directory holds
    (:meth:`_extra_pretrained`, :meth:`_extra_config`, :meth:`_extra_pipeline_parts`) and the
    condition channels and image embeddings the transformer takes (:meth:`_image_inputs`)."""

    PIPELINE = "HunyuanVideo15Pipeline"
    FAMILY = "hunyuan_video_1.5"
    TINY: dict[str, dict[str, Any]] = TINY_INIT

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 tokenizer: Any, text_encoder_2: torch.nn.Module, tokenizer_2: Any, *, device: torch.device,
                 dtype: torch.dtype, max_sequence_length: int,
                 scheduler_config: dict[str, Any] | None = None) -> None:
        self._setup(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, device, dtype,
                    max_sequence_length, scheduler_config)
        tcfg = self.transformer.config
        self.system_message = _system_message()
        self.crop_start = _crop_start(tokenizer, self.system_message)
        vcfg = self.vae.config
        self.latent_channels = int(vcfg.latent_channels)
        self.scale_temporal = int(vcfg.temporal_compression_ratio)
        self.scale_spatial = int(vcfg.spatial_compression_ratio)
        self.scaling_factor = float(vcfg.scaling_factor)
        self._text_cache: dict[str, TextBatch] = {}
        if int(tcfg.in_channels) != 2 * self.latent_channels + 1:
            raise ModelError(f"transformer in_channels {tcfg.in_channels} != 2 x vae latent_channels "
                             f"{self.latent_channels} + 1 (latents, condition latents, mask)")

    @classmethod
    def build(cls, path: str | None, init: dict[str, Any] | None, *, device: torch.device, dtype: str,
              max_sequence_length: int, seed: int = 0, embedded_guidance: float | None = None
              ) -> "HunyuanVideo15Adapter":
        if embedded_guidance is not None:
            raise ModelError("model.embedded_guidance: HunyuanVideo 1.5 has no embedded guidance "
                             "(use sampler.guidance_scale)")
        if path is not None:
            return cls.from_pretrained(path, device=device, dtype=dtype, max_sequence_length=max_sequence_length)
        return cls.from_config(init or {}, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
                               seed=seed)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device, dtype: str = "float32",
                        max_sequence_length: int = 1000) -> "HunyuanVideo15Adapter":
        """A ``HunyuanVideo15Pipeline`` directory (e.g. hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v), or
        the :attr:`PIPELINE` of a subclass."""
        from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
        from transformers import AutoTokenizer, Qwen2_5_VLTextModel, T5EncoderModel

        p = Path(path)
        check_pipeline_folders(p, "HunyuanVideo15Transformer3DModel", cls.FAMILY)
        tdtype = DTYPES[dtype]
        # A staged build (models.common.building) reads only its own parts' weights.
        transformer = denoiser_part(
            lambda: HunyuanVideo15Transformer3DModel.from_pretrained(p, subfolder="transformer", torch_dtype=tdtype),
            lambda: skeleton(HunyuanVideo15Transformer3DModel, p / "transformer", tdtype))
        vae = denoiser_part(lambda: AutoencoderKLHunyuanVideo15.from_pretrained(p, subfolder="vae", torch_dtype=torch.float32),
                            lambda: skeleton(AutoencoderKLHunyuanVideo15, p / "vae"), conditions=cls.takes_images)
        text_encoder = encoder_part(lambda: Qwen2_5_VLTextModel.from_pretrained(p / "text_encoder", dtype=tdtype),
                                    lambda: skeleton(Qwen2_5_VLTextModel, p / "text_encoder", tdtype))
        text_encoder_2 = encoder_part(lambda: T5EncoderModel.from_pretrained(p / "text_encoder_2", dtype=tdtype),
                                      lambda: skeleton(T5EncoderModel, p / "text_encoder_2", tdtype))
        sched = p / "scheduler" / "scheduler_config.json"
        return cls(transformer, vae, text_encoder, AutoTokenizer.from_pretrained(p / "tokenizer"), text_encoder_2,
                   AutoTokenizer.from_pretrained(p / "tokenizer_2"), device=device, dtype=tdtype,
                   max_sequence_length=max_sequence_length,
                   scheduler_config=json.loads(sched.read_text()) if sched.is_file() else None,
                   **cls._extra_pretrained(p, tdtype))

    @classmethod
    def from_config(cls, init: dict[str, Any], *, device: torch.device, dtype: str = "float32",
                    max_sequence_length: int = 1000, seed: int = 0) -> "HunyuanVideo15Adapter":
        """Random weights from sub-configs (missing ones take :attr:`TINY`); byte tokenizers
        (a chat template for the first, ByT5's own byte tokenizer for the second)."""
        from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
        from transformers import ByT5Tokenizer, Qwen2_5_VLTextModel, T5Config, T5EncoderModel
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

        parts = init_parts(init, cls.TINY)
        tok, tok_2 = byte_tokenizer(), ByT5Tokenizer()
        tok.chat_template = _CHAT_TEMPLATE
        tdtype = DTYPES[dtype]
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            # Created in the model dtype (never float32 first: the 8.3B transformer would need 33 GB);
            # the VAE stays float32, as from_pretrained keeps it.
            tr = dict(parts["transformer"])
            tr["rope_axes_dim"] = tuple(tr["rope_axes_dim"])
            with built_in(tdtype):
                transformer = drawn_denoiser(HunyuanVideo15Transformer3DModel(**tr))
            vcfg = dict(parts["vae"])
            vcfg["block_out_channels"] = tuple(vcfg["block_out_channels"])
            vae = drawn_denoiser(AutoencoderKLHunyuanVideo15(**vcfg), conditions=cls.takes_images)
            with built_in(tdtype):
                text_encoder = encoder_part(lambda: Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**{
                    "vocab_size": len(tok), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
                    **parts["text_encoder"]})))
                text_encoder_2 = encoder_part(
                    lambda: T5EncoderModel(T5Config(**{"vocab_size": len(tok_2), **parts["text_encoder_2"]})))
                extra = cls._extra_config(parts, tdtype)
        except (TypeError, ValueError, KeyError) as e:
            raise ModelError(f"bad model.init: {str(e).splitlines()[0]}") from None
        finally:
            torch.random.set_rng_state(state)
        if tdtype != torch.float32:            # the buffers computed in an explicit dtype
            transformer, text_encoder, text_encoder_2 = (m.to(tdtype) for m in (transformer, text_encoder,
                                                                                text_encoder_2))
        return cls(transformer, vae, text_encoder, tok, text_encoder_2, tok_2, device=device, dtype=tdtype,
                   max_sequence_length=max_sequence_length, **extra)

    @classmethod
    def _extra_pretrained(cls, path: Path, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the constructor loaded from a directory beyond the shared parts."""
        return {}

    @classmethod
    def _extra_config(cls, parts: dict[str, dict[str, Any]], dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the constructor built (seeded, in ``dtype``) from ``model.init`` parts."""
        return {}

    def _extra_pipeline_parts(self) -> dict[str, Any]:
        """The pipeline's components beyond the shared ones (for :meth:`save_pretrained`)."""
        return {}

    def save_pretrained(self, directory: Path) -> None:
        """A diffusers :attr:`PIPELINE` directory (``HunyuanVideo15Pipeline`` here)."""
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.guiders import ClassifierFreeGuidance

        scheduler = FlowMatchEulerDiscreteScheduler(**{"shift": 5.0, **{
            k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}})
        getattr(diffusers, self.PIPELINE)(
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, transformer=self.export_single(), vae=self.vae,
            scheduler=scheduler, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            guider=ClassifierFreeGuidance(), **self._extra_pipeline_parts()).save_pretrained(str(directory))
        self.copy_released_parts(Path(directory))

    def embed_text(self, prompts: list[str]) -> TextBatch:
        """The pipeline's own encoders (chat template, crop, layer -3; ByT5 for quoted text); no cache."""
        from diffusers import HunyuanVideo15Pipeline

        embeds, mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(
            self.text_encoder, self.tokenizer, prompts, self.device, tokenizer_max_length=self.max_sequence_length,
            system_message=self.system_message, crop_start=self.crop_start)
        embeds_2, mask_2 = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(
            self.tokenizer_2, self.text_encoder_2, prompts, self.device, tokenizer_max_length=BYT5_MAX_LENGTH)
        return TextBatch(embeds=embeds.to(self.dtype), mask=mask.long(), embeds_2=embeds_2.to(self.dtype),
                         mask_2=mask_2.long())

    def _image_inputs(self, x: torch.Tensor, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition latents with their mask ``(B, C + 1, F, H, W)`` and the image embeddings
        ``(B, N, D_image)`` that go with ``x``. Text-to-video: zeros, as ``HunyuanVideo15Pipeline``
        feeds them (all-zero image embeddings are masked out by the transformer)."""
        b, dev, dt = x.shape[0], self.device, self.dtype
        cond = torch.zeros((b, self.latent_channels + 1, *x.shape[2:]), device=dev, dtype=dt)
        image = torch.zeros((b, _IMAGE_TOKENS, int(self.transformer.config.image_embed_dim)), device=dev, dtype=dt)
        return cond, image

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: TextBatch, expert: int = 0) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        x = x.to(device=dev, dtype=dt)
        cond, image = self._image_inputs(x, text)
        t = text.parts
        # As the pipeline: masks in the transformer dtype.
        out = self.experts[expert](hidden_states=torch.cat([x, cond], dim=1),
                                   timestep=sigma.to(device=dev, dtype=torch.float32) * 1000.0,
                                   encoder_hidden_states=t["embeds"].to(device=dev, dtype=dt),
                                   encoder_attention_mask=t["mask"].to(device=dev, dtype=dt),
                                   encoder_hidden_states_2=t["embeds_2"].to(device=dev, dtype=dt),
                                   encoder_attention_mask_2=t["mask_2"].to(device=dev, dtype=dt),
                                   image_embeds=image, return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 1) -> torch.Tensor:
        # One video at a time: AutoencoderKLHunyuanVideo15's mid-block attention mask does not
        # broadcast over a batch of 2+ in diffusers 0.42 (a shape error in its decoder).
        return super().decode(latents, chunk=1)


def text_tokens(adapter: VideoFlowAdapter) -> int:
    """Tokens each video token attends to: the Qwen text, ByT5's and the (zero) image embeddings."""
    return int(adapter.max_sequence_length) + BYT5_MAX_LENGTH + _IMAGE_TOKENS


def init_from_folder(folder: Path, parts: tuple[str, ...] = ("transformer", "vae", "text_encoder", "text_encoder_2")
                     ) -> tuple[dict[str, Any], list[str]]:
    """``model.init`` of a folder of ``<part>/config.json`` files (the four parts) for the planner."""
    return read_part_configs(folder, parts)


# HunyuanVideo 1.5 T2V (image-to-video: hunyuan15_i2v.py).
register(FamilySpec(name="hunyuan_video_1.5", pipeline="HunyuanVideo15Pipeline", adapter=HunyuanVideo15Adapter,
                    build=functools.partial(hunyuan_common.build, HunyuanVideo15Adapter), tiny_init=TINY_INIT,
                    activation_profile=hunyuan_common.activation_profile, text_tokens=text_tokens,
                    init_from_folder=init_from_folder, sequence_parallel_plan=hunyuan_common.sequence_parallel_plan,
                    staged=True))
