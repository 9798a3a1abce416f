"""Trust regions compared at matched strength: reward against KL, one front per arm.

    .venv/bin/python tools/bench/algorithms.py --stage seed0 --jobs 2      # run (resumable); then row, seeds12,
                                                                           # one_epoch, knees
    .venv/bin/python tools/bench/algorithms.py --report                    # tables, plots, matched-KL
    .venv/bin/python tools/bench/algorithms.py --stage knees --jobs 2 --reuse docs/data/frontier.json  # a new machine
    .venv/bin/python tools/bench/algorithms.py --stage transfer --jobs 2 \
        --reuse docs/data/frontier.json            # the transfer test in the latent world (docs/latent_world.md)

A trust region is a knob, so each arm is swept over its own: token-wise Flow-DPPO (delta per latent
element), sample-level Flow-DPPO (the paper's algorithm, delta per element), row-gated Flow-DPPO
(token terms frozen only inside rows whose own mean KL per element is past delta), row-decided
Flow-DPPO (the row's mean KL decides, each token's push is tested), Flow-GRPO ratio clipping
(epsilon), and no trust region. Each at 1 and 4 inner epochs (tighter knob values at 1 epoch, where
only one minibatch per iteration is off-policy), with paired seeds (the same rollout seeds in every
arm). Every run is the shapes-world recipe
(``flowdppo_video/recipes/default.yaml``) at the same rollout budget (``--iterations`` x 32 videos),
lr 1e-4, 2 held-out samples per prompt; only the arm, its knob, the inner epochs and the seed change.

The base model's evaluation is the same in every run (fixed evaluation noise), so it is computed
once (``OUT/_base``; ``OUT/_base-WORLD`` in another world, ``...-tag-TAG`` for a ``--tag`` variant, whose
overrides may change the model) and copied into each run. Runs are claimed with a lock file, so several
invocations (or ``--jobs N`` workers, one thread each) can work through one grid side by side;
an interrupted run is redone from scratch. Each run writes ``bench.json`` (its numbers, wall time,
and the commit it ran) beside its metrics.

``--report`` reads every finished run and writes ``DOCS/data/frontier.json`` (per run),
``DOCS/frontier.md`` (fronts, matched-KL paired differences with bootstrap intervals over seeds,
4 against 1 epoch), ``DOCS/figures/frontier.png`` (held-out direction against KL to the base model),
``DOCS/figures/frontier_forgetting.png`` and ``frontier_grid.png`` (forgetting and the grid artifact
against KL), and for each other world with runs ``DOCS/frontier_WORLD.md`` and its figures, with
that world's knees read from its own runs by the rule of ``KNEES`` (:func:`knees_from`). A variant on
another model (``model.path=`` among its overrides) also gets a page of its own from its runs alone,
``DOCS/frontier[_WORLD]_TAG.md``, and its figures. The
stages' wall times are kept in ``DOCS/data/frontier_stages.json``, so a report on another machine
keeps them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flowdppo_video.commands.benchmarking import DATA, FIGURES, FRONTIER_TRAINING, git_commit
from flowdppo_video.objectives import OBJECTIVES
from flowdppo_video.reporting.winrates import bootstrap_ci, mean_ci_text

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "flowdppo_video" / "recipes" / "default.yaml"
EVAL_REWARDS = ("eval.rewards={world_direction: 1.0, world_colour: 1.0, world_shape: 1.0, "
                "world_smoothness: 1.0, world_fidelity: 1.0}")
# FRONTIER_TRAINING: full fine-tuning on every step and the plain rollout, as the committed fronts were
# measured (docs/clean_rl.md, docs/benchmarks.md rollout_payoff); new cells stay comparable with them.
# run.keep_best off: a run is read at its end, and its one evaluation after training would be kept
# again beside its last checkpoint.
COMMON = [*FRONTIER_TRAINING, "eval.samples_per_prompt=2", "run.report_every=0", "run.progress=false",
          "run.tensorboard=false", "run.sample_every=1000", "run.checkpoint_every=1000", "run.keep_best=null",
          EVAL_REWARDS]


@dataclass(frozen=True)
class World:
    """An embedded world the grid runs in: its recipe, its evaluation rewards and the prefix of their
    names (``world_direction``, ``latent_direction``); runs of a world other than the shapes world
    are named ``WORLD-...`` and tagged ``"world"`` in their results."""

    recipe: Path
    eval_rewards: str
    prefix: str
    # The world's own knob values (arm -> values) where its calibration puts 5-50% frozen elsewhere.
    knob_values: dict[str, list[float]] | None = None
    # Settings of its own, after COMMON's (the learning rate that moves it as far per step).
    overrides: tuple[str, ...] = ()


WORLDS: dict[str, World] = {
    "shapes": World(RECIPE, EVAL_REWARDS, "world_"),
    # The latent world (docs/latent_world.md): Wan 2.1's latent geometry, D = 64, the VAE in the loop.
    # One unconstrained update at lr 1e-4 moves its policy 9x further per element than the shapes
    # world's (docs/trust_region_calibration_latent.md), and every arm there damaged the model: the
    # grid runs at lr 3e-5, where one update moves it as far per element as lr 1e-4 moves the shapes
    # world (3.0e-4 against 3.4e-4; docs/trust_region_calibration_latent_lr3e-5.md), so that the knob
    # values compare as numbers. The values span 80-5% frozen there (the shares in the comments) and
    # reach within 3x of each arm's shapes-world knee (KNEES).
    "latent": World(ROOT / "configs" / "latent_world.yaml",
                    "eval.rewards={latent_direction: 1.0, latent_colour: 1.0, latent_shape: 1.0, latent_fidelity: 1.0}",
                    "latent_",
                    {"sample": [3e-5, 1e-4, 3e-4, 1e-3],        # 80%, 62%, 37%, 7%
                     "clip": [1e-4, 3e-4, 1e-3, 3e-3],          # 79%, 63%, 30%, 5%
                     "row": [1e-5, 1e-4, 1e-3],                 # 47%, 25%, 6%
                     "token": [1e-5, 1e-4, 1e-3]},              # 47%, 23%, 3%
                    ("optim.lr=3e-5",)),
}

# The arms are the variants of the registered objectives (flowdppo_video.objectives: each class
# names its knob and its variants); the knob values are this benchmark's choice. They span roughly
# 5-50% of the off-policy terms frozen at 4 inner epochs (docs/trust_region_calibration.md, the
# shares in the comments).
KNOB_VALUES: dict[str, list[float]] = {
    "token": [3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3],    # (3e-6 not calibrated), 23%, 12%, 5.7%, 3.3%, 3.0%
    "sample": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],          # 76% (the paper's value), 63%, 38%, 19%, 7%
    "clip": [1e-4, 3e-4, 1e-3, 3e-3],                  # 58%, 30%, 11%, 3%
    "row_gated": [1e-6, 3e-6, 1e-5, 3e-5],             # 50%, 40%, 22%, 11%
    "row": [1e-5, 3e-5, 1e-4, 3e-4],                   # the sample arm's first four: the same decision
}
ARM_ORDER = ("token", "sample", "clip", "row_gated", "row")   # the order of the tables and plots


def registry_arms() -> dict[str, tuple[list[str], str | None]]:
    """Every variant of every registered objective: ``arm -> (overrides, knob key)``."""
    out: dict[str, tuple[list[str], str | None]] = {}
    for kind, cls in OBJECTIVES.items():
        for arm, settings in (cls.variants or {kind: {}}).items():
            out[arm] = ([f"objective.kind={kind}", *(f"objective.{k}={v}" for k, v in settings.items())],
                        f"objective.{cls.knob}" if cls.knob else None)
    return out


# arm -> (overrides, knob key, knob values): the measured arms first, then any other registered
# variant (no values of its own: give them with --values).
_REGISTRY = registry_arms()
ARMS: dict[str, tuple[list[str], str | None, list[float]]] = {
    arm: (*_REGISTRY[arm], KNOB_VALUES.get(arm, []))
    for arm in [*ARM_ORDER, *(a for a in _REGISTRY if a not in ARM_ORDER)]}
# Pinned token-wise, as measured (it was the default then): with nothing frozen the granularity
# still sets the ratio's form (per token, or one mean per row).
ARMS["none"] = (["objective.kind=flow_dppo", "objective.granularity=token", "objective.delta=.inf"], None, [math.inf])
class _Default(dict):
    """A table with a fallback for arms it does not list (a newly registered objective's)."""

    def __init__(self, table: dict[str, str], default: str | None = None) -> None:
        super().__init__(table)
        self.default = default

    def __missing__(self, key: str) -> str:
        return key if self.default is None else self.default


LABELS = _Default({"token": "Flow-DPPO token", "sample": "Flow-DPPO sample (paper)", "clip": "ratio clipping",
                   "row_gated": "Flow-DPPO row-gated", "row": "Flow-DPPO row-decided", "none": "no trust region"})
COLOURS = _Default({"token": "tab:blue", "sample": "tab:orange", "clip": "tab:red", "row_gated": "tab:green",
                    "row": "tab:purple", "none": "tab:gray"}, "black")
# Stages: what to run, in order (the whole grid does not fit one sitting on 2 cores).
# The two candidate redesigns (row_gated, row) are screened on seed 0 at 4 inner epochs; the arms
# that decide the comparison get the further seeds (row, which reached the sample/clip front on
# seed 0, among them).
STAGES = {
    "seed0": {"seeds": [0], "epochs": [4, 1], "arms": ["token", "sample", "clip", "none", "row_gated"]},
    "row": {"seeds": [0], "epochs": [4], "arms": ["row"]},
    "seeds12": {"seeds": [1, 2], "epochs": [4, 1], "arms": ["token", "sample", "clip", "none", "row"]},
    # The 1-epoch fronts at the values that act there (ONE_EPOCH_VALUES), seeds 0-2 (row-decided not
    # run there yet: --stage one_epoch --arms row).
    "one_epoch": {"seeds": [0, 1, 2], "epochs": [1], "arms": ["token", "sample", "clip", "none"]},
    # Seeds 3-4 at each arm's 4-epoch knee (KNEES).
    "knees": {"seeds": [3, 4], "epochs": [4], "arms": ["sample", "clip", "row", "token"], "knees": True},
    # The transfer test in another world (--world latent): its own knob values, 4 inner epochs, seeds 0-2.
    "transfer": {"seeds": [0, 1, 2], "epochs": [4], "arms": ["sample", "clip", "row", "token", "none"],
                 "world": "latent"},
}
# Each arm's knee at 4 inner epochs, by one rule on the seed 0-2 medians: the highest held-out
# direction among the arm's points that forgot at most 6 points. 5 seeds run here (stage "knees"),
# and the two-reward variant (--tag two) runs at these cells.
KNEES: dict[str, float] = {"sample": 1e-5, "clip": 1e-4, "row": 1e-4, "token": 1e-5}


def run_name(arm: str, value: float, epochs: int, seed: int, tag: str = "", world: str = "shapes") -> str:
    knob = "inf" if math.isinf(value) else f"{value:g}"
    return f"{'' if world == 'shapes' else world + '-'}{arm}-{knob}-e{epochs}-s{seed}{('-' + tag) if tag else ''}"


def world_of(result: dict) -> str:
    """The world a result was measured in (results from before worlds were tagged: the shapes world)."""
    return result.get("world", "shapes")


# At one inner epoch only the iteration's second minibatch is off-policy, so most of the 4-epoch
# values freeze nothing there (seed 0: sample delta >= 1e-4 and clip eps >= 3e-4 froze 0% and ran as
# no trust region): the 1-epoch fronts sweep tighter values, each of which acts.
ONE_EPOCH_VALUES: dict[str, list[float]] = {
    "token": [3e-6, 1e-5, 3e-5, 1e-4], "sample": [1e-6, 3e-6, 1e-5, 3e-5], "clip": [1e-5, 3e-5, 1e-4, 3e-4],
    "row_gated": [1e-6, 3e-6, 1e-5, 3e-5], "row": [1e-6, 3e-6, 1e-5, 3e-5],
}


def knob_values(arm: str, epochs: int, values: dict[str, list[float]] | None = None) -> list[float]:
    """An arm's knob values at ``epochs`` inner epochs: ``values["arm@E"]``, else ``values["arm"]``,
    else the 1-epoch list (at one epoch), else the arm's own."""
    values = values or {}
    for key in (f"{arm}@{epochs}", arm):
        if key in values:
            return values[key]
    return ONE_EPOCH_VALUES.get(arm, ARMS[arm][2]) if epochs == 1 else ARMS[arm][2]


def stage_values(stage: dict, world: str) -> dict[str, list[float]]:
    """The knob values a stage runs before ``--values``: each arm's knee (stage ``knees``), else the
    world's own values (a world calibrated apart), else none (each arm's ``KNOB_VALUES``)."""
    if stage.get("knees"):
        return {a: [v] for a, v in KNEES.items()}
    return {a: list(v) for a, v in (WORLDS[world].knob_values or {}).items()}


def grid(arms: list[str], epochs: list[int], seeds: list[int], values: dict[str, list[float]] | None = None
         ) -> list[tuple[str, float, int, int]]:
    out = []
    for seed in seeds:
        for e in epochs:
            for arm in arms:
                for v in knob_values(arm, e, values):
                    out.append((arm, v, e, seed))
    return out


def overrides_for(arm: str, value: float, epochs: int, seed: int, iterations: int, run_dir: Path,
                  extra: list[str], world: str = "shapes") -> list[str]:
    arm_ov, knob, _ = ARMS[arm]
    common = [x if x != EVAL_REWARDS else WORLDS[world].eval_rewards for x in COMMON]
    ov = [f"run.output_dir={run_dir}", f"run.seed={seed}", f"run.iterations={iterations}",
          f"optim.inner_epochs={epochs}", f"eval.every={iterations}", *common, *WORLDS[world].overrides, *arm_ov]
    if knob is not None:
        ov.append(f"{knob}={value!r}")
    return ov + extra


def base_dir(out: Path, world: str = "shapes", tag: str = "") -> Path:
    """Where the grid keeps a world's base evaluation, one per ``--tag`` variant: a variant's overrides
    may change the base itself (``model.path``, the evaluation's rewards)."""
    return out / ("_base" + ("" if world == "shapes" else f"-{world}") + (f"-tag-{tag}" if tag else ""))


def base_eval(out: Path, iterations: int, extra: list[str], world: str = "shapes", tag: str = "") -> Path:
    """The base model's held-out evaluation, once for the grid: ``OUT/_base/eval.jsonl`` and its videos
    (``OUT/_base-WORLD`` for another world, ``...-TAG`` for a variant)."""
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.trainer import Trainer

    base = base_dir(out, world, tag)
    if (base / "done").is_file():
        return base
    shutil.rmtree(base, ignore_errors=True)
    cfg = load_config(WORLDS[world].recipe, overrides_for("none", math.inf, 1, 0, iterations, base / "run", extra, world))
    t = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.evaluate(0)
    trainer.close()
    shutil.copy(base / "run" / "eval.jsonl", base / "eval.jsonl")
    shutil.copytree(base / "run" / "eval" / "after_000000", base / "after_000000")
    (base / "done").write_text(json.dumps({"seconds": time.perf_counter() - t, "commit": git_commit(ROOT)}))
    return base


def _claim(run_dir: Path) -> bool:
    """Take the run, or leave it to the live process that holds it (a dead holder's claim is stale)."""
    lock = run_dir.with_name(run_dir.name + ".claim")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)
            return False
        except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
            lock.unlink(missing_ok=True)
            return _claim(run_dir)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def summarise_run(run_dir: Path, prefix: str = "world_") -> dict:
    from flowdppo_video.training.metrics import read_metrics

    rows, evals = read_metrics(run_dir), read_metrics(run_dir, "eval")
    base, final = evals[0], evals[-1]

    def ev(row: dict, k: str) -> float:
        k = prefix + k[len("world_"):] if k.startswith("world_") else k      # the world's reward names
        v = row.get(f"eval/{k}/mean")
        return float("nan") if v is None else float(v)

    def mean_of(key: str, rs: list[dict]) -> float:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.fmean(vals) if vals else float("nan")

    return {
        "train_seconds": sum(r["time/rollout_s"] + r["time/reward_s"] + r["time/update_s"] for r in rows),
        "train_reward_first": rows[0]["reward/mean"],
        "train_reward_final": statistics.fmean(r["reward/mean"] for r in rows[-5:]),
        "direction_base": ev(base, "world_direction"), "direction": ev(final, "world_direction"),
        "kl_to_base": ev(final, "kl_base"),
        "forgetting": (ev(base, "world_colour") + ev(base, "world_shape")
                       - ev(final, "world_colour") - ev(final, "world_shape")) / 2,
        "colour": ev(final, "world_colour"), "shape": ev(final, "world_shape"),
        "colour_base": ev(base, "world_colour"), "shape_base": ev(base, "world_shape"),
        "smoothness": ev(final, "world_smoothness"), "smoothness_base": ev(base, "world_smoothness"),
        "fidelity": ev(final, "world_fidelity"), "fidelity_base": ev(base, "world_fidelity"),
        "background_error": ev(final, "world_fidelity/background_error"),
        "background_error_base": ev(base, "world_fidelity/background_error"),
        "grid_energy": ev(final, "world_fidelity/grid_energy"),
        "grid_energy_base": ev(base, "world_fidelity/grid_energy"),
        "offpolicy_frozen": mean_of("mask/offpolicy_drop_frac", rows),
        "pooled_frozen": mean_of("mask/drop_frac", rows),
        "colour_train_final": mean_of(f"reward/{prefix}colour/mean", rows[-5:]),
        "colour_train_first": rows[0].get(f"reward/{prefix}colour/mean"),
    }


