"""Artifact monitors for any video, from pixels only: what RL fine-tuning can break while a reward
climbs (the transformer's patch grid showing through, over-exposure and saturation drift, flicker,
frozen frames). Each is a registered reward, so it can be logged in evaluation (the trainer and
``eval`` run :data:`DEFAULT_MONITORS` by default) or trained against with a negative weight.

Every monitor reads **higher = worse** and returns a dict with ``score`` and its parts, ``(B,)``
float32 each. Scales (docs/rewards.md has the validation on real clips):

* ``patch_grid`` -- the RMS, in 8-bit levels, of the component of the high-passed grey frames that
  repeats with the family's spatial period ``P`` (VAE stride x transformer patch: 16 px for Wan 2.1,
  2 px for the shapes world; the trainer passes its model's own): per phase, the median over frames
  and ``P x P`` cells (:func:`grid_measurements`). At ``P = 2`` it reads as ``world_fidelity``'s grid
  energy (columns alternating by ``2a`` read ``a``); clean footage <= 0.15. Part ``residual``.
* ``clipped_pixels`` -- the share in ``[0, 1]`` of colour samples at the ends of the 8-bit range
  (``<= 3`` or ``>= 252``): blown highlights, crushed shadows, channels clipped by over-saturation.
  Parts ``highlights``, ``shadows``.
* ``saturation`` -- the mean HSV saturation ``(max - min) / max`` in ``[0, 1]`` (drift: compare
  with the base model's; content sets the level). Part ``luma``: mean luma in ``[0, 1]``.
* ``flicker`` -- brightness flicker: mean |second temporal difference| of the frames' mean luma, in
  8-bit levels (steady footage <= 2). Part ``change``.
* ``frame_jumps`` -- dropped frames and stutter: the largest frame-to-frame change over the median
  of its neighbours' (steady motion ~1-1.5). Part ``change``.
* ``frozen_frames`` -- the share in ``[0, 1]`` of consecutive frame pairs that do not change (mean
  absolute difference under ``tolerance`` levels at the working size): repeated frames, a frozen
  video. Part ``change``.

Cost (CPU, numpy and OpenCV, one thread): see docs/rewards.md (measured per video, all six
together). The grid and colour monitors read at most ``max_frames`` frames (16) at full size, the
temporal ones every frame shrunk to short side ``size`` (64).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .common import check_videos
from .registry import RewardError, register

DEFAULT_MONITORS = ("patch_grid", "clipped_pixels", "saturation", "flicker", "frame_jumps", "frozen_frames")
# The least change of each monitor that is worth a warning (its scale's noise: what clean footage and
# harmless re-encoding move it by, docs/rewards.md), so a model with no artifact at all (a std of ~0
# over its videos) is not flagged for an invisible 0.004-level grid.
NOTICEABLE = {"patch_grid": 0.15, "clipped_pixels": 0.01, "saturation": 0.02, "flicker": 0.5,
              "frame_jumps": 0.3, "frozen_frames": 0.05}
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
CHANGE_FLOOR = 0.5          # 8-bit levels: frame_jumps' denominator floor (a still video's noise is no jump)


def _check_int(who: str, key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise RewardError(f"{who}: option {key} must be an integer >= {least}, got {value!r}")
    return value


def _check_float(who: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RewardError(f"{who}: option {key} must be a number > 0, got {value!r}")
    return float(value)


_LAST: dict[str, tuple[torch.Tensor, tuple, dict[str, np.ndarray]]] = {}


def _shared(kind: str, videos: torch.Tensor, prompts: list[str], options: tuple, compute: Any) -> dict[str, np.ndarray]:
    """``compute()``, or its result for the same batch and options from the monitor before: the
    temporal (and the colour) monitors measure one pass, so an evaluation running all of them pays
    once. The very tensor object (not an equal one) and its in-place version must match."""
    check_videos(videos, prompts)
    last = _LAST.get(kind)
    key = (videos._version, options)
    if last is not None and last[0] is videos and last[1] == key:
        return last[2]
    out = compute()
    _LAST[kind] = (videos, key, out)
    return out


def _numpy(videos: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """``(B, F, H, W, 3)`` uint8 tensor -> the same as a numpy array (checked)."""
    check_videos(videos, prompts)
    return videos.detach().cpu().numpy()


def frame_subset(num_frames: int, max_frames: int) -> np.ndarray:
    """At most ``max_frames`` indices spread evenly over ``num_frames`` (all when fewer)."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, max_frames).round().astype(np.int64))


