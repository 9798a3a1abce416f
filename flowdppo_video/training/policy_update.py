"""The policy update of one iteration: ``inner_epochs`` passes of shuffled minibatches, each
replaying the stored SDE steps through the rollout's own forward path and applying the objective.

Its statistics are pooled so fractions stay unbiased over minibatches, ranks and steps; the share
of terms the trust region froze is logged over all minibatches, over the off-policy ones only
(after the iteration's first optimizer step: the first minibatch replays the rollout policy, ratio
1, where nothing can be frozen), and per inner epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from flowdppo_video import objectives, sde
from flowdppo_video.exceptions import TrainingError
from flowdppo_video.objectives import ObjectiveOutput, PolicyObjective, check_section
from flowdppo_video.models.base import VideoFlowAdapter
from flowdppo_video.parallel.groups import ParallelState
from flowdppo_video.parallel.updaters import Updater
from flowdppo_video.runs.config import ObjectiveConfig, OptimConfig, RunConfig
from flowdppo_video.runs.seeding import derive_seed

from .rollout import Trajectory, step_evaluations, step_mean


class RunningStats:
    """Weighted running means, sums and maxima of scalar stats."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.maxes: dict[str, float] = {}

    def add(self, stats: dict[str, Any], weight: float = 1.0) -> None:
        for k, v in stats.items():
            v = float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
            self.weights[k] = self.weights.get(k, 0.0) + weight
            self.maxes[k] = nan_max(self.maxes.get(k, -math.inf), v)

    def mean(self, k: str) -> float:
        return self.sums[k] / self.weights[k] if self.weights.get(k) else float("nan")

    def frac(self, num: str, den: str) -> float:
        """``sum(num) / sum(den)`` of counts added with weight 1 (NaN when nothing was counted)."""
        d = self.sums.get(den, 0.0)
        return self.sums.get(num, 0.0) / d if d else float("nan")

    def pooled(self, par: ParallelState) -> "RunningStats":
        """Every rank's statistics pooled (SP ranks repeat theirs: means are unchanged)."""
        out = RunningStats()
        for sums, weights, maxes in par.all_gather_objects((self.sums, self.weights, self.maxes), par.world_group,
                                                           "pooling update statistics"):
            for k, v in sums.items():
                out.sums[k] = out.sums.get(k, 0.0) + v
                out.weights[k] = out.weights.get(k, 0.0) + weights[k]
            for k, v in maxes.items():
                out.maxes[k] = nan_max(out.maxes.get(k, -math.inf), v)
        return out


def nan_max(a: float, b: float) -> float:
    """``max`` that keeps a NaN (``max(0.0, nan)`` is 0.0, which would hide a broken ratio)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


@dataclass
class KLSnapshot:
    """Token KL and frozen mask of the update's last minibatch, per SDE step: ``kl``, ``frozen``
    ``(S, b, N)``; the minibatch, its advantages ``(b,)`` and the frozen share per inner epoch."""

    kl: torch.Tensor
    frozen: torch.Tensor
    minibatch: Trajectory
    advantages: torch.Tensor
    frozen_by_epoch: list[float]


def trained_tokens(patch: sde.Tokens) -> torch.Tensor | None:
    """The token indices that enter the objective: None (all of them) unless a stream of a
    :class:`~flowdppo_video.sde.TokenStreams` is frozen (sampled, not trained)."""
    if not isinstance(patch, sde.TokenStreams) or all(s.trains for s in patch.streams):
        return None
    return patch.trained().nonzero().squeeze(1)


def objective_elements(patch: sde.Tokens, latent_shape: tuple[int, ...]) -> int | torch.Tensor:
    """``D`` of the tokens the objective sees (one int, or ``(N_trained,)`` for several streams)."""
    d = sde.element_counts((1, *latent_shape), patch)
    keep = trained_tokens(patch)
    if keep is None:
        return d
    if not keep.numel():
        raise TrainingError("model.frozen_streams freezes every token stream: nothing would train")
    return d[keep]


def stream_shares(patch: sde.Tokens, kl: torch.Tensor, frozen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Counts, summed over minibatches and pooled by :meth:`RunningStats.frac`, of each stream's part
    of a multi-stream latent: its token KL (``kl_<name>`` of ``kl_all``, all streams, frozen ones
    included) and the terms of its tokens the trust region froze (``dropped_<name>`` of
    ``terms_<name>``; trained streams only). ``frozen``: ``(B, N)`` over every token. Empty for a
    single-stream latent."""
    if not isinstance(patch, sde.TokenStreams):
        return {}
    spans, out = patch.spans(), {"kl_all": kl.sum()}
    for s in patch.streams:
        sl = spans[s.name]
        out[f"kl_{s.name}"] = kl[:, sl].sum()
        if s.trains:
            out[f"dropped_{s.name}"] = frozen[:, sl].float().sum()
            out[f"terms_{s.name}"] = kl.new_tensor(float(kl.shape[0] * s.tokens))
    return out


