"""What a run writes besides checkpoints: its metric logs, evaluation and sample videos,
before/after pairs, token-KL snapshots, curves and the HTML report. Rank 0 writes every file;
other ranks get an instance whose writers do nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from flowdppo_video.runs.config import Config, config_to_dict
from flowdppo_video.runs.fsio import naming, write_text_atomic
from flowdppo_video.runs.video import write_video
from flowdppo_video.training.rollout import sound
from flowdppo_video.training import kl_maps
from flowdppo_video.training.metrics import MetricsWriter, start_wandb
from flowdppo_video.training.rollout import Trajectory

from .before_after import pick_videos, write_before_after
from .plots import plot_curves
from .report import write_report


class _NullWriter:
    """What ranks other than 0 log: nothing (rank 0 writes every file)."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def add_videos(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class RunArtifacts:
    """The run directory's files. ``purge``: on resume, the first iteration redone (TensorBoard
    drops its events from there); ``main``: whether this process writes."""

    def __init__(self, cfg: Config, run_dir: Path, main: bool, purge: int | None = None) -> None:
        self.cfg, self.run_dir, self.main = cfg, run_dir, main
        self.wandb = None
        if not main:
            self.metrics: MetricsWriter | _NullWriter = _NullWriter()
            self.eval_log: MetricsWriter | _NullWriter = _NullWriter()
            return
        with naming(run_dir):            # a full disk's write() names no file: name the run
            run_dir.mkdir(parents=True, exist_ok=True)
            # On resume too: the overrides given then (e.g. more iterations) are the run's config now.
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            self.wandb = start_wandb(run_dir, config_to_dict(cfg)) if cfg.run.wandb else None
            self.metrics = MetricsWriter(run_dir, cfg.run.tensorboard, purge_step=purge, wandb_run=self.wandb)
            self.eval_log = MetricsWriter(run_dir, cfg.run.tensorboard, "eval", "after_iterations",
                                          purge_step=None if purge is None else purge + 1, wandb_run=self.wandb)

    def evaluation(self, done: int, out: dict[str, float], traj: Trajectory, prompts: list[str]) -> None:
        """Log a held-out evaluation after ``done`` iterations and keep a few of its videos
        (``eval/after_NNNNNN``): one of as many prompts as fit, spread over their words (every
        direction, speed, ...), the same ones at every evaluation, for before/after and the report."""
        self.eval_log.write({"after_iterations": done, **out})
        if not self.main:
            return
        e, fps = self.cfg.eval, self.cfg.video.fps
        folder = self.run_dir / "eval" / f"after_{done:06d}"
        picked = pick_videos(prompts, e.samples_per_prompt, min(e.num_videos, traj.batch_size))
        if not picked:                      # eval.num_videos=0: the numbers only
            return
        for k, i in enumerate(picked):
            write_video(folder / f"{k:02d}.mp4", traj.videos[i], fps=fps, **sound(traj, i))
        (folder / "prompts.txt").write_text("".join(traj.prompts[i] + "\n" for i in picked))
        self.eval_log.add_videos("eval/videos", traj.videos[:min(e.num_videos, 4)], done, fps)

    def samples(self, it: int, traj: Trajectory, reward_mean: float) -> None:
        """``samples/iter_NNNNNN``: videos of iteration ``it``'s rollout (where ``it`` is a multiple
        of ``run.sample_every``, beside ``eval/after_N`` and ``checkpoints/iter_N``, and the last)."""
        r = self.cfg.run
        if not self.main or not (it % r.sample_every == 0 or it == r.iterations - 1):
            return
        n = min(r.num_sample_videos, traj.batch_size)
        if n == 0:                # run.num_sample_videos=0: no folder, no index (it would name none)
            return
        folder = self.run_dir / "samples" / f"iter_{it:06d}"
        for k in range(n):
            write_video(folder / f"{k:02d}.mp4", traj.videos[k], fps=self.cfg.video.fps, **sound(traj, k))
        (folder / "index.json").write_text(json.dumps(
            {"iteration": it, "videos": [{"file": f"{k:02d}.mp4", "prompt": traj.prompts[k]} for k in range(n)],
             "reward_mean": reward_mean}, indent=1))

    def klmap(self, it: int, snap: Any, patch: Any, latent_shape: tuple[int, ...]) -> None:
        """A token-KL snapshot (:class:`policy_update.KLSnapshot`) as ``klmaps/iter_NNNNNN.npz``;
        ``patch``: the adapter's token map of ``latent_shape`` (a patch, or token streams)."""
        if not self.main:
            return
        latent_frames = kl_maps.latent_frames(patch, latent_shape)
        o = self.cfg.objective
        kl_maps.save_snapshot(self.run_dir / "klmaps" / f"iter_{it:06d}.npz", iteration=it, kl=snap.kl,
                              drop=snap.frozen, advantages=snap.advantages, traj=snap.minibatch, patch=patch,
                              latent_frames=latent_frames,
                              objective={"kind": o.kind, "delta": o.delta, "granularity": o.granularity},
                              frozen_by_epoch=snap.frozen_by_epoch)

    def report(self, say: bool = False) -> None:
        """Write the report; ``say``: print where it is (a refresh mid-run: the user can look now;
        the end of the run prints it in its summary). A failure is a warning, never the run's end."""
        if not self.main:
            return
        try:
            index = write_report(self.run_dir)
            if say:
                tqdm.write(f"report refreshed: {index}")
        except Exception as e:  # noqa: BLE001 - a report must not hide the run's own outcome
            print(f"flowdppo-video: warning: could not write the report: {e}")

    def before_after(self) -> None:
        """``before_after/``: the base model's evaluation videos beside the final model's, and an
        ``index.html`` labelling each with its prompt."""
        if not self.main:
            return
        root, n = self.run_dir / "eval", self.cfg.run.iterations
        base, final = root / "after_000000", root / f"after_{n:06d}"
        if base.is_dir() and final.is_dir() and base != final:
            write_before_after(base, final, self.run_dir / "before_after", self.cfg.video.fps, f"after {n}")

    def finish(self) -> None:
        """Close the logs; on rank 0 draw the curves and write the final report (whatever the run's
        outcome: what it wrote stays readable)."""
        self.metrics.close()
        self.eval_log.close()
        if self.wandb is not None:
            self.wandb.finish()
        if not self.main:
            return
        try:
            plot_curves(self.run_dir)
        except Exception as e:  # noqa: BLE001 - a picture must not hide the run's own outcome
            print(f"flowdppo-video: warning: could not plot curves: {e}")
        if self.cfg.run.report_every:
            self.report()


def nonfinite_rows(final: torch.Tensor) -> int:
    """How many videos of ``final`` ``(B, ...)`` hold a NaN or infinite latent."""
    return int((~torch.isfinite(final.flatten(1))).any(1).sum().item())


def warn_nonfinite(where: str, n: int, total: int, key: str) -> None:
    """A NaN latent decodes to black frames that rewards score as if real: say so, in one line."""
    print(f"flowdppo-video: warning: {where}: {n} of {total} videos have non-finite latents (decoded as black "
          f"frames); counted in {key}", file=sys.stderr)
