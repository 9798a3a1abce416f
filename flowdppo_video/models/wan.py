"""Wan 2.1 text-to-video (diffusers ``WanTransformer3DModel``, ``AutoencoderKLWan``, UMT5)."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .base import ModelError, VideoFlowAdapter
from .tokenizers import byte_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LORA_FILE = "pytorch_lora_weights.safetensors"
_FULL_FILE = "transformer.safetensors"

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


def _json_default(value: Any) -> Any:
    """Sets (peft target modules) as lists, paths and the rest as strings."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _check_checkpoint_dir(path: Path) -> None:
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
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not (path / sub).is_dir():
            raise ModelError(f"model.path {path} has no {sub}/ folder")
    if not (path / "vae" / "config.json").is_file():
        raise ModelError(f"model.path {path} has no vae/config.json")


class WanAdapter(VideoFlowAdapter):
    """Wan 2.1 T2V: the transformer trains; UMT5 and the VAE are frozen."""

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 tokenizer: Any, *, device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int, scheduler_config: dict[str, Any] | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        # Dtypes are set at load time (from_pretrained keeps Wan's float32 norms); only move here.
        self.transformer = transformer.to(device=device)
        self.vae = vae.to(device=device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device=device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config or {}
        self.patch_size = tuple(int(p) for p in self.transformer.config.patch_size)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._lora_rank = 0
        self._frozen_base: torch.nn.Module | None = None
        vcfg = self.vae.config
        self.latent_channels = int(vcfg.z_dim)
        self.scale_temporal = 2 ** sum(bool(t) for t in vcfg.temperal_downsample)
        self.scale_spatial = 2 ** len(vcfg.temperal_downsample)
        if int(self.transformer.config.in_channels) != self.latent_channels:
            raise ModelError(f"transformer in_channels {self.transformer.config.in_channels} != "
                             f"vae z_dim {self.latent_channels}")

    # ---------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device, dtype: str = "float32",
                        max_sequence_length: int = 512) -> "WanAdapter":
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        p = Path(path)
        _check_checkpoint_dir(p)
        tdtype = _DTYPES[dtype]
        transformer = WanTransformer3DModel.from_pretrained(p, subfolder="transformer", torch_dtype=tdtype)
        vae_cls = json.loads((p / "vae" / "config.json").read_text()).get("_class_name", "AutoencoderKLWan")
        if vae_cls == "PixelAutoencoder":
            from .pixel_vae import PixelAutoencoder as vae_type
        elif vae_cls == "AutoencoderKLWan":
            vae_type = AutoencoderKLWan
        else:
            raise ModelError(f"model.path {p}: vae is a {vae_cls}, expected AutoencoderKLWan or PixelAutoencoder")
        vae = vae_type.from_pretrained(p, subfolder="vae", torch_dtype=torch.float32)
        text_encoder = UMT5EncoderModel.from_pretrained(p / "text_encoder", dtype=tdtype)
        tokenizer = AutoTokenizer.from_pretrained(p / "tokenizer")
        sched = p / "scheduler" / "scheduler_config.json"
        sched_cfg = json.loads(sched.read_text()) if sched.is_file() else None
        return cls(transformer, vae, text_encoder, tokenizer, device=device, dtype=tdtype,
                   max_sequence_length=max_sequence_length, scheduler_config=sched_cfg)

    @classmethod
    def from_config(cls, init: dict[str, Any], *, device: torch.device, dtype: str = "float32",
                    max_sequence_length: int = 512, seed: int = 0) -> "WanAdapter":
        """Random weights from sub-configs ``transformer``, ``vae``, ``text_encoder`` (tests, demos).

        Missing sub-configs take :data:`TINY_INIT`; the tokenizer is :func:`byte_tokenizer`.
        """
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        unknown = set(init) - set(TINY_INIT)
        if unknown:
            raise ModelError(f"unknown model.init part(s) {sorted(unknown)}; known: {sorted(TINY_INIT)}")
        bad = [k for k, v in init.items() if not isinstance(v, dict)]
        if bad:
            raise ModelError(f"model.init.{bad[0]} must be a mapping of config values")
        parts = {k: {**TINY_INIT[k], **init.get(k, {})} for k in TINY_INIT}
        tokenizer = byte_tokenizer()
        tcfg = dict(parts["text_encoder"])
        tcfg.setdefault("vocab_size", len(tokenizer))
        vcfg = dict(parts["vae"])
        z = int(vcfg["z_dim"])
        vcfg.setdefault("latents_mean", [0.0] * z)
        vcfg.setdefault("latents_std", [1.0] * z)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            transformer = WanTransformer3DModel(**parts["transformer"])
            vae = AutoencoderKLWan(**vcfg)
            text_encoder = UMT5EncoderModel(UMT5Config(**tcfg, pad_token_id=0, eos_token_id=1,
                                                       decoder_start_token_id=0))
        except (TypeError, ValueError) as e:
            raise ModelError(f"bad model.init: {str(e).splitlines()[0]}") from None
        finally:
            torch.random.set_rng_state(gen_state)
        if text_encoder.config.d_model != transformer.config.text_dim:
            raise ModelError(f"model.init: text_encoder.d_model {text_encoder.config.d_model} != "
                             f"transformer.text_dim {transformer.config.text_dim}")
        if dtype != "float32":
            transformer = transformer.to(_DTYPES[dtype])
            text_encoder = text_encoder.to(_DTYPES[dtype])
        return cls(transformer, vae, text_encoder, tokenizer, device=device, dtype=_DTYPES[dtype],
                   max_sequence_length=max_sequence_length)

    def save_pretrained(self, directory: Path) -> None:
        """A diffusers ``WanPipeline`` directory (``WanPipeline.from_pretrained`` loads it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

        scheduler = FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **{
            k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}})
        with self._merged_lora() as transformer:
            pipe = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                               transformer=transformer, scheduler=scheduler)
            pipe.save_pretrained(str(directory))

    @contextlib.contextmanager
    def _merged_lora(self) -> Iterator[torch.nn.Module]:
        if not self._lora_rank:
            yield self.transformer
            return
        # Export base + LoRA as plain weights without touching the training model.
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = copy.deepcopy(self.transformer)
        for m in merged.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
        from diffusers import WanTransformer3DModel

        plain = WanTransformer3DModel(**{k: v for k, v in self.transformer.config.items()
                                         if not k.startswith("_")})
        sd = {}
        for k, v in merged.state_dict().items():
            if "lora_" in k:
                continue
            sd[k.replace(".base_layer.", ".")] = v
        plain.load_state_dict(sd)
        yield plain.to(dtype=self.dtype)

    # ---------------------------------------------------------------- training setup
    def enable_lora(self, rank: int, alpha: float | None, targets: list[str], seed: int = 0) -> None:
        """peft LoRA on the named transformer submodules; base weights frozen, B initialised to 0."""
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank,
                                                    target_modules=targets, init_lora_weights=True))
        except ValueError as e:
            raise ModelError(f"model.lora.targets {targets}: {str(e).splitlines()[0]}") from None
        finally:
            torch.random.set_rng_state(state)
        for n, p in self.transformer.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                p.data = p.data.float()  # float32 adapters (and optimizer state) under a bf16 base
        self._lora_rank = rank

    def enable_full_finetune(self, keep_reference: bool) -> None:
        self.transformer.requires_grad_(True)
        if keep_reference:
            self._frozen_base = copy.deepcopy(self.transformer).eval().requires_grad_(False)

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        if self._lora_rank:
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
            return
        if self._frozen_base is None:
            raise ModelError("no reference model: full fine-tuning keeps one only when objective.beta > 0")
        live = self.transformer
        self.transformer = self._frozen_base
        try:
            yield
        finally:
            self.transformer = live

    def save_trainable(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if self._lora_rank:
            from peft import get_peft_model_state_dict

            sd = get_peft_model_state_dict(self.transformer)
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, directory / _LORA_FILE)
            (directory / "adapter_config.json").write_text(json.dumps(
                self.transformer.peft_config["default"].to_dict(), default=_json_default, indent=1))
        else:
            sd = {k: v.detach().contiguous().cpu() for k, v in self.transformer.state_dict().items()}
            save_file(sd, directory / _FULL_FILE)
            (directory / "config.json").write_text(json.dumps(dict(self.transformer.config), default=_json_default))

    def load_trainable(self, directory: Path) -> None:
        if self._lora_rank:
            from peft import set_peft_model_state_dict

            f = directory / _LORA_FILE
            if not f.is_file():
                raise ModelError(f"{f} not found: the checkpoint holds no LoRA weights")
            try:
                res = set_peft_model_state_dict(self.transformer, load_file(f, device=str(self.device)))
            except RuntimeError as e:
                raise ModelError(f"{f} does not fit this model's LoRA (rank or shapes differ): "
                                 f"{str(e).splitlines()[0]}") from None
            bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ModelError(f"{f}: LoRA keys do not match this model ({bad[0]} ...)")
        else:
            f = directory / _FULL_FILE
            if not f.is_file():
                raise ModelError(f"{f} not found: the checkpoint holds no full transformer weights")
            sd = load_file(f, device=str(self.device))
            try:
                with torch.no_grad():
                    missing, unexpected = self.transformer.load_state_dict(sd, strict=False)
            except RuntimeError as e:
                raise ModelError(f"{f} does not fit this transformer: {str(e).splitlines()[0]}") from None
            if missing or unexpected:
                raise ModelError(f"{f} does not match the transformer (missing {missing[:2]}, "
                                 f"unexpected {unexpected[:2]})")

    # ---------------------------------------------------------------- the interface
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        st, ss = self.scale_temporal, self.scale_spatial
        pt, ph, pw = self.patch_size
        if num_frames < 1 or (num_frames - 1) % st:
            raise ModelError(f"video.num_frames={num_frames} must be {st}k+1 for this autoencoder")
        if height % (ss * ph) or width % (ss * pw):
            raise ModelError(f"video size {height}x{width} must be divisible by {ss * ph}x{ss * pw} "
                             f"(autoencoder x{ss} times patch {ph}x{pw})")
        f = (num_frames - 1) // st + 1
        if f % pt:
            raise ModelError(f"latent frames {f} (video.num_frames={num_frames}) not divisible by patch {pt}")
        return self.latent_channels, f, height // ss, width // ss

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

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        timestep = (sigma.to(device=self.device, dtype=torch.float32) * 1000.0)
        out = self.transformer(hidden_states=x.to(device=self.device, dtype=self.dtype), timestep=timestep,
                               encoder_hidden_states=text.to(device=self.device, dtype=self.dtype),
                               return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 2) -> torch.Tensor:
        c = self.latent_channels
        mean = torch.tensor(self.vae.config.latents_mean, device=self.device).view(1, c, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=self.device).view(1, c, 1, 1, 1)
        outs = []
        for part in latents.split(chunk):
            z = part.to(self.device, torch.float32) * std + mean
            video = self.vae.decode(z, return_dict=False)[0]        # (b, 3, F, H, W) in [-1, 1]
            video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            outs.append(video.permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(outs)
