"""Checkpoints: what trains (safetensors), the optimiser, RNG states and the iteration.

A checkpoint is written into a temporary folder and renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models.base import VideoFlowAdapter

_PREFIX = "iter_"


def _rng_state() -> dict[str, Any]:
    # The trainer's own streams are seeded per iteration; these global states only matter to
    # code outside it (user rewards drawing random numbers, say).
    return {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: Path, adapter: VideoFlowAdapter, optimizer: torch.optim.Optimizer,
                    next_iteration: int, extra: dict[str, Any], keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/iter_{next_iteration:06d}`` atomically; prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{next_iteration:06d}"
    tmp = root / f".tmp_{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    adapter.save_trainable(tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"next_iteration": next_iteration, **extra}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "meta.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, adapter: VideoFlowAdapter, optimizer: torch.optim.Optimizer | None
                    ) -> dict[str, Any]:
    """Load weights (and optimiser and RNG states when ``optimizer`` is given); return the meta."""
    adapter.load_trainable(path / "model")
    if optimizer is not None:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    return json.loads((path / "meta.json").read_text())
