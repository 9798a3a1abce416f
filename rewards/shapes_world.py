"""The shapes world's definition: its prompt grammar (colour, shape, direction, speed, background)
and the three shapes. Shared by the trainer's embedded world (:mod:`flowdppo_video.world`, which
re-exports every name here where it always was) and the shapes-world rewards (:mod:`rewards.world`),
so neither package imports the other.

``"a red circle moves left slowly on black"``. 4 x 3 x 4 x 2 x 2 = 192 prompts, split once
into train and held-out sets with a fixed seed so every word appears in both.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS: dict[str, float] = {"slowly": 0.7, "quickly": 1.3}      # pixels per frame
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (12, 12, 12), "gray": (128, 128, 128)}
SPLIT_SEED = 20261124
HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for."""

    colour: str
    shape: str
    direction: str
    speed: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction} {self.speed} on {self.background}"


def all_scenes() -> list[Scene]:
    return [Scene(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS, SPEEDS, BACKGROUNDS)]


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt of this grammar describes; ValueError naming the prompt otherwise."""
    words = prompt.strip().lower().split()
    try:
        _, colour, shape, moves, direction, speed, on, background = words
    except ValueError:
        raise ValueError(f"prompt {prompt!r} is not of the form "
                         "'a <colour> <shape> moves <direction> <speed> on <background>'") from None
    scene = Scene(colour, shape, direction, speed, background)
    if (moves, on) != ("moves", "on") or colour not in COLOURS or shape not in SHAPES \
            or direction not in DIRECTIONS or speed not in SPEEDS or background not in BACKGROUNDS:
        raise ValueError(f"prompt {prompt!r} is not in the shapes-world grammar")
    return scene


def split_scenes() -> tuple[list[Scene], list[Scene]]:
    """``(train, held_out)``: fixed; each colour, shape, direction appears in both."""
    scenes = all_scenes()
    rng = random.Random(SPLIT_SEED)
    while True:
        order = scenes[:]
        rng.shuffle(order)
        n_held = round(len(order) * HELD_OUT_FRACTION)
        held, train = order[:n_held], order[n_held:]
        ok = all({getattr(s, f) for s in part} == {getattr(s, f) for s in scenes}
                 for part in (held, train) for f in ("colour", "shape", "direction", "speed", "background"))
        if ok:
            return sorted(train, key=lambda s: s.prompt), sorted(held, key=lambda s: s.prompt)


def vocabulary() -> list[str]:
    """Every word the grammar uses (the world tokenizer's vocabulary)."""
    words = ["a", "moves", "on", *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS, *BACKGROUNDS]
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------- the shapes
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
