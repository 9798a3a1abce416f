"""The trainer: the order of things, and nothing else.

One iteration: rollout -> rewards -> advantages -> ``inner_epochs`` passes of shuffled
minibatches, each replaying the stored SDE steps through the same forward path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowdppo_video.reporting.run_artifacts import RunArtifacts, nonfinite_rows, warn_nonfinite
from flowdppo_video.runs.config import Config, ObjectiveConfig, SamplerConfig
from flowdppo_video.runs.data import load_prompts, prompts_for_iteration
from flowdppo_video.runs.fsio import check_output_dir, naming
from flowdppo_video.runs.host_memory import release_freed_memory
from flowdppo_video.runs.images import run_images
from flowdppo_video.runs.run_dir import (
    RunDirError, RunLock, check_new_run, check_output_name, check_unlocked, mark_owned)
from flowdppo_video.runs.seeding import derive_seed, resolve_device, seed_global_rngs
from flowdppo_video.training.best import BEST_CHECKPOINT, BestModel
from flowdppo_video.training.checkpoint import checkpoint_path, keep_checkpoint_as, resume_checkpoint, save_checkpoint
from flowdppo_video.training.evaluation import evaluate
from flowdppo_video.training.metrics import import_wandb, read_metrics, truncate_metrics
from flowdppo_video.training.monitors import build_monitors
from flowdppo_video.training.perf import Throughput
from flowdppo_video.training.policy_update import PolicyUpdate, objective_elements
from flowdppo_video.training.rollout import Trajectory, reward_audio, rollout
from flowdppo_video.training.run_builder import build_model, keeps_reference
from rewards import build_rewards, reward_weights, score_videos

from .advantages import compute_advantages
from .exceptions import TrainingError
from .models.text_cache import CACHE_FILE
from .objectives import ObjectiveOutput
from .parallel.groups import ParallelState, adopt_launcher_settings, check_layout, init_parallel
from .parallel.sequence import apply_sequence_parallel, check_token_padding
from .parallel.updaters import build_updater


@dataclass
class Batch:
    """One iteration's training batch before its update (:meth:`Trainer.collect`): the trajectory,
    advantages ``(B,)``, per-reward ``scores`` and logged ``extras`` ``{name: (B,)}``, the reward
    ``weights``, the advantage stats, the count of non-finite videos, this rank's share of videos,
    and the seconds the rollout and the rewards took."""

    traj: Trajectory
    advantages: torch.Tensor
    scores: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]
    weights: dict[str, float]
    advantage_stats: dict[str, Any]
    nonfinite: int
    share: int
    rollout_s: float
    reward_s: float


class Trainer:
    """Flow-DPPO (or ratio-clipping) fine-tuning of a video flow model."""

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        if cfg.run.release_host_memory and not release_freed_memory():   # before any weight is allocated
            warnings.warn("run.release_host_memory: the C library is not glibc; the setting does nothing here",
                          stacklevel=2)
        self.lock: RunLock | None = None
        # Check everything cheap before loading weights or touching the run directory.
        if int(os.environ.get("RANK", "0") or 0) == 0:     # rank 0 writes the run; other nodes may not see it
            if not resume:
                check_output_name(cfg.run.output_dir)       # "" (an unset variable) is Path("."): look first
                check_new_run(self.run_dir, cfg.run.allow_foreign_files)   # a run there, or foreign files
            check_output_dir(self.run_dir, "run.output_dir")
            check_unlocked(self.run_dir)         # a second training of this folder stops before its model loads
        self.prompts = load_prompts(cfg.data.prompts)
        self.rewards = build_rewards(cfg.rewards)
        e = cfg.eval
        self.eval_prompts = load_prompts(e.prompts) if e.prompts is not None else None
        self.eval_rewards = build_rewards(e.rewards or cfg.rewards, "eval.rewards" if e.rewards else "rewards") if self.eval_prompts else {}
        images = run_images(cfg.data.prompts, cfg.data.images, e.prompts, e.images)  # image-to-video models
        if cfg.run.wandb:
            import_wandb()
        requested = resolve_device(cfg.run.device)
        cfg.parallel = adopt_launcher_settings(cfg.parallel)
        self.par: ParallelState = init_parallel(cfg.parallel, requested.type)
        check_layout(self.par, cfg.data, cfg.optim, cfg.objective)
        self.device = resolve_device(cfg.run.device, self.par.local_rank)
        # Sequence parallelism is applied to the built model from outside, before the images attach.
        sp = (lambda adapter: apply_sequence_parallel(adapter, self.par.sp_group)) if self.par.sp > 1 else None
        # A staged start: every prompt (training and held-out) encoded once by the text encoders alone,
        # which are released before the transformers are built (none is built when the run's text
        # cache covers them); model.keep_text_encoder keeps them, built with the rest.
        built = build_model(cfg, self.device, reference=keeps_reference(cfg), images=images, transform=sp,
                            prompts=self.prompts + (self.eval_prompts or []), run_dir=self.run_dir,
                            progress=cfg.run.progress and self.par.is_main)
        self.adapter, self.latent_shape = built.adapter, built.latent_shape
        self.text_stats = built.text_stats
        check_token_padding(self.adapter, self.latent_shape)
        # after the model: patch_grid's period is its own (VAE stride x patch) unless configured
        self.eval_monitors = (build_monitors(e.monitors, e.monitor_period, self.adapter, (cfg.video.height, cfg.video.width))
                              if self.eval_prompts else {})
        check_rollout_memory(cfg, self.latent_shape, self.adapter)
        self.elements_per_token = objective_elements(self.adapter.token_map(self.latent_shape), self.latent_shape)
        self.updater = build_updater(self.adapter, cfg, self.par)
        self.perf = Throughput(self.adapter, cfg, self.device, self.latent_shape)
        self.policy_update = PolicyUpdate(self.adapter, cfg.objective, cfg.optim, cfg.run, self.par, self.updater, self.device,
                                          self.elements_per_token)
        # The global generators, for code outside the trainer's own seeded streams (a user's reward
        # drawing random numbers): seeded here, after the model's own init seeds, and restored
        # from the checkpoint on resume.
        seed_global_rngs(cfg.run.seed)
        self.start_iteration = 0
        self.best: BestModel | None = None      # run.keep_best's record, rank 0's, taken up by run()
        # The first write: rank 0 locks the folder (and looks again under the lock: another process
        # may have started since), every rank obeys its answer.
        refused = None
        if self.is_main:
            try:
                self._claim(resume)
            except RunDirError as e:
                refused = str(e)
        refused = self.par.broadcast_object(refused, "claiming the run directory")
        if refused is not None:
            raise RunDirError(refused)
        try:
            if resume:
                with naming(self.run_dir):
                    self._resume()
            self.par.barrier("start")             # every rank has looked before rank 0 writes
            if self.is_main and self.text_stats["text/encoded_prompts"]:
                self.adapter.text_cache.save(self.run_dir / CACHE_FILE)
            self.artifacts = RunArtifacts(cfg, self.run_dir, self.par.is_main,
                                          purge=self.start_iteration if resume else None)
        except BaseException:
            self.release()
            raise

    def _claim(self, resume: bool) -> None:
        """Rank 0: lock the run directory for this process and mark it as a run's (a one-line
        :class:`RunDirError` if another process holds it or a run appeared there meanwhile)."""
        with naming(self.run_dir):                 # a full disk's write() names no file: name the run
            self.lock = RunLock.acquire(self.run_dir)
        weakref.finalize(self, self.lock.release)     # a trainer dropped without close() unlocks
        try:
            if not resume:
                check_new_run(self.run_dir, self.cfg.run.allow_foreign_files)
            with naming(self.run_dir):
                mark_owned(self.run_dir)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Unlock the run directory (the end of the run; idempotent)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def is_main(self) -> bool:
        return self.par.is_main

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[dict[str, Any]]:
        """Evaluate the base model, then per iteration: train, evaluate, log, sample, checkpoint, and
        keep the best model so far (``run.keep_best``)."""
        rows, art, r = [], self.artifacts, self.cfg.run
        if self.is_main and (self.lock is None or not self.lock.held):    # run() again after it released
            self._claim(resume=True)
        try:
            if r.keep_best and self.is_main and self.best is None:
                self.best, note = BestModel.start(self.run_dir, r.keep_best, self.start_iteration,
                                                  read_metrics(self.run_dir, "eval"))
                if note:
                    print(f"flowdppo-video: warning: {note}", file=sys.stderr)
            base_done = self.par.broadcast_object((self.run_dir / "eval.jsonl").exists(), "the evaluation check")
            if self.start_iteration == 0 and not base_done:
                self._keep_best(0, self._maybe_evaluate(0))  # the base model, before any update
            for it in tqdm(range(self.start_iteration, r.iterations), desc="iterations",
                           disable=not (r.progress and self.is_main)):
                traj, row = self.train_iteration(it)
                row.update(self._maybe_evaluate(it + 1))
                art.metrics.write(row)
                rows.append(row)
                art.samples(it, traj, row["reward/mean"])
                self._maybe_checkpoint(it)
                self._keep_best(it + 1, row)
                if r.report_every and (it + 1) % r.report_every == 0 and it + 1 < r.iterations:
                    art.report(say=True)                     # a refresh; the final report follows the loop
            art.before_after()
        except OSError as e:
            if e.filename is None and e.errno is not None:   # a write() on a full disk names no file
                e.filename = str(self.run_dir)
            raise
        finally:
            try:
                art.finish()
            finally:
                self.release()
        return rows

    def close(self) -> None:
        """Unlock the run directory; leave the process group this trainer joined (if it made one)."""
        self.release()
        self.par.close()

    def _maybe_evaluate(self, done: int) -> dict[str, float]:
        """:meth:`evaluate` where the schedule asks for it: every ``eval.every`` iterations, and the
        base model and the final model always."""
        if not (done % self.cfg.eval.every == 0 or done == self.cfg.run.iterations):
            return {}
        return self.evaluate(done)

    def evaluate(self, done: int) -> dict[str, float]:
        """Held-out evaluation of the model as it is now, recorded as after ``done`` iterations: the
        ``eval/*`` means returned and appended to ``eval.jsonl``, the videos under
        ``eval/after_{done:06d}``; ``{}`` without held-out prompts. Every rank calls it."""
        e = self.cfg.eval
        if not self.eval_prompts:
            return {}
        # Every rank evaluates the same prompts (each forward needs all ranks of an SP group, and
        # under ZeRO-3 all ranks); rank 0 writes.
        with self.updater.rollout():
            out, traj = evaluate(self.adapter, self.eval_prompts, e.samples_per_prompt, self.latent_shape,
                                 self.cfg.sampler, e.seed, self.eval_rewards, self.cfg.data.negative_prompt,
                                 e.kl_to_base, fps=self.cfg.video.fps, monitors=self.eval_monitors,
                                 keep_tail=e.sampler_tail)
        # Every rank evaluated the same videos: any rank's count is the count. Not under eval/ (the
        # held-out tables list those); merged into the training row beside videos/nonfinite.
        out["videos/eval_nonfinite"] = nonfinite_rows(traj.final)
        if out["videos/eval_nonfinite"] and self.is_main:
            warn_nonfinite(f"evaluation after {done} iterations", out["videos/eval_nonfinite"], traj.batch_size,
                           "videos/eval_nonfinite")
        self.artifacts.evaluation(done, out, traj, self.eval_prompts)
        return out

    def collect(self, it: int) -> Batch:
        """Iteration ``it``'s rollout, rewards and advantages exactly as training makes them, without
        the update (:meth:`train_iteration` is this and :meth:`update`; tools that compare updates on
        one batch call it)."""
        cfg = self.cfg
        prompts = prompts_for_iteration(self.prompts, it, cfg.data.prompts_per_iteration, cfg.run.seed)
        if self.perf.wants_flops:                     # once, on CUDA: one forward's FLOPs for perf/mfu
            with self.updater.rollout():
                self.perf.count(prompts[0])
        t0 = time.perf_counter()
        par = self.par
        share = len(prompts) * cfg.data.group_size // par.dp     # this DP rank's videos
        with self.updater.rollout():
            traj = rollout(self.adapter, prompts, cfg.data.group_size, self.latent_shape, cfg.sampler,
                           torch.Generator().manual_seed(derive_seed(cfg.run.seed, it, 0)),
                           negative_prompt=cfg.data.negative_prompt, progress=cfg.run.progress and self.is_main,
                           rows=slice(par.dp_rank * share, (par.dp_rank + 1) * share))
        t1 = time.perf_counter()
        nonfinite = nonfinite_rows(traj.final)        # before the gather: each rank counts its own
        scores, extras = score_videos(self.rewards, traj.videos, traj.prompts, fps=cfg.video.fps,
                                      audio=reward_audio(traj))
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
            warn_nonfinite(f"iteration {it}", nonfinite, traj.batch_size, "videos/nonfinite")
        return Batch(traj, adv, scores, extras, weights, adv_stats, nonfinite, share, t1 - t0, time.perf_counter() - t1)

    def set_objective(self, section: ObjectiveConfig) -> None:
        """Update with the objective of ``section`` (an ``objective`` config section) from now on,
        with a fresh optimizer: the public way for tools to compare objectives on one trainer."""
        self.cfg = dataclasses.replace(self.cfg, objective=section)
        self.updater = build_updater(self.adapter, self.cfg, self.par)
        self.policy_update.updater = self.updater
        self.policy_update.set_objective(section)

    def set_sampler(self, section: SamplerConfig) -> None:
        """Roll out with ``section`` (a ``sampler`` config section, checked as the config checks it)
        from the next iteration on: the public way for tools to compare rollout options on one trainer."""
        cfg = dataclasses.replace(self.cfg, sampler=section)
        cfg.validate()
        self.cfg = cfg

    def train_iteration(self, it: int) -> tuple[Trajectory, dict[str, Any]]:
        b = self.collect(it)
        traj, adv, scores, extras, weights, nonfinite = b.traj, b.advantages, b.scores, b.extras, b.weights, b.nonfinite
        t0 = time.perf_counter()
        upd = self.update(traj, adv, it)
        t3 = time.perf_counter()
        evaluations = {**(traj.evaluations or {}), "replay": upd.pop("perf/evals/replay"),
                       "reference": upd.pop("perf/evals/reference")}
        total = sum(weights[n] * scores[n] for n in weights)
        row: dict[str, Any] = {"iteration": it, "reward/mean": total.mean().item(),
                               "reward/std": total.std(unbiased=False).item()}
        for n, s in scores.items():
            row[f"reward/{n}/mean"] = s.mean().item()
        for n, s in extras.items():
            row[f"reward/{n}/mean"] = s.float().mean().item()
        row.update({"advantage/abs_mean": adv.abs().mean().item(),
                    "advantage/zero_std_groups": b.advantage_stats["zero_std_groups"], "videos/nonfinite": nonfinite,
                    **upd, "time/rollout_s": b.rollout_s, "time/reward_s": b.reward_s, "time/update_s": t3 - t0,
                    "sde_steps": traj.steps.tolist()})
        row.update(self.perf.metrics(traj.batch_size, b.share, evaluations,
                                     b.rollout_s, t3 - t0, time.perf_counter() - t0 + b.rollout_s + b.reward_s))
        return traj, row

    # ------------------------------------------------------------------ the update
    def replay_step(self, mb: Trajectory, j: int, advantages: torch.Tensor
                    ) -> tuple[ObjectiveOutput, torch.Tensor, torch.Tensor]:
        """SDE step ``j`` of a minibatch replayed: :meth:`PolicyUpdate.replay_step`."""
        return self.policy_update.replay_step(mb, j, advantages)

    def update(self, traj: Trajectory, advantages: torch.Tensor, it: int) -> dict[str, Any]:
        """``inner_epochs`` passes of shuffled minibatches over the stored SDE steps."""
        metrics, snap = self.policy_update(traj, advantages, it, snapshot=self._snapshot_iteration(it))
        if snap is not None:
            self.artifacts.klmap(it, snap, self.adapter.token_map(self.latent_shape), self.latent_shape)
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

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"nonfinite_in_row": self.nonfinite_in_row, "prompts_sha": self.prompts_sha(),
                "world": self.par.world, "sequence_parallel": self.par.sp, "zero_stage": self.cfg.parallel.zero_stage}

    def _maybe_checkpoint(self, it: int) -> None:
        r = self.cfg.run
        if (it + 1) % r.checkpoint_every == 0 or it == r.iterations - 1:
            save_checkpoint(self.run_dir, self.adapter, self.updater, it + 1, self._checkpoint_meta(),
                            keep=r.keep_checkpoints, par=self.par)

    def _keep_best(self, done: int, row: dict[str, Any]) -> None:
        """``run.keep_best``: after an evaluation that beats the best so far, that model as
        ``checkpoints/best`` (none for the base model: it is the base) and ``best.json``."""
        if not self.cfg.run.keep_best or not any(k.startswith("eval/") for k in row):   # no evaluation: all agree
            return
        # Every rank writes its share of a saved checkpoint: all take rank 0's answer. The model just
        # checkpointed (eval.every a multiple of checkpoint_every) is linked, not written again.
        numbered = checkpoint_path(self.run_dir, done)
        how = None
        if self.is_main and self.best is not None and self.best.improves(row):
            how = "base" if done == 0 else "link" if numbered.is_dir() else "save"
        how = self.par.broadcast_object(how, "the best-model check")
        if how is None:
            return
        ckpt = None
        if how == "save":
            ckpt = save_checkpoint(self.run_dir, self.adapter, self.updater, done, self._checkpoint_meta(),
                                   par=self.par, name=BEST_CHECKPOINT)
        elif how == "link" and self.is_main:
            ckpt = keep_checkpoint_as(numbered, BEST_CHECKPOINT)
        if self.is_main:
            self.best.record(self.run_dir, done, row, ckpt)

    def prompts_sha(self) -> str:
        """The first 16 hex digits of the SHA-256 of the training prompts (a resume checks it)."""
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]

    def _resume(self) -> None:
        """Continue from the newest checkpoint that verifies and loads, or from the start if the
        run died before its first (:func:`checkpoint.resume_checkpoint`)."""
        unreadable = None
        if self.is_main:                  # the logs are checked before anything is moved or rewritten
            try:
                read_metrics(self.run_dir), read_metrics(self.run_dir, "eval")
            except TrainingError as e:
                unreadable = str(e)
        unreadable = self.par.broadcast_object(unreadable, "reading the metric logs")
        if unreadable is not None:
            raise TrainingError(f"--resume {self.run_dir}: {unreadable}")
        ckpt, meta = resume_checkpoint(self.run_dir, self.adapter, self.updater, self.par,
                                       self.cfg.parallel.zero_stage, self.cfg.run.iterations)
        if ckpt is not None:
            if meta.get("prompts_sha") != self.prompts_sha():
                raise TrainingError(f"--resume {self.run_dir}: the prompts differ from the run's (data.prompts)")
            self.start_iteration = int(meta["next_iteration"])
            self.nonfinite_in_row = int(meta.get("nonfinite_in_row", 0))
        if self.is_main:
            truncate_metrics(self.run_dir, self.start_iteration)
            # Evaluations after `start_iteration` updates were made before that checkpoint: keep them.
            truncate_metrics(self.run_dir, self.start_iteration + 1 if ckpt is not None else 0, "eval",
                             "after_iterations")


def rollout_bytes(cfg: Config, latent_shape: tuple[int, ...], text_row_bytes: int) -> int:
    """Host bytes one iteration's rollout holds at least: per video its latents at each SDE step
    (state, mean, std) and the final one, its frames as float32 and uint8, and its prompt rows
    (both CFG branches). Every rank holds all of them once the data-parallel ranks gather."""
    v, s = cfg.video, cfg.sampler
    videos = cfg.data.prompts_per_iteration * cfg.data.group_size
    latent = 4 * int(torch.Size(latent_shape).numel())
    frames = v.num_frames * v.height * v.width * 3
    return videos * (latent * (3 * s.sde_steps + 2) + 5 * frames + 2 * text_row_bytes)


def check_rollout_memory(cfg: Config, latent_shape: tuple[int, ...], adapter: Any) -> None:
    """A batch that cannot fit the host's available memory is one line before the run directory
    exists (rather than a MemoryError, or the kernel's OOM killer, mid-iteration)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return                                   # not Linux: nothing to compare with
    cache = getattr(adapter, "text_cache", None)
    row = next(iter(cache.entries.values()), None) if cache is not None else None
    row_bytes = 0 if row is None else sum(t.numel() * t.element_size() for t in
                                          ([row] if isinstance(row, torch.Tensor) else row.parts.values()))
    need = rollout_bytes(cfg, latent_shape, row_bytes)
    if need > avail:
        d = cfg.data
        raise TrainingError(f"data.prompts_per_iteration x data.group_size = {d.prompts_per_iteration} x "
                            f"{d.group_size} videos per iteration hold about {need / 2 ** 30:.1f} GiB in the "
                            f"rollout, more than the {avail / 2 ** 30:.1f} GiB of memory available; lower "
                            "data.group_size or data.prompts_per_iteration")
