"""Helpers every reward model module shares: argument checks, local checkpoint directories,
devices and dtypes. Imports nothing of the project beyond the registry's error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .registry import RewardError


def check_videos(videos: torch.Tensor, prompts: Sequence[str]) -> None:
    """``videos`` is a ``(B, F, H, W, 3)`` uint8 tensor with one prompt per video (one-line error if not)."""
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != torch.uint8:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise RewardError(f"videos must be a (B, F, H, W, 3) uint8 tensor, got {shape}")
    if len(prompts) != videos.shape[0]:
        raise RewardError(f"got {len(prompts)} prompts for {videos.shape[0]} videos")


def positive(key: str, value: Any, kind: type = float) -> Any:
    """``value`` as a positive ``kind`` (float or int); a one-line error naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and value != int(value)):
        raise RewardError(f"{key} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def read_json(path: Path) -> dict:
    """A JSON file's object; a one-line error naming the file if it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RewardError(f"cannot read {path}: {e}") from e


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` (bfloat16 on CUDA, float32 elsewhere), ``float32``, ``bfloat16`` or ``float16``."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise RewardError(f"dtype must be one of auto, {', '.join(table)}, got {dtype!r}")
    return table[dtype]


def checkpoint_dir(model: Any) -> Path:
    """A local transformers checkpoint directory (with ``config.json``); one-line error otherwise."""
    path = Path(str(model)).expanduser()
    if not (path / "config.json").is_file():
        raise RewardError(f"model must be a local checkpoint directory with config.json, got {str(model)!r}")
    return path


def load_local(processor_cls: Any, model_cls: Any, path: Path, dtype: torch.dtype, what: str) -> tuple[Any, Any]:
    """``(processor, model)`` from the local checkpoint ``path`` (nothing downloaded); a one-line
    :class:`RewardError` naming ``what`` and the path if either fails to load."""
    try:
        return (processor_cls.from_pretrained(path, local_files_only=True),
                model_cls.from_pretrained(path, local_files_only=True, dtype=dtype))
    except Exception as e:
        raise RewardError(f"cannot load the {what} model from {path}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA if there is one), ``cpu``, ``cuda`` or ``cuda:N``. A bare ``cuda`` (and ``auto`` on
    CUDA) is this process's GPU, ``cuda:LOCAL_RANK``: rewards are built before the trainer sets the
    current device, so ``cuda`` alone would put every rank's reward model on ``cuda:0``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RewardError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type == "cuda" and dev.index is None:
        raw = os.environ.get("LOCAL_RANK", "") or "0"          # set by torchrun, deepspeed, accelerate
        if not raw.isdigit():
            raise RewardError(f"environment variable LOCAL_RANK={raw!r} is not an integer (set by the launcher)")
        dev = torch.device("cuda", int(raw))
    return dev
