"""Model families behind one adapter interface. Only this package knows families by name."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..resources import resolve
from .base import ModelError, TextBatch, VideoFlowAdapter

# family -> the diffusers pipeline class its checkpoints declare in model_index.json
FAMILIES: dict[str, str] = {
    "wan": "WanPipeline",                         # Wan 2.1, Wan 2.2 T2V-A14B (two experts), TI2V-5B
    "wan_i2v": "WanImageToVideoPipeline",         # Wan 2.1 I2V (CLIP), Wan 2.2 I2V-A14B, expand_timesteps
    "hunyuan_video": "HunyuanVideoPipeline",      # HunyuanVideo (1.0) T2V
    "hunyuan_video_i2v": "HunyuanVideoImageToVideoPipeline",  # HunyuanVideo-I2V (token_replace, latent_concat)
    "hunyuan_video_1.5": "HunyuanVideo15Pipeline",  # HunyuanVideo 1.5 T2V
}
# Image-to-video pipelines not supported yet: named in errors so a user learns what they hold.
_OTHER_PIPELINES = {"HunyuanVideo15ImageToVideoPipeline": "hunyuan_video_1.5"}


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
    for fam, pipe in FAMILIES.items():
        if cls == pipe:
            return fam
    if cls in _OTHER_PIPELINES:
        raise ModelError(f"model.path {path} holds a {cls} (image-to-video), which this project does not "
                         f"train; model.family {_OTHER_PIPELINES[cls]!r} takes its text-to-video checkpoints")
    return None


def check_weight_files(path: Path) -> None:
    """Open the header of every safetensors file under ``path`` (cheap: no tensor is read) so a
    truncated or garbled one is a :class:`ModelError` naming it, not a loader's traceback."""
    from safetensors import safe_open

    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: either way the file is bad
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ModelError(f"model.path {path}: {f} is not a readable safetensors file ({first})") from None


def build_adapter(cfg: ModelConfig, device: torch.device, keep_reference: bool = False) -> VideoFlowAdapter:
    """Load (``cfg.path``) or build (``cfg.init``) the model and set up what trains.

    ``keep_reference``: keep the frozen base reachable through ``adapter.reference()``
    (free with LoRA; a frozen copy with full fine-tuning).
    """
    if cfg.family not in FAMILIES:
        raise ModelError(f"model.family={cfg.family!r} is not one of {', '.join(FAMILIES)}")
    path = resolve(cfg.path) if cfg.path is not None else None
    if path is not None:
        found = checkpoint_family(Path(path))
        if found is not None and found != cfg.family:
            raise ModelError(f"model.path {path} holds a {FAMILIES[found]} checkpoint (family {found!r}), "
                             f"but model.family is {cfg.family!r}")
        check_weight_files(Path(path))
    if cfg.family not in ("wan", "wan_i2v") and cfg.train_experts not in (None, ["high"]):
        raise ModelError(f"model.train_experts {cfg.train_experts}: only Wan 2.2 A14B has two experts")
    if cfg.family in ("wan", "wan_i2v"):
        from .wan import WanAdapter
        from .wan_i2v import WanI2VAdapter

        wan = WanI2VAdapter if cfg.family == "wan_i2v" else WanAdapter
        if path is not None:
            adapter = wan.from_pretrained(path, device=device, dtype=cfg.dtype,
                                          max_sequence_length=cfg.max_sequence_length,
                                          train_experts=cfg.train_experts)
        else:
            adapter = wan.from_config(cfg.init or {}, device=device, dtype=cfg.dtype,
                                      max_sequence_length=cfg.max_sequence_length, seed=cfg.init_seed,
                                      train_experts=cfg.train_experts)
    elif cfg.family in ("hunyuan_video", "hunyuan_video_i2v"):
        from .hunyuan import HunyuanVideoAdapter
        from .hunyuan_i2v import HunyuanVideoI2VAdapter

        hunyuan = HunyuanVideoI2VAdapter if cfg.family == "hunyuan_video_i2v" else HunyuanVideoAdapter
        adapter = hunyuan.build(path, cfg.init, device=device, dtype=cfg.dtype,
                                max_sequence_length=cfg.max_sequence_length, seed=cfg.init_seed,
                                embedded_guidance=cfg.embedded_guidance)
    else:
        from .hunyuan15 import HunyuanVideo15Adapter

        adapter = HunyuanVideo15Adapter.build(path, cfg.init, device=device, dtype=cfg.dtype,
                                              max_sequence_length=cfg.max_sequence_length, seed=cfg.init_seed,
                                              embedded_guidance=cfg.embedded_guidance)
    if cfg.lora.rank > 0:
        adapter.enable_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.init_seed)
    else:
        adapter.enable_full_finetune(keep_reference)
    if cfg.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    return adapter


__all__ = ["FAMILIES", "ModelError", "TextBatch", "VideoFlowAdapter", "build_adapter", "check_weight_files",
           "checkpoint_family"]
