"""The latent world: Wan 2.1's latent geometry on a CPU.

A real video VAE (diffusers' ``AutoencoderKLWan``: 16 latent channels, 4x in time, 8x in space)
turns 17 frames of 64x64 into 5 x 8 x 8 latents; a ``WanTransformer3DModel`` with Wan 2.1's patch
(1, 2, 2) sees 80 tokens of D = 64 latent elements each; a small UMT5 encodes the prompt. Its
grammar and backgrounds are defined in :mod:`rewards.latent_world` (its checkers read them too).
The shipped checkpoint, ``builtin:weights/latent-world``, is pretrained in stages by
``tools/pretrain_latent_vae.py`` and ``tools/pretrain_latent_world.py``; docs/latent_world.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowdppo_video.models import family, ModelError, checkpoint_family
from flowdppo_video.runs.config import ModelConfig
from rewards.latent_world import (COLOURS, DIRECTIONS, FRAMES, RADIUS, SIZE, SPEEDS, LatentScene, background_image,
                                  object_mask, vocabulary)

from .render import straight_path

WEIGHTS_DIR = Path(__file__).parent / "weights" / "latent-world"

# AutoencoderKLWan: Wan 2.1's layout (z 16, temporal downsampling in the last two of three stages)
# at a width a CPU trains in an hour; 2.6M parameters.
VAE: dict[str, Any] = {"base_dim": 16, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                       "attn_scales": [], "temperal_downsample": [False, True, True]}
# Wan 2.1's patch over 16 channels: D = 64 latent elements per token, 5 x 4 x 4 = 80 tokens a video.
TRANSFORMER: dict[str, Any] = {"patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 32,
                               "in_channels": 16, "out_channels": 16, "text_dim": 64, "freq_dim": 64,
                               "ffn_dim": 384, "num_layers": 6, "rope_max_seq_len": 64}
TEXT_ENCODER: dict[str, Any] = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
                                "relative_attention_num_buckets": 8}
MAX_TEXT_TOKENS = 16          # the longest prompt (two objects) is 15 words
POSITION_CHANNELS = 5         # as the shapes world: absolute (frame, row, column) and the motion products


SEPARATION = 2.6              # radii between two objects' centres in every frame (they never touch)


def path(speed: str, direction: str, rng: np.random.Generator, size: int = SIZE, frames: int = FRAMES,
         radius: float = RADIUS) -> np.ndarray:
    """Centre positions ``(frames, 2)`` (x, y) of one object (:func:`~flowdppo_video.world.render.straight_path`
    at this world's speeds, scaled with the frame size)."""
    return straight_path(DIRECTIONS[direction], SPEEDS[speed] * size / SIZE, rng, size, frames, radius)


def render(scene: LatentScene, rng: np.random.Generator, size: int = SIZE, frames: int = FRAMES,
           with_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A ground-truth video ``(frames, size, size, 3)`` uint8 of ``scene`` (later objects drawn over
    earlier ones); with ``with_mask`` also the objects' coverage ``(frames, size, size)`` float32."""
    radius = RADIUS * size / SIZE
    img = np.broadcast_to(background_image(scene.background, size), (frames, size, size, 3)).copy()
    cover = np.zeros((frames, size, size), dtype=np.float32)
    # Two objects never overlap (each is whole in every frame, for the checkers as for a viewer): paths
    # are drawn again until they keep apart.
    for _ in range(100):
        paths = [path(t.speed, t.direction, rng, size, frames, radius) for t in scene.things]
        if len(paths) < 2 or np.sqrt(((paths[0] - paths[1]) ** 2).sum(-1)).min() >= SEPARATION * radius:
            break
    for thing, centres in zip(scene.things, paths):
        fg = np.array(COLOURS[thing.colour], dtype=np.float64)
        for f, (cx, cy) in enumerate(centres):
            a = object_mask(thing.shape, cx, cy, size, radius)
            img[f] = img[f] * (1 - a[..., None]) + fg * a[..., None]
            cover[f] = np.maximum(cover[f], a)
    video = np.round(img).astype(np.uint8)
    return (video, cover) if with_mask else video


def render_batch(scenes: list[LatentScene], seed: int, size: int = SIZE, frames: int = FRAMES,
                 with_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``(B, frames, size, size, 3)`` uint8 (and masks ``(B, frames, size, size)``); deterministic per seed."""
    rng = np.random.default_rng(seed)
    out = [render(s, rng, size, frames, with_mask=True) for s in scenes]
    videos = np.stack([v for v, _ in out])
    return (videos, np.stack([m for _, m in out])) if with_mask else videos


def latent_object_cover(cover: torch.Tensor | np.ndarray, temporal: int = 4, spatial: int = 8,
                        grow: int = 0) -> torch.Tensor:
    """The objects' coverage ``(B, F, H, W)`` in pixels on the latent grid ``(B, 1, F', H', W')`` of
    Wan's causal VAE (frame 0 alone, then groups of ``temporal`` frames; ``spatial`` pixels a cell):
    the most of a cell any frame of its group covers, grown by ``grow`` cells on every side (one
    cell already makes an object's region about half the frame)."""
    c = torch.as_tensor(cover).float()
    b, f, h, w = c.shape
    if (f - 1) % temporal or h % spatial or w % spatial:
        raise ValueError(f"cover of {f} frames of {h}x{w} does not fit the VAE's grid "
                         f"(1 + {temporal}k frames, multiples of {spatial} pixels)")
    groups = torch.cat([c[:, :1], c[:, 1:].reshape(b, (f - 1) // temporal, temporal, h, w).amax(2)], 1)
    cells = torch.nn.functional.max_pool2d(groups, spatial)                      # (B, F', H', W')
    if grow:
        cells = torch.nn.functional.max_pool2d(cells, 2 * grow + 1, stride=1, padding=grow)
    return cells.unsqueeze(1)


def video_to_pixels(videos: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(B, F, H, W, 3)`` uint8 -> ``(B, 3, F, H, W)`` float in ``[-1, 1]`` (the VAE's input)."""
    v = torch.as_tensor(videos)
    return v.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def world_init(position_channels: int = POSITION_CHANNELS) -> dict[str, Any]:
    """``model.init`` of the latent world: the sub-configs above and the grammar's word tokenizer."""
    return {"transformer": {**TRANSFORMER, "in_channels": TRANSFORMER["in_channels"] + position_channels},
            "vae": {"_class_name": "AutoencoderKLWan", **VAE}, "text_encoder": dict(TEXT_ENCODER),
            "tokenizer": {"words": vocabulary()}, "pipeline": {"position_channels": position_channels}}


def build_latent_adapter(device: torch.device, seed: int = 0, position_channels: int = POSITION_CHANNELS,
                         family_name: str = "wan") -> Any:
    """A randomly initialised latent-world model built by ``family_name`` from :func:`world_init`."""
    cfg = ModelConfig(family=family_name, init=world_init(position_channels), init_seed=seed, dtype="float32",
                      max_sequence_length=MAX_TEXT_TOKENS)
    return family(family_name).build(cfg, None, device)


def load_latent_adapter(path: str | Path = WEIGHTS_DIR, device: torch.device = torch.device("cpu")) -> Any:
    """The latent-world model saved at ``path`` (a diffusers directory), by the family it names."""
    name = checkpoint_family(Path(path))
    if name is None:
        raise ModelError(f"{path}: not a checkpoint of any model family")
    cfg = ModelConfig(family=name, path=str(path), max_sequence_length=MAX_TEXT_TOKENS)
    return family(name).build(cfg, str(path), device)


__all__ = ["FRAMES", "MAX_TEXT_TOKENS", "POSITION_CHANNELS", "SIZE", "TEXT_ENCODER", "TRANSFORMER", "VAE",
           "WEIGHTS_DIR", "build_latent_adapter", "latent_object_cover", "load_latent_adapter", "path", "render",
           "render_batch", "video_to_pixels", "world_init"]
