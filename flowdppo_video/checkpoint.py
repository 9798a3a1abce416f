"""Checkpoints: what trains (safetensors), the optimizer (the updater's own files), RNG states and
the iteration.

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
from .parallel.groups import ParallelState
from .parallel.updaters import Updater

_PREFIX = "iter_"


def _rng_state() -> dict[str, Any]:
    # The trainer's own streams are seeded per iteration; these global states only matter to
    # code outside it (user rewards drawing random numbers, say).
    return {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: Path, adapter: VideoFlowAdapter, updater: Updater,
                    next_iteration: int, extra: dict[str, Any], keep: int = 2,
                    par: ParallelState | None = None) -> Path:
    """Write ``run_dir/checkpoints/iter_{next_iteration:06d}`` atomically; prune old ones.

    Collective when several ranks run: each writes its share of the optimizer state (ZeRO), rank
    0 the full trained weights, the RNG state and the meta, then renames the folder into place.
    """
    par = par or ParallelState()
    root = run_dir / "checkpoints"
    final = root / f"{_PREFIX}{next_iteration:06d}"
    tmp = root / f".tmp_{final.name}"
    if par.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    par.barrier("checkpoint start")
    updater.save(tmp)
    with updater.gathered():                 # ZeRO-3: the whole trained weights, for rank 0 to write
        if par.is_main:
            adapter.save_trainable(tmp / "model")
    if par.is_main:
        torch.save({"rng": _rng_state()}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"next_iteration": next_iteration, **extra}, indent=1))
    par.barrier("checkpoint write")
    if par.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    par.barrier("checkpoint rename")
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


def load_checkpoint(path: Path, adapter: VideoFlowAdapter, updater: Updater | None) -> dict[str, Any]:
    """Load weights (and the optimizer and RNG states when ``updater`` is given); return the meta."""
    if updater is None or not updater.restores_weights:
        adapter.load_trainable(path / "model")
    if updater is not None:
        updater.load(path)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        _set_rng_state(state["rng"])
    return json.loads((path / "meta.json").read_text())
