"""What the HunyuanVideo families share (1.0 text-to-video, its image-to-video, 1.5): the adapter
base over their causal VAEs and two text encoders, loading and building the parts 1.0 and its
image-to-video have alike, and where sequence parallelism cuts their transformers (the same
double- and single-stream joint attention in both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flowdppo_video.runs.config import ModelConfig

from ._training import TrainableExperts
from .activations import F32, ActivationProfile, BlockBytes, Linears, rms, trains
from .base import SequenceParallelPlan, TextBatch, VideoFlowAdapter, cat_text, causal_latent_shape
from .common import built_in, denoiser_part, drawn_denoiser, encoder_part, place, skeleton

CLIP_MAX_LENGTH = 77              # CLIP's text length (the pooled-projection encoder of 1.0 and its I2V)


class HunyuanCommon(TrainableExperts, VideoFlowAdapter):
    """What HunyuanVideo 1.0 and 1.5 share: the latent grid of their causal VAEs (``scaling_factor``,
    ``spatial``/``temporal_compression_ratio``), decoding, and per-prompt caching of a
    :class:`TextBatch` conditioning made by ``embed_text``."""

    scale_temporal: int
    scale_spatial: int
    scaling_factor: float
    latent_channels: int
    _text_cache: dict[str, TextBatch]
    masks_attention = True             # the joint attention masks the text padding on every forward

    def _setup(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
               tokenizer: Any, text_encoder_2: torch.nn.Module, tokenizer_2: Any, device: torch.device,
               dtype: torch.dtype, max_sequence_length: int, scheduler_config: dict[str, Any] | None) -> None:
        """One trainable transformer; two frozen text encoders and the frozen VAE on ``device``."""
        self.device, self.dtype, self.max_sequence_length = device, dtype, max_sequence_length
        self.experts = [place(transformer, device)]
        self.trained = [0]
        self._init_training()
        self.vae = place(vae, device).eval().requires_grad_(False)
        self.text_encoder = place(text_encoder, device).eval().requires_grad_(False)
        self.text_encoder_2 = place(text_encoder_2, device).eval().requires_grad_(False)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler_config = scheduler_config or {}
        tcfg = self.transformer.config
        self.patch_size = (int(tcfg.patch_size_t), int(tcfg.patch_size), int(tcfg.patch_size))

    def embed_text(self, prompts: list[str]) -> TextBatch:
        raise NotImplementedError

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return causal_latent_shape(num_frames, height, width, self.scale_temporal, self.scale_spatial,
                                   self.patch_size, self.latent_channels)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextBatch:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            batch = self.embed_text(missing)
            for i, p in enumerate(missing):
                self._text_cache[p] = batch[i:i + 1]
        return cat_text([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 2) -> torch.Tensor:
        outs = []
        for part in latents.split(chunk):
            z = part.to(self.device, torch.float32) / self.scaling_factor
            video = self.vae.decode(z, return_dict=False)[0]        # (b, 3, F, H, W) in [-1, 1]
            video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            outs.append(video.permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(outs)


def load_shared_parts(p: Path, tdtype: torch.dtype, conditions: bool = False) -> dict[str, Any]:
    """What every HunyuanVideo pipeline directory holds alike (text-to-video and image-to-video):
    the transformer, the VAE (float32), the CLIP text encoder, both tokenizers, the scheduler config;
    a staged build's parts only (``conditions``: the VAE encodes the prompts' images too)."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import AutoTokenizer, CLIPTextModel

    sched = p / "scheduler" / "scheduler_config.json"
    return {"transformer": denoiser_part(
                lambda: HunyuanVideoTransformer3DModel.from_pretrained(p, subfolder="transformer", torch_dtype=tdtype),
                lambda: skeleton(HunyuanVideoTransformer3DModel, p / "transformer", tdtype)),
            "vae": denoiser_part(
                lambda: AutoencoderKLHunyuanVideo.from_pretrained(p, subfolder="vae", torch_dtype=torch.float32),
                lambda: skeleton(AutoencoderKLHunyuanVideo, p / "vae"), conditions=conditions),
            "text_encoder_2": encoder_part(lambda: CLIPTextModel.from_pretrained(p / "text_encoder_2", dtype=tdtype),
                                           lambda: skeleton(CLIPTextModel, p / "text_encoder_2", tdtype)),
            "tokenizer": AutoTokenizer.from_pretrained(p / "tokenizer"),
            "tokenizer_2": AutoTokenizer.from_pretrained(p / "tokenizer_2"),
            "scheduler_config": json.loads(sched.read_text()) if sched.is_file() else None}


