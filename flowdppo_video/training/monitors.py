"""Artifact monitors in every evaluation, and the reward-hacking warning read from them.

The monitors (``rewards.artifacts``: patch grid, clipped pixels, saturation, flicker, frame jumps,
frozen frames; all higher = worse) score the held-out videos of each evaluation beside the rewards.
An evaluation row holds ``monitor/<name>/mean`` and ``monitor/<name>/std`` (over its videos): under
their own prefix, not ``eval/``, so no reward table or total counts them as rewards; the run's
closing table, the report and ``eval`` show them in a block of their own, base -> now.

:func:`hacking_warnings` is the report's warning: a training reward rose (held out when it is
evaluated, else along the training curve) while a monitor worsened, from the base model's
evaluation to the last, by more than the base model's own spread (the std of that monitor over the
base model's held-out videos) and by more than the monitor's noticeable change
(``rewards.artifacts.NOTICEABLE``: a base model without any artifact has a std of ~0).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Sequence

import torch

from flowdppo_video.models.base import VideoFlowAdapter
from flowdppo_video.runs.config import ConfigError
from rewards import build_rewards, score_videos
from rewards.artifacts import DEFAULT_MONITORS, monitor_specs, NOTICEABLE

PREFIX = "monitor/"


def model_period(adapter: "VideoFlowAdapter") -> int:
    """The spatial period of a model's patch grid in pixels: VAE stride x transformer patch (16 for
    Wan 2.1: 8 x 2; 2 for the shapes world, which is in pixel space with patch 2)."""
    return int(adapter.scale_spatial) * int(adapter.patch_size[1])


def build_monitors(names: Sequence[str] | None, period: int | None, adapter: Any,
                   size: tuple[int, int] | None = None, key: str = "eval.monitors") -> dict[str, Any]:
    """The configured monitors as built rewards (``names`` None: all defaults); ``patch_grid``'s period
    is ``period``, else the model's (:func:`model_period`). ``size``: the videos' ``(height, width)``;
    a grid needs two periods a side, so by default ``patch_grid`` is left out of smaller videos (a
    note says so), and asked for by name it is an error naming ``eval.monitor_period``. Errors name
    ``key``."""


    chosen = tuple(DEFAULT_MONITORS if names is None else names)
    p = period or model_period(adapter)
    if "patch_grid" in chosen and size is not None and min(size) < 2 * p:
        why = f"videos of {size[0]}x{size[1]} px hold less than two periods of the {p}-px patch grid"
        if names is not None:
            raise ConfigError(f"eval.monitors: patch_grid: {why}; set eval.monitor_period or leave it out")
        print(f"flowdppo-video: note: the patch_grid monitor is off: {why}", file=sys.stderr)
        chosen = tuple(n for n in chosen if n != "patch_grid")
    return build_rewards(monitor_specs(p, chosen), key)


def score_monitors(monitors: Mapping[str, Any], videos: torch.Tensor, prompts: list[str], *, fps: float
                   ) -> dict[str, torch.Tensor]:
    """``{name: (B,) scores}`` of ``(B, F, H, W, 3)`` uint8 videos (parts dropped: a monitor is one number)."""
    if not monitors:
        return {}
    scores, _ = score_videos(dict(monitors), videos, prompts, fps=fps)
    return scores


def monitor_means(per_video: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``monitor/<name>/mean`` and ``monitor/<name>/std`` (population std over the videos)."""
    out = {}
    for n, s in per_video.items():
        s = s.double()
        out[f"{PREFIX}{n}/mean"] = float(s.mean())
        out[f"{PREFIX}{n}/std"] = float(s.std(unbiased=False)) if s.numel() > 1 else 0.0
    return out


def monitor_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The monitors logged in any of ``rows``, in logged order."""
    names: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith(PREFIX) and k.endswith("/mean"):
                n = k[len(PREFIX):-len("/mean")]
                if n not in names:
                    names.append(n)
    return names


def _get(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    return None if v is None or not math.isfinite(float(v)) else float(v)


def hacking_warnings(evals: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                     training_rewards: Sequence[str], spread: float = 1.0) -> list[str]:
    """One sentence per (training reward that rose, monitor that worsened) pair; ``[]`` when none.

    ``evals``: the evaluation rows in order, the first the base model's (``after_iterations`` 0);
    ``rows``: the training rows (for a reward not evaluated held out); ``training_rewards``: the
    names in the run's ``rewards``. A monitor worsened when its last mean exceeds the base mean by
    more than ``spread`` x the base std over the held-out videos and by more than its noticeable
    change (``rewards.artifacts.NOTICEABLE``; 0 for a monitor not listed there).
    """
    if len(evals) < 2 or evals[0].get("after_iterations", 0) != 0:
        return []
    base, last = evals[0], evals[-1]
    rose = []
    for r in training_rewards:
        a, b = _get(base, f"eval/{r}/mean"), _get(last, f"eval/{r}/mean")
        where = "held-out"
        if a is None or b is None:                       # not evaluated held out: the training curve
            a = _get(rows[0], f"reward/{r}/mean") if rows else None
            b = _get(rows[-1], f"reward/{r}/mean") if rows else None
            where = "training"
        if a is not None and b is not None and b > a:
            rose.append((r, where, a, b))
    out = []
    for m in monitor_names([base, last]):
        a, b, s = (_get(base, f"{PREFIX}{m}/mean"), _get(last, f"{PREFIX}{m}/mean"),
                   _get(base, f"{PREFIX}{m}/std"))
        if a is None or b is None or s is None or not b - a > max(spread * s, NOTICEABLE.get(m, 0.0)):
            continue
        for r, where, ra, rb in rose:
            out.append(f"possible reward hacking: {where} reward {r} rose {ra:.4g} -> {rb:.4g} while the artifact "
                       f"monitor {m} worsened {a:.4g} -> {b:.4g} (more than the base model's own spread, std "
                       f"{s:.3g} over its held-out videos, and than {NOTICEABLE.get(m, 0.0):g}; after "
                       f"{last.get('after_iterations', '?')} iterations)")
    return out


__all__ = ["PREFIX", "build_monitors", "hacking_warnings", "model_period", "monitor_means", "monitor_names",
           "score_monitors"]
