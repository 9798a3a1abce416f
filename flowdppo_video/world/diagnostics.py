"""Does a shapes-world model read its motion words? (Pure evaluation: no training, no files.)"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from .grammar import split_scenes
from .model import flow_matching_loss, video_to_latent
from .render import render_batch

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
OTHER_AXIS = {"left": "up", "right": "down", "up": "left", "down": "right"}


@torch.no_grad()
def direction_word_losses(adapter: Any, sigmas: list[float], n: int = 256, seed: int = 0) -> dict[float, dict[str, float]]:
    """Flow-matching loss on ``n`` held-out ground-truth videos per noise level ``{sigma: {caption
    kind: loss}}``, captioned with the right direction word, the opposite one (left <-> right),
    one of the other axis, and nothing. A model that reads the sign of its motion words has a
    higher loss with the opposite word than with the right one."""
    _, held = split_scenes()
    rng = random.Random(seed)
    scenes = [rng.choice(held) for _ in range(n)]
    x0 = video_to_latent(torch.from_numpy(render_batch(scenes, seed=seed)))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))

    def caps(words: dict[str, str] | None) -> list[str]:
        return [dataclasses.replace(s, direction=words[s.direction]).prompt if words else "" for s in scenes]

    captions = {"right word": [s.prompt for s in scenes], "opposite": caps(OPPOSITE),
                "other axis": caps(OTHER_AXIS), "no caption": caps(None)}
    texts = {k: adapter.embed_text(c) for k, c in captions.items()}     # once, not once per sigma
    return {sigma: {k: float(flow_matching_loss(adapter, x0, eps, torch.full((n,), sigma), t))
                    for k, t in texts.items()} for sigma in sigmas}