def _grey(frames: np.ndarray) -> np.ndarray:
    """``(..., H, W, 3)`` uint8 -> ``(..., H, W)`` float32 luma in 8-bit levels."""
    return frames.astype(np.float32) @ LUMA


def _working_grey(video: np.ndarray, size: int) -> np.ndarray:
    """``(F, H, W, 3)`` uint8 -> ``(F, h, w)`` float32 luma, shrunk (area) so the short side is at most
    ``size``: temporal change measured on averaged pixels, so sensor and codec noise do not count
    (shrunk as uint8 RGB first: converting every full-size frame to float costs more than the rest)."""
    import cv2

    f, h, w, _ = video.shape
    s = size / min(h, w)
    if s < 1:
        hw = (max(1, round(w * s)), max(1, round(h * s)))
        video = np.stack([cv2.resize(x, hw, interpolation=cv2.INTER_AREA) for x in video])
    return _grey(video)


def _pixel_sample(video: np.ndarray, max_frames: int, max_pixels: int = 65536) -> np.ndarray:
    """At most ``max_frames`` frames of ``(F, H, W, 3)``, every ``s``-th pixel each way so a frame holds
    about ``max_pixels`` at most: shares and means of pixels need no more, and full-size 480p
    frames cost ~1 s per monitor."""
    s = max(1, math.ceil(math.sqrt(video.shape[1] * video.shape[2] / max_pixels)))
    return video[frame_subset(video.shape[0], max_frames), ::s, ::s]


# ---------------------------------------------------------------------- the patch grid

HIGH_PASS = np.array([0.25, 0.5, 0.25], dtype=np.float32)   # x - blur: keeps seams and a 2-px grid whole


def grid_measurements(videos: np.ndarray, period: int, max_frames: int = 8) -> dict[str, np.ndarray]:
    """``energy`` (8-bit levels) of the ``period``-periodic component and ``residual`` (RMS of the
    high-passed frames, levels: the non-periodic part it stands out from), ``(B,)`` each.

    The grey frames minus their 3x3 binomial blur (a column pattern alternating by ``2a`` passes whole,
    so at period 2 this reads as ``world_fidelity``'s grid energy; a one-pixel seam of height ``a`` every
    16 px in both directions reads about ``0.2 a``; a smooth modulation without edges is not seen); at
    each of the ``period^2`` phases the **median** over frames and cells (texture and edges are
    heavy-tailed, the grid is not: a mean let codec blocking and edges through at ~1-3 levels, the
    median reads clean clips at <= 0.15), minus the mean over phases; the RMS of that.

    Args:
        videos: ``(B, F, H, W, 3)`` uint8, each side at least two periods.
        period: the grid's period in pixels (VAE stride x patch).
        max_frames: frames used per video, spread evenly (a model's grid is in every frame).
    """
    import cv2

    b, f, h, w, _ = videos.shape
    if h < 2 * period or w < 2 * period:
        raise RewardError(f"patch_grid: videos of {h}x{w} pixels are smaller than two periods of {period} px "
                          f"(option period)")
    hh, ww = h // period * period, w // period * period
    energy, residual = np.zeros(b, np.float32), np.zeros(b, np.float32)
    for i, video in enumerate(videos):
        g = _grey(video[frame_subset(f, max_frames)])                        # (F', H, W) levels
        r = np.stack([x - cv2.sepFilter2D(x, cv2.CV_32F, HIGH_PASS, HIGH_PASS, borderType=cv2.BORDER_REFLECT_101)
                      for x in g])[:, :hh, :ww]
        cells = r.reshape(r.shape[0], hh // period, period, ww // period, period).transpose(2, 4, 0, 1, 3)
        m = np.median(cells.reshape(period, period, -1), axis=-1).astype(np.float64)     # (P, P)
        m -= m.mean()
        energy[i], residual[i] = np.sqrt((m ** 2).mean()), np.sqrt((r.astype(np.float64) ** 2).mean())
    return {"energy": energy, "residual": residual}


@register("patch_grid")
class PatchGrid:
    """The transformer's patch grid showing through: RMS of the ``period``-periodic component of the
    high-passed frames, in 8-bit levels (higher = worse; clean footage <= 0.15, see
    :func:`grid_measurements`). ``period`` (px): VAE stride x patch, 16 for Wan 2.1 (the default), 2
    for the shapes world; the trainer and ``eval`` pass the model's own unless configured.
    ``max_frames``: frames used, spread evenly. Extra: ``residual`` (levels)."""

    monitor = True

    def __init__(self, period: int = 16, max_frames: int = 8) -> None:
        self.period = _check_int("patch_grid", "period", period, 2)
        self.max_frames = _check_int("patch_grid", "max_frames", max_frames, 1)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = grid_measurements(_numpy(videos, prompts), self.period, self.max_frames)
        return {"score": torch.from_numpy(m["energy"]), "residual": torch.from_numpy(m["residual"])}


# ---------------------------------------------------------------------- exposure and colour

def exposure_measurements(videos: np.ndarray, max_frames: int = 16, low: int = 3, high: int = 252
                          ) -> dict[str, np.ndarray]:
    """Per video, ``(B,)`` float32: ``highlights`` and ``shadows`` (shares of colour samples ``>= high``
    and ``<= low``), ``clipped`` (their sum), ``saturation`` (mean HSV saturation) and ``luma`` (mean
    luma), all in ``[0, 1]``, over at most ``max_frames`` frames of ``(B, F, H, W, 3)`` uint8 videos."""
    out = {k: np.zeros(len(videos), np.float32) for k in ("highlights", "shadows", "clipped", "saturation", "luma")}
    for i, video in enumerate(videos):
        v = _pixel_sample(video, max_frames)
        out["highlights"][i] = (v >= high).mean()
        out["shadows"][i] = (v <= low).mean()
        hi, lo = v.max(axis=-1).astype(np.float32), v.min(axis=-1).astype(np.float32)
        out["saturation"][i] = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0).mean()
        out["luma"][i] = _grey(v).mean() / 255.0
    out["clipped"] = out["highlights"] + out["shadows"]
    return out


