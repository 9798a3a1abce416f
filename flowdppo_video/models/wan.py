"""Wan 2.1 and 2.2 text-to-video (diffusers ``WanTransformer3DModel``, ``AutoencoderKLWan``, UMT5).

Wan 2.2 A14B is a mixture of two experts: ``transformer`` takes the high-noise steps
(``sigma * 1000 >= boundary_ratio * 1000``, as ``WanPipeline`` routes them) and
``transformer_2`` the rest. Wan 2.2 TI2V-5B is one transformer fed per-token timesteps
(``expand_timesteps``) over a 16x-compressing autoencoder.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any

import torch

from flowdppo_video.runs.config import ModelConfig

from ._training import EXPERT_DIRS, TrainableExperts
from .activations import F32, ActivationProfile, BlockBytes, Linears, rms, trains
from .base import ModelError, SequenceParallelPlan, VideoFlowAdapter, causal_latent_shape, init_parts
from .common import (DTYPES, built_in, denoiser_part, drawn_denoiser, encoder_part, place,
                     skeleton, vae_latent_stats)
from .memory import SMALL_CHECKPOINT_BYTES, read_json, read_part_configs
from .pixel_vae import PixelAutoencoder
from .registry import FamilySpec, register
from .tokenizers import byte_tokenizer, word_tokenizer

EXPERT_NAMES = ("high", "low")                 # model.train_experts -> transformer, transformer_2

# A tiny Wan for tests and demos: every part is the real diffusers / transformers class.
TINY_INIT: dict[str, dict[str, Any]] = {
    "transformer": {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16,
                    "in_channels": 4, "out_channels": 4, "text_dim": 32, "freq_dim": 32,
                    "ffn_dim": 64, "num_layers": 2, "rope_max_seq_len": 64},
    "vae": {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]},
    "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                     "relative_attention_num_buckets": 8},
}
# Optional parts of `model.init`: (Wan 2.2) a second expert (its config over `transformer`'s) and
# the pipeline's routing settings; a word-level tokenizer (`tokenizer: {words: [...]}`, small
# vocabularies such as the shapes world's) instead of the byte tokenizer.
OPTIONAL_INIT = ("transformer_2", "pipeline", "tokenizer")
# A checkpoint's or `model.init`'s vae `_class_name`: the video autoencoder (default) or the identity
# pixel autoencoder.
_VAE_CLASSES = ("AutoencoderKLWan", "PixelAutoencoder")


def _vae_class(name: str) -> type | None:
    """The autoencoder class a ``_class_name`` names (one of :data:`_VAE_CLASSES`), else None."""
    if name == "AutoencoderKLWan":
        from diffusers import AutoencoderKLWan
        return AutoencoderKLWan
    if name == "PixelAutoencoder":
        return PixelAutoencoder
    return None
_PIPELINE_KEYS = ("boundary_ratio", "expand_timesteps", "position_channels")


def _check_checkpoint_dir(path: Path, pipeline: str = "WanPipeline") -> None:
    if not path.exists():
        raise ModelError(f"model.path {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ModelError(f"model.path {path} is not a diffusers checkpoint (no model_index.json)")
    cfg_file = path / "transformer" / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"model.path {path} has no transformer/config.json")
    cls = json.loads(cfg_file.read_text()).get("_class_name")
    if cls != "WanTransformer3DModel":
        raise ModelError(f"model.path {path} holds a {cls}, not a WanTransformer3DModel "
                         "(model.family is 'wan')")
    index = json.loads((path / "model_index.json").read_text())
    pipe = index.get("_class_name")
    if pipe not in (None, pipeline):
        family = "wan_i2v" if pipeline == "WanImageToVideoPipeline" else "wan"
        raise ModelError(f"model.path {path} is a {pipe} checkpoint; model.family {family!r} takes "
                         f"{pipeline} checkpoints")
    if (index.get("transformer_2") or [None])[0] is not None:
        if not (path / "transformer_2" / "config.json").is_file():
            raise ModelError(f"model.path {path}: model_index.json names a transformer_2 but there is no "
                             "transformer_2/config.json")
        if index.get("boundary_ratio") is None:
            raise ModelError(f"model.path {path}: a transformer_2 needs boundary_ratio in model_index.json")
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not (path / sub).is_dir():
            raise ModelError(f"model.path {path} has no {sub}/ folder")
    if not (path / "vae" / "config.json").is_file():
        raise ModelError(f"model.path {path} has no vae/config.json")


class WanAdapter(TrainableExperts, VideoFlowAdapter):
    """Wan 2.1 / 2.2 T2V: the transformer(s) train; UMT5 and the VAE are frozen.

    ``transformer_2`` and ``boundary_ratio`` make a Wan 2.2 A14B mixture of experts;
    ``expand_timesteps`` feeds one timestep per latent token (Wan 2.2 TI2V-5B).
    ``train_experts`` (of :data:`EXPERT_NAMES`) picks the experts that train; the others stay
    frozen and get neither LoRA adapters nor optimizer state.
    """

    # What subclasses (Wan image-to-video, models/wan_i2v.py) change: the pipeline their checkpoints
    # declare, their tiny defaults, and the extra parts they load or build (see the `_extra_*` hooks).
    PIPELINE = "WanPipeline"
    TINY = TINY_INIT
    CONDITION_LABEL = "position channels"

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 tokenizer: Any, *, device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int, scheduler_config: dict[str, Any] | None = None,
                 transformer_2: torch.nn.Module | None = None, boundary_ratio: float | None = None,
                 expand_timesteps: bool = False, train_experts: list[str] | None = None,
                 position_channels: int = 0) -> None:
        self.device = device
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        # Dtypes are set at load time (from_pretrained keeps Wan's float32 norms); only move here.
        self.experts: list[torch.nn.Module] = [place(t, device) for t in (transformer, transformer_2)
                                               if t is not None]
        self._init_training()
        if self.num_experts > 1 and boundary_ratio is None:
            raise ModelError("a Wan 2.2 transformer_2 needs a boundary_ratio (model_index.json)")
        if boundary_ratio is not None and not 0.0 < boundary_ratio < 1.0:
            raise ModelError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
        self.boundary_ratio = boundary_ratio if self.num_experts > 1 else None
        self.expand_timesteps = bool(expand_timesteps)
        names = EXPERT_NAMES[:self.num_experts]
        wanted = list(names) if train_experts is None else list(train_experts)
        extra = [e for e in wanted if e not in names]
        if extra:
            raise ModelError(f"model.train_experts {wanted}: this model has only the {list(names)} expert(s) "
                             "(a second, low-noise expert is Wan 2.2 A14B's transformer_2)")
        self.trained = [names.index(e) for e in names if e in wanted]
        self.vae = place(vae, device).eval().requires_grad_(False)
        self.text_encoder = place(text_encoder, device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config or {}
        self.patch_size = tuple(int(p) for p in self.transformer.config.patch_size)
        self._text_cache: dict[str, torch.Tensor] = {}
        vcfg = self.vae.config
        self.latent_channels = int(vcfg.z_dim)
        self.scale_temporal = 2 ** sum(bool(t) for t in vcfg.temperal_downsample)
        # Wan 2.2's VAE also folds 2x2 pixels into channels first (its `patch_size`): 16x in all.
        self.scale_spatial = 2 ** len(vcfg.temperal_downsample) * int(getattr(vcfg, "patch_size", None) or 1)
        # Optional clean conditioning channels (t, y, x) in [-1, 1] appended to the noisy latent, as
        # Wan I2V appends its image channels: they give a small model absolute positions, which
        # Wan's relative RoPE does not (the shapes-world model uses them; real Wan checkpoints: 0).
        self.position_channels = int(position_channels)
        if self.position_channels not in (0, 3, 5):
            raise ModelError(f"position_channels must be 0, 3 or 5, got {position_channels}")
        self._positions: dict[tuple[int, ...], torch.Tensor] = {}
        for i, t in enumerate(self.experts):
            if int(t.config.in_channels) != self.latent_channels + self._condition_channels():
                n = self._condition_channels()
                extra = f" + {n} {self.CONDITION_LABEL}" if n else ""
                raise ModelError(f"{EXPERT_DIRS[i]} in_channels {t.config.in_channels} != "
                                 f"vae z_dim {self.latent_channels}{extra}")
            if tuple(int(p) for p in t.config.patch_size) != self.patch_size:
                raise ModelError("transformer and transformer_2 have different patch sizes")

    # ---------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device, dtype: str = "float32",
                        max_sequence_length: int = 512, train_experts: list[str] | None = None) -> "WanAdapter":
        from diffusers import WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        p = Path(path)
        _check_checkpoint_dir(p, cls.PIPELINE)
        tdtype = DTYPES[dtype]
        index = json.loads((p / "model_index.json").read_text())
        # A staged build (models.common.building) reads only its own parts' weights.
        transformer = denoiser_part(
            lambda: WanTransformer3DModel.from_pretrained(p, subfolder="transformer", torch_dtype=tdtype),
            lambda: skeleton(WanTransformer3DModel, p / "transformer", tdtype))
        transformer_2 = None
        if (index.get("transformer_2") or [None])[0] is not None:
            transformer_2 = denoiser_part(
                lambda: WanTransformer3DModel.from_pretrained(p, subfolder="transformer_2", torch_dtype=tdtype),
                lambda: skeleton(WanTransformer3DModel, p / "transformer_2", tdtype))
        vae_cls = json.loads((p / "vae" / "config.json").read_text()).get("_class_name", "AutoencoderKLWan")
        vae_type = _vae_class(vae_cls)
        if vae_type is None:
            raise ModelError(f"model.path {p}: vae is a {vae_cls}, expected AutoencoderKLWan or PixelAutoencoder")
        vae = denoiser_part(lambda: vae_type.from_pretrained(p, subfolder="vae", torch_dtype=torch.float32),
                            lambda: skeleton(vae_type, p / "vae"), conditions=cls.takes_images)
        text_encoder = encoder_part(lambda: UMT5EncoderModel.from_pretrained(p / "text_encoder", dtype=tdtype),
                                    lambda: skeleton(UMT5EncoderModel, p / "text_encoder", tdtype))
        tokenizer = AutoTokenizer.from_pretrained(p / "tokenizer")
        sched = p / "scheduler" / "scheduler_config.json"
        sched_cfg = json.loads(sched.read_text()) if sched.is_file() else None
        return cls(transformer, vae, text_encoder, tokenizer, device=device, dtype=tdtype,
                   max_sequence_length=max_sequence_length, scheduler_config=sched_cfg,
                   transformer_2=transformer_2, boundary_ratio=index.get("boundary_ratio"),
                   expand_timesteps=bool(index.get("expand_timesteps", False)), train_experts=train_experts,
                   position_channels=int(index.get("position_channels", 0)), **cls._extra_pretrained(p, index))

    @classmethod
    def from_config(cls, init: dict[str, Any], *, device: torch.device, dtype: str = "float32",
                    max_sequence_length: int = 512, seed: int = 0,
                    train_experts: list[str] | None = None) -> "WanAdapter":
        """Random weights from sub-configs ``transformer``, ``vae``, ``text_encoder`` (tests, demos).

        Missing sub-configs take :data:`TINY_INIT`; the tokenizer is :func:`byte_tokenizer`, or
        :func:`word_tokenizer` with ``tokenizer: {words: [...]}``; ``vae: {_class_name:
        PixelAutoencoder, z_dim}`` gives pixel-space latents (no autoencoder defaults merged).
        Wan 2.2: ``transformer_2`` (overrides of ``transformer``'s config; its presence makes two
        experts) and ``pipeline: {boundary_ratio, expand_timesteps, position_channels}``.
        """
        from diffusers import WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        parts = init_parts(init, cls.TINY, tuple(OPTIONAL_INIT))
        pipeline = dict(init.get("pipeline", {}))
        unknown = set(pipeline) - set(_PIPELINE_KEYS)
        if unknown:
            raise ModelError(f"unknown model.init.pipeline key(s) {sorted(unknown)}; known: {list(_PIPELINE_KEYS)}")
        tok = dict(init.get("tokenizer", {}))
        if set(tok) - {"words"}:
            raise ModelError(f"unknown model.init.tokenizer key(s) {sorted(set(tok) - {'words'})}; known: ['words']")
        tokenizer = word_tokenizer(list(tok["words"])) if "words" in tok else byte_tokenizer()
        tcfg = dict(parts["text_encoder"])
        tcfg.setdefault("vocab_size", len(tokenizer))
        vae_name = init.get("vae", {}).get("_class_name", "AutoencoderKLWan")
        vae_type = _vae_class(vae_name)
        if vae_type is None:
            raise ModelError(f"model.init.vae._class_name must be one of {list(_VAE_CLASSES)}, got {vae_name!r}")
        # The pixel autoencoder takes only its own keys: the tiny video autoencoder's are not merged in.
        vcfg = {k: v for k, v in (parts["vae"] if vae_name == "AutoencoderKLWan" else init["vae"]).items()
                if k != "_class_name"}
        z = int(vcfg["z_dim"])
        vcfg.setdefault("latents_mean", [0.0] * z)
        vcfg.setdefault("latents_std", [1.0] * z)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        # On CUDA the weights are drawn there (seconds, where a host takes minutes for a real-size
        # UMT5); the CUDA generator gives other values than the CPU's for the same seed.
        on_device = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
        try:
            # The transformers and the text encoder are created in the model dtype (a real-size UMT5
            # in float32 first would need 23 GB); the VAE stays float32, as from_pretrained keeps it.
            # A staged build (models.common.building) draws the parts in the same order: a part left
            # out is drawn and dropped (the denoiser's, before the encoders) or never drawn (the
            # encoders, drawn last), so each part's weights are those of the whole build.
            with on_device:
                with built_in(DTYPES[dtype]):
                    transformer = drawn_denoiser(WanTransformer3DModel(**parts["transformer"]))
                    transformer_2 = None
                    if "transformer_2" in init:
                        transformer_2 = drawn_denoiser(
                            WanTransformer3DModel(**{**parts["transformer"], **init["transformer_2"]}))
                vae = drawn_denoiser(vae_type(**vcfg), conditions=cls.takes_images)
                with built_in(DTYPES[dtype]):
                    text_encoder = encoder_part(lambda: UMT5EncoderModel(UMT5Config(
                        **tcfg, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)))
                extra = cls._extra_config(parts, transformer)
        except (TypeError, ValueError) as e:
            raise ModelError(f"bad model.init: {str(e).splitlines()[0]}") from None
        finally:
            torch.random.set_rng_state(gen_state)
        if text_encoder.config.d_model != transformer.config.text_dim:
            raise ModelError(f"model.init: text_encoder.d_model {text_encoder.config.d_model} != "
                             f"transformer.text_dim {transformer.config.text_dim}")
        if dtype != "float32":           # the buffers computed in an explicit dtype (RoPE tables)
            transformer = transformer.to(DTYPES[dtype])
            transformer_2 = None if transformer_2 is None else transformer_2.to(DTYPES[dtype])
            text_encoder = text_encoder.to(DTYPES[dtype])
        return cls(transformer, vae, text_encoder, tokenizer, device=device, dtype=DTYPES[dtype],
                   max_sequence_length=max_sequence_length, transformer_2=transformer_2,
                   boundary_ratio=pipeline.get("boundary_ratio"),
                   expand_timesteps=bool(pipeline.get("expand_timesteps", False)), train_experts=train_experts,
                   position_channels=int(pipeline.get("position_channels", 0)), **extra)

    # Hooks for subclasses: constructor arguments beyond the text-to-video parts.
    @classmethod
    def _extra_pretrained(cls, path: Path, index: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def _extra_config(cls, parts: dict[str, dict[str, Any]], transformer: torch.nn.Module) -> dict[str, Any]:
        return {}

    def _condition_channels(self) -> int:
        """Channels concatenated to the noisy latent before the transformer (position channels here)."""
        return self.position_channels

    def save_pretrained(self, directory: Path) -> None:
        """A diffusers ``WanPipeline`` directory (``WanPipeline.from_pretrained`` loads it); a text
        encoder this build left out is copied from ``model.path`` (:meth:`copy_released_parts`)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

        scheduler = FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **{
            k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}})
        plain, boundary = self.export_experts()      # routed by noise level: two experts
        pipe = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           transformer=plain[0], scheduler=scheduler,
                           transformer_2=plain[1] if len(plain) > 1 else None,
                           boundary_ratio=boundary, expand_timesteps=self.expand_timesteps)
        pipe.save_pretrained(str(directory))
        if self.position_channels:  # WanPipeline does not know this key; our loader reads it
            index_path = Path(directory) / "model_index.json"
            index = json.loads(index_path.read_text())
            index["position_channels"] = self.position_channels
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self.copy_released_parts(Path(directory))

    def expert_for(self, sigma: float) -> int:
        # WanPipeline: `t >= boundary_ratio * num_train_timesteps` -> transformer, else transformer_2.
        if self.boundary_ratio is None or sigma * 1000.0 >= self.boundary_ratio * 1000.0:
            return 0
        return 1

    # ---------------------------------------------------------------- the interface
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        shape = causal_latent_shape(num_frames, height, width, self.scale_temporal, self.scale_spatial,
                                    self.patch_size, self.latent_channels)
        # The rotary table has rope_max_seq_len positions per axis: past it the first forward fails
        # with a shape error, after the run directory exists. Checked here, while the trainer is built.
        limit = int(getattr(self.transformer.config, "rope_max_seq_len", 0) or 0)
        for key, value, n, p in (("video.num_frames", num_frames, shape[1], self.patch_size[0]),
                                 ("video.height", height, shape[2], self.patch_size[1]),
                                 ("video.width", width, shape[3], self.patch_size[2])):
            if limit and n // p > limit:
                raise ModelError(f"{key}={value} gives {n // p} token positions along that axis; this model's "
                                 f"rotary embedding holds {limit} (rope_max_seq_len)")
        return shape

    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings ``(P, L, D)`` as WanPipeline makes them (padding zeroed); no cache."""
        inputs = self.tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)
        hidden = self.text_encoder(inputs.input_ids.to(self.device), mask).last_hidden_state.to(self.dtype)
        return hidden * mask[..., None].to(hidden.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            for p, h in zip(missing, self.embed_text(missing)):
                self._text_cache[p] = h
        return torch.stack([self._text_cache[p] for p in prompts])

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, expert: int = 0) -> torch.Tensor:
        timestep = (sigma.to(device=self.device, dtype=torch.float32) * 1000.0)
        if self.expand_timesteps:
            # TI2V-5B: one timestep per latent token (WanPipeline's `expand_timesteps`; all equal
            # for text-to-video, where no token is a clean conditioning frame).
            pt, ph, pw = self.patch_size
            n = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
            timestep = timestep[:, None].expand(-1, n)
        h = x.to(device=self.device, dtype=self.dtype)
        if self.position_channels:
            h = torch.cat([h, self.position_grid(h)], dim=1)
        out = self.experts[expert](hidden_states=h, timestep=timestep,
                                   encoder_hidden_states=text.to(device=self.device, dtype=self.dtype),
                                   return_dict=False)[0]
        return out.float()

    def position_grid(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, P, F, H, W)`` latent coordinates (frame, row, column), each spanning ``[-1, 1]``;
        with ``P = 5`` also frame x row and frame x column, the odd products that tell a motion's
        sign (leftward: the column falls as the frame rises)."""
        key = tuple(h.shape[2:])
        if key not in self._positions:
            axes = [torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1) for n in key]
            f, r, c = torch.meshgrid(*axes, indexing="ij")
            grid = [f, r, c] + ([f * r, f * c] if self.position_channels == 5 else [])
            self._positions[key] = torch.stack(grid)
        grid = self._positions[key].to(device=h.device, dtype=h.dtype)
        return grid.unsqueeze(0).expand(h.shape[0], -1, -1, -1, -1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 2) -> torch.Tensor:
        mean, std = vae_latent_stats(self.vae, self.device)
        outs = []
        for part in latents.split(chunk):
            z = part.to(self.device, torch.float32) * std + mean
            video = self.vae.decode(z, return_dict=False)[0]        # (b, 3, F, H, W) in [-1, 1]
            video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            outs.append(video.permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(outs)



def sequence_parallel_plan(transformer: torch.nn.Module) -> SequenceParallelPlan:
    """Ulysses SP on one ``WanTransformer3DModel``.

    The model flattens the patches into ``(B, N, D)`` before ``blocks[0]`` (sharded there); its
    ``rope`` returns ``(cos, sin)`` of ``(1, N, 1, d)`` (sharded on its output); TI2V's per-token
    ``timestep`` ``(B, N)`` is sharded on the way in, so its projections match the tokens; the
    self-attention ``attn1`` goes through the all-to-all, the cross-attention ``attn2`` to the
    replicated text needs none; ``proj_out`` (per token) gathers the tokens before unpatchifying.
    """
    cfg = transformer.config
    pt, ph, pw = (int(p) for p in cfg.patch_size)
    return SequenceParallelPlan(heads=int(cfg.num_attention_heads), patch=(pt, ph, pw), tokens_enter="blocks.0",
                                tokens_leave="proj_out", rotary="rope", rotary_token_dim=1,
                                attention=("blocks.*.attn1",), replicated=("blocks.*.attn2",),
                                per_token_inputs=(("timestep", 1),))


# ---------------------------------------------------------------- the planner
# Wan's from_config sets these itself (UMT5Config keyword arguments); a checkpoint's values are equal.
_TEXT_FIXED = ("pad_token_id", "eos_token_id", "decoder_start_token_id")


def init_from_folder(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """``model.init`` of a folder of Wan ``<part>/config.json`` files (a checkpoint or a shapes
    folder): the three parts, a ``transformer_2`` and the pipeline's routing keys; and the parts
    that have no config there."""
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    init, missing = read_part_configs(folder, ("transformer", "vae", "text_encoder"), {"text_encoder": _TEXT_FIXED})
    if index.get("position_channels"):
        raise ModelError(f"{folder}: the planner builds AutoencoderKLWan/WanTransformer3DModel shapes only "
                         "(this checkpoint's extras need its weights: use a checkpoint under "
                         f"{SMALL_CHECKPOINT_BYTES // 2 ** 20} MiB or drop them)")
    if (folder / "transformer_2" / "config.json").is_file():
        init["transformer_2"] = read_part_configs(folder, ("transformer_2",))[0]["transformer_2"]
    pipeline = {k: index[k] for k in ("boundary_ratio", "expand_timesteps") if index.get(k) is not None}
    if "transformer_2" in init and "boundary_ratio" not in pipeline:
        raise ModelError(f"{folder}: a transformer_2 needs boundary_ratio in model_index.json")
    if pipeline:
        init["pipeline"] = pipeline
    return init, missing


def activation_profile(t: torch.nn.Module, s: int) -> ActivationProfile:
    """Saved-for-backward bytes of a ``WanTransformer3DModel`` in dtype of ``s`` bytes (the terms:
    :mod:`flowdppo_video.models.memory`'s docstring)."""
    c = t.config
    D = int(c.num_attention_heads) * int(c.attention_head_dim)
    H, hd = int(c.num_attention_heads), int(c.attention_head_dim)
    blk = t.blocks[0]
    Fw = int(blk.ffn.net[0].proj.out_features)
    lin = Linears(s)
    full = blk.scale_shift_table.requires_grad                       # modulation and gates train
    a1, a2 = blk.attn1, blk.attn2
    tok = 0.0
    tok += F32 * D + 8                                               # norm1 (float32 input, mean, rstd)
    tok += F32 * D if full else 0                                    # norm1 * (1 + scale)
    tok += lin.saved([a1.to_q, a1.to_k, a1.to_v], D)
    tok += rms(a1.norm_q, s, D) + rms(a1.norm_k, s, D)
    tok += 4 * s * D + F32 * H                                       # fused attention: q, k, v, out, lse
    tok += lin.saved([a1.to_out[0]], D, counted=True)                # its input is attention's output
    tok += s * D if full else 0                                      # attn_output * gate
    tok += F32 * D + 8 if not isinstance(blk.norm2, torch.nn.Identity) else 0  # norm2
    tok += lin.saved([a2.to_q], D)
    tok += rms(a2.norm_q, s, D)
    tok += 2 * s * D + F32 * H                                       # cross attention: q, out, lse
    tok += lin.saved([a2.to_out[0]], D, counted=True)
    tok += F32 * D + 8                                               # norm3
    tok += F32 * D if full else 0                                    # norm3 * (1 + c_scale)
    tok += lin.saved([blk.ffn.net[0].proj], D)
    tok += s * Fw                                                    # tanh-GELU input
    tok += lin.saved([blk.ffn.net[2]], Fw)
    tok += F32 * D if full else 0                                    # ff_output.float() * c_gate
    txt = 0.0
    txt += lin.saved([a2.to_k, a2.to_v], D, counted=True)            # the text states: once, below
    txt += rms(a2.norm_k, s, D) + 2 * s * D                         # norm_k, then k and v in attention
    per_block = BlockBytes(tok, txt)
    n = len(t.blocks)
    # Only when the blocks are not checkpointed: the RoPE cos/sin tables their attention keeps, and
    # block 0's norm1 keeps nothing when nothing before the blocks trains (LoRA).
    pe = t.patch_embedding
    blocks_extra = 2 * s * hd
    if not (trains(pe) or trains(t.condition_embedder)):
        blocks_extra -= F32 * D + 8
    # Outside the blocks (once per forward).
    out_tok = F32 * D + 8 + (F32 * D if t.scale_shift_table.requires_grad else 0)  # norm_out, modulation
    out_tok += lin.saved([t.proj_out], D)
    if trains(pe):
        out_tok += s * int(pe.in_channels) * int(torch.tensor(pe.kernel_size).prod())
    text_emb = t.condition_embedder.text_embedder
    out_txt = 0.0
    if trains(text_emb):
        out_txt += s * (int(text_emb.linear_1.in_features) + 2 * D)
    if any(lin.shares([b.attn2.to_k, b.attn2.to_v]) for b in t.blocks):
        out_txt += s * D                                             # the text states every block's k/v read
    outside = BlockBytes(out_tok, out_txt)
    inputs = BlockBytes(s * D * n, 0.0)
    # No grad: the residual stream (model dtype) + its float32 norm copy, and the larger of the
    # attention set (normed input, q, k, v, out) and the FFN set (normed input, hidden, GELU out).
    live = s * D + 2 * F32 * D + max(5 * s * D, s * D + 2 * s * Fw)
    return ActivationProfile(per_block.scale(n) + BlockBytes(blocks_extra), per_block, inputs, outside,
                             BlockBytes(live, 2 * s * D), H)


# ---------------------------------------------------------------- the family
def build(cls: type[WanAdapter], cfg: ModelConfig, path: str | None, device: torch.device) -> WanAdapter:
    """A Wan adapter of class ``cls`` loaded from ``path`` or built from ``cfg.init``."""
    if path is not None:
        return cls.from_pretrained(path, device=device, dtype=cfg.dtype, max_sequence_length=cfg.max_sequence_length,
                                   train_experts=cfg.train_experts)
    return cls.from_config(cfg.init or {}, device=device, dtype=cfg.dtype, max_sequence_length=cfg.max_sequence_length,
                           seed=cfg.init_seed, train_experts=cfg.train_experts)


# Wan 2.1, Wan 2.2 T2V-A14B (two experts), TI2V-5B.
register(FamilySpec(name="wan", pipeline="WanPipeline", adapter=WanAdapter, build=functools.partial(build, WanAdapter),
                    tiny_init=TINY_INIT, activation_profile=activation_profile, init_from_folder=init_from_folder,
                    sequence_parallel_plan=sequence_parallel_plan, two_experts=True, staged=True))