def one_run(out: Path, arm: str, value: float, epochs: int, seed: int, iterations: int, extra: list[str],
            tag: str = "", world: str = "shapes") -> dict | None:
    """Run one cell of the grid (or read it if finished); None if another process holds it."""
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.trainer import Trainer

    run_dir = out / run_name(arm, value, epochs, seed, tag, world)
    done = run_dir / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    if not _claim(run_dir):
        return None
    try:
        shutil.rmtree(run_dir, ignore_errors=True)             # an interrupted run starts again
        base = base_eval(out, iterations, extra, world, tag)
        t = time.perf_counter()
        trainer = Trainer(load_config(WORLDS[world].recipe,
                                      overrides_for(arm, value, epochs, seed, iterations, run_dir, extra, world)))
        shutil.copy(base / "eval.jsonl", run_dir / "eval.jsonl")     # the shared base evaluation
        shutil.copytree(base / "after_000000", run_dir / "eval" / "after_000000")
        trainer.run()
        result = {"arm": arm, "knob": ARMS[arm][1], "value": value, "epochs": epochs, "seed": seed, "tag": tag,
                  "iterations": iterations, "extra": extra, "wall_seconds": time.perf_counter() - t,
                  "commit": git_commit(ROOT), **({} if world == "shapes" else {"world": world}),
                  **summarise_run(run_dir, WORLDS[world].prefix)}
        done.write_text(json.dumps(result, indent=1))
        return result
    finally:
        run_dir.with_name(run_dir.name + ".claim").unlink(missing_ok=True)


