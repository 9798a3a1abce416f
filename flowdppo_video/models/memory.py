"""What the memory planner (``flowdppo_video.commands.planner``) needs to know about a family, and nothing
the planner needs to know by name: a model built on the meta device (no weights allocated), its
parameters grouped into parts, its token counts and its activation bytes per token.

Activation model (bytes of the tensors autograd keeps for backward during one forward)
--------------------------------------------------------------------------------------
Per transformer block, per token of the video sequence (``N`` tokens) and per text token (``L``)::

    saved = sum over the block's ops of the tensors that op saves, given what requires grad

with ``s`` the model dtype's bytes, ``f = 4`` (float32), ``D`` the hidden size, ``F`` the FFN
width, ``H`` the heads, ``r`` the LoRA rank. The terms, read off the diffusers blocks and checked
tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` (tests/test_planner.py):

- a float32 LayerNorm (Wan's ``FP32LayerNorm``) saves its float32 input and mean/rstd:
  ``f*D + 8``; a LayerNorm in the model dtype (HunyuanVideo) ``s*D + 8``;
- adaLN modulation ``norm * (1 + scale) + shift`` saves ``norm`` (``f*D`` or ``s*D``) only when
  the modulation trains (full fine-tuning); a gate ``x * gate`` saves ``x`` likewise;
- an ``nn.RMSNorm`` of q or k saves its float32 upcast (``f*D``), plus the float32 normalised
  tensor when its weight trains, plus rstd (4 per row);
- a Linear saves its input when its weight trains (``s*D``, shared by q/k/v that read the same
  input); a peft LoRA Linear saves its input cast to the adapter dtype (``f*D`` per target when
  float32 adapters sit on a 16-bit base, else the shared ``s*D``) and ``lora_A``'s output
  (``f*r``); a frozen Linear keeps only its weight;
- fused attention (flash / memory-efficient, what a GPU runs) saves q, k, v, the output
  (``4*s*D`` for self-attention) and the log-sum-exp (``4*H`` per query token); no N^2 term;
- tanh-GELU saves its input (``s*F``); the second FFN Linear its input when it trains.

So full fine-tuning of a Wan block in float32 keeps ``(22 D + 2 F) * 4`` bytes per token and
LoRA on attention ``~(12 D + F) * 4``; in bf16 the float32 norm inputs stay 4 bytes. The blocks'
inputs, the text conditioning (once per forward), RoPE tables, the final norm and projection and
the patch embedding are added once. With gradient checkpointing only each block's input
(``s*D`` per token) is kept, and the backward pass re-runs one block at a time (its full
``saved`` is the extra peak, reported separately). The no-grad rollout holds, per block, the
residual stream and the larger of the attention working set (q, k, v, out) and the FFN hidden
state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from flowdppo_video.models import build_adapter
from flowdppo_video.runs.config import ModelConfig
from flowdppo_video.runs.resources import resolve

from ._training import EXPERT_DIRS
from .activations import ActivationProfile, BlockBytes  # noqa: F401 (the planner's types, importable here)
from .base import ModelError, VideoFlowAdapter
from .common import DTYPES
from .registry import families, family, spec_for

# Weights smaller than this (all files under model.path) are loaded for real to be counted
# (the shipped shapes-world model); larger checkpoints are planned from their config.json files.
SMALL_CHECKPOINT_BYTES = 256 * 2 ** 20
_TRANSFORMERS_META_KEYS = ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
                           "dtype", "_attn_implementation_autoset", "use_cache", "output_past")


@dataclasses.dataclass
class Part:
    """One group of parameters: ``role`` is ``trained`` (what the optimizer updates), ``base`` (frozen
    weights inside a training expert: ZeRO-3 shards them with it), or ``frozen`` (held whole on
    every GPU). ``counted`` is False when the part's config was not given (shapes folder)."""

    name: str
    role: str
    tensors: list[torch.Tensor]
    counted: bool = True

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def dtypes(self) -> str:
        names = sorted({str(t.dtype).replace("torch.", "") for t in self.tensors})
        return "/".join(names) if names else "-"


# ---------------------------------------------------------------- building without weights
def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable JSON file ({str(e).splitlines()[0]})") from None


def _clean(cfg: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _TRANSFORMERS_META_KEYS
            and k not in drop}