@register("clipped_pixels")
class ClippedPixels:
    """Share in ``[0, 1]`` of colour samples at the ends of the 8-bit range (``<= 3`` or ``>= 252``):
    over-exposure, crushed shadows, channels clipped by over-saturation (higher = worse). Extras:
    ``highlights``, ``shadows``."""

    monitor = True

    def __init__(self, max_frames: int = 16) -> None:
        self.max_frames = _check_int("clipped_pixels", "max_frames", max_frames, 1)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = _shared("exposure", videos, prompts, (self.max_frames,),
                    lambda: exposure_measurements(_numpy(videos, prompts), self.max_frames))
        return {"score": torch.from_numpy(m["clipped"]), "highlights": torch.from_numpy(m["highlights"]),
                "shadows": torch.from_numpy(m["shadows"])}


@register("saturation")
class Saturation:
    """Mean HSV saturation ``(max - min) / max`` in ``[0, 1]`` (a drift monitor: higher than the
    base model's = worse; content sets its level, so compare a model with its base on the same
    prompts and noise). Extra: ``luma`` (mean luma in ``[0, 1]``)."""

    monitor = True

    def __init__(self, max_frames: int = 16) -> None:
        self.max_frames = _check_int("saturation", "max_frames", max_frames, 1)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = _shared("exposure", videos, prompts, (self.max_frames,),
                    lambda: exposure_measurements(_numpy(videos, prompts), self.max_frames))
        return {"score": torch.from_numpy(m["saturation"]), "luma": torch.from_numpy(m["luma"])}


# ---------------------------------------------------------------------- time

