"""The latent world's definition: a prompt grammar of one or two small moving objects on textured
or gradient backgrounds, the backgrounds themselves and the objects' outlines.

Shared by the trainer's embedded latent world (:mod:`flowdppo_video.world.latent`, which renders
and pretrains on it) and its pixel checkers (:mod:`rewards.latent_checks`), so neither package
imports the other. Where the shapes world (:mod:`rewards.shapes_world`) is 8 frames of 16x16 with
one object covering a tenth of the frame on a flat colour, this world is 17 frames of 64x64 (a
Wan 2.1 VAE makes that 5 x 8 x 8 latents of 16 channels), each object covers under 8% of the
frame (2.5 latent cells across) and the background has structure a damaged model can visibly drift from:

``"a red circle moves left slowly on stone"``,
``"a red circle moves left slowly and a blue square moves up quickly on dusk"``.

Prompts are split into train and held-out sets by a stable hash of the prompt text (a fifth held
out), over 384 one-object and 27,648 two-object prompts (the two objects differ in colour, which
is how the checkers tell them apart).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from dataclasses import dataclass

import numpy as np

from .shapes_world import COLOURS, DIRECTIONS, SHAPES, shape_mask

SIZE = 64            # frame height and width, pixels
FRAMES = 17          # frames per video: 1 + 4 x 4, five latent frames under Wan's 4x causal VAE
RADIUS = 10.0        # object half-extent, pixels: a circle covers 7.7% of the frame, a square 7.9%
SPEEDS: dict[str, float] = {"slowly": 1.0, "quickly": 2.0}     # pixels per frame: 16 or 32 px in a video
BACKGROUND_NAMES = ("night", "stone", "sand", "dusk")
HELD_OUT_MODULUS = 5  # a prompt is held out when its hash is 0 modulo this
MAX_OBJECTS = 2


@dataclass(frozen=True)
class Thing:
    """One object of a scene: what colour, what shape, which way and how fast it moves."""

    colour: str
    shape: str
    direction: str
    speed: str

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction} {self.speed}"


@dataclass(frozen=True)
class LatentScene:
    """What a prompt asks for: one or two objects (of different colours) on a background."""

    things: tuple[Thing, ...]
    background: str

    @property
    def prompt(self) -> str:
        return " and ".join(t.phrase for t in self.things) + f" on {self.background}"


def parse_prompt(prompt: str) -> LatentScene:
    """The scene a prompt of this grammar describes; ValueError naming the prompt otherwise."""
    words = prompt.strip().lower().split()
    bad = ValueError(f"prompt {prompt!r} is not in the latent-world grammar ('a <colour> <shape> moves "
                     "<direction> <speed> [and a <colour> <shape> moves <direction> <speed>] on <background>')")
    if len(words) not in (8, 15) or words[-2] != "on" or words[-1] not in BACKGROUND_NAMES \
            or (len(words) == 15 and words[6] != "and"):
        raise bad
    things = []
    for phrase in (words[:6], words[7:13]) if len(words) == 15 else (words[:6],):
        a, colour, shape, moves, direction, speed = phrase
        if (a, moves) != ("a", "moves") or colour not in COLOURS or shape not in SHAPES \
                or direction not in DIRECTIONS or speed not in SPEEDS:
            raise bad
        things.append(Thing(colour, shape, direction, speed))
    if len(things) == 2 and things[0].colour == things[1].colour:
        raise ValueError(f"prompt {prompt!r}: two objects of one colour (the latent world's objects differ in colour)")
    return LatentScene(tuple(things), words[-1])


def all_things() -> list[Thing]:
    return [Thing(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS, SPEEDS)]


def all_scenes(objects: int | None = None) -> list[LatentScene]:
    """Every scene of the grammar (``objects``: only those with that many objects)."""
    things = all_things()
    out: list[LatentScene] = []
    if objects in (None, 1):
        out += [LatentScene((t,), bg) for t in things for bg in BACKGROUND_NAMES]
    if objects in (None, 2):
        out += [LatentScene((a, b), bg) for a in things for b in things if a.colour != b.colour
                for bg in BACKGROUND_NAMES]
    return out


def is_held_out(prompt: str) -> bool:
    """The fixed split: a stable hash of the prompt text, a fifth held out."""
    return int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def split_scenes(objects: int | None = None) -> tuple[list[LatentScene], list[LatentScene]]:
    """``(train, held_out)`` scenes, each sorted by prompt."""
    scenes = all_scenes(objects)
    held = [s for s in scenes if is_held_out(s.prompt)]
    train = [s for s in scenes if not is_held_out(s.prompt)]
    return sorted(train, key=lambda s: s.prompt), sorted(held, key=lambda s: s.prompt)


def draw_scene(rng: random.Random, held_out: bool = False, two_object_share: float = 0.5) -> LatentScene:
    """A random scene of the train (or held-out) split: two objects with probability
    ``two_object_share``; each field uniform. Rejection keeps it on its side of the split."""
    colours, shapes, dirs, speeds = list(COLOURS), list(SHAPES), list(DIRECTIONS), list(SPEEDS)
    while True:
        n = 2 if rng.random() < two_object_share else 1
        cs = rng.sample(colours, n)
        things = tuple(Thing(c, rng.choice(shapes), rng.choice(dirs), rng.choice(speeds)) for c in cs)
        scene = LatentScene(things, rng.choice(BACKGROUND_NAMES))
        if is_held_out(scene.prompt) == held_out:
            return scene


def vocabulary() -> list[str]:
    """Every word the grammar uses (the world tokenizer's vocabulary)."""
    words = ["a", "moves", "on", "and", *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS, *BACKGROUND_NAMES]
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------- backgrounds
# Gradients and low-frequency textures: structure a drifting model visibly loses, smooth enough
# for a small video VAE to keep. Texture wavelengths avoid divisors of the 16-px patch period, so a
# clean background has no grid energy of its own.
_GRADIENTS = {"night": ((8, 12, 34), (34, 22, 62)), "dusk": ((70, 44, 96), (172, 96, 64))}
_TEXTURES = {"stone": ((104, 104, 100), 16.0, 11), "sand": ((164, 140, 98), 13.0, 12)}
_WAVES = 4


@functools.lru_cache(maxsize=None)
def _background(name: str, size: int) -> np.ndarray:
    y, x = np.meshgrid(np.arange(size, dtype=np.float64) + 0.5, np.arange(size, dtype=np.float64) + 0.5,
                       indexing="ij")
    scale = size / SIZE          # the same picture at any size (tests render small)
    if name in _GRADIENTS:
        top, bottom = (np.array(c, dtype=np.float64) for c in _GRADIENTS[name])
        t = (y / size)[..., None]
        img = top * (1 - t) + bottom * t
    elif name in _TEXTURES:
        base, amp, seed = _TEXTURES[name]
        rng = np.random.default_rng(seed)
        field = np.zeros((size, size))
        for _ in range(_WAVES):
            wavelength = rng.uniform(19.0, 41.0) * scale
            angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            field += np.cos(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / wavelength + phase)
        field /= np.sqrt(_WAVES / 2)
        tint = np.array([1.0, 0.9, 0.75])           # warmer in the light parts, as stone and sand are
        img = np.array(base, dtype=np.float64) + amp * field[..., None] * tint
    else:
        raise ValueError(f"unknown background {name!r} (backgrounds: {', '.join(BACKGROUND_NAMES)})")
    out = np.clip(img, 0, 255)
    out.setflags(write=False)
    return out


def background_image(name: str, size: int = SIZE) -> np.ndarray:
    """The background ``(size, size, 3)`` float64 in [0, 255] (read-only): the same for every video."""
    return _background(name, size)


def object_mask(shape: str, cx: float, cy: float, size: int = SIZE, radius: float = RADIUS) -> np.ndarray:
    """Anti-aliased coverage ``(size, size)`` in [0, 1] of a shape centred at ``(cx, cy)`` (the
    shapes world's outlines at this world's radius), computed in a box around it."""
    out = np.zeros((size, size))
    r = int(np.ceil(radius * 1.2)) + 2
    x0, y0 = max(0, int(np.floor(cx)) - r), max(0, int(np.floor(cy)) - r)
    x1, y1 = min(size, int(np.floor(cx)) + r + 1), min(size, int(np.floor(cy)) + r + 1)
    if x1 <= x0 or y1 <= y0:
        return out
    box = max(x1 - x0, y1 - y0)
    m = shape_mask(shape, cx - x0, cy - y0, size=box, radius=radius)
    out[y0:y1, x0:x1] = m[:y1 - y0, :x1 - x0]
    return out


def object_area(shape: str, radius: float = RADIUS) -> float:
    """Pixels a whole object of ``shape`` covers."""
    c = 4 * radius
    return float(object_mask(shape, c, c, size=int(8 * radius), radius=radius).sum())


__all__ = ["BACKGROUND_NAMES", "COLOURS", "DIRECTIONS", "FRAMES", "LatentScene", "MAX_OBJECTS", "RADIUS", "SHAPES",
           "SIZE", "SPEEDS", "Thing", "all_scenes", "all_things", "background_image", "draw_scene", "is_held_out",
           "object_area", "object_mask", "parse_prompt", "split_scenes", "vocabulary"]