def read_part_configs(folder: Path, parts: tuple[str, ...], drop: dict[str, tuple[str, ...]] | None = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """``model.init`` parts from ``folder/<part>/config.json`` (bookkeeping keys and ``drop[part]``
    left out), and the parts that have no config there (built tiny, not counted)."""
    init: dict[str, Any] = {}
    missing = []
    for part in parts:
        f = folder / part / "config.json"
        if not f.is_file():
            missing.append(part)
            continue
        init[part] = _clean(read_json(f), (drop or {}).get(part, ()))
    return init, missing


def _init_from_folder(family_name: str, folder: Path) -> tuple[dict[str, Any], list[str]]:
    """``model.init`` equivalent of a folder of diffusers ``<part>/config.json`` files (a checkpoint
    or a shapes folder), read as the family's spec says; returns it and the parts that have no
    config there (built tiny, not counted)."""
    if not (folder / "transformer" / "config.json").is_file():
        raise ModelError(f"{folder}: no transformer/config.json (a model-config folder holds "
                         "<part>/config.json files, as a diffusers checkpoint does)")
    spec = family(family_name)
    if spec.init_from_folder is None:
        known = [s.name for s in families().values() if s.init_from_folder is not None]
        raise ModelError(f"the planner cannot read a model-config folder for model.family={family_name!r} yet "
                         f"(known: {', '.join(known)}); give it a checkpoint's model.path instead")
    init, missing = spec.init_from_folder(folder)
    for key in ("rope_axes_dim",):
        if key in init.get("transformer", {}):
            init["transformer"][key] = list(init["transformer"][key])
    return init, missing


def _weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def _keep_fp32(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """As diffusers' ``from_pretrained`` does: ``_keep_in_fp32_modules`` stay float32 under a 16-bit dtype."""
    names = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype == torch.float32 or not names:
        return
    for n, p in module.named_parameters():
        if "lora_" not in n and any(m in n for m in names):
            p.data = p.data.float()


def plan_adapter(cfg: ModelConfig, shapes: str | Path | None, keep_reference: bool
                 ) -> tuple[VideoFlowAdapter, list[str]]:
    """The adapter as training would set it up (LoRA or full, reference copy, dtypes), on the meta
    device unless it is a small real checkpoint; and the parts whose config was missing.

    ``shapes``: a folder of ``<part>/config.json`` files standing in for ``cfg.path``.
    """
    # The speed switches change no parameter and the activation model already assumes fused attention;
    # off here, so a config for a CUDA-only backend plans on any machine (the planner runs on none).
    cfg = dataclasses.replace(cfg, attention_backend="native", compile=False)
    folder = Path(shapes) if shapes is not None else (Path(resolve(cfg.path)) if cfg.path is not None else None)
    if folder is not None and not folder.is_dir():
        raise ModelError(f"{'--model-config' if shapes is not None else 'model.path'} {folder} is not a folder")
    if folder is not None and shapes is None and (folder / "model_index.json").is_file() \
            and 0 < _weights_bytes(folder) < SMALL_CHECKPOINT_BYTES:
        return build_adapter(cfg, torch.device("cpu"), keep_reference=keep_reference), []
    missing: list[str] = []
    from_folder = folder is not None
    if from_folder:
        init, missing = _init_from_folder(cfg.family, folder)
        cfg = dataclasses.replace(cfg, path=None, init=init)
    from diffusers.utils import logging as diffusers_logging

    meta = torch.device("meta")
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()          # from_config's float32-modules cast warning: handled below
    try:
        with torch.device(meta):
            adapter = build_adapter(cfg, meta, keep_reference=keep_reference)
    finally:
        diffusers_logging.set_verbosity(level)
    if from_folder:
        dtype = DTYPES[cfg.dtype]
        for m in _experts_and_references(adapter):
            _keep_fp32(m, dtype)
    return adapter, missing


def _experts_and_references(adapter: VideoFlowAdapter) -> list[torch.nn.Module]:
    return [*adapter.experts, *adapter.reference_copies().values()]


def parameter_parts(adapter: VideoFlowAdapter, missing: list[str] = ()) -> list[Part]:
    """Parameters grouped as the planner prints them (each tensor once)."""
    experts = list(adapter.experts)
    trained = set(adapter.trained)
    parts: list[Part] = []
    seen: set[int] = set()

    def take(params: Iterator[torch.nn.Parameter]) -> list[torch.Tensor]:
        out = []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    for i, t in enumerate(experts):
        name = EXPERT_DIRS[i] if i < len(EXPERT_DIRS) else f"expert_{i}"
        if i in trained:
            parts.append(Part(name, "trained", take(p for p in t.parameters() if p.requires_grad)))
            base = take(p for p in t.parameters() if not p.requires_grad)
            if base:
                parts.append(Part(f"{name} base weights (under LoRA)", "base", base))
        else:
            parts.append(Part(f"{name} (frozen expert)", "frozen", take(t.parameters())))
    for i, ref in adapter.reference_copies().items():
        parts.append(Part(f"{EXPERT_DIRS[i]} reference copy", "frozen", take(ref.parameters())))
    for attr in (*adapter.TEXT_ENCODERS, *adapter.FROZEN_PARTS):
        m = getattr(adapter, attr, None)
        if isinstance(m, torch.nn.Module):
            parts.append(Part(attr, "frozen", take(m.parameters()), counted=attr not in missing))
    return parts


# ---------------------------------------------------------------- tokens and activations
def activation_profile(adapter: VideoFlowAdapter, expert: int = 0) -> ActivationProfile:
    """Saved-for-backward bytes per token of one forward through ``expert`` (see module docstring;
    each family's spec gives its own profile)."""
    t = adapter.experts[expert]
    spec = spec_for(adapter)
    if spec is None or spec.activation_profile is None:
        raise ModelError(f"no activation model for a {type(t).__name__}")
    s = torch.empty((), dtype=adapter.dtype).element_size()
    return spec.activation_profile(t, s)


def text_tokens(adapter: VideoFlowAdapter) -> int:
    """Conditioning tokens each video token attends to (padded text, plus fixed extra tokens)."""
    spec = spec_for(adapter)
    return int(adapter.max_sequence_length) if spec is None else spec.text_tokens(adapter)
