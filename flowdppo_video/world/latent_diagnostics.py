"""Does a latent-world model read its words? (Pure evaluation: no training, no files.)

The same probe as the shapes world's (:mod:`flowdppo_video.world.diagnostics`): the flow-matching
loss on held-out ground truth, encoded by the model's own VAE, captioned with the right direction
word, the opposite one, one of the other axis, and nothing. A model that reads the sign of its
motion words has a clearly higher loss with the opposite word than with the right one.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from flowdppo_video.models.common import vae_latent_stats
from rewards.latent_world import LatentScene, draw_scene

from .diagnostics import OPPOSITE, OTHER_AXIS, caption_losses_by_region
from .latent import latent_object_cover, render_batch, video_to_pixels


def normalised_latents(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior ``z (B, 16, F', H', W')`` in the transformer's units: minus the VAE's
    ``latents_mean``, over its ``latents_std`` (the adapter's ``decode`` undoes this)."""
    mean, std = vae_latent_stats(vae, z.device, z.dtype)
    return (z - mean) / std


@torch.no_grad()
def encode_scenes(vae: Any, scenes: list[LatentScene], seed: int, chunk: int = 16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``scenes`` and encode them (posterior means, normalised): ``(B, 16, F', H', W')``, and
    the objects' coverage on that grid ``(B, 1, F', H', W')`` (:func:`latent_object_cover`)."""
    out, covers = [], []
    for i in range(0, len(scenes), chunk):
        videos, cover = render_batch(scenes[i:i + chunk], seed=seed * 1_000_003 + i, with_mask=True)
        out.append(normalised_latents(vae, vae.encode(video_to_pixels(videos)).latent_dist.mode()))
        covers.append(latent_object_cover(cover))
    return torch.cat(out), torch.cat(covers)


def object_cells(cover: torch.Tensor) -> torch.Tensor:
    """The latent cells any object touches, 0/1 ``(B, 1, F', H', W')`` from
    :func:`~flowdppo_video.world.latent.latent_object_cover`'s coverage."""
    return (cover > 0).float()


@torch.no_grad()
def direction_word_losses_by_region(adapter: Any, sigmas: list[float], n: int = 128, seed: int = 0,
                                    two_object_share: float = 0.0) -> dict[str, dict[float, dict[str, float]]]:
    """``{region: {sigma: {caption kind: flow loss}}}`` on ``n`` held-out scenes (one object by
    default), every object's direction word kept, replaced by the opposite one, by one of the other
    axis, or the caption left empty; the same noise for every caption. Two regions from the same
    forward passes: ``"video"`` (every cell) and ``"objects"`` (the cells the objects cover, where a
    word about them can matter; the background, about 80% of a one-object video's cells, dilutes
    any such word in the first)."""
    rng = random.Random(seed)
    scenes = [draw_scene(rng, held_out=True, two_object_share=two_object_share) for _ in range(n)]
    x0, cover = encode_scenes(adapter.vae, scenes, seed)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))

    def caps(words: dict[str, str] | None) -> list[str]:
        if words is None:
            return [""] * n
        return [LatentScene(tuple(dataclasses.replace(t, direction=words[t.direction]) for t in s.things),
                            s.background).prompt for s in scenes]

    return caption_losses_by_region(
        adapter, sigmas, x0, eps, {"right word": [s.prompt for s in scenes], "opposite": caps(OPPOSITE),
                                   "other axis": caps(OTHER_AXIS), "no caption": caps(None)},
        {"video": None, "objects": object_cells(cover)})


def direction_word_losses(adapter: Any, sigmas: list[float], n: int = 128, seed: int = 0,
                          two_object_share: float = 0.0, objects_only: bool = False) -> dict[float, dict[str, float]]:
    """One region of :func:`direction_word_losses_by_region`: the whole video, or with
    ``objects_only`` the cells the objects cover."""
    return direction_word_losses_by_region(adapter, sigmas, n, seed, two_object_share)[
        "objects" if objects_only else "video"]
