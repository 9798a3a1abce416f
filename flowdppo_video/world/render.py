"""Ground-truth videos of the shapes world: one shape moving as its prompt says."""

from __future__ import annotations

import numpy as np

from .grammar import BACKGROUNDS, COLOURS, DIRECTIONS, SPEEDS, Scene

SIZE = 16          # frame height and width, pixels
FRAMES = 8         # frames per video
RADIUS = 2.6       # shape half-extent, pixels
_SS = 4            # supersampling factor for anti-aliased edges


def shape_mask(shape: str, cx: float, cy: float, size: int = SIZE, radius: float = RADIUS) -> np.ndarray:
    """Anti-aliased coverage ``(size, size)`` in ``[0, 1]`` of a shape centred at ``(cx, cy)``."""
    n = size * _SS
    coords = (np.arange(n) + 0.5) / _SS
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        m = dx ** 2 + dy ** 2 <= radius ** 2
    elif shape == "square":
        h = radius * 0.9            # equal area to the circle would be 0.886 r; keep it a touch larger
        m = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":
        # Upward isosceles triangle inscribed in the radius box: apex on top, base at the bottom.
        r = radius * 1.15
        top, bottom = -r, r
        t = (dy - top) / (bottom - top)               # 0 at the apex, 1 at the base
        m = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= t * r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.reshape(size, _SS, size, _SS).mean(axis=(1, 3))


def path(scene: Scene, rng: np.random.Generator, size: int = SIZE, frames: int = FRAMES,
         radius: float = RADIUS) -> np.ndarray:
    """Centre positions ``(frames, 2)`` (x, y): a random start, then constant velocity."""
    ux, uy = DIRECTIONS[scene.direction]
    travel = SPEEDS[scene.speed] * (frames - 1)
    lo, hi = radius + 0.5, size - radius - 0.5
    start = rng.uniform(lo, hi, size=2)
    # Along the motion axis, start where the whole path stays in the frame.
    for axis, u in ((0, ux), (1, uy)):
        if u > 0:
            start[axis] = rng.uniform(lo, hi - travel)
        elif u < 0:
            start[axis] = rng.uniform(lo + travel, hi)
    t = np.arange(frames)[:, None] * SPEEDS[scene.speed]
    return start[None, :] + t * np.array([ux, uy], dtype=np.float64)[None, :]


def render(scene: Scene, rng: np.random.Generator, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """A ground-truth video ``(frames, size, size, 3)`` uint8 for ``scene``."""
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    fg = np.array(COLOURS[scene.colour], dtype=np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f, (cx, cy) in enumerate(path(scene, rng, size, frames)):
        a = shape_mask(scene.shape, cx, cy, size)[..., None]
        out[f] = np.round(bg * (1 - a) + fg * a).astype(np.uint8)
    return out


def render_batch(scenes: list[Scene], seed: int, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """``(B, frames, size, size, 3)`` uint8; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return np.stack([render(s, rng, size, frames) for s in scenes])
