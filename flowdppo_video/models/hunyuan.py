"""HunyuanVideo (1.0) text-to-video: diffusers ``HunyuanVideoTransformer3DModel``,
``AutoencoderKLHunyuanVideo``, a Llama text encoder (prompt template, template tokens cropped)
and CLIP's pooled projection.

The conditioning is three tensors per prompt (a :class:`~.base.TextBatch`): Llama hidden states
``embeds`` ``(L, D)``, their attention ``mask`` ``(L,)`` (the transformer builds the joint
image-text attention mask from it) and CLIP's ``pooled`` ``(D_pool,)``. The embedded (distilled)
guidance scale is fed to the transformer at every step: it is part of the policy, fixed per run
(``model.embedded_guidance``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from . import hunyuan_common
from .base import ModelError, TextBatch, init_parts
from .common import DTYPES, built_in, check_pipeline_folders, encoder_part, skeleton
from .hunyuan_common import CLIP_MAX_LENGTH, HunyuanCommon, load_shared_parts, tiny_transformer_and_vae
from .memory import read_part_configs
from .registry import FamilySpec, register
from .tokenizers import byte_tokenizer

DEFAULT_EMBEDDED_GUIDANCE = 6.0            # HunyuanVideoPipeline's `guidance_scale` default

# A tiny HunyuanVideo for tests: every part is the real diffusers / transformers class.
TINY_INIT: dict[str, dict[str, Any]] = {
    "transformer": {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
                    "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0,
                    "patch_size": 2, "patch_size_t": 1, "guidance_embeds": True, "text_embed_dim": 16,
                    "pooled_projection_dim": 8, "rope_axes_dim": [2, 2, 4]},
    "vae": {"latent_channels": 4, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1,
            "norm_num_groups": 4, "spatial_compression_ratio": 8, "temporal_compression_ratio": 4,
            "mid_block_add_attention": False},
    "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
                     "num_attention_heads": 2, "num_key_value_heads": 2},
    "text_encoder_2": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "projection_dim": 8},
}
def _crop_start(tokenizer: Any, template: str) -> int:
    """Tokens of the prompt template before the prompt, as the pipeline crops them.

    HunyuanVideo's own Llama tokenizer: the pipeline's fixed 95. Any other tokenizer (the tiny
    models' byte tokenizer): counted, leading special tokens (BOS) included, trailing ones not.
    """
    if "llama" in type(tokenizer).__name__.lower():
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        return int(DEFAULT_PROMPT_TEMPLATE["crop_start"])
    prefix = template.split("{}")[0]
    full = tokenizer(prefix, add_special_tokens=True).input_ids
    empty = tokenizer("", add_special_tokens=True).input_ids
    lead = 0
    while lead < len(empty) and lead < len(full) and full[lead] == empty[lead]:
        lead += 1
    return len(full) - (len(empty) - lead)


class HunyuanVideoAdapter(HunyuanCommon):
    """HunyuanVideo T2V: the transformer trains; Llama, CLIP and the VAE are frozen."""

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 tokenizer: Any, text_encoder_2: torch.nn.Module, tokenizer_2: Any, *, device: torch.device,
                 dtype: torch.dtype, max_sequence_length: int, embedded_guidance: float | None = None,
                 scheduler_config: dict[str, Any] | None = None) -> None:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        self._setup(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, device, dtype,
                    max_sequence_length, scheduler_config)
        tcfg = self.transformer.config
        self.embedded_guidance = DEFAULT_EMBEDDED_GUIDANCE if embedded_guidance is None else float(embedded_guidance)
        if not tcfg.guidance_embeds:
            self.embedded_guidance = None            # a model without the guidance embedder
        self.prompt_template = {"template": DEFAULT_PROMPT_TEMPLATE["template"],
                                "crop_start": _crop_start(tokenizer, DEFAULT_PROMPT_TEMPLATE["template"])}
        vcfg = self.vae.config
        self.latent_channels = int(vcfg.latent_channels)
        self.scale_temporal = int(vcfg.temporal_compression_ratio)
        self.scale_spatial = int(vcfg.spatial_compression_ratio)
        self.scaling_factor = float(vcfg.scaling_factor)
        self._text_cache: dict[str, TextBatch] = {}
        if int(tcfg.in_channels) != self.latent_channels:
            raise ModelError(f"transformer in_channels {tcfg.in_channels} != vae latent_channels {self.latent_channels}")
        if int(text_encoder.config.hidden_size) != int(tcfg.text_embed_dim):
            raise ModelError(f"text_encoder hidden_size {text_encoder.config.hidden_size} != transformer "
                             f"text_embed_dim {tcfg.text_embed_dim}")
        if int(text_encoder_2.config.hidden_size) != int(tcfg.pooled_projection_dim):
            raise ModelError(f"text_encoder_2 hidden_size {text_encoder_2.config.hidden_size} != transformer "
                             f"pooled_projection_dim {tcfg.pooled_projection_dim}")

    # ---------------------------------------------------------------- building
    @classmethod
    def build(cls, path: str | None, init: dict[str, Any] | None, *, device: torch.device, dtype: str,
              max_sequence_length: int, seed: int = 0, embedded_guidance: float | None = None
              ) -> "HunyuanVideoAdapter":
        if path is not None:
            return cls.from_pretrained(path, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
                                       embedded_guidance=embedded_guidance)
        return cls.from_config(init or {}, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
                               seed=seed, embedded_guidance=embedded_guidance)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device, dtype: str = "float32",
                        max_sequence_length: int = 256, embedded_guidance: float | None = None
                        ) -> "HunyuanVideoAdapter":
        """A ``HunyuanVideoPipeline`` directory (e.g. hunyuanvideo-community/HunyuanVideo)."""
        from transformers import LlamaModel

        p = Path(path)
        check_pipeline_folders(p, "HunyuanVideoTransformer3DModel", "hunyuan_video")
        tdtype = DTYPES[dtype]
        s = load_shared_parts(p, tdtype)
        text_encoder = encoder_part(lambda: LlamaModel.from_pretrained(p / "text_encoder", dtype=tdtype),
                                    lambda: skeleton(LlamaModel, p / "text_encoder", tdtype))
        return cls(s["transformer"], s["vae"], text_encoder,
                   s["tokenizer"], s["text_encoder_2"], s["tokenizer_2"], device=device, dtype=tdtype,
                   max_sequence_length=max_sequence_length, embedded_guidance=embedded_guidance,
                   scheduler_config=s["scheduler_config"])

    @classmethod
    def from_config(cls, init: dict[str, Any], *, device: torch.device, dtype: str = "float32",
                    max_sequence_length: int = 256, seed: int = 0, embedded_guidance: float | None = None
                    ) -> "HunyuanVideoAdapter":
        """Random weights from sub-configs (missing ones take :data:`TINY_INIT`); byte tokenizers."""
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        parts = init_parts(init, TINY_INIT)
        tok, tok_2 = byte_tokenizer(), byte_tokenizer()
        tok_2.model_max_length = CLIP_MAX_LENGTH
        tdtype = DTYPES[dtype]
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            # Created in the model dtype (never float32 first: the 13B transformer would need 52 GB);
            # the VAE stays float32, as from_pretrained keeps it.
            transformer, vae = tiny_transformer_and_vae(parts, tdtype)
            with built_in(tdtype):
                text_encoder = encoder_part(lambda: LlamaModel(LlamaConfig(**{
                    "vocab_size": len(tok), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
                    **parts["text_encoder"]})))
                text_encoder_2 = encoder_part(lambda: CLIPTextModel(CLIPTextConfig(**{
                    "vocab_size": len(tok_2), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
                    "max_position_embeddings": CLIP_MAX_LENGTH, **parts["text_encoder_2"]})))
        except (TypeError, ValueError) as e:
            raise ModelError(f"bad model.init: {str(e).splitlines()[0]}") from None
        finally:
            torch.random.set_rng_state(state)
        if tdtype != torch.float32:            # the buffers computed in an explicit dtype
            transformer, text_encoder, text_encoder_2 = (m.to(tdtype) for m in (transformer, text_encoder,
                                                                                text_encoder_2))
        return cls(transformer, vae, text_encoder, tok, text_encoder_2, tok_2,
                   device=device, dtype=tdtype, max_sequence_length=max_sequence_length,
                   embedded_guidance=embedded_guidance)

    def save_pretrained(self, directory: Path) -> None:
        """A diffusers ``HunyuanVideoPipeline`` directory (``HunyuanVideoPipeline.from_pretrained`` loads it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

        scheduler = FlowMatchEulerDiscreteScheduler(**{"shift": 7.0, **{
            k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}})
        HunyuanVideoPipeline(text_encoder=self.text_encoder, tokenizer=self.tokenizer, transformer=self.export_single(),
                             vae=self.vae, scheduler=scheduler, text_encoder_2=self.text_encoder_2,
                             tokenizer_2=self.tokenizer_2).save_pretrained(str(directory))
        self.copy_released_parts(Path(directory))

    # ---------------------------------------------------------------- the interface
    def embed_text(self, prompts: list[str]) -> TextBatch:
        """The pipeline's own ``encode_prompt`` (template, crop, layer -3, CLIP pooled); no cache."""
        from diffusers import HunyuanVideoPipeline

        pipe = HunyuanVideoPipeline(text_encoder=self.text_encoder, tokenizer=self.tokenizer, transformer=None,
                                    vae=None, scheduler=None, text_encoder_2=self.text_encoder_2,
                                    tokenizer_2=self.tokenizer_2)
        embeds, pooled, mask = pipe.encode_prompt(prompts, prompt_template=self.prompt_template, device=self.device,
                                                  dtype=self.dtype, max_sequence_length=self.max_sequence_length)
        return TextBatch(embeds=embeds.to(self.dtype), mask=mask.long(), pooled=pooled.to(self.dtype))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: TextBatch, expert: int = 0) -> torch.Tensor:
        b, dev = x.shape[0], self.device
        timestep = sigma.to(device=dev, dtype=torch.float32) * 1000.0
        guidance = None
        if self.embedded_guidance is not None:
            # As the pipeline: the distilled guidance scale times 1000, one per row.
            guidance = torch.full((b,), self.embedded_guidance * 1000.0, device=dev, dtype=self.dtype)
        t = text.parts
        out = self.experts[expert](hidden_states=x.to(device=dev, dtype=self.dtype), timestep=timestep,
                                   encoder_hidden_states=t["embeds"].to(device=dev, dtype=self.dtype),
                                   encoder_attention_mask=t["mask"].to(device=dev),
                                   pooled_projections=t["pooled"].to(device=dev, dtype=self.dtype),
                                   guidance=guidance, return_dict=False)[0]
        return out.float()


def init_from_folder(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """``model.init`` of a folder of ``<part>/config.json`` files (the four parts) for the planner."""
    return read_part_configs(folder, ("transformer", "vae", "text_encoder", "text_encoder_2"))


# HunyuanVideo (1.0) T2V.
register(FamilySpec(name="hunyuan_video", pipeline="HunyuanVideoPipeline", adapter=HunyuanVideoAdapter,
                    build=functools.partial(hunyuan_common.build, HunyuanVideoAdapter), tiny_init=TINY_INIT,
                    activation_profile=hunyuan_common.activation_profile, init_from_folder=init_from_folder,
                    sequence_parallel_plan=hunyuan_common.sequence_parallel_plan, staged=True))
