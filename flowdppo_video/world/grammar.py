"""The shapes world's prompt grammar: colour, shape, direction, speed, background.

``"a red circle moves left slowly on black"``. 4 x 3 x 4 x 2 x 2 = 192 prompts, split once
into train and held-out sets with a fixed seed so every word appears in both.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

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
