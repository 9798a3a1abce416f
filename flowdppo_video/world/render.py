"""Ground-truth videos of the shapes world: one shape moving as its prompt says."""

from __future__ import annotations

import numpy as np

# The frame size, the shapes and their radius are the world's definition, shared with its rewards.
from rewards.shapes_world import FRAMES, RADIUS, SIZE, shape_mask  # noqa: F401 (re-exported)

from .grammar import BACKGROUNDS, COLOURS, DIRECTIONS, SPEEDS, Scene


def straight_path(direction: tuple[float, float], speed: float, rng: np.random.Generator, size: int, frames: int,
                  radius: float) -> np.ndarray:
    """Centre positions ``(frames, 2)`` (x, y) moving at ``speed`` px/frame along unit ``direction``: a
    random start from which the whole path stays in the frame, then constant velocity (both worlds)."""
    ux, uy = direction
    travel = speed * (frames - 1)
    lo, hi = radius + 0.5, size - radius - 0.5
    start = rng.uniform(lo, hi, size=2)
    # Along the motion axis, start where the whole path stays in the frame.
    for axis, u in ((0, ux), (1, uy)):
        if u > 0:
            start[axis] = rng.uniform(lo, hi - travel)
        elif u < 0:
            start[axis] = rng.uniform(lo + travel, hi)
    t = np.arange(frames)[:, None] * speed
    return start[None, :] + t * np.array([ux, uy], dtype=np.float64)[None, :]


def path(scene: Scene, rng: np.random.Generator, size: int = SIZE, frames: int = FRAMES,
         radius: float = RADIUS) -> np.ndarray:
    """Centre positions ``(frames, 2)`` (x, y) of ``scene``'s shape: a random start, then constant velocity."""
    return straight_path(DIRECTIONS[scene.direction], SPEEDS[scene.speed], rng, size, frames, radius)


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
