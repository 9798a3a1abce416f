"""Held-out evaluation: fixed-seed samples of held-out prompts, their rewards, and KL to the base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowdppo_video import sde
from flowdppo_video.models.base import VideoFlowAdapter
from flowdppo_video.runs.config import SamplerConfig
from flowdppo_video.runs.video import read_audio, read_video, write_video
from rewards import score_videos

from .monitors import monitor_means, score_monitors
from .rollout import Trajectory, plain_sampler, reward_audio, rollout, step_mean


@torch.no_grad()
def token_kl_to_base(adapter: VideoFlowAdapter, traj: Trajectory, chunk: int = 0) -> torch.Tensor:
    """Per-token ``KL(pi_theta || pi_base)`` averaged over the trajectory's SDE steps: ``(B, N)``.

    ``pi_theta``'s means are the trajectory's own ``mu``; the base model's are recomputed on the
    same states inside ``adapter.reference()``. A token's KL sums its ``D`` elements (its stream's ``D``
    for a multi-stream family).
    """
    b, chunk = traj.batch_size, chunk or traj.batch_size
    out: torch.Tensor | None = None
    tokens = adapter.token_map(tuple(traj.latents.shape[2:]))
    for i in range(0, b, chunk):
        part = traj.select(torch.arange(i, min(i + chunk, b)))
        for j in range(traj.num_sde_steps):
            with adapter.reference():
                mean_base = step_mean(adapter, part, j)
            kl = sde.token_kl(mean_base, part.means[:, j].to(mean_base.device),
                              part.stds[:, j].to(mean_base.device), tokens).cpu()
            if out is None:
                out = torch.zeros(b, kl.shape[1])
            out[i:i + part.batch_size] += kl / traj.num_sde_steps
    return out if out is not None else torch.zeros(b, 0)


def kl_to_base_metrics(adapter: VideoFlowAdapter, traj: Trajectory, chunk: int = 0) -> dict[str, float]:
    """``eval/kl_base/mean`` (nats per token, every token) and, for a multi-stream family (LTX-2),
    ``eval/kl_base/<stream>/mean`` per stream: its tokens carry ``D_s`` elements each, so the
    all-token mean mixes tokens of different sizes and each stream's own mean is what compares
    across runs (and with the trust region's per-element δ: divide by its ``D_s``)."""
    kl = token_kl_to_base(adapter, traj, chunk)
    out = {"eval/kl_base/mean": kl.mean().item()}
    tokens = adapter.token_map(tuple(traj.latents.shape[2:]))
    if isinstance(tokens, sde.TokenStreams):
        out.update({f"eval/kl_base/{name}/mean": kl[:, span].mean().item() for name, span in tokens.spans().items()})
    return out


def evaluate(adapter: VideoFlowAdapter, prompts: list[str], samples_per_prompt: int,
             latent_shape: tuple[int, ...], sampler: SamplerConfig, seed: int, rewards: dict,
             negative_prompt: str = "", measure_kl: bool = True, *, fps: float, monitors: dict | None = None,
             keep_tail: bool = False) -> tuple[dict[str, float], Trajectory]:
    """Sample every prompt ``samples_per_prompt`` times with a fixed seed (the same noise at every
    evaluation, so numbers are paired across iterations) and score the videos as shown at ``fps``
    (the run's ``video.fps``).

    Returns ``({"eval/<reward>/mean": ..., "eval/kl_base/mean": ... (and per stream, see
    :func:`kl_to_base_metrics`), "monitor/<name>/mean": ...,
    "monitor/<name>/std": ...}, trajectory)``: ``monitors`` (:mod:`flowdppo_video.training.monitors`) are
    scored beside the rewards, under their own prefix.
    """
    # Independent noise and the full schedule (``keep_tail``: eval.sampler_tail), whatever the training
    # rollout's economies: held-out numbers stay comparable across recipes.
    traj = rollout(adapter, prompts, samples_per_prompt, latent_shape, plain_sampler(sampler, keep_tail),
                   torch.Generator().manual_seed(seed), negative_prompt=negative_prompt, progress=False)
    scores, extras = score_videos(rewards, traj.videos, traj.prompts, fps=fps, audio=reward_audio(traj))
    out = {f"eval/{n}/mean": s.mean().item() for n, s in scores.items()}
    out.update({f"eval/{n}/mean": s.float().mean().item() for n, s in extras.items()})
    out.update(monitor_means(score_monitors(monitors or {}, traj.videos, traj.prompts, fps=fps)))
    if measure_kl and traj.num_sde_steps:
        out.update(kl_to_base_metrics(adapter, traj, sampler.batch_size))
    return out, traj


def _upscale(frames: np.ndarray, min_size: int = 128) -> np.ndarray:
    k = max(1, min_size // frames.shape[1])
    return frames.repeat(k, axis=1).repeat(k, axis=2)


def write_side_by_side(before_dir: Path, after_dir: Path, out_dir: Path, fps: float) -> list[Path]:
    """``out_dir/NN.mp4``: each video of ``before_dir`` beside its namesake in ``after_dir``
    (nearest-neighbour upscaled so small videos are visible), with a white divider."""
    written = []
    for before in sorted(before_dir.glob("*.mp4")):
        after = after_dir / before.name
        if not after.is_file():
            continue
        a, b = _upscale(read_video(before)), _upscale(read_video(after))
        n = min(len(a), len(b))
        divider = np.full((n, a.shape[1], 4, 3), 255, dtype=np.uint8)
        # One sound track: the tuned model's (right), where the videos have sound.
        audio = read_audio(after)
        written.append(write_video(out_dir / before.name, np.concatenate([a[:n], divider, b[:n]], axis=2), fps,
                                   *(audio if audio is not None else (None, None))))
    return written
