"""Clean RL (issue 26): levers against the artifacts the demo's RL grows, on the demo's budget.

    .venv/bin/python tools/bench/clean_rl.py --jobs 2                       # every lever, seeds 0-2
    .venv/bin/python tools/bench/clean_rl.py --levers route_0.75 beta_1 --jobs 2
    .venv/bin/python tools/bench/clean_rl.py --cells every_step:1 beta_1:0 --jobs 2   # exactly these, in order
    .venv/bin/python tools/bench/clean_rl.py --report                       # only read finished runs

Each lever is the default recipe (``make demo``) plus the overrides in :data:`LEVERS`, trained at
``run.seed`` 0, 1, 2 into ``OUT/<lever>-s<seed>`` by :func:`flowdppo_video.commands.benchmarking.run_seed` (the
same runner and metadata as the demo's table, ``demo_seeds.py``; a finished run is read, not rerun; ``--jobs 2`` runs two cells
side by side with one thread each, in the queue's order). ``--report`` (and the end of every run)
writes ``DOCS/clean_rl_levers.md`` and ``DOCS/data/clean_rl_levers.json``: per lever the held-out direction gain, background error, grid
energy, colour and shape lost, KL to the base model and wall time, as means over seeds with 95%
bootstrap intervals, and each lever minus full fine-tuning on every step (``every_step``) and minus the
default (``route_0.55+lora_32``), paired by seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from flowdppo_video.commands.benchmarking import (DATA, finished_seed_runs, seed_grid_main, seeds_mean_ci,
                                                  summarise_seed_run)

ROOT = Path(__file__).resolve().parents[2]

# name -> overrides of the default recipe. "every_step" is full fine-tuning on every denoising step (the default
# before routing: the baseline every lever is paired with). Each lever names what it keeps of the recipe it
# was measured on (FULL: full fine-tuning at lr 5e-5, the default before LoRA; UNROUTED), so it keeps its
# meaning whatever the default recipe does now (LoRA rank 32 routed at 0.55: "route_0.55+lora_32"). The
# demo's schedule (10 steps, shift 1) has sigma 1.0, 0.9, ..., 0.1: base_below 0.75 leaves the tuned weights
# the window's three steps (sigma 1.0-0.8), 0.55 five.
FULL = ["model.lora.rank=0", "optim.lr=5e-5"]
UNROUTED = "model.base_below=null"
LORA_32 = ["model.lora.rank=32", "optim.lr=3e-4"]
# Every lever was measured with the plain rollout (independent noise, the whole schedule); the default recipe
# has since taken shared noise and a 3-step tail (docs/benchmarks.md, rollout_payoff).
PLAIN_ROLLOUT = ["sampler.shared_noise=false", "sampler.tail_steps=null"]
_LEVERS: dict[str, list[str]] = {                # in the queue's order
    "route_0.75": [*FULL, "model.base_below=0.75"],
    "every_step": [*FULL, UNROUTED],
    "route_0.55": [*FULL, "model.base_below=0.55"],
    "beta_1": [*FULL, UNROUTED, "objective.beta=1.0"],
    "beta_0.1": [*FULL, UNROUTED, "objective.beta=0.1"],
    "beta_0.01": [*FULL, UNROUTED, "objective.beta=0.01"],
    "row_1e-4": [*FULL, UNROUTED, "objective.granularity=row", "objective.delta=1e-4"],
    # world_fidelity (background and grid artifacts) as a second reward, each normalised in its group.
    "gdpo_fidelity": [*FULL, UNROUTED, "rewards={world_direction: 1.0, world_fidelity: 1.0}",
                      "advantages.aggregation=gdpo"],
    "lora_32": [UNROUTED, *LORA_32],
    "route_0.75+row": [*FULL, "model.base_below=0.75", "objective.granularity=row", "objective.delta=1e-4"],
    "route_0.55+row": [*FULL, "model.base_below=0.55", "objective.granularity=row", "objective.delta=1e-4"],
    "route_0.35": [*FULL, "model.base_below=0.35"],
    "beta_10": [*FULL, UNROUTED, "objective.beta=10.0"],
    "lora_8": [UNROUTED, "model.lora.rank=8", "optim.lr=3e-4"],
    # The best two combined: routing (free with LoRA: the adapters switched off below the boundary, as the
    # Wan recipes run) and LoRA rank 32. The default recipe since this benchmark.
    "route_0.55+lora_32": ["model.base_below=0.55", *LORA_32],
}
LEVERS: dict[str, list[str]] = {name: [*over, *PLAIN_ROLLOUT] for name, over in _LEVERS.items()}
BASELINE = "every_step"
DEFAULT = "route_0.55+lora_32"     # the lever the default recipe grew from (it then took shared noise and the tail)
SEEDS = (0, 1, 2)
# (name, key of a summarise() row, scale for the table, decimals): direction in points.
GAINS = [("direction gain (points)", "direction_gain", 100, 1), ("background error", "background_error", 1, 2),
         ("grid energy", "grid_energy", 1, 2), ("colour+shape lost (points)", "forgotten", 100, 1),
         ("KL to base", "kl_to_base", 1, 4), ("wall (min)", "wall_min", 1, 1)]


def derived(row: dict) -> dict:
    """A run's row with its wall time in minutes (the gains come with :func:`summarise_seed_run`)."""
    return {**row, "wall_min": row["wall_seconds"] / 60}