def tiny_transformer_and_vae(parts: dict[str, dict[str, Any]], dtype: torch.dtype = torch.float32,
                             conditions: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``HunyuanVideoTransformer3DModel`` (created in ``dtype``) and ``AutoencoderKLHunyuanVideo``
    (float32) from ``model.init`` parts (random weights; the caller seeds and turns errors into
    ModelError)."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    tr = dict(parts["transformer"])
    tr["rope_axes_dim"] = tuple(tr["rope_axes_dim"])
    vcfg = dict(parts["vae"])
    n = len(vcfg["block_out_channels"])
    vcfg.setdefault("down_block_types", ["HunyuanVideoDownBlock3D"] * n)
    vcfg.setdefault("up_block_types", ["HunyuanVideoUpBlock3D"] * n)
    with built_in(dtype):
        transformer = drawn_denoiser(HunyuanVideoTransformer3DModel(**tr))
    return transformer, drawn_denoiser(AutoencoderKLHunyuanVideo(**vcfg), conditions=conditions)


def sequence_parallel_plan(transformer: torch.nn.Module) -> SequenceParallelPlan:
    """Ulysses SP on a ``HunyuanVideoTransformer3DModel`` (1.0) or ``HunyuanVideo15Transformer3DModel``.

    ``x_embedder`` flattens the patches into ``(B, N, D)`` before the first block (sharded there);
    ``rope`` returns ``(cos, sin)`` of ``(N, d)`` (sharded on its output). Every block's attention is
    joint (video tokens, then the text tokens): the video part goes through the all-to-all, the
    text, replicated on every rank, is split by heads; the attention masks the models build (over
    the full or the local token count) are laid out again for the gathered sequence. The text
    stream itself stays replicated, and so does the text refiner (``context_embedder``) before the
    blocks. ``proj_out`` (per token) gathers the tokens before unpatchifying.
    """
    cfg = transformer.config
    pt, p = int(cfg.patch_size_t), int(cfg.patch_size)
    return SequenceParallelPlan(heads=int(cfg.num_attention_heads), patch=(pt, p, p),
                                tokens_enter="transformer_blocks.0", tokens_leave="proj_out", rotary="rope",
                                rotary_token_dim=0,
                                attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
                                replicated=("context_embedder.*",))


def build(cls: Any, cfg: ModelConfig, path: str | None, device: torch.device) -> VideoFlowAdapter:
    """A HunyuanVideo adapter of class ``cls`` (its ``build``: loaded from ``path`` or built from
    ``cfg.init``)."""
    return cls.build(path, cfg.init, device=device, dtype=cfg.dtype, max_sequence_length=cfg.max_sequence_length,
                     seed=cfg.init_seed, embedded_guidance=cfg.embedded_guidance)


def activation_profile(t: torch.nn.Module, s: int) -> ActivationProfile:
    """HunyuanVideo 1.0 (double- and single-stream blocks) and 1.5 (double-stream): the joint
    sequence is image tokens + text tokens; norms and modulation in the model dtype."""
    c = t.config
    H, hd = int(c.num_attention_heads), int(c.attention_head_dim)
    D = H * hd
    lin = Linears(s)
    doubles = list(getattr(t, "transformer_blocks", []))
    singles = list(getattr(t, "single_transformer_blocks", []))
    total, largest = BlockBytes(), BlockBytes()
    live = 0.0
    for blk in doubles:
        full = trains(blk.norm1)
        Fw = int(blk.ff.net[0].proj.out_features)
        a = blk.attn

        def stream(q: Any, k: Any, v: Any, out: Any, nq: Any, nk: Any, ff: Any) -> float:
            b = s * D + 8 + (s * D if full else 0)                   # norm1 (model dtype) and modulation
            b += lin.saved([q, k, v], D) + rms(nq, s, hd, H) * 1 + rms(nk, s, hd, H)
            b += 4 * s * D + F32 * H                                 # joint attention q, k, v, out, lse
            b += lin.saved([out], D, counted=True)
            b += s * D if full else 0                                # gate
            b += s * D + 8 + (s * D if full else 0)                  # norm2 and modulation
            b += lin.saved([ff.net[0].proj], D) + s * Fw + lin.saved([ff.net[2]], Fw)
            b += s * D if full else 0                                # gate
            return b

        img = stream(a.to_q, a.to_k, a.to_v, a.to_out[0], a.norm_q, a.norm_k, blk.ff)
        txt = stream(a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_add_out, a.norm_added_q, a.norm_added_k,
                     blk.ff_context)
        b = BlockBytes(img, txt)
        total = total + b
        largest = b if b.per_token > largest.per_token else largest
        live = max(live, s * D * 2 + max(5 * s * D, s * D + 2 * s * Fw))
    for blk in singles:
        full = trains(blk.norm)
        Fw = int(blk.proj_mlp.out_features)
        a = blk.attn
        b = s * D + 8 + (s * D if full else 0)
        b += lin.saved([a.to_q, a.to_k, a.to_v, blk.proj_mlp], D) + s * Fw
        b += rms(a.norm_q, s, hd, H) + rms(a.norm_k, s, hd, H)
        b += 4 * s * D + F32 * H
        b += lin.saved([blk.proj_out], D + Fw) + (s * D if full else 0)
        bb = BlockBytes(b, b)                                        # one joint sequence
        total = total + bb
        largest = bb if bb.per_token > largest.per_token else largest
        live = max(live, s * D * 2 + max(5 * s * D, s * (D + 2 * Fw)))
    n = len(doubles) + len(singles)
    inputs = BlockBytes(s * D * n, s * D * n)
    total = total + BlockBytes(2 * F32 * hd)                         # RoPE tables kept by the blocks
    outside = BlockBytes(s * D + 8 + lin.saved([t.proj_out], D), 0.0)
    return ActivationProfile(total, largest, inputs, outside, BlockBytes(live, live), H)