def work(out: Path, cells: list[tuple[str, float, int, int]], iterations: int, extra: list[str], tag: str,
         world: str = "shapes") -> None:
    from tqdm.auto import tqdm

    for arm, v, e, s in tqdm(cells, desc=f"grid (pid {os.getpid()})"):
        r = one_run(out, arm, v, e, s, iterations, extra, tag, world)
        if r is not None:
            print(json.dumps({k: r[k] for k in ("arm", "value", "epochs", "seed", "direction", "kl_to_base",
                                                "forgetting", "offpolicy_frozen", "wall_seconds")}), flush=True)


# ---------------------------------------------------------------------- analysis
def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def interp_at(points: list[tuple[float, float]], kl: float) -> float | None:
    """Reward at ``kl`` on one front: linear in log KL between the knob values' points (sorted by
    KL), None outside the front's KL range."""
    pts = sorted((k, r) for k, r in points if k > 0 and k == k and r == r)
    if not pts or not (pts[0][0] <= kl <= pts[-1][0]):
        return None
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            w = 0.0 if k1 == k0 else (math.log(kl) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return r0 + w * (r1 - r0)
    return pts[0][1]


def front_runs(results: list[dict]) -> list[dict]:
    """The runs that make fronts. Where some seeds swept an arm's knob (two values or more at that
    epoch count), a seed run at one value only (the knees' seeds 3-4) is a point, not a front: it
    would pin every matched-KL range to its one KL, so it is left out here and enters the knee table
    alone. An arm no seed swept (the no-trust-region arm, a one-value grid) keeps its runs."""
    n: dict[tuple[str, int, int], int] = {}
    for r in results:
        n[(r["arm"], r["epochs"], r["seed"])] = n.get((r["arm"], r["epochs"], r["seed"]), 0) + 1
    swept = {(a, e) for (a, e, _), k in n.items() if k >= 2}
    return [r for r in results if (r["arm"], r["epochs"]) not in swept or n[(r["arm"], r["epochs"], r["seed"])] >= 2]


def fronts(results: list[dict], key: str = "direction") -> dict[tuple[str, int, int], list[tuple[float, float]]]:
    """(arm, epochs, seed) -> [(KL to base, key)] over the arm's knob values (:func:`front_runs` only)."""
    out: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    for r in front_runs(results):
        out.setdefault((r["arm"], r["epochs"], r["seed"]), []).append((r["kl_to_base"], r[key]))
    return out


def _budgets(fa: dict[int, list[tuple[float, float]]], fb: dict[int, list[tuple[float, float]]]) -> list[float]:
    """Three KL budgets (20%, 50%, 80% of the way in log KL) inside the range both fronts cover in
    every seed. Where no range is covered by every seed (one seed's front ends below where another's
    starts, as at one inner epoch), inside the range of the median seed instead: each of those
    budgets is then compared over the seeds whose fronts reach it (the row's seed count says how
    many). None if even the median fronts do not overlap."""
    both = [pts for pts in (*fa.values(), *fb.values()) if pts]
    if not both:
        return []
    lo = max(min(k for k, _ in pts) for pts in both)
    hi = min(max(k for k, _ in pts) for pts in both)
    if not (0 < lo < hi):
        ends = [[(min(k for k, _ in pts), max(k for k, _ in pts)) for pts in f.values() if pts] for f in (fa, fb)]
        if not all(ends):
            return []
        lo = max(statistics.median(a for a, _ in e) for e in ends)
        hi = min(statistics.median(b for _, b in e) for e in ends)
        if not (0 < lo < hi):
            return []
    return [math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo))) for f in (0.2, 0.5, 0.8)]


