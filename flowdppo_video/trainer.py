"""The trainer: the order of things, and nothing else.

One iteration: rollout -> rewards -> advantages -> ``inner_epochs`` passes of shuffled
minibatches, each replaying the stored SDE steps through the same forward path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from rewards import build_rewards, reward_weights, score_videos

from . import kl_maps, sde
from .advantages import compute_advantages
from .checkpoint import has_manifest, list_checkpoints, load_checkpoint, move_aside, save_checkpoint, verify_checkpoint
from .config import Config, ConfigError, config_to_dict
from .data import load_prompts, prompts_for_iteration
from .before_after import pick_videos, write_before_after
from .evaluation import evaluate
from .fsio import check_output_dir, naming, write_text_atomic
from .images import attach_images, run_images
from .metrics import MetricsWriter, import_wandb, start_wandb, truncate_metrics
from .models import build_adapter
from .parallel.groups import ParallelState, adopt_launcher_settings, init_parallel
from .parallel.sequence import apply_sequence_parallel
from .parallel.updaters import build_updater
from .plots import plot_curves
from .objectives import ObjectiveOutput
from .policy_update import PolicyUpdate, TrainingError
from .rollout import Trajectory, rollout
from .seeding import derive_seed, resolve_device, seed_global_rngs
from .video import write_video


class _NullWriter:
    """What ranks other than 0 log: nothing (rank 0 writes every file)."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def add_videos(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Flow-DPPO (or ratio-clipping) fine-tuning of a video flow model."""

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        # Check everything cheap before loading weights or touching the run directory.
        if int(os.environ.get("RANK", "0") or 0) == 0:     # rank 0 writes the run; other nodes may not see it
            check_output_dir(self.run_dir, "run.output_dir")
        self.prompts = load_prompts(cfg.data.prompts)
        self.rewards = build_rewards(cfg.rewards)
        e = cfg.eval
        self.eval_prompts = load_prompts(e.prompts) if e.prompts is not None else None
        self.eval_rewards = build_rewards(e.rewards or cfg.rewards, "eval.rewards" if e.rewards else "rewards") if self.eval_prompts else {}
        measure_base = bool(self.eval_prompts) and e.kl_to_base
        images = run_images(cfg.data.prompts, cfg.data.images, e.prompts, e.images)  # image-to-video models
        if cfg.run.wandb:
            import_wandb()
        requested = resolve_device(cfg.run.device)
        cfg.parallel = adopt_launcher_settings(cfg.parallel)
        self.par: ParallelState = init_parallel(cfg.parallel, requested.type)
        self._check_layout()
        self.device = resolve_device(cfg.run.device, self.par.local_rank)
        self.adapter = build_adapter(cfg.model, self.device, keep_reference=cfg.objective.beta > 0 or measure_base)
        if self.par.sp > 1:
            apply_sequence_parallel(self.adapter, self.par.sp_group)
        v = cfg.video
        self.latent_shape = self.adapter.latent_shape(v.num_frames, v.height, v.width)
        attach_images(self.adapter, images, cfg)
        _, self.elements_per_token = sde.patch_count((1, *self.latent_shape), self.adapter.patch_size)
        self.updater = build_updater(self.adapter, cfg, self.par)
        self.policy_update = PolicyUpdate(self.adapter, cfg, self.par, self.updater, self.device,
                                          self.elements_per_token)
        # The global generators, for code outside the trainer's own seeded streams (a user's reward
        # drawing random numbers): seeded here, after the model's own init seeds, and restored
        # from the checkpoint on resume.
        seed_global_rngs(cfg.run.seed)
        self.start_iteration = 0
        main = self.par.is_main
        if resume:
            with naming(self.run_dir):
                self._resume()
        # Rank 0 decides from the files it writes (other nodes may not see them), every rank obeys.
        elif self.par.broadcast_object(any((self.run_dir / n).exists() for n in
                                           ("metrics.jsonl", "eval.jsonl", "checkpoints")), "the run-directory check"):
            raise TrainingError(f"{self.run_dir} already holds a run; use --resume {self.run_dir} "
                                "or another run.output_dir")
        self.par.barrier("start")             # every rank has looked before rank 0 writes
        purge = self.start_iteration if resume else None
        self.wandb = None
        if main:
            with naming(self.run_dir):            # a full disk's write() names no file: name the run
                self.run_dir.mkdir(parents=True, exist_ok=True)
                # On resume too: the overrides given then (e.g. more iterations) are the run's config now.
                write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
                self.wandb = start_wandb(self.run_dir, config_to_dict(cfg)) if cfg.run.wandb else None
                self.metrics: MetricsWriter | _NullWriter = MetricsWriter(
                    self.run_dir, cfg.run.tensorboard, purge_step=purge, wandb_run=self.wandb)
                self.eval_log: MetricsWriter | _NullWriter = MetricsWriter(
                    self.run_dir, cfg.run.tensorboard, "eval", "after_iterations",
                    purge_step=None if purge is None else purge + 1, wandb_run=self.wandb)
        else:
            self.metrics, self.eval_log = _NullWriter(), _NullWriter()

    @property
    def is_main(self) -> bool:
        return self.par.is_main

    def _check_layout(self) -> None:
        """Data-parallel ranks split prompts and minibatches evenly (one line naming the key if not)."""
        dp, cfg = self.par.dp, self.cfg
        if dp == 1:
            return
        if cfg.objective.normalize == "kept":
            # Each rank would divide by the kept count of its own part of the minibatch.
            raise ConfigError("objective.normalize=kept is per minibatch and would change with data-parallel "
                              f"ranks ({dp} here); use objective.normalize=all")
        b = cfg.data.prompts_per_iteration * cfg.data.group_size
        m = cfg.optim.minibatch_size
        if cfg.data.prompts_per_iteration % dp:
            raise ConfigError(f"data.prompts_per_iteration={cfg.data.prompts_per_iteration} must be divisible by "
                              f"the {dp} data-parallel ranks (world {self.par.world} / parallel.sequence_parallel "
                              f"{self.par.sp})")
        if m % dp or b % m:
            raise ConfigError(f"optim.minibatch_size={m} must be divisible by the {dp} data-parallel ranks and "
                              f"divide the batch of {b} videos")

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[dict[str, Any]]:
        rows = []
        its = range(self.start_iteration, self.cfg.run.iterations)
        try:
            base_done = self.par.broadcast_object((self.run_dir / "eval.jsonl").exists(), "the evaluation check")
            if self.start_iteration == 0 and not base_done:
                self._maybe_evaluate(0)                      # the base model, before any update
            for it in tqdm(its, desc="iterations", disable=not (self.cfg.run.progress and self.is_main)):
                traj, row = self.train_iteration(it)
                row.update(self._maybe_evaluate(it + 1))
                self.metrics.write(row)
                rows.append(row)
                self._maybe_write_samples(it, traj, row)
                self._maybe_checkpoint(it)
                every = self.cfg.run.report_every
                if every and (it + 1) % every == 0 and it + 1 < self.cfg.run.iterations:
                    self._write_report(say=True)             # a refresh; the final report follows the loop
            if self.is_main:
                self._write_before_after()
        except OSError as e:
            if e.filename is None and e.errno is not None:   # a write() on a full disk names no file
                e.filename = str(self.run_dir)
            raise
        finally:
            self.metrics.close()
            self.eval_log.close()
            if self.wandb is not None:
                self.wandb.finish()
            if self.is_main:
                try:
                    plot_curves(self.run_dir)
                except Exception as e:  # a picture must not hide the run's own outcome
                    print(f"flowdppo-video: warning: could not plot curves: {e}")
                if self.cfg.run.report_every:
                    self._write_report()
        return rows

    def close(self) -> None:
        """Leave the process group this trainer joined (if it made one)."""
        self.par.close()

    def _write_report(self, say: bool = False) -> None:
        """Write the report; ``say``: print where it is (a refresh mid-run: the user can look now;
        the end of the run prints it in its summary)."""
        from .report import write_report

        if not self.is_main:
            return
        try:
            index = write_report(self.run_dir)
            if say:
                tqdm.write(f"report refreshed: {index}")
        except Exception as e:  # nor must the report
            print(f"flowdppo-video: warning: could not write the report: {e}")

    def _maybe_evaluate(self, done: int) -> dict[str, float]:
        """Held-out evaluation of the model after ``done`` iterations (every ``eval.every``, the
        base model and the final model always). Also logged to ``eval.jsonl``."""
        e = self.cfg.eval
        if not self.eval_prompts or not (done % e.every == 0 or done == self.cfg.run.iterations):
            return {}
        # Every rank evaluates the same prompts (each forward needs all ranks of an SP group, and
        # under ZeRO-3 all ranks); rank 0 writes.
        with self.updater.rollout():
            out, traj = evaluate(self.adapter, self.eval_prompts, e.samples_per_prompt, self.latent_shape,
                                 self.cfg.sampler, e.seed, self.eval_rewards, self.cfg.data.negative_prompt,
                                 e.kl_to_base, fps=self.cfg.video.fps)
        # Every rank evaluated the same videos: any rank's count is the count. Not under eval/ (the
        # held-out tables list those); merged into the training row beside videos/nonfinite.
        out["videos/eval_nonfinite"] = _nonfinite_rows(traj.final)
        if out["videos/eval_nonfinite"] and self.is_main:
            print(f"flowdppo-video: warning: evaluation after {done} iterations: {out['videos/eval_nonfinite']} of "
                  f"{traj.batch_size} videos have non-finite latents (decoded as black frames); counted in "
                  f"videos/eval_nonfinite", file=sys.stderr)
        self.eval_log.write({"after_iterations": done, **out})
        if not self.is_main:
            return out
        folder = self.run_dir / "eval" / f"after_{done:06d}"
        # One video of as many prompts as fit, spread over their words (every direction, speed, ...),
        # the same ones at every evaluation: before_after/ and the report show these.
        picked = pick_videos(self.eval_prompts, e.samples_per_prompt, min(e.num_videos, traj.batch_size))
        for k, i in enumerate(picked):
            write_video(folder / f"{k:02d}.mp4", traj.videos[i], fps=self.cfg.video.fps)
        (folder / "prompts.txt").write_text("".join(traj.prompts[i] + "\n" for i in picked))
        self.eval_log.add_videos("eval/videos", traj.videos[:min(e.num_videos, 4)], done, self.cfg.video.fps)
        return out

    def _write_before_after(self) -> None:
        """``before_after/NN.mp4``: the base model's evaluation videos beside the final model's, and
        ``before_after/index.html`` labelling each with its prompt."""
        root = self.run_dir / "eval"
        base, final = root / "after_000000", root / f"after_{self.cfg.run.iterations:06d}"
        if base.is_dir() and final.is_dir() and base != final:
            write_before_after(base, final, self.run_dir / "before_after", self.cfg.video.fps,
                               f"after {self.cfg.run.iterations}")

    def train_iteration(self, it: int) -> tuple[Trajectory, dict[str, Any]]:
        cfg = self.cfg
        prompts = prompts_for_iteration(self.prompts, it, cfg.data.prompts_per_iteration, cfg.run.seed)
        t0 = time.perf_counter()
        par = self.par
        share = len(prompts) * cfg.data.group_size // par.dp     # this DP rank's videos
        with self.updater.rollout():
            traj = rollout(self.adapter, prompts, cfg.data.group_size, self.latent_shape, cfg.sampler,
                           torch.Generator().manual_seed(derive_seed(cfg.run.seed, it, 0)),
                           negative_prompt=cfg.data.negative_prompt, progress=cfg.run.progress and self.is_main,
                           rows=slice(par.dp_rank * share, (par.dp_rank + 1) * share))
        t1 = time.perf_counter()
        nonfinite = _nonfinite_rows(traj.final)       # before the gather: each rank counts its own
        scores, extras = score_videos(self.rewards, traj.videos, traj.prompts, fps=cfg.video.fps)
        if par.dp > 1:
            # Advantages are over the whole batch's groups: gather every DP rank's rows (in order).
            parts = par.all_gather_objects((traj, scores, extras), par.dp_group, "gathering rollouts and rewards")
            traj = Trajectory.concat([t for t, _, _ in parts])
            scores = {n: torch.cat([s[n] for _, s, _ in parts]) for n in scores}
            extras = {n: torch.cat([x[n] for _, _, x in parts]) for n in extras}
        weights = reward_weights(cfg.rewards)
        adv, adv_stats = compute_advantages(scores, weights, cfg.data.group_size,
                                            cfg.advantages.aggregation, cfg.advantages.std,
                                            cfg.advantages.clip)
        if par.dp > 1:
            nonfinite = sum(par.all_gather_objects(nonfinite, par.dp_group, "counting non-finite videos"))
        if nonfinite and self.is_main:
            # A NaN latent decodes to black frames that rewards score as if real: say so.
            print(f"flowdppo-video: warning: iteration {it}: {nonfinite} of {traj.batch_size} videos have "
                  f"non-finite latents (decoded as black frames); counted in videos/nonfinite", file=sys.stderr)
        t2 = time.perf_counter()
        upd = self.update(traj, adv, it)
        t3 = time.perf_counter()
        total = sum(weights[n] * scores[n] for n in weights)
        row: dict[str, Any] = {"iteration": it, "reward/mean": float(total.mean()),
                               "reward/std": float(total.std(unbiased=False))}
        for n, s in scores.items():
            row[f"reward/{n}/mean"] = float(s.mean())
        for n, s in extras.items():
            row[f"reward/{n}/mean"] = float(s.float().mean())
        row.update({"advantage/abs_mean": float(adv.abs().mean()),
                    "advantage/zero_std_groups": adv_stats["zero_std_groups"], "videos/nonfinite": nonfinite, **upd,
                    "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
                    "sde_steps": traj.steps.tolist()})
        return traj, row

    # ------------------------------------------------------------------ the update
    def replay_step(self, mb: Trajectory, j: int, advantages: torch.Tensor
                    ) -> tuple[ObjectiveOutput, torch.Tensor, torch.Tensor]:
        """SDE step ``j`` of a minibatch replayed: :meth:`PolicyUpdate.replay_step`."""
        return self.policy_update.replay_step(mb, j, advantages)

    def update(self, traj: Trajectory, advantages: torch.Tensor, it: int) -> dict[str, Any]:
        """``inner_epochs`` passes of shuffled minibatches over the stored SDE steps."""
        metrics, snap = self.policy_update(traj, advantages, it, snapshot=self._snapshot_iteration(it))
        if snap is not None and self.is_main:
            o = self.cfg.objective
            kl_maps.save_snapshot(self.run_dir / "klmaps" / f"iter_{it:06d}.npz", iteration=it, kl=snap.kl,
                                  drop=snap.frozen, advantages=snap.advantages, traj=snap.minibatch,
                                  patch=self.adapter.patch_size, latent_frames=self.latent_shape[1],
                                  objective={"kind": o.kind, "delta": o.delta, "granularity": o.granularity},
                                  frozen_by_epoch=snap.frozen_by_epoch)
        return metrics

    @property
    def nonfinite_in_row(self) -> int:
        """Skipped optimizer steps in a row (carried by checkpoints)."""
        return self.policy_update.nonfinite_in_row

    @nonfinite_in_row.setter
    def nonfinite_in_row(self, n: int) -> None:
        self.policy_update.nonfinite_in_row = n

    def _snapshot_iteration(self, it: int) -> bool:
        """Token-KL snapshots for the report: first and last iteration, every ``run.report_every``."""
        r = self.cfg.run
        return bool(r.report_every) and (it in (0, r.iterations - 1) or (it + 1) % r.report_every == 0)

    # ------------------------------------------------------------------ outputs
    def _maybe_write_samples(self, it: int, traj: Trajectory, row: dict[str, Any]) -> None:
        r = self.cfg.run
        # Iteration `it` rolls out the model after `it` updates, so sampling where `it` is a multiple
        # of sample_every puts samples/iter_N beside eval/after_N and checkpoints/iter_N: one N.
        if not self.is_main or not (it % r.sample_every == 0 or it == r.iterations - 1):
            return
        folder = self.run_dir / "samples" / f"iter_{it:06d}"
        n = min(r.num_sample_videos, traj.batch_size)
        if n == 0:                # run.num_sample_videos=0: no folder, no index (it would name none)
            return
        for k in range(n):
            write_video(folder / f"{k:02d}.mp4", traj.videos[k], fps=self.cfg.video.fps)
        (folder / "index.json").write_text(json.dumps(
            {"iteration": it, "videos": [{"file": f"{k:02d}.mp4", "prompt": traj.prompts[k]} for k in range(n)],
             "reward_mean": row["reward/mean"]}, indent=1))

    def _maybe_checkpoint(self, it: int) -> None:
        r = self.cfg.run
        if (it + 1) % r.checkpoint_every == 0 or it == r.iterations - 1:
            save_checkpoint(self.run_dir, self.adapter, self.updater, it + 1,
                            {"nonfinite_in_row": self.nonfinite_in_row, "prompts_sha": self._prompts_sha(),
                             "world": self.par.world, "sequence_parallel": self.par.sp,
                             "zero_stage": self.cfg.parallel.zero_stage},
                            keep=r.keep_checkpoints, par=self.par)

    def _prompts_sha(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]

    def _resume(self) -> None:
        """Continue from the newest checkpoint that verifies and loads, or from the start if the
        run died before its first. A newer damaged one is moved aside (one warning line each)."""
        ckpt, meta = self._newest_loadable()
        if ckpt is not None:
            if meta.get("prompts_sha") != self._prompts_sha():
                raise TrainingError(f"--resume {self.run_dir}: the prompts differ from the run's (data.prompts)")
            self.start_iteration = int(meta["next_iteration"])
            self.nonfinite_in_row = int(meta.get("nonfinite_in_row", 0))
        if self.is_main:
            truncate_metrics(self.run_dir, self.start_iteration)
            # Evaluations after `start_iteration` updates were made before that checkpoint: keep them.
            truncate_metrics(self.run_dir, self.start_iteration + 1 if ckpt is not None else 0, "eval",
                             "after_iterations")

    def _check_resumable(self, ckpt: Path, meta: dict[str, Any]) -> None:
        """What no other checkpoint would change: one line and exit 2, nothing rewritten."""
        was, now = meta.get("zero_stage", 0), self.cfg.parallel.zero_stage
        if was != now or (now and meta.get("world") != self.par.world):
            raise TrainingError(f"--resume {self.run_dir}: its checkpoint was written with parallel.zero_stage={was} "
                                f"on {meta.get('world', 1)} rank(s); this run has zero_stage={now} on "
                                f"{self.par.world} (a ZeRO checkpoint resumes with the same stage and ranks)")
        done, want = int(meta["next_iteration"]), self.cfg.run.iterations
        if want < done:
            raise TrainingError(f"--resume {self.run_dir}: run.iterations={want} is below the {done} iterations "
                                f"already done ({ckpt.name}); give run.iterations >= {done} (nothing was changed)")

    def _newest_loadable(self) -> tuple[Path | None, dict[str, Any]]:
        """The newest checkpoint whose manifest verifies (one written before manifests: that loads)
        and its meta, loaded into the model, updater and RNGs. Rank 0 verifies and decides."""
        par = self.par
        found = par.broadcast_object(list_checkpoints(self.run_dir), "finding the checkpoints")
        skipped: list[tuple[Path, str]] = []
        for ckpt in reversed(found):
            reason = par.broadcast_object(verify_checkpoint(ckpt) if par.is_main else None, "verifying a checkpoint")
            meta: dict[str, Any] = {}
            if reason is None:
                try:
                    meta = json.loads((ckpt / "meta.json").read_text())
                    int(meta["next_iteration"])
                except (OSError, ValueError, KeyError, TypeError) as e:
                    reason = f"meta.json is unreadable ({type(e).__name__})"
            if reason is None:
                self._check_resumable(ckpt, meta)
                try:
                    meta = load_checkpoint(ckpt, self.adapter, self.updater)
                    error = None
                except Exception as e:   # noqa: BLE001 - any damage a file can do to its reader
                    if has_manifest(ckpt):
                        raise             # verified files that do not load: not damage, a real error
                    # CheckpointError names the file's own error; anything else, its first line
                    error = getattr(e, "reason", None) or f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                if par.all_true(error is None, "loading a checkpoint"):
                    break
                reason = error or "it failed to load on another rank"
            skipped.append((ckpt, reason))
        else:
            if skipped:      # none loads: keep every one where it is, and say why
                raise TrainingError(f"--resume {self.run_dir}: no checkpoint verifies or loads (newest "
                                    f"{skipped[0][0].name}: {skipped[0][1]}); nothing was moved or changed")
            return None, {}
        if par.is_main:
            for bad, reason in skipped:
                aside = move_aside(bad)
                print(f"flowdppo-video: warning: skipped checkpoint {bad.name} ({reason}); moved it to "
                      f"{aside}; resuming from {ckpt.name}", file=sys.stderr)
        par.barrier("moving damaged checkpoints aside")
        return ckpt, meta


def _nonfinite_rows(final: torch.Tensor) -> int:
    """How many videos of ``final`` ``(B, ...)`` hold a NaN or infinite latent."""
    return int((~torch.isfinite(final.flatten(1))).any(1).sum())
