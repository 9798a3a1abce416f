"""Model families behind one adapter interface. Only this package knows families by name."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..resources import resolve
from .base import ModelError, VideoFlowAdapter

FAMILIES = ("wan",)


def build_adapter(cfg: ModelConfig, device: torch.device, keep_reference: bool = False) -> VideoFlowAdapter:
    """Load (``cfg.path``) or build (``cfg.init``) the model and set up what trains.

    ``keep_reference``: keep the frozen base reachable through ``adapter.reference()``
    (free with LoRA; a frozen copy with full fine-tuning).
    """
    if cfg.family == "wan":
        from .wan import WanAdapter

        if cfg.path is not None:
            adapter = WanAdapter.from_pretrained(resolve(cfg.path), device=device, dtype=cfg.dtype,
                                                 max_sequence_length=cfg.max_sequence_length)
        else:
            adapter = WanAdapter.from_config(cfg.init or {}, device=device, dtype=cfg.dtype,
                                             max_sequence_length=cfg.max_sequence_length, seed=cfg.init_seed)
    else:
        raise ModelError(f"model.family={cfg.family!r} is not one of {', '.join(FAMILIES)}")
    if cfg.lora.rank > 0:
        adapter.enable_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.init_seed)
    else:
        adapter.enable_full_finetune(keep_reference)
    if cfg.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    return adapter


__all__ = ["FAMILIES", "ModelError", "VideoFlowAdapter", "build_adapter"]
