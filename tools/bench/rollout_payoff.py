"""Does a cheaper rollout pay (issue 34)? The demo's recipe with each rollout option, paired by seed.

    .venv/bin/python tools/bench/rollout_payoff.py --jobs 2                  # every arm, seeds 0-2
    .venv/bin/python tools/bench/rollout_payoff.py --cells tail_3:0 plain:0  # exactly these, in order
    .venv/bin/python tools/bench/rollout_payoff.py --report                  # only read finished runs

Each arm is the default recipe (``make demo``: the shapes world, 40 iterations at the frontier's knee) plus
the overrides in :data:`ARMS`: as the options were first measured, full fine-tuning routed at 0.55
(:data:`FULL`: the default before LoRA), paired with ``plain``; and as the recipe is now (LoRA), the
``lora`` arms, paired with ``lora`` (:func:`baseline_of`). Each is trained at ``run.seed`` 0, 1, 2 into
``OUT/<arm>-s<seed>`` by :func:`flowdppo_video.commands.benchmarking.run_seed` (a finished run is read, not rerun). Compute is
counted two ways from each run's ``metrics.jsonl``: transformer evaluations (``perf/evals/total``: rollout
prefix, SDE steps, tail and replay, CFG counted) and training seconds (rollout, rewards and update, the
held-out evaluations left out: they keep the full schedule in every arm). ``--report`` (and the end of
every run) writes the ``rollout_payoff`` section of ``docs/benchmarks.md`` and
``docs/data/rollout_payoff.json``: per arm the held-out direction gain, the KL to the base model,
colour and shape lost and the compute, as means over seeds with 95% bootstrap intervals; each arm minus
its baseline paired by seed at the same number of iterations; and at the same compute: the baseline's direction
gain read off its evaluation curve (held-out direction every 10 iterations against the evaluations spent
so far, linear between points) where it had spent what the arm spent in all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flowdppo_video.commands.benchmarking import (DATA, finished_seed_runs, seed_grid_main, seeds_mean_ci,
                                                  summarise_seed_run, write_section)
from flowdppo_video.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
# name -> sampler overrides of the default recipe (its SDE steps are 3 of 10 in [0, 0.3]; the routed base
# model denoises below sigma 0.55 in every arm, the tail included). FULL: the recipe these arms were measured
# with, full fine-tuning at lr 5e-5, before the default trained LoRA adapters (docs/clean_rl.md).
# PLAIN: independent noise and the whole schedule, as the recipe was when these arms ran (it has since taken
# shared noise and the 3-step tail, so every arm states both).
FULL = ["model.lora.rank=0", "optim.lr=5e-5"]
PLAIN = ["sampler.shared_noise=false", "sampler.tail_steps=null"]
ARMS: dict[str, list[str]] = {                   # in the queue's order
    "plain": [*FULL, *PLAIN],
    "tail_3": [*FULL, "sampler.shared_noise=false", "sampler.tail_steps=3", "sampler.tail_solver=dpm2m"],
    "shared": [*FULL, "sampler.shared_noise=true", "sampler.tail_steps=null"],
    "shared+tail_3": [*FULL, "sampler.shared_noise=true", "sampler.tail_steps=3", "sampler.tail_solver=dpm2m"],
    # The LoRA recipe (rank 32 at lr 3e-4, routed at 0.55): does the winner carry over?
    "lora": [*PLAIN],
    "lora+shared+tail_3": ["sampler.shared_noise=true", "sampler.tail_steps=3", "sampler.tail_solver=dpm2m"],
}
BASELINE = "plain"
SEEDS = (0, 1, 2)
SECTION = "rollout_payoff"
# (name, key of a row, scale for the table, decimals): direction in points, evaluations in thousands.
COLUMNS = [("direction gain (points)", "direction_gain", 100, 1), ("KL to base", "kl_to_base", 1, 4),
           ("colour+shape lost (points)", "forgotten", 100, 1), ("evaluations (k)", "evaluations", 1e-3, 1),
           ("training s", "train_seconds", 1, 0)]


def baseline_of(arm: str) -> str:
    """The arm ``arm`` is paired with: ``lora`` for the LoRA recipe's arms, ``plain`` for the others."""
    return "lora" if arm.startswith("lora") else BASELINE


def compute_curve(run_dir: Path) -> dict[str, Any]:
    """A run's compute: the evaluations and training seconds of every iteration summed, and its held-out
    direction against the evaluations spent before each evaluation (``after_iterations`` of them)."""
    rows = read_metrics(run_dir, "metrics")
    evals = np.cumsum([0.0] + [float(r.get("perf/evals/total", np.nan)) for r in rows])
    secs = sum(float(r.get("time/rollout_s", 0)) + float(r.get("time/reward_s", 0)) + float(r.get("time/update_s", 0))
               for r in rows)
    points = [(float(evals[min(int(e["after_iterations"]), len(rows))]), float(e["eval/world_direction/mean"]))
              for e in read_metrics(run_dir, "eval")]
    return {"evaluations": float(evals[-1]), "train_seconds": secs, "curve": points}


