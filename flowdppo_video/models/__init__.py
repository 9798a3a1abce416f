"""Model families behind one adapter interface. Only this package knows families by name: each is one
module registering a :class:`~.registry.FamilySpec` (see :mod:`.registry`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from flowdppo_video.runs.config import ModelConfig
from flowdppo_video.runs.resources import resolve

from .base import ModelError, SequenceParallelPlan, TextBatch, VideoFlowAdapter
from .common import ALL, CONDITIONING, DENOISER, building
from .registry import FamilySpec, families, family, family_of_pipeline, register, spec_for
from .speed import apply_speed_switches, attention_backend


def checkpoint_family(path: Path) -> str | None:
    """The family a diffusers directory holds (from ``model_index.json``'s ``_class_name``);
    a :class:`ModelError` if ``path`` is not a diffusers checkpoint."""
    if not path.exists():
        raise ModelError(f"model.path {path} does not exist")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"model.path {path} is not a diffusers checkpoint (no model_index.json)")
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise ModelError(f"model.path {path}: model_index.json is not a JSON object") from None
    return family_of_pipeline(cls, path)


def check_weight_files(path: Path) -> None:
    """Open the header of every safetensors file under ``path`` (cheap: no tensor is read) so a
    truncated or garbled one is a :class:`ModelError` naming it, not a loader's traceback."""
    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: either way the file is bad
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ModelError(f"model.path {path}: {f} is not a readable safetensors file ({first})") from None


def staged(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s family builds its conditioning encoders and its denoiser apart
    (``FamilySpec.staged``)."""
    return family(cfg.family).staged


def build_adapter(cfg: ModelConfig, device: torch.device, keep_reference: bool = False,
                  parts: str = ALL) -> VideoFlowAdapter:
    """Load (``cfg.path``) or build (``cfg.init``) the model and set up what trains.

    ``keep_reference``: keep the frozen base reachable through ``adapter.reference()``
    (free with LoRA; a frozen copy with full fine-tuning).
    ``parts`` (a family with ``FamilySpec.staged``; others build every part): ``CONDITIONING``, the
    encoders alone, for ``encode_prompts`` (the transformers are skeletons on the meta device, nothing
    trains); ``DENOISER``, the transformers and the VAE, without any text encoder (the rows of the
    run's text cache stand in for it); ``ALL``, every part.
    """
    spec = family(cfg.family)
    path = resolve(cfg.path) if cfg.path is not None else None
    if path is not None:
        found = checkpoint_family(Path(path))
        if found is not None and found != cfg.family:
            raise ModelError(f"model.path {path} holds a {families()[found].pipeline} checkpoint (family {found!r}), "
                             f"but model.family is {cfg.family!r}")
        check_weight_files(Path(path))
    if not spec.two_experts and cfg.train_experts not in (None, ["high"]):
        raise ModelError(f"model.train_experts {cfg.train_experts}: only Wan 2.2 A14B has two experts")
    attention_backend(cfg.attention_backend, device, spec.adapter.masks_attention)   # before the weights load
    if cfg.frozen_streams:               # before any weight is read: a 19B model loads for minutes
        streams = spec.adapter.STREAMS
        if len(streams) < 2:
            raise ModelError(f"model.frozen_streams {cfg.frozen_streams}: model.family {cfg.family!r} has one "
                             "token stream (only a family with several, such as ltx2's video and audio, freezes one)")
        unknown = sorted(set(cfg.frozen_streams) - set(streams))
        if unknown or len(set(cfg.frozen_streams)) >= len(streams):
            raise ModelError(f"model.frozen_streams {cfg.frozen_streams}: name some of {list(streams)} (not all: "
                             "something must train)" + (f"; unknown {unknown}" if unknown else ""))
    if not spec.staged:
        parts = ALL
    with building(parts):
        adapter = spec.build(cfg, path, device)
    adapter.source_path = Path(path) if path is not None else None
    if parts == CONDITIONING:
        return adapter                   # it only encodes: nothing trains, no LoRA, nothing compiled
    if parts == DENOISER:
        adapter.release_text_encoders()  # the skeletons: nothing was read or drawn for them
    if cfg.frozen_streams:
        adapter.frozen_streams = tuple(cfg.frozen_streams)
    if cfg.base_below is not None:
        if adapter.num_experts > 1:
            raise ModelError(f"model.base_below {cfg.base_below}: this model already routes its two experts by "
                             "noise level (boundary_ratio); train one of them with model.train_experts")
        adapter.base_below = float(cfg.base_below)
        keep_reference = True            # the base denoises below the boundary: full fine-tuning keeps a copy
    if cfg.lora.rank > 0:
        adapter.enable_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.init_seed)
    else:
        adapter.enable_full_finetune(keep_reference)
    if cfg.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    apply_speed_switches(adapter, cfg.attention_backend, cfg.compile)   # after LoRA: what is compiled is final
    return adapter


__all__ = ["ALL", "CONDITIONING", "DENOISER", "FamilySpec", "ModelError", "SequenceParallelPlan", "TextBatch", "VideoFlowAdapter", "build_adapter",
           "check_weight_files", "checkpoint_family", "families", "family", "register", "spec_for", "staged"]