def _paired(fa: dict[int, list[tuple[float, float]]], fb: dict[int, list[tuple[float, float]]],
            budgets: list[float]) -> list[dict]:
    """Per budget: front a minus front b, paired by seed, with a bootstrap interval over seeds."""
    rows = []
    for kl in budgets:
        at_a = {s: interp_at(pts, kl) for s, pts in fa.items()}
        at_b = {s: interp_at(pts, kl) for s, pts in fb.items()}
        seeds = [s for s in at_a if at_a[s] is not None and at_b.get(s) is not None]
        if len(seeds) < min(2, len(at_a)):       # a budget only one of several seeds reaches says little
            continue
        diffs = [at_a[s] - at_b[s] for s in seeds]
        lo_ci, hi_ci = bootstrap_ci(diffs)
        rows.append({"kl": kl, "n_seeds": len(diffs), "mean_diff": statistics.fmean(diffs), "ci": [lo_ci, hi_ci],
                     "diffs": diffs, "a_mean": statistics.fmean(at_a[s] for s in seeds),
                     "b_mean": statistics.fmean(at_b[s] for s in seeds)})
    return rows


def _by_seed(fr: dict[tuple[str, int, int], list[tuple[float, float]]], arm: str, epochs: int
             ) -> dict[int, list[tuple[float, float]]]:
    return {s: pts for (a, e, s), pts in fr.items() if a == arm and e == epochs}


def matched_kl(results: list[dict], epochs: int, key: str = "direction", budgets: list[float] | None = None
               ) -> list[dict]:
    """Paired differences of ``key`` between arms at matched KL budgets, per seed, with intervals.

    Without ``budgets``, each pair of arms gets three budgets (20%, 50%, 80% of the way in log KL)
    inside the KL range that both arms' fronts cover in every seed; a pair whose fronts do not
    overlap gets none."""
    fr = fronts([r for r in results if r["epochs"] == epochs and r["arm"] != "none"], key)
    arms = sorted({a for a, _, _ in fr}, key=list(ARMS).index)
    rows = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            fa, fb = _by_seed(fr, a, epochs), _by_seed(fr, b, epochs)
            for m in _paired(fa, fb, budgets if budgets is not None else _budgets(fa, fb)):
                rows.append({"epochs": epochs, "a": a, "b": b, **m})
    return rows


def epochs_against(results: list[dict], many: int = 4, one: int = 1, key: str = "direction") -> list[dict]:
    """Does an arm's ``many``-epoch front hold up against its own ``one``-epoch front? Paired
    differences at matched KL inside the range both cover (none where they do not overlap)."""
    fr = fronts([r for r in results if r["arm"] != "none"], key)
    rows = []
    for arm in sorted({a for a, _, _ in fr}, key=list(ARMS).index):
        fa, fb = _by_seed(fr, arm, many), _by_seed(fr, arm, one)
        if fa and fb:
            rows += [{"arm": arm, **m} for m in _paired(fa, fb, _budgets(fa, fb))]
    return rows


def grid_runs(results: list[dict]) -> list[dict]:
    """The grid itself: the runs of no ``--tag`` variant (the fronts, the matched-KL tables, the plots)."""
    return [r for r in results if not r.get("tag")]


def _gain_parts(r: dict, base: dict) -> dict[str, float]:
    """Held-out gains of run ``r`` over a base evaluation (read from ``base``, a run with the same base:
    ``r`` itself, or a run of the same grid): direction and colour gained, shape lost, KL to the base."""
    return {"direction": r["direction"] - base["direction_base"], "colour": r["colour"] - base["colour_base"],
            "shape lost": base["shape_base"] - r["shape"], "KL": r["kl_to_base"]}


def _base_of(twin: dict, variant: dict) -> dict:
    """The base numbers that measure ``twin``'s gains: its own; where it lacks the base colour and shape
    (runs from before they were summarised), the variant's for those two, which is right only when
    the variant ran on the same model (then the base is the same), else they are NaN (n/a)."""
    same_model = not any(o.startswith("model.path=") for o in variant.get("extra", []))
    fill = {k: variant[k] if same_model else float("nan") for k in ("colour_base", "shape_base") if k not in twin}
    return {**twin, **fill}


def model_variant_tags(results: list[dict]) -> list[str]:
    """The ``--tag`` variants that ran on another model (a ``model.path=`` among their overrides): their
    base is not the grid's, so each gets a page of its own (:func:`variant_page`) beside the paired table."""
    return sorted({r["tag"] for r in results
                   if r.get("tag") and any(o.startswith("model.path=") for o in r.get("extra", []))})


def variant_page(results: list[dict], tag: str, world: str, reference_knees: dict[str, dict] | None) -> tuple[str, list[dict]]:
    """The page of a variant on another model: :func:`report` over its runs alone (as a grid of their
    own), after a line that says which model and which cells. Returns the page and those runs."""
    runs = [{**r, "tag": ""} for r in results if r.get("tag") == tag]
    cells = sorted({(r["arm"], r["value"]) for r in runs}, key=lambda t: (list(ARMS).index(t[0]), t[1]))
    head = [f"Variant `{tag}` of the {world} world: {' '.join(runs[0]['extra'])}. Every number below is over "
            "this variant's runs alone, against its own base evaluation. Cells run: "
            + ", ".join(f"{LABELS[a]} {v:g}" for a, v in cells) + ". Where an arm ran one value, its knee "
            "below is that value by construction (if it forgot at most 6 points), not a reading.", ""]
    one_value = {a: vs[0] for a in {a for a, _ in cells} if len(vs := [v for b, v in cells if b == a]) == 1}
    return "\n".join(head) + "\n" + report(runs, {}, world, reference_knees, cells=one_value), runs


def _fmt_median(gains: list[dict[str, float]], name: str) -> str:
    if not gains:
        return "n/a"
    m = _median([g[name] for g in gains])
    return f"{m:.3f}" if name == "KL" else f"{m:+.3f}"


