"""Token-KL maps: where in a video an update moved the policy, and which tokens the mask froze.

Pure functions over trajectories and token tensors, plus a small ``.npz`` snapshot format the
trainer writes at report iterations (``RUN_DIR/klmaps/iter_NNNNNN.npz``) and the report draws.

A token is one ``(pt, ph, pw)`` patch of the latent ``(B, C, F, H, W)``; its map position is
``(f', h', w') = (f // pt, h // ph, w // pw)``, the transformer's own patch grid, so a token
map is ``(B, F', H', W')`` with tokens in the row-major order of :mod:`flowdppo_video.sde`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from flowdppo_video import sde

from .rollout import Trajectory

SNAPSHOT_ROWS = 2          # videos kept per snapshot: the highest and the lowest advantage
SNAPSHOT_MAX_SIDE = 256    # frames kept in a snapshot are strided down to at most this many pixels


def latent_frames(patch: sde.Tokens, latent_shape: tuple[int, ...]) -> int:
    """``F`` of a latent ``(C, F, H, W)``; of token streams, the first (video) stream's token frames
    (a multi-stream family's video patch is 1 frame deep: LTX-2's)."""
    if isinstance(patch, sde.TokenStreams):
        return int(patch.streams[0].grid[0])
    return int(latent_shape[1])


def token_grid(latent_shape: tuple[int, ...] | torch.Size, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(F', H', W')`` token grid of a latent ``(C, F, H, W)`` or ``(B, C, F, H, W)``."""
    shape = tuple(latent_shape)
    if len(shape) == 4:
        shape = (1, *shape)
    sde.patch_count(shape, patch)               # checks divisibility, names the shapes
    _, _, f, h, w = shape
    return f // patch[0], h // patch[1], w // patch[2]