class PolicyUpdate:
    """Replays and updates; built once per run. ``nonfinite_in_row`` carries over iterations (and
    checkpoints): ``run.max_nonfinite_in_row`` skipped optimizer steps in a row stop the run."""

    def __init__(self, adapter: VideoFlowAdapter, objective: ObjectiveConfig, optim: OptimConfig, run: RunConfig,
                 par: ParallelState, updater: Updater, device: torch.device, elements_per_token: int) -> None:
        self.adapter, self.par, self.updater, self.device = adapter, par, updater, device
        self.optim, self.run = optim, run           # its sections of the run config: passes, minibatches, seed
        self.section = objective
        self.objective = PolicyObjective.from_config(objective, elements_per_token)
        self.nonfinite_in_row = 0

    def set_objective(self, section: ObjectiveConfig) -> None:
        """Use the objective of ``section`` (an ``objective`` config section, validated here) from
        the next update on: the public way for a tool to compare objectives on one trainer."""
        check_section(section)
        self.section = section
        self.objective = PolicyObjective.from_config(section, self.objective.elements_per_token)

    def replay_step(self, mb: Trajectory, j: int, advantages: torch.Tensor
                    ) -> tuple[ObjectiveOutput, torch.Tensor, torch.Tensor]:
        """SDE step ``j`` of a minibatch: recompute ``mu_theta`` through the rollout's forward and
        apply the objective (plus ``beta`` times the KL to the reference).

        Returns ``(output, token_kl, token_log_ratio)``, the last two ``(b, N)`` and detached.
        """
        dev, beta = self.device, self.section.beta
        patch = self.adapter.token_map(tuple(mb.latents.shape[2:]))
        std = mb.stds[:, j].to(dev)
        x_next, mean_old = mb.next_latents[:, j].to(dev), mb.means[:, j].to(dev)
        mean = step_mean(self.adapter, mb, j)
        logp_new = sde.token_log_prob(x_next, mean, std, patch)
        with torch.no_grad():
            logp_old = sde.token_log_prob(x_next, mean_old, std, patch)
        kl = sde.token_kl(mean, mean_old, std, patch)
        keep = trained_tokens(patch)
        if keep is not None:            # a frozen stream (model.frozen_streams): sampled, not trained
            keep = keep.to(dev)
            out = self.objective(logp_new[:, keep], logp_old[:, keep], kl[:, keep], advantages.to(dev))
        else:
            out = self.objective(logp_new, logp_old, kl, advantages.to(dev))
        if keep is not None:            # the frozen terms over every token (a frozen stream's: never)
            full = torch.zeros(kl.shape, dtype=torch.bool, device=kl.device)
            full[:, keep] = out.frozen
            out = ObjectiveOutput(out.loss, full, out.stats, out.counts)
        stream_stats = stream_shares(patch, kl.detach(), out.frozen)
        if beta > 0:
            with torch.no_grad(), self.adapter.reference():
                mean_ref = step_mean(self.adapter, mb, j)
            kl_ref = sde.token_kl(mean, mean_ref, std, patch)
            kl_ref = kl_ref if keep is None else kl_ref[:, keep]
            out = ObjectiveOutput(out.loss + objectives.reference_kl_loss(kl_ref, beta), out.frozen,
                                  {**out.stats, "kl_ref_mean": kl_ref.detach().mean()}, out.counts)
        if stream_stats:
            out = ObjectiveOutput(out.loss, out.frozen, out.stats, {**out.counts, **stream_stats})
        return out, kl.detach(), (logp_new - logp_old).detach()

    def __call__(self, traj: Trajectory, advantages: torch.Tensor, it: int, snapshot: bool = False
                 ) -> tuple[dict[str, Any], KLSnapshot | None]:
        """``inner_epochs`` passes of shuffled minibatches over ``traj``'s SDE steps with
        advantages ``(B,)``. Returns the iteration's update metrics and, if ``snapshot``, the
        token-KL snapshot of its last minibatch (after the others' steps)."""
        run, par, upd = self.run, self.par, self.updater
        epochs, size = self.optim.inner_epochs, self.optim.minibatch_size
        gen = torch.Generator().manual_seed(derive_seed(run.seed, it, 1))
        acc, n_steps, skipped = RunningStats(), traj.num_sde_steps, 0
        first_max_abs_log: float | None = None
        n_mb = math.ceil(traj.batch_size / size) * epochs
        bar = tqdm(total=n_mb, desc="update", leave=False, disable=not (run.progress and par.is_main))
        snap: list[tuple[torch.Tensor, torch.Tensor]] = []
        mb_i, stepped_once = -1, False
        for epoch in range(epochs):
            for whole in torch.randperm(traj.batch_size, generator=gen).split(size):
                # Every rank draws the same permutation; a DP rank takes its equal part of each
                # minibatch. Its loss (a mean over its part) times the SP degree, averaged over the
                # world by the updater, is the whole minibatch's loss: the layout changes nothing.
                idx = whole.tensor_split(par.dp)[par.dp_rank]
                mb, a = traj.select(idx), advantages[idx]
                mb_i += 1
                upd.zero_grad()
                finite, mb_max, mb_loss = True, 0.0, 0.0
                for j in range(n_steps):
                    out, kl, log_ratio = self.replay_step(mb, j, a)
                    evals = step_evaluations(mb, j)           # the policy's forwards (and the reference's)
                    acc.add({"evals_replay": evals, "evals_reference": evals if self.section.beta > 0 else 0})
                    if snapshot and mb_i == n_mb - 1:
                        snap.append((kl, out.frozen))
                    mb_max = nan_max(mb_max, log_ratio.abs().max().item())
                    # The updater agrees over ranks that every loss is finite (one collective).
                    if not upd.backward(out.loss * (par.sp / n_steps)):
                        finite = False
                        break
                    mb_loss += out.loss.detach().item() / n_steps
                    acc.add(out.stats, weight=float(idx.numel()))
                    acc.add(out.counts)                           # summed, then pooled by frac()
                    acc.add({f"epoch{epoch}_{k}": out.counts[k] for k in ("dropped", "terms")})
                    if stepped_once:                              # off-policy: a step was taken
                        acc.add({f"offpolicy_{k}": v for k, v in out.counts.items()})
                if first_max_abs_log is None:
                    first_max_abs_log = mb_max
                stepped, grad_norm = upd.step() if finite else (False, float("nan"))
                if stepped:
                    stepped_once = True
                    self.nonfinite_in_row = 0
                    acc.add({"loss": mb_loss, "grad_norm": grad_norm})
                else:
                    upd.zero_grad()
                    skipped += 1
                    self.nonfinite_in_row += 1
                    if self.nonfinite_in_row >= run.max_nonfinite_in_row:
                        raise TrainingError(
                            f"non-finite loss or gradient in {self.nonfinite_in_row} optimizer steps in a row "
                            f"(iteration {it}; run.max_nonfinite_in_row={run.max_nonfinite_in_row}); "
                            f"stopped, checkpoints and metrics up to the previous iteration are kept")
                bar.update(1)
        bar.close()
        by_epoch = [acc.frac(f"epoch{e}_dropped", f"epoch{e}_terms") for e in range(epochs)]
        snapshot_out = None
        if len(snap) == n_steps > 0:   # (mb, a): this rank's part of the last minibatch
            snapshot_out = KLSnapshot(torch.stack([k for k, _ in snap]), torch.stack([f for _, f in snap]),
                                      mb, a, by_epoch)
        if par.distributed:
            acc = acc.pooled(par)
            firsts = par.all_gather_objects(first_max_abs_log, par.world_group, "pooling the first log-ratio")
            firsts = [f for f in firsts if f is not None]
            first_max_abs_log = None if not firsts else (math.nan if any(math.isnan(f) for f in firsts)
                                                         else max(firsts))
        return self._metrics(acc, first_max_abs_log, skipped), snapshot_out

    def _metrics(self, acc: RunningStats, first_max_abs_log: float | None, skipped: int) -> dict[str, Any]:
        f = acc.frac
        out = {"loss": acc.mean("loss"), "grad_norm": acc.mean("grad_norm"),
               "kl/mean": acc.mean("kl_mean"), "kl/max": acc.maxes.get("kl_max", float("nan")),
               "mask/drop_frac": f("dropped", "terms"), "mask/drop_frac_pos": f("dropped_pos", "terms_pos"),
               "mask/drop_frac_neg": f("dropped_neg", "terms_neg"),
               "mask/offpolicy_drop_frac": f("offpolicy_dropped", "offpolicy_terms"),
               "mask/offpolicy_drop_frac_pos": f("offpolicy_dropped_pos", "offpolicy_terms_pos"),
               "mask/offpolicy_drop_frac_neg": f("offpolicy_dropped_neg", "offpolicy_terms_neg"),
               "mask/drop_frac_by_epoch": [f(f"epoch{e}_dropped", f"epoch{e}_terms")
                                           for e in range(self.optim.inner_epochs)],
               "ratio/first_max_abs_log": first_max_abs_log if first_max_abs_log is not None else float("nan"),
               "nonfinite_skipped": skipped,
               # Transformer row evaluations of the update, all ranks (sequence-parallel ranks repeat theirs).
               "perf/evals/replay": acc.sums.get("evals_replay", 0.0) / self.par.sp,
               "perf/evals/reference": acc.sums.get("evals_reference", 0.0) / self.par.sp}
        if "clip_frac" in acc.sums:
            out["ratio/clip_frac"] = acc.mean("clip_frac")
        if "kl_ref_mean" in acc.sums:
            out["kl_ref/mean"] = acc.mean("kl_ref_mean")
        # A multi-stream latent (video and audio): each stream's share of the token KL, and the share
        # of its terms the trust region froze (a stream frozen by model.frozen_streams has none).
        for k in acc.sums:
            if k.startswith("kl_") and k not in ("kl_all", "kl_mean", "kl_max", "kl_ref_mean"):
                name = k[3:]
                out[f"kl/share_{name}"] = f(k, "kl_all")
                if f"terms_{name}" in acc.sums:
                    out[f"mask/drop_frac_{name}"] = f(f"dropped_{name}", f"terms_{name}")
        return out