def tagged_summary(results: list[dict], tag: str) -> list[str]:
    """Per arm, knob and epoch count of a ``--tag`` variant: medians over its seeds of the variant's gains
    and of its untagged twins', then the paired difference (variant minus twin) of each gain, with a 95%
    bootstrap interval over the seeds that have both runs."""
    plain = {(r["arm"], r["value"], r["epochs"], r["seed"]): r for r in grid_runs(results)}
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("tag") == tag:
            cells.setdefault((r["arm"], r["value"], r["epochs"]), []).append(r)
    names = ("direction", "colour", "shape lost", "KL")
    lines = ["Medians over seeds; the paired columns are variant minus untagged run of the same seed (mean, "
             "95% bootstrap interval over seeds).", "",
             "| arm | knob | epochs | seeds | variant: direction gained | colour gained | shape lost | KL "
             "| untagged: direction | colour | shape lost | KL | paired: direction | colour | shape lost |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, v, e), rs in sorted(cells.items(), key=lambda t: (t[0][2], list(ARMS).index(t[0][0]), t[0][1])):
        var = {r["seed"]: _gain_parts(r, r) for r in rs}
        twin = {r["seed"]: _gain_parts(t, _base_of(t, r)) for r in rs
                if (t := plain.get((arm, v, e, r["seed"]))) is not None}
        med = [_fmt_median(list(gs.values()), n) for gs in (var, twin) for n in names]
        paired = [mean_ci_text([var[s][n] - twin[s][n] for s in twin], signed=True) for n in names[:3]]
        knob = "—" if ARMS[arm][1] is None else f"{ARMS[arm][1].split('.')[-1]} {v:g}"
        lines.append(f"| {LABELS[arm]} | {knob} | {e} | {len(rs)} | " + " | ".join(med + paired) + " |")
    return lines + [""]


def tagged_table(results: list[dict], tag: str) -> list[str]:
    """A variant of the grid (``--tag``, e.g. two rewards at each arm's knee) beside the untagged run
    of the same cell: held-out direction and colour gained, shape lost, KL to the base model."""
    plain = {(r["arm"], r["value"], r["epochs"], r["seed"]): r for r in grid_runs(results)}

    def gains(r: dict, base: dict) -> str:
        g = _gain_parts(r, base)
        return f"{g['direction']:+.3f} | {g['colour']:+.3f} | {g['shape lost']:+.3f} | {g['KL']:.3f}"

    lines = [f"### Variant `{tag}`: {' '.join(next(r for r in results if r.get('tag') == tag)['extra'])}", ""]
    lines += tagged_summary(results, tag)
    lines += ["Each row: the variant's run, then the untagged run of the same arm, knob, epochs and seed "
             "(held-out gains, each over its own base evaluation: the grid's shared one, or a variant's on "
             "another model; shape lost in points of the score).", "",
             "| arm | knob | epochs | seed | direction gained | colour gained | shape lost | KL to base "
             "| untagged: direction | colour | shape lost | KL |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in results if r.get("tag") == tag),
                    key=lambda r: (r["epochs"], list(ARMS).index(r["arm"]), r["value"], r["seed"])):
        twin = plain.get((r["arm"], r["value"], r["epochs"], r["seed"]))
        knob = "—" if ARMS[r["arm"]][1] is None else f"{ARMS[r['arm']][1].split('.')[-1]} {r['value']:g}"
        lines.append(f"| {LABELS[r['arm']]} | {knob} | {r['epochs']} | {r['seed']} | {gains(r, r)} | "
                     + (gains(twin, _base_of(twin, r)) if twin else "n/a | n/a | n/a | n/a") + " |")
    return lines + [""]


# The knee tables: (key, name, display scale, decimals).
KNEE_KEYS = [("direction", "held-out direction", 1.0, 3), ("kl_to_base", "KL to base", 1.0, 3),
             ("forgetting", "forgetting (pts)", 100.0, 1), ("background_error", "background error", 1.0, 1),
             ("grid_energy", "grid energy", 1.0, 2)]


# The knee rule (KNEES): at most this much forgetting (median over seeds, a fraction of the score).
KNEE_MAX_FORGETTING = 0.06


def _knee_of(medians: dict[float, tuple[float, float]], max_forgetting: float) -> float | None:
    """The knob value with the highest median direction among those whose median forgetting is at
    most ``max_forgetting`` (``medians``: value -> (direction, forgetting)); None if none is. An exact
    tie in direction goes to the larger value (the looser setting that reached the same reward)."""
    ok = [(d, v) for v, (d, f) in medians.items() if d == d and f == f and f <= max_forgetting]
    return max(ok)[1] if ok else None


def knees_from(results: list[dict], epochs: int = 4, max_forgetting: float = KNEE_MAX_FORGETTING
               ) -> dict[str, dict]:
    """Each swept arm's knee read from the runs by the rule :data:`KNEES` was read by (the highest
    median held-out direction among the knob values whose median forgetting is at most
    ``max_forgetting``), each value's medians over the seeds that ran it.

    Returns arm -> {"value": the knee, "seeds": n, "resampled": {value: share}}: how often each value
    is the knee when the seeds are resampled with replacement (every one of the n^n draws, weighted
    alike), which says how firmly the seeds place it. A knee depends on which seeds a draw holds, not
    their order, so each multiset of seeds is read once and weighted by the draws that give it
    (C(2n-1, n) readings: 10 at 3 seeds, 92,378 at 10, where n^n would be 10^10)."""
    out: dict[str, dict] = {}
    fronted = front_runs(grid_runs(results))
    for arm in ARMS:
        if ARMS[arm][1] is None:
            continue
        rs = [r for r in fronted if r["arm"] == arm and r["epochs"] == epochs]
        values = sorted({r["value"] for r in rs})
        by = {(r["value"], r["seed"]): r for r in rs}
        seeds = sorted({r["seed"] for r in rs})
        if len(values) < 2:
            continue

        def knee(draw: tuple[int, ...]) -> float | None:
            ran = {v: [by[v, s] for s in draw if (v, s) in by] for v in values}
            return _knee_of({v: (_median([r["direction"] for r in g]), _median([r["forgetting"] for r in g]))
                             for v, g in ran.items() if g}, max_forgetting)

        n = len(seeds)
        counts: dict[float, int] = {}
        for d in itertools.combinations_with_replacement(seeds, n):
            k = knee(d)
            if k is not None:                       # the ordered draws of this multiset: n! / prod(count!)
                ways = math.factorial(n) // math.prod(math.factorial(c) for c in Counter(d).values())
                counts[k] = counts.get(k, 0) + ways
        out[arm] = {"value": knee(tuple(seeds)), "seeds": n,
                    "resampled": {v: counts[v] / n ** n for v in sorted(counts)}}
    return out


def _resampled_text(k: dict) -> str:
    shares = [f"{v:g}: {p * 100:.0f}%" for v, p in k["resampled"].items()]
    rest = 1 - sum(k["resampled"].values())
    return ", ".join(shares + ([f"no value: {rest * 100:.0f}%"] if rest > 1e-9 else [])) or "n/a"


def knee_table(results: list[dict], world: str = "shapes", reference: dict[str, dict] | None = None,
               epochs: int = 4, knees: dict[str, dict] | None = None) -> list[str]:
    """Each arm's knee read from ``results`` (:func:`knees_from`, or ``knees`` where the caller has
    read them) with how firmly the seeds place it; with ``reference`` (the shapes world's knees, as
    :func:`knees_from` gives them), beside those: their ratio and whether it lies within a factor of
    3 (the transfer test's question)."""
    knees = knees_from(results, epochs) if knees is None else knees
    fronted = front_runs(grid_runs(results))
    if not knees:
        return []
    head = "| arm | knob | seeds | knee | resampled |"
    if reference is not None:
        head += " shapes world's knee | resampled there | here / shapes | within 3x |"
    lines = [f"### Each arm's knee read from the runs, {world} world, {epochs} inner epochs", "",
             f"The rule of `KNEES`: the highest median held-out direction among the knob values whose median "
             f"forgetting is at most {KNEE_MAX_FORGETTING * 100:g} points. 'Resampled': how often each value is "
             "the knee when the seeds are drawn again with replacement (all n^n draws, equally likely).", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for arm, k in knees.items():
        here = k["value"]
        values = sorted({r["value"] for r in fronted if r["arm"] == arm and r["epochs"] == epochs})
        edge = " (sweep's edge)" if here is not None and here in (values[0], values[-1]) else ""
        row = (f"| {LABELS[arm]} | {ARMS[arm][1].split('.')[-1]} | {k['seeds']} | "
               f"{'none' if here is None else f'{here:g}'}{edge} | {_resampled_text(k)} |")
        if reference is not None:
            ref = reference.get(arm, {})
            there = ref.get("value")
            ratio = here / there if here is not None and there else None
            row += (f" {'n/a' if there is None else f'{there:g}'} | {_resampled_text(ref) if ref.get('resampled') else 'n/a'} | "
                    f"{'n/a' if ratio is None else f'{ratio:g}x'} | "
                    f"{'n/a' if ratio is None else ('yes' if 1 / 3 - 1e-9 <= ratio <= 3 + 1e-9 else 'no')} |")
        lines.append(row)
    return lines + [""]


def knee_summary(results: list[dict], epochs: int = 4, against: str = "sample",
                 knees: dict[str, float] | None = None) -> list[str]:
    """Each arm at its knee (``knees``, by default :data:`KNEES`; ``epochs`` inner epochs) over all its
    seeds: mean and 95% bootstrap interval of each :data:`KNEE_KEYS` number; then each knee minus
    ``against``'s knee, paired by seed (the seeds both ran)."""
    knees = KNEES if knees is None else knees
    runs = {a: {r["seed"]: r for r in results if r["arm"] == a and r["value"] == v and r["epochs"] == epochs
                and not r.get("tag")} for a, v in knees.items()}
    runs = {a: rs for a, rs in runs.items() if rs}
    if not runs:
        return []

    names = " | ".join(n for _, n, _, _ in KNEE_KEYS)
    lines = [f"### Each arm at its knee, {epochs} inner epochs (mean over seeds, 95% bootstrap interval)", "",
             f"| arm | knob | seeds | {names} |", "|---|---|---|" + "---|" * len(KNEE_KEYS)]
    for a, rs in runs.items():
        knob = "—" if ARMS[a][1] is None else f"{ARMS[a][1].split('.')[-1]} {knees[a]:g}"   # none: no knob
        lines.append(f"| {LABELS[a]} | {knob} | {len(rs)} | "
                     + " | ".join(mean_ci_text([r[k] for r in rs.values()], sc, d) for k, _, sc, d in KNEE_KEYS) + " |")
    if against in runs:
        lines += ["", f"Paired by seed, each knee minus {LABELS[against]}'s ({against} {knees[against]:g}):", "",
                  f"| arm | seeds | {names} |", "|---|---|" + "---|" * len(KNEE_KEYS)]
        for a, rs in runs.items():
            n, cells = _paired_cells(rs, runs[against])
            if a != against and n:
                lines.append(f"| {LABELS[a]} | {n} | {cells} |")
    return lines + [""]


def _paired_cells(a: dict[int, dict], b: dict[int, dict]) -> tuple[int, str]:
    """How many seeds both ``a`` and ``b`` (seed -> run) ran, and each :data:`KNEE_KEYS` number's
    a − b paired by those seeds as table cells (mean [95% bootstrap interval])."""
    common = sorted(set(a) & set(b))
    return len(common), " | ".join(mean_ci_text([a[s][k] - b[s][k] for s in common], sc, d, signed=True)
                                   for k, _, sc, d in KNEE_KEYS)


def along_front(results: list[dict], knees: dict[str, float], epochs: int = 4) -> list[str]:
    """How flat each arm's front is around its knee: every other knob value of the arm minus the knee
    (``knees``: arm -> value), paired by seed (the seeds both ran), mean and 95% bootstrap interval of
    each :data:`KNEE_KEYS` number. A value as good as the knee in direction at less KL is a cheaper
    point on a flat top, which a knee read from medians alone cannot show."""
    fronted = [r for r in front_runs(grid_runs(results)) if r["epochs"] == epochs]
    names = " | ".join(n for _, n, _, _ in KNEE_KEYS)
    lines = [f"### Along each front, {epochs} inner epochs: each knob value minus the arm's knee, paired by seed", "",
             f"| arm | value − knee | seeds | {names} |", "|---|---|---|" + "---|" * len(KNEE_KEYS)]
    for arm, knee in knees.items():
        by: dict[float, dict[int, dict]] = {}           # value -> seed -> run
        for r in fronted:
            if r["arm"] == arm:
                by.setdefault(r["value"], {})[r["seed"]] = r
        for v in sorted(by):
            n, cells = _paired_cells(by[v], by.get(knee, {}))
            if v != knee and n:
                lines.append(f"| {LABELS[arm]} | {v:g} − {knee:g} | {n} | {cells} |")
    return lines + [""] if len(lines) > 4 else []


# The matched-KL tables: held-out direction (the reward), then what a trust region should hold down
# at a given KL: forgetting and the two artifacts (key, name, display scale, decimals).
MATCHED_KEYS = [("direction", "held-out direction", 1.0, 3), ("forgetting", "forgetting (pts)", 100.0, 1),
                ("background_error", "background error (levels)", 1.0, 1), ("grid_energy", "grid energy (levels)", 1.0, 2)]


def report(results: list[dict], stage_times: dict, world: str = "shapes",
           reference_knees: dict[str, dict] | None = None, cells: dict[str, float] | None = None) -> str:
    """The world's page (``frontier.md`` or ``frontier_WORLD.md``) from its runs; in a world other than
    the shapes world its knees are read from its runs and set beside ``reference_knees`` (the shapes
    world's, :func:`knees_from`; each arm's :data:`KNEES` value where not given). ``cells``: arm ->
    value for the arms run at one value only (a variant's), set beside the knees in their table."""
    reference_knees = {**{a: {"value": v, "resampled": {}} for a, v in KNEES.items()}, **(reference_knees or {})}

    def f(x: float, d: int = 3) -> str:
        return "n/a" if x is None or x != x else f"{x:.{d}f}"

    tags = sorted({r["tag"] for r in results if r.get("tag")})
    variants = [line for t in tags for line in tagged_table(results, t)]
    worker_hours = sum(r.get("wall_seconds", 0.0) for r in results) / 3600
    n_all = len(results)
    knee_runs = grid_runs(results)
    results = front_runs(knee_runs)

    base = _median([r["direction_base"] for r in results])
    lines = [f"Runs: {len(knee_runs)}. On the fronts: {len(results)} (the others are extra seeds at the knees). "
             f"Base model held-out direction {f(base)} (one evaluation, fixed noise, shared by every run). "
             f"Commits: {', '.join(sorted({r['commit'][:12] for r in knee_runs}))}.", ""]
    lines += [f"Compute: {n_all} runs with the variants, {worker_hours:.1f} hours of wall time summed over runs "
              "(each run one thread, usually two side by side).", ""]
    if stage_times:
        lines += ["Stage wall times (a resumed stage counts only its last machine's time): " + "; ".join(f"{k} {v / 60:.0f} min" for k, v in stage_times.items()), ""]
    lines += ["### Fronts (median over seeds, [min, max] in brackets)", "",
              "| arm | knob | inner epochs | seeds | off-policy frozen | held-out direction | KL to base (nats/token) "
              "| forgetting (pts) | background error (levels) | grid energy (levels) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["arm"], r["value"], r["epochs"]), []).append(r)

    def cell(rs: list[dict], k: str, scale: float = 1.0, d: int = 3) -> str:
        xs = [r[k] * scale for r in rs if r[k] == r[k]]
        if not xs:
            return "n/a"
        return f"{_median(xs):.{d}f}" + (f" [{min(xs):.{d}f}, {max(xs):.{d}f}]" if len(xs) > 1 else "")

    for (arm, v, e), rs in sorted(groups.items(), key=lambda t: (t[0][2], list(ARMS).index(t[0][0]), t[0][1])):
        knob = "—" if ARMS[arm][1] is None else f"{ARMS[arm][1].split('.')[-1]} {v:g}"
        lines.append(f"| {LABELS[arm]} | {knob} | {e} | {len(rs)} | {cell(rs, 'offpolicy_frozen', 100, 1)}% | "
                     f"{cell(rs, 'direction')} | {cell(rs, 'kl_to_base')} | {cell(rs, 'forgetting', 100, 1)} | "
                     f"{cell(rs, 'background_error', 1, 1)} | {cell(rs, 'grid_energy', 1, 2)} |")
    b0 = results[0]
    lines += ["", f"Base model: background error {f(b0['background_error_base'], 1)} levels, grid energy "
              f"{f(b0['grid_energy_base'], 2)} levels.", ""]
    for key, name, scale, d in MATCHED_KEYS:
        for e in sorted({r["epochs"] for r in results}):
            mk = matched_kl(results, e, key)
            if not mk:
                continue
            lines += [f"### Matched KL, {e} inner epoch(s): {name}, arm a minus arm b", "",
                      "| KL budget | a | b | seeds | a | b | a − b (mean) | 95% bootstrap interval |",
                      "|---|---|---|---|---|---|---|---|"]
            for m in mk:
                lines.append(f"| {m['kl']:.3f} | {LABELS[m['a']]} | {LABELS[m['b']]} | {m['n_seeds']} | "
                             f"{m['a_mean'] * scale:.{d}f} | {m['b_mean'] * scale:.{d}f} | {m['mean_diff'] * scale:+.{d}f} | "
                             f"[{m['ci'][0] * scale:+.{d}f}, {m['ci'][1] * scale:+.{d}f}] |")
            lines.append("")
    read = knees_from(knee_runs)
    read_values = {a: read[a]["value"] for a in KNEES if a in read and read[a]["value"] is not None}  # KNEES' order
    lines += knee_table(knee_runs, world, None if world == "shapes" else reference_knees, knees=read)
    if world == "shapes":                           # every seed at the knees; the rest: the fronts' seeds
        lines += knee_summary(knee_runs)
        moved = [f"{LABELS[a]}: `KNEES` {v:g}, the runs {read_values[a]:g}" for a, v in KNEES.items()
                 if a in read_values and read_values[a] != v]
        if moved:                                   # the knee stage's extra seeds ran at `KNEES`
            lines += ["**The knees read from the runs differ from `KNEES`**, where the table above and the "
                      "knee stage's extra seeds sit: " + "; ".join(moved) + ". Update `KNEES` and run the "
                      "knee stage again.", ""]
    else:                                           # another world: at the knees read from its own runs
        # A variant that ran one value of an arm (``cells``) compares it too: at one value per arm
        # there is no knee to read, only the cell.
        extra = {a: v for a, v in sorted((cells or {}).items(), key=lambda t: list(ARMS).index(t[0]))
                 if a not in read_values}
        lines += knee_summary(knee_runs, knees={**read_values, **extra})     # the knees first, as the shapes page
    lines += along_front(knee_runs, read_values)
    ea = epochs_against(results)
    if ea:
        lines += ["### 4 against 1 inner epoch, same arm: held-out direction at matched KL", "",
                  "| arm | KL budget | seeds | 4 epochs | 1 epoch | 4 − 1 (mean) | 95% bootstrap interval |",
                  "|---|---|---|---|---|---|---|"]
        for m in ea:
            lines.append(f"| {LABELS[m['arm']]} | {m['kl']:.3f} | {m['n_seeds']} | {m['a_mean']:.3f} | {m['b_mean']:.3f} "
                         f"| {m['mean_diff']:+.3f} | [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}] |")
        lines.append("")
    return "\n".join(lines + variants)


def plot(results: list[dict], figures: Path, suffix: str = "") -> None:
    """``frontier.png``, ``frontier_forgetting.png`` and ``frontier_grid.png`` into ``figures`` (each
    name with ``suffix`` before ``.png``: another world's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = sorted({r["epochs"] for r in results})
    panels = [("direction", "held-out direction score", "frontier.png"),
              ("forgetting", "forgetting: mean of colour and shape lost (points)", "frontier_forgetting.png"),
              ("grid_energy", "patch-grid energy (8-bit levels)", "frontier_grid.png")]
    base = _median([r["direction_base"] for r in results])
    for key, ylabel, name in panels:
        fig, axes = plt.subplots(1, len(epochs), figsize=(6.0 * len(epochs), 4.4), sharey=True, squeeze=False)
        for ax, e in zip(axes[0], epochs):
            for arm in ARMS:
                rs = [r for r in results if r["arm"] == arm and r["epochs"] == e]
                if not rs:
                    continue
                by_v: dict[float, list[dict]] = {}
                for r in rs:
                    by_v.setdefault(r["value"], []).append(r)
                scale = 100.0 if key == "forgetting" else 1.0
                xs, ys = [], []
                for v, g in sorted(by_v.items(), key=lambda t: _median([r["kl_to_base"] for r in t[1]])):
                    kx = [r["kl_to_base"] for r in g]
                    ky = [r[key] * scale for r in g]
                    x, y = _median(kx), _median(ky)
                    xs.append(x)
                    ys.append(y)
                    ax.errorbar([x], [y], xerr=[[x - min(kx)], [max(kx) - x]], yerr=[[y - min(ky)], [max(ky) - y]],
                                color=COLOURS[arm], alpha=0.5, capsize=2, linewidth=0.8)
                    if ARMS[arm][1] is not None:
                        ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                    color=COLOURS[arm])
                ax.plot(xs, ys, marker="o", color=COLOURS[arm], label=LABELS[arm])
            if key == "direction":
                ax.axhline(base, color="black", linestyle="--", linewidth=0.8, label="base model")
            if key == "grid_energy":
                ax.axhline(results[0]["grid_energy_base"], color="black", linestyle="--", linewidth=0.8, label="base model")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{e} inner epoch{'s' if e > 1 else ''} (median over seeds, bars: seed range)", fontsize=9)
            ax.set_xlabel("held-out KL(π_θ ‖ π_base), nats per token (log)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        handles, labels = axes[0][-1].get_legend_handles_labels()
        # One panel (a world run at one epoch count) is too narrow for the legend on one row.
        ncol = len(labels) if len(epochs) > 1 else min(len(labels), 3)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.035 + 0.04 * math.ceil(len(labels) / ncol), 1, 1))
        fig.savefig(figures / name.replace(".png", f"{suffix}.png"), dpi=110)
        plt.close(fig)


STAGE_TIMES = "frontier_stages.json"    # the stages' wall times, kept in DOCS/data beside the runs


def stage_key(stage: str, world: str) -> str:
    """A stage's key among the wall times: its name, ``WORLD:name`` in a world other than the shapes world."""
    return stage if world == "shapes" else f"{world}:{stage}"


def stage_times_of(times: dict[str, float], world: str) -> dict[str, float]:
    """The wall times of ``world``'s stages, by stage name. A key ``WORLD:name`` is that world's; an
    unprefixed key (a stage run by an older copy of this script, or a label written by hand) is a
    best guess: its stage's world (``STAGES[name]["world"]``), else the shapes world's."""
    out = {}
    for k, v in times.items():
        prefix, _, rest = k.partition(":")
        w, name = (prefix, rest) if prefix in WORLDS else (STAGES.get(k, {}).get("world", "shapes"), k)
        if w == world:
            out[name] = out.get(name, 0.0) + v
    return out


def load_stage_times(out: Path, docs: Path) -> dict[str, float]:
    """The stages' wall times: those committed in ``DOCS/data/frontier_stages.json``, updated by this
    machine's ``OUT/stages.json`` (a stage run here: its time replaces a committed one of the same
    key, so a stage resumed on a second machine counts that machine's part only), and written back,
    so that a report on a fresh machine keeps the times measured on another."""
    kept = docs / DATA / STAGE_TIMES
    times: dict[str, float] = {}
    for path in (kept, out / "stages.json"):
        if not path.is_file():
            continue
        try:
            more = json.loads(path.read_text())
            times.update({str(k): float(v) for k, v in more.items()})
        except (ValueError, TypeError, AttributeError) as e:
            print(f"algorithms.py: {path}: not a JSON object of stage -> seconds ({e})", file=sys.stderr)
            sys.exit(2)
    kept.write_text(json.dumps(times, indent=1))
    return times


def world_for(args: argparse.Namespace) -> str:
    """The world a grid runs in: ``--world``, else its stage's, else the shapes world."""
    return args.world or STAGES.get(args.stage or "", {}).get("world", "shapes")


def worker_command(args: argparse.Namespace, seeds: list[int], epochs: list[int], arms: list[str],
                   values: dict[str, list[float]] | None = None) -> list[str]:
    """One ``--jobs`` worker: the same cells, one process; ``values`` are the knob values the grid
    resolved (a stage's own and ``--values``), passed on as ``--values`` (left out when empty:
    argparse refuses an empty one)."""
    given = [f"{a}={','.join(repr(float(x)) for x in vs)}" for a, vs in (values or {}).items()]
    return [sys.executable, __file__, "--iterations", str(args.iterations), "--out", str(args.out),
            "--docs", str(args.docs), "--tag", args.tag, "--world", world_for(args), "--seeds", *map(str, seeds), "--epochs", *map(str, epochs),
            "--arms", *arms, *(["--values", *given] if given else []), "--", *args.overrides]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=list(STAGES), help="a predefined part of the grid")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--epochs", type=int, nargs="+")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS))
    ap.add_argument("--values", nargs="+", default=[], metavar="ARM[@EPOCHS]=V1,V2",
                    help="override an arm's knob values, e.g. token=1e-5,3e-5 or sample@1=1e-6,3e-6")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes side by side, one thread each")
    ap.add_argument("--tag", default="", help="names a variant of the grid (with its extra overrides)")
    ap.add_argument("--world", choices=list(WORLDS),
                    help="the embedded world the grid runs in (its recipe and rewards; default: the stage's, "
                    "else the shapes world); --report writes "
                    "frontier.md for the shapes world and frontier_WORLD.md for each other world with runs")
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--docs", type=Path, default=Path("docs"),
                    help="frontier.md here, frontier.json in DOCS/data, the plots in DOCS/figures")
    ap.add_argument("--report", action="store_true", help="only read finished runs and write the docs")
    ap.add_argument("--reuse", type=Path, metavar="JSON",
                    help="finished runs from an earlier sitting (a frontier.json, e.g. the committed "
                         "docs/data/frontier.json): counted as done here, so a fresh machine resumes the grid")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (with --tag)")
    return ap


def main() -> None:
    args = parser().parse_args()
    stage_world = STAGES.get(args.stage or "", {}).get("world")
    if args.world is not None and stage_world not in (None, args.world):     # before anything is written
        print(f"algorithms.py: --stage {args.stage} runs in the {stage_world} world, not --world {args.world}",
              file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for d in (args.docs, args.docs / DATA, args.docs / FIGURES):
        d.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        for r in json.loads(args.reuse.read_text()):
            done = args.out / run_name(r["arm"], r["value"], r["epochs"], r["seed"], r.get("tag", ""),
                                       world_of(r)) / "bench.json"
            if not done.is_file():
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(r, indent=1))
    if args.report:
        results = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/bench.json"))]
        if not results:
            sys.exit(f"algorithms.py: no finished runs under {args.out}")
        stage_times = load_stage_times(args.out, args.docs)
        (args.docs / DATA / "frontier.json").write_text(json.dumps(results, indent=1))    # every world's runs
        shapes = [r for r in results if world_of(r) == "shapes"]
        shapes_knees = knees_from(shapes) if shapes else None       # every other world's reference
        for world in WORLDS:                   # one report per world with runs, from that world's runs alone
            mine = [r for r in results if world_of(r) == world]
            if not mine:
                continue
            suffix = "" if world == "shapes" else f"_{world}"
            md = report(mine, stage_times_of(stage_times, world), world, shapes_knees)
            (args.docs / f"frontier{suffix}.md").write_text(md + "\n")
            plot(front_runs(grid_runs(mine)), args.docs / FIGURES, suffix)
            print(md)
            for tag in model_variant_tags(mine):
                page, runs = variant_page(mine, tag, world, shapes_knees)
                (args.docs / f"frontier{suffix}_{tag}.md").write_text(page + "\n")
                plot(front_runs(grid_runs(runs)), args.docs / FIGURES, f"{suffix}_{tag}")
        return
    st = STAGES.get(args.stage, {})
    args.world = world_for(args)
    seeds, epochs, arms = args.seeds or st.get("seeds", [0]), args.epochs or st.get("epochs", [4, 1]), \
        args.arms or st.get("arms", list(ARMS))
    values = stage_values(st, args.world)
    values.update({a: [float(x) for x in vs.split(",")] for a, vs in (v.split("=", 1) for v in args.values)})
    cells = grid(arms, epochs, seeds, values)
    t = time.perf_counter()
    if args.jobs > 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = worker_command(args, seeds, epochs, arms, values)
        procs = [subprocess.Popen(cmd, env=env)]
        # The first one writes the shared base evaluation; another starting before it is done would
        # begin the same evaluation over it (the latent world's takes minutes, not seconds).
        base_done = base_dir(args.out, args.world, args.tag) / "done"
        while not base_done.is_file() and procs[0].poll() is None:
            time.sleep(2)
        for _ in range(args.jobs - 1):
            procs.append(subprocess.Popen(cmd, env=env))
            time.sleep(1)
        codes = [p.wait() for p in procs]
        if any(codes):
            sys.exit(f"algorithms.py: a worker failed ({codes})")
    else:
        work(args.out, cells, args.iterations, args.overrides, args.tag, args.world)
    if args.stage:
        path = args.out / "stages.json"
        times = json.loads(path.read_text()) if path.is_file() else {}
        key = stage_key(args.stage, args.world)
        times[key] = times.get(key, 0.0) + time.perf_counter() - t
        path.write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
