"""Pixel helpers the world checkers share (:mod:`rewards.world`, :mod:`rewards.latent_checks`): pure numpy."""

from __future__ import annotations

import numpy as np
import torch


def ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below ``lo``, 1 above ``hi``, linear between."""
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """:func:`ramp` with a smooth start and end."""
    t = ramp(x, lo, hi)
    return t * t * (3.0 - 2.0 * t)


def as_rgb(videos) -> np.ndarray:
    """``videos`` (B, F, H, W, 3) uint8 (or float in [0, 255]), tensor or array -> float32 [0, 1]."""
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().cpu().numpy()
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be (B, F, H, W, 3), got {videos.shape}")
    if videos.shape[1] < 1 or videos.shape[2] < 3 or videos.shape[3] < 3:
        raise ValueError(f"videos of {videos.shape[1]} frames of {videos.shape[2]}x{videos.shape[3]} pixels "
                         "are too small to analyse")
    return videos.astype(np.float32) / np.float32(255.0)


def box_sum(x: np.ndarray, r: int) -> np.ndarray:
    """Sum over the (2r+1)^2 box around every pixel of ``x`` (..., H, W), zero outside."""
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(r + 1, r), (r + 1, r)]
    s = np.pad(x, pad).cumsum(axis=-2).cumsum(axis=-1)
    k = 2 * r + 1
    return s[..., k:k + h, k:k + w] - s[..., :h, k:k + w] - s[..., k:k + h, :w] + s[..., :h, :w]
