"""Does a shapes-world model read its words? (Pure evaluation: no training, no files.)"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from .grammar import Scene, split_scenes
from .model import flow_matching_losses, video_to_latent
from .render import render_batch

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
OTHER_AXIS = {"left": "up", "right": "down", "up": "left", "down": "right"}
ROUND_SWAP = {"square": "circle", "circle": "square"}     # the two shapes that differ only at the corners


def _held_out_batch(n: int, seed: int, keep=lambda s: True) -> tuple[list[Scene], torch.Tensor, torch.Tensor]:
    """``n`` held-out scenes (those ``keep`` accepts), their ground truth ``x0`` and noise, ``(n, 3, F, H, W)``."""
    _, held = split_scenes()
    held = [s for s in held if keep(s)]
    rng = random.Random(seed)
    scenes = [rng.choice(held) for _ in range(n)]
    x0 = video_to_latent(torch.from_numpy(render_batch(scenes, seed=seed)))
    return scenes, x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))


def caption_losses(adapter: Any, sigmas: list[float], x0: torch.Tensor, eps: torch.Tensor,
                   captions: dict[str, list[str]], weight: torch.Tensor | None = None) -> dict[float, dict[str, float]]:
    """``{sigma: {caption kind: flow loss}}`` of one batch ``x0`` and noise ``eps`` under each kind's
    captions (weighted by ``weight (B, 1, F, H, W)`` where given: one region's loss)."""
    return caption_losses_by_region(adapter, sigmas, x0, eps, captions, {"": weight})[""]


def caption_losses_by_region(adapter: Any, sigmas: list[float], x0: torch.Tensor, eps: torch.Tensor,
                             captions: dict[str, list[str]], regions: dict[str, torch.Tensor | None]
                             ) -> dict[str, dict[float, dict[str, float]]]:
    """:func:`caption_losses` in each of ``regions`` (name -> weight ``(B, 1, F, H, W)``, or ``None``
    for the whole video), ``{region: {sigma: {caption kind: loss}}}``, one forward pass per caption
    kind and noise level for all of them."""
    texts = {k: adapter.embed_text(c) for k, c in captions.items()}     # once, not once per sigma
    n = x0.shape[0]
    out: dict[str, dict[float, dict[str, float]]] = {r: {} for r in regions}
    for sigma in sigmas:
        for k, t in texts.items():
            losses = flow_matching_losses(adapter, x0, eps, torch.full((n,), sigma), t, list(regions.values()))
            for r, loss in zip(regions, losses):
                out[r].setdefault(sigma, {})[k] = float(loss)
    return out


@torch.no_grad()
def direction_word_losses(adapter: Any, sigmas: list[float], n: int = 256, seed: int = 0) -> dict[float, dict[str, float]]:
    """Flow-matching loss on ``n`` held-out ground-truth videos per noise level ``{sigma: {caption
    kind: loss}}``, captioned with the right direction word, the opposite one (left <-> right),
    one of the other axis, and nothing. A model that reads the sign of its motion words has a
    higher loss with the opposite word than with the right one."""
    scenes, x0, eps = _held_out_batch(n, seed)

    def caps(words: dict[str, str] | None) -> list[str]:
        return [dataclasses.replace(s, direction=words[s.direction]).prompt if words else "" for s in scenes]

    return caption_losses(adapter, sigmas, x0, eps, {"right word": [s.prompt for s in scenes], "opposite": caps(OPPOSITE),
                                              "other axis": caps(OTHER_AXIS), "no caption": caps(None)})


@torch.no_grad()
def shape_word_losses(adapter: Any, sigmas: list[float], n: int = 256, seed: int = 0) -> dict[float, dict[str, float]]:
    """The same probe for the two round-ish shapes: the loss on ``n`` held-out squares and circles
    with the right shape word, the other one (square <-> circle), ``triangle``, and nothing. A
    model that tells a square from a circle has a clearly higher loss with the swapped word."""
    scenes, x0, eps = _held_out_batch(n, seed, keep=lambda s: s.shape in ROUND_SWAP)

    def caps(shape: dict[str, str] | str) -> list[str]:
        return [dataclasses.replace(s, shape=shape[s.shape] if isinstance(shape, dict) else shape).prompt
                for s in scenes]

    return caption_losses(adapter, sigmas, x0, eps, {"right word": [s.prompt for s in scenes], "swapped": caps(ROUND_SWAP),
                                              "triangle": caps("triangle"), "no caption": [""] * n})