def to_grid(values: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Per-token values ``(B, N)`` as a map ``(B, F', H', W')`` (``N = F' H' W'``)."""
    if values.ndim != 2 or values.shape[1] != math.prod(grid):
        raise ValueError(f"token values {tuple(values.shape)} do not fit the token grid {grid}")
    f, h, w = grid
    return rearrange(values, "b (f h w) -> b f h w", f=f, h=h, w=w)


def token_kl_map(mean_new: torch.Tensor, mean_old: torch.Tensor, std: torch.Tensor,
                 patch: tuple[int, int, int]) -> torch.Tensor:
    """Exact token ``KL(pi_old || pi_new)`` (:func:`sde.token_kl`) as a map ``(B, F', H', W')``.

    Args:
        mean_new, mean_old: ``(B, C, F, H, W)``; std: ``(B,)``.
    """
    return to_grid(sde.token_kl(mean_new, mean_old, std, patch), token_grid(mean_old.shape, patch))


def step_kl_map(traj: Trajectory, j: int, mean_new: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """KL map of SDE step ``j`` of ``traj`` between its stored ``mu_old`` and ``mean_new``
    (``(B, C, F, H, W)``, e.g. :func:`flowdppo_video.training.rollout.step_mean` after an update)."""
    mean_old = traj.means[:, j].to(mean_new.device)
    return token_kl_map(mean_new, mean_old, traj.stds[:, j].to(mean_new.device), patch)


def latent_to_pixel_frames(num_latent: int, num_pixel: int) -> list[int]:
    """For each pixel frame, the latent frame that holds it: ``ceil(t (F_lat - 1) / (F_px - 1))``.

    Wan's causal VAE keeps frame 0 alone and packs each later group of ``(F_px - 1) / (F_lat - 1)``
    frames into one latent frame; an identity (pixel-space) autoencoder maps frame to frame.
    """
    if num_latent <= 1 or num_pixel <= 1:
        return [0] * num_pixel
    return [min(num_latent - 1, math.ceil(t * (num_latent - 1) / (num_pixel - 1) - 1e-9)) for t in range(num_pixel)]


def token_frame_pixels(num_token_frames: int, pt: int, num_latent: int, num_pixel: int) -> list[int]:
    """One representative pixel frame per token frame ``f'``: the middle of the pixel frames whose
    latent frame lies in ``[f' pt, (f' + 1) pt)``."""
    owner = latent_to_pixel_frames(num_latent, num_pixel)
    out = []
    for f in range(num_token_frames):
        frames = [t for t, lat in enumerate(owner) if f * pt <= lat < (f + 1) * pt]
        out.append(frames[len(frames) // 2] if frames else min(num_pixel - 1, f))
    return out


def _upsample(token_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour ``(H', W')`` -> ``(height, width)``: pixel ``(y, x)`` takes token
    ``(y H' // height, x W' // width)``."""
    hh, ww = token_map.shape
    rows = (np.arange(height) * hh) // height
    cols = (np.arange(width) * ww) // width
    return token_map[rows][:, cols]


def overlay(frame: np.ndarray, kl_map: np.ndarray, drop: np.ndarray | None, vmax: float,
            scale: int = 1, cmap: str = "inferno") -> np.ndarray:
    """Draw one token-frame's KL over a video frame: ``(H s, W s, 3)`` uint8.

    The frame is shown dimmed and grey; each token's pixels are tinted with the colour map by
    ``KL / vmax`` with opacity ``0.85 min(1, KL / vmax)``, so a token with zero KL keeps the grey
    frame exactly. Dropped tokens get a cyan outline one pixel wide.

    Args:
        frame: ``(H, W, 3)`` uint8. kl_map: ``(H', W')`` KL per token. drop: ``(H', W')`` bool.
        vmax: the KL drawn at full colour (> 0). scale: nearest-neighbour upscaling of the frame.
    """
    import matplotlib

    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame must be (H, W, 3), got {frame.shape}")
    img = frame.repeat(scale, axis=0).repeat(scale, axis=1).astype(np.float32)
    h, w = img.shape[:2]
    grey = img.mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.6
    level = np.clip(_upsample(np.asarray(kl_map, dtype=np.float64), h, w) / max(vmax, 1e-30), 0.0, 1.0)
    colour = matplotlib.colormaps[cmap](level)[..., :3] * 255.0
    alpha = (0.85 * level)[..., None]
    out = grey * (1 - alpha) + colour * alpha
    if drop is not None and np.asarray(drop).any():
        d = _upsample(np.asarray(drop, dtype=bool), h, w)
        # The outline: dropped pixels with a neighbour outside the dropped region (or the border).
        pad = np.pad(d, 1, constant_values=False)
        inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        out[d & ~inner] = (0.0, 255.0, 255.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- snapshots
def snapshot_rows(advantages: torch.Tensor, rows: int = SNAPSHOT_ROWS) -> list[int]:
    """The rows a snapshot keeps: the highest advantage, then the lowest, then the rest in order."""
    order = [torch.argmax(advantages).item(), torch.argmin(advantages).item()] + list(range(advantages.numel()))
    out: list[int] = []
    for i in order:
        if i not in out:
            out.append(i)
    return out[:rows]


def save_snapshot(path: str | Path, *, iteration: int, kl: torch.Tensor, drop: torch.Tensor,
                  advantages: torch.Tensor, traj: Trajectory, patch: tuple[int, int, int],
                  latent_frames: int, objective: dict[str, Any],
                  frozen_by_epoch: list[float] | None = None) -> Path:
    """Write the token KL and drop mask of one minibatch, per SDE step, as ``.npz``.

    Args:
        kl, drop: ``(S, b, N)`` token KL and drop mask of the minibatch ``traj`` (``b`` rows).
        advantages: ``(b,)``. patch: the transformer's ``(pt, ph, pw)``.
        latent_frames: ``F`` of the latent (to place token frames on pixel frames).
        objective: ``kind``, ``delta``, ... (shown in the report).
        frozen_by_epoch: the share of terms the trust region froze in each inner epoch of the
            iteration (all minibatches), shown beside the map.
    Keeps :data:`SNAPSHOT_ROWS` rows, and of their videos only one representative frame per
    token frame, strided to at most :data:`SNAPSHOT_MAX_SIDE` pixels.
    """
    keep = snapshot_rows(advantages)
    # kl and drop stay where the update computed them (the GPU): .item() brings the means over.
    extra: dict[str, Any] = {"kl_mean_all": np.float32(kl.float().mean().item()),
                             "drop_frac_all": np.float32(drop.float().mean().item())}
    if isinstance(patch, sde.TokenStreams):
        # Several token streams: the first (video) is the map; each other stream's tokens are kept
        # on their own grid as kl_<name>, drop_<name> (LTX-2's audio: one row of audio tokens).
        spans = patch.spans()
        video, rest = patch.streams[0], patch.streams[1:]
        grid = tuple(video.grid)
        for st in rest:
            sl = spans[st.name]
            extra[f"kl_{st.name}"] = kl[:, keep][:, :, sl].reshape(kl.shape[0], len(keep), *st.grid).float().cpu().numpy()
            extra[f"drop_{st.name}"] = drop[:, keep][:, :, sl].reshape(
                kl.shape[0], len(keep), *st.grid).bool().cpu().numpy()
        extra["streams"] = np.array([st.name for st in patch.streams])
        kl, drop = kl[:, :, spans[video.name]], drop[:, :, spans[video.name]]
        patch = (max(1, latent_frames // grid[0]), 1, 1)
    else:
        grid = token_grid(traj.means.shape[2:], patch)
    f, h, w = grid
    kl_maps = rearrange(kl[:, keep], "s b (f h w) -> s b f h w", f=f, h=h, w=w).float().cpu().numpy()
    drop_maps = rearrange(drop[:, keep], "s b (f h w) -> s b f h w", f=f, h=h, w=w).bool().cpu().numpy()
    out: dict[str, Any] = {**extra,
        "iteration": np.int64(iteration), "kl": kl_maps.astype(np.float32), "drop": drop_maps,
        "steps": traj.steps.cpu().numpy(), "sigmas": traj.sigmas.cpu().numpy(),
        "advantages": advantages[keep].float().cpu().numpy(),
        "prompts": np.array([traj.prompts[i] for i in keep]),
        "patch": np.array(patch), "objective": np.array(repr(sorted(objective.items()))),
        "frozen_by_epoch": np.asarray(frozen_by_epoch if frozen_by_epoch is not None else [], dtype=np.float32),
    }
    if traj.videos is not None:
        vids = traj.videos[keep].cpu().numpy()
        frames = token_frame_pixels(grid[0], patch[0], latent_frames, vids.shape[1])
        stride = max(1, math.ceil(max(vids.shape[2:4]) / SNAPSHOT_MAX_SIDE))
        out["frames"] = vids[:, frames, ::stride, ::stride]
        out["frame_index"] = np.array(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.npz")
    np.savez_compressed(tmp, **out)
    tmp.replace(path)
    return path


def load_snapshot(path: str | Path) -> dict[str, Any]:
    """A snapshot written by :func:`save_snapshot` as plain numpy arrays and Python scalars."""
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    d["iteration"] = int(d["iteration"])
    d["prompts"] = [str(p) for p in d["prompts"]]
    d["objective"] = str(d["objective"])
    return d
