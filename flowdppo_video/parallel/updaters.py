"""The optimizer step of the update, behind one small interface the trainer drives.

``TorchUpdater``: AdamW over the trainable parameters, gradients averaged over the world
before clipping (so every rank takes the same step). ``ZeroUpdater`` (``parallel/zero.py``):
the same through a DeepSpeed ZeRO engine (``parallel.zero_stage`` 1-3). Per minibatch the
trainer calls ``zero_grad``, ``backward`` once per SDE step (it agrees over ranks that the loss is
finite, and says so), then ``step``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Protocol

import torch

from flowdppo_video.runs.config import Config

from ..models.base import VideoFlowAdapter
from .groups import ParallelState
from .zero import ZeroUpdater

_OPTIMIZER_FILE = "optimizer.pt"


class Updater(Protocol):
    params: list[torch.nn.Parameter]
    restores_weights: bool        # whether load() also restores the trained weights

    def zero_grad(self) -> None: ...
    def backward(self, loss: torch.Tensor) -> bool: ...   # False on every rank if any loss is not finite
    def step(self) -> tuple[bool, float]: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def gathered(self, whole: bool = False) -> contextlib.AbstractContextManager[None]: ...   # what trains, whole
    def rollout(self) -> contextlib.AbstractContextManager[None]: ...


class TorchUpdater:
    """``torch.optim.AdamW``; with several ranks, gradients are averaged over the world first."""

    restores_weights = False

    def __init__(self, adapter: VideoFlowAdapter, cfg: Config, par: ParallelState) -> None:
        o = cfg.optim
        self.params = adapter.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.grad_clip = o.grad_clip
        self.par = par

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> bool:
        """Accumulate the gradient of ``loss`` once every rank's loss is finite (one collective);
        ``False`` on every rank otherwise (nothing accumulated: the caller ends the minibatch)."""
        if not self.par.all_true(bool(torch.isfinite(loss.detach()).all()), "the finite-loss check"):
            return False
        loss.backward()
        return True

    def step(self) -> tuple[bool, float]:
        self.par.average_gradients(self.params)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf")))
        if not math.isfinite(norm):
            self.zero_grad()
            return False, norm
        self.optimizer.step()
        return True, norm

    def save(self, directory: Path) -> None:
        if self.par.is_main:                   # every rank holds the same state
            torch.save(self.optimizer.state_dict(), directory / _OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        f = directory / _OPTIMIZER_FILE
        if f.is_file():
            state = torch.load(f, map_location="cpu", weights_only=False)
        else:  # checkpoints before the updaters kept the optimizer inside state.pt
            state = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)["optimizer"]
        self.optimizer.load_state_dict(state)

    def gathered(self, whole: bool = False) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def rollout(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def build_updater(adapter: VideoFlowAdapter, cfg: Config, par: ParallelState) -> Updater:
    """The updater ``parallel.zero_stage`` asks for (0: torch AdamW; 1-3: DeepSpeed ZeRO)."""
    if cfg.parallel.zero_stage == 0:
        return TorchUpdater(adapter, cfg, par)
    return ZeroUpdater(adapter, cfg.optim, cfg.parallel, accumulation_steps=cfg.sampler.sde_steps,
                       persistence_threshold=cfg.parallel.zero_persistence_threshold)