def temporal_measurements(videos: np.ndarray, size: int = 64, tolerance: float = 0.1) -> dict[str, np.ndarray]:
    """Per video, ``(B,)`` float32, from grey frames shrunk to short side ``size`` (area averaging:
    sensor and codec noise do not count) and ``d_t``, the mean absolute change of pair ``t`` (levels):

    * ``flicker``: mean |second difference| of the frames' mean luma (levels): brightness pumping; a
      steady fade or pan is ~0 (needs 3 frames, else 0);
    * ``jump``: the largest ``d_t`` over the median of its (up to four) neighbours' (floored at 0.5
      levels): a dropped frame or a stutter; steady motion reads ~1-1.5 (needs 2 pairs, else 1);
    * ``frozen``: the share of pairs with ``d_t < tolerance``: repeated frames, a frozen video;
    * ``change``: mean ``d_t``.
    """
    out = {k: np.zeros(len(videos), np.float32) for k in ("flicker", "jump", "frozen", "change")}
    out["jump"][:] = 1.0
    for i, video in enumerate(videos):
        if video.shape[0] < 2:
            continue
        g = _working_grey(video, size)
        d = np.abs(np.diff(g, axis=0)).mean(axis=(1, 2))                  # (F-1,) per pair
        out["change"][i], out["frozen"][i] = d.mean(), (d < tolerance).mean()
        if len(d) >= 2:
            out["jump"][i] = max(d[t] / max(float(np.median(np.r_[d[max(0, t - 2):t], d[t + 1:t + 3]])), CHANGE_FLOOR)
                                 for t in range(len(d)))
        if g.shape[0] >= 3:
            out["flicker"][i] = np.abs(np.diff(g.mean(axis=(1, 2)), n=2)).mean()
    return out


@register("flicker")
class Flicker:
    """Brightness flicker: mean |second temporal difference| of the frames' mean luma, in 8-bit levels
    (higher = worse; steady footage <= 2, a +-4 level pumping ~16). ``size``: the short side of the
    grey frames measured (area-shrunk). ``temporal_flicker`` is the flow-based, costlier measure of
    local flicker. Extra: ``change`` (mean absolute change per frame pair, levels)."""

    monitor = True

    def __init__(self, size: int = 64) -> None:
        self.size = _check_int("flicker", "size", size, 8)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = _shared("time", videos, prompts, (self.size, 0.1), lambda: temporal_measurements(_numpy(videos, prompts), self.size))
        return {"score": torch.from_numpy(m["flicker"]), "change": torch.from_numpy(m["change"])}


@register("frame_jumps")
class FrameJumps:
    """Dropped frames and stutter: the largest frame-to-frame change over the median of its neighbours'
    (floored at 0.5 levels), grey frames at short side ``size`` (higher = worse; steady motion ~1-1.5,
    two frames dropped from steady motion ~2; content whose own timing is irregular reads up to ~2).
    Extra: ``change``."""

    monitor = True

    def __init__(self, size: int = 64) -> None:
        self.size = _check_int("frame_jumps", "size", size, 8)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = _shared("time", videos, prompts, (self.size, 0.1), lambda: temporal_measurements(_numpy(videos, prompts), self.size))
        return {"score": torch.from_numpy(m["jump"]), "change": torch.from_numpy(m["change"])}


@register("frozen_frames")
class FrozenFrames:
    """Share in ``[0, 1]`` of consecutive frame pairs that do not change (mean absolute difference of
    grey frames at short side ``size`` under ``tolerance`` 8-bit levels): repeated frames, a frozen
    video (higher = worse). Extra: ``change`` (mean absolute change per pair, levels)."""

    monitor = True

    def __init__(self, size: int = 64, tolerance: float = 0.1) -> None:
        self.size = _check_int("frozen_frames", "size", size, 8)
        self.tolerance = _check_float("frozen_frames", "tolerance", tolerance)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = _shared("time", videos, prompts, (self.size, self.tolerance),
                    lambda: temporal_measurements(_numpy(videos, prompts), self.size, self.tolerance))
        return {"score": torch.from_numpy(m["frozen"]), "change": torch.from_numpy(m["change"])}


def monitor_specs(period: int | None = None, names: tuple[str, ...] = DEFAULT_MONITORS) -> dict[str, Any]:
    """The reward entries of the default monitors (weight 0: logged, never trained against), with
    ``patch_grid``'s ``period`` when given (the model's own: VAE stride x patch)."""
    unknown = [n for n in names if n not in DEFAULT_MONITORS]
    if unknown:
        raise RewardError(f"unknown monitor {unknown[0]!r}; the monitors are {', '.join(DEFAULT_MONITORS)}")
    out: dict[str, Any] = {}
    for n in names:
        out[n] = {"weight": 0.0, "period": int(period)} if n == "patch_grid" and period else 0.0
    return out


__all__ = ["DEFAULT_MONITORS", "NOTICEABLE", "ClippedPixels", "Flicker", "FrameJumps", "FrozenFrames", "PatchGrid", "Saturation",
           "exposure_measurements", "frame_subset", "grid_measurements", "monitor_specs",
           "temporal_measurements"]