def at_compute(curve: list[tuple[float, float]], spent: float) -> float:
    """The direction of ``curve`` (evaluations, direction; increasing evaluations) after ``spent``
    evaluations, linear between its points; beyond its last point, its last value."""
    xs, ys = zip(*curve)
    return float(np.interp(spent, xs, ys))


def row(run_dir: Path, arm: str, seed: int) -> dict[str, Any]:
    """A finished run's row: :func:`summarise_seed_run`'s numbers (the gains included) and :func:`compute_curve`."""
    return {**summarise_seed_run(run_dir, arm, seed), **compute_curve(run_dir)}


def collect(out: Path) -> dict[str, dict[int, dict]]:
    return finished_seed_runs(out, list(ARMS), SEEDS, row)


def report(rows: dict[str, dict[int, dict]]) -> str:
    """The section's tables (see the module's docstring)."""
    lines = ["## Does a cheaper rollout pay? The demo's recipe with each rollout option "
             "(`tools/bench/rollout_payoff.py`)", "",
             "Two recipes: the demo's as it was when the options were built, full fine-tuning at lr 5e-5, routed at "
             "0.55 (`FULL` in the script; the arms without a prefix), and the LoRA recipe, rank 32 at lr 3e-4, "
             "routed at 0.55 (the `lora` arms; `lora+shared+tail_3` is the default recipe since these runs).",
             "", "Means over seeds with 95% bootstrap intervals (40 iterations each):", "",
             "| arm | seeds | " + " | ".join(n for n, *_ in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for arm, by_seed in rows.items():
        cells = [seeds_mean_ci([r[k] for r in by_seed.values()], s, d) for _, k, s, d in COLUMNS]
        lines.append(f"| `{arm}` | {','.join(map(str, sorted(by_seed)))} | " + " | ".join(cells) + " |")
    lines += ["", f"Each arm minus its recipe's plain rollout (`{BASELINE}`, `lora`), paired by seed: at the same "
              "iterations (the first three columns), and at the same compute (the plain rollout's direction gain "
              "where it had spent the arm's evaluations):", "",
              "| arm | paired seeds | direction gain (points) | KL to base | colour+shape lost (points) | "
              "evaluations spent (ratio) | training s (ratio) | direction gain at the same evaluations (points) |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, by_seed in rows.items():
        if arm == baseline_of(arm):
            continue
        base = rows.get(baseline_of(arm), {})
        seeds = sorted(set(by_seed) & set(base))
        diff = [seeds_mean_ci([by_seed[s][k] - base[s][k] for s in seeds], sc, d, signed=True)
                for _, k, sc, d in COLUMNS[:3]]
        ratio = [seeds_mean_ci([by_seed[s][k] / base[s][k] for s in seeds], 1, 2)
                 for k in ("evaluations", "train_seconds")]
        matched = [by_seed[s]["direction_gain"] - (at_compute(base[s]["curve"], by_seed[s]["evaluations"])
                                                   - base[s]["direction_base"]) for s in seeds]
        lines.append(f"| `{arm}` | {','.join(map(str, seeds)) or '—'} | " + " | ".join(
            diff + ratio + [seeds_mean_ci(matched, 100, 1, signed=True)]) + " |")
    commits = sorted({r["commit"] for by_seed in rows.values() for r in by_seed.values()})
    arms = "; ".join(f"`{a}`: {' '.join(o) or 'the recipe as it is'}" for a, o in ARMS.items())
    lines += ["", f"Arms (`ARMS` in the script): {arms}. Commits: {', '.join(commits)}. Evaluations are counted "
              "exactly (`perf/evals/total`); training seconds are each run's own rollout, reward and update time, "
              "with cells two at a time beside whatever else the machine ran: compare them within a pair of cells "
              "that ran together, not across pairs. The recipe takes an option only when 3 seeds agree."]
    return "\n".join(lines)


def write_docs(out: Path, docs: Path) -> str:
    rows = collect(out)
    (docs / DATA).mkdir(parents=True, exist_ok=True)
    flat = [r for by_seed in rows.values() for r in by_seed.values()]
    (docs / DATA / "rollout_payoff.json").write_text(json.dumps({"arms": ARMS, "runs": flat}, indent=1))
    text = report(rows)
    write_section(docs / "benchmarks.md", SECTION, text)
    return text


def main() -> None:
    seed_grid_main(__doc__.splitlines()[0], ARMS, "arm", "runs/rollout_payoff", ROOT / "docs",
                   "benchmarks.md's section here, its JSON in DOCS/data", write_docs, ROOT)


if __name__ == "__main__":
    main()