def collect(out: Path) -> dict[str, dict[int, dict]]:
    return finished_seed_runs(out, list(LEVERS), SEEDS, lambda d, n, s: derived(summarise_seed_run(d, n, s)))


def report(rows: dict[str, dict[int, dict]]) -> str:
    head = "| lever | seeds | " + " | ".join(n for n, *_ in GAINS) + " |"
    lines = ["## Each lever, means over seeds with 95% bootstrap intervals", "", head,
             "|---|---|" + "---|" * len(GAINS)]
    for lever, by_seed in rows.items():
        cells = [seeds_mean_ci([r[k] for r in by_seed.values()], s, d) for _, k, s, d in GAINS]
        lines.append(f"| {lever} | {','.join(map(str, sorted(by_seed)))} | " + " | ".join(cells) + " |")
    for against, what in ((BASELINE, "full fine-tuning on every step, the default before routing"),
                          (DEFAULT, "LoRA 32 routed at 0.55, the default recipe before shared noise and the tail")):
        base = rows.get(against, {})
        lines += ["", f"## Each lever minus `{against}` ({what}), paired by seed", "",
                  "| lever | paired seeds | " + " | ".join(n for n, *_ in GAINS[:5]) + " |",
                  "|---|---|" + "---|" * 5]
        for lever, by_seed in rows.items():
            if lever == against:
                continue
            seeds = sorted(set(by_seed) & set(base))
            cells = [seeds_mean_ci([by_seed[s][k] - base[s][k] for s in seeds], sc, d, signed=True)
                     for _, k, sc, d in GAINS[:5]]
            lines.append(f"| {lever} | {','.join(map(str, seeds)) or '—'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(out: Path, docs: Path) -> str:
    rows = collect(out)
    (docs / DATA).mkdir(parents=True, exist_ok=True)
    flat = [r for by_seed in rows.values() for r in by_seed.values()]
    (docs / DATA / "clean_rl_levers.json").write_text(json.dumps({"levers": LEVERS, "runs": flat}, indent=1))
    commits = sorted({r["commit"] for r in flat})
    text = ("# Clean RL: levers against the demo's artifacts (generated by tools/bench/clean_rl.py)\n\n"
            + report(rows) + f"\n\nCommits: {', '.join(commits)}. The default recipe (40 iterations, 1,280 "
            "training videos) plus each lever's overrides (`LEVERS` in the script); held-out: 38 prompts x 4, the "
            "same noise before and after. Background error and grid energy are the final model's "
            "(base: 0.85 and 0.36), in 8-bit levels; colour+shape lost is the mean of the two losses, signed.\n")
    (docs / "clean_rl_levers.md").write_text(text)
    return text


def main() -> None:
    seed_grid_main(__doc__.splitlines()[0], LEVERS, "lever", "runs/clean_rl", Path("docs"),
                   "clean_rl_levers.md here, its JSON in DOCS/data", write_docs, ROOT)


if __name__ == "__main__":
    main()
