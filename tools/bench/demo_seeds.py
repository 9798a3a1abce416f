"""The demo's table across seeds: ``make demo``'s recipe at ``run.seed`` 0, 1, 2, base -> final.

    .venv/bin/python tools/bench/demo_seeds.py                       # seeds 0 1 2, two side by side
    .venv/bin/python tools/bench/demo_seeds.py --tag before optim.inner_epochs=1 ...   # a variant
    .venv/bin/python tools/bench/demo_seeds.py --report              # only read finished runs

Each seed is ``flowdppo-video train run.seed=N`` (the default recipe, plus any overrides) in its
own process into ``OUT/<tag>-s<N>``; ``--jobs 2`` runs two side by side with one thread each
(``--jobs 1`` gives a run both cores, like ``make demo``). A finished run (its last evaluation at
the final iteration) is read, not rerun. ``--report`` (and every run's end) writes
``DOCS/demo_seeds.{json,md}``: held-out direction, colour, shape, the KL to the base model and the
two artifact metrics of ``world_fidelity`` (background error, patch-grid energy), base -> final,
one row per tag and seed, with the wall time and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METRICS = [("direction", "eval/world_direction/mean"), ("colour", "eval/world_colour/mean"),
           ("shape", "eval/world_shape/mean"), ("background_error", "eval/world_fidelity/background_error/mean"),
           ("grid_energy", "eval/world_fidelity/grid_energy/mean")]


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _evals(run_dir: Path) -> list[dict]:
    path = run_dir / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _iterations(run_dir: Path) -> int | None:
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    import yaml

    return int(yaml.safe_load(cfg.read_text())["run"]["iterations"])


def finished(run_dir: Path) -> bool:
    evals, n = _evals(run_dir), _iterations(run_dir)
    return bool(evals) and n is not None and evals[-1].get("after_iterations") == n and (run_dir / "demo_seed.json").is_file()


def run_seed(out: Path, tag: str, seed: int, overrides: list[str], threads: int) -> dict:
    """Train one seed (or read it if finished) and return its row."""
    run_dir = out / f"{tag}-s{seed}"
    if not finished(run_dir):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "flowdppo_video", "train", f"run.seed={seed}", f"run.output_dir={run_dir}",
               "run.progress=false", *overrides]
        t = time.perf_counter()
        shutil.rmtree(run_dir, ignore_errors=True)        # an interrupted run starts over
        with open(out / f"{tag}-s{seed}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"demo_seeds.py: seed {seed} ({tag}) failed with exit {rc}; see {out / f'{tag}-s{seed}.log'}")
        (run_dir / "demo_seed.json").write_text(json.dumps({"wall_seconds": time.perf_counter() - t,
                                                            "threads": threads, "commit": _commit(),
                                                            "overrides": overrides}))
    return summarise(run_dir, tag, seed)


def summarise(run_dir: Path, tag: str, seed: int) -> dict:
    evals, meta = _evals(run_dir), json.loads((run_dir / "demo_seed.json").read_text())
    base, final = evals[0], evals[-1]
    row = {"tag": tag, "seed": seed, "iterations": final["after_iterations"], **meta,
           "kl_to_base": final.get("eval/kl_base/mean")}
    for name, key in METRICS:
        row[f"{name}_base"], row[name] = base.get(key), final.get(key)
    return row


def table(rows: list[dict]) -> str:
    def f(x: float | None, d: int = 3) -> str:
        return "—" if x is None else f"{x:.{d}f}"

    lines = ["| variant | seed | held-out direction | colour | shape | KL to base | background error | grid energy "
             "| wall (threads) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["tag"], r["seed"])):
        cells = [f"{f(r[n + '_base'], 1 if n in ('background_error', 'grid_energy') else 3)} → "
                 f"{f(r[n], 1 if n in ('background_error', 'grid_energy') else 3)}" for n, _ in METRICS]
        lines.append(f"| {r['tag']} | {r['seed']} | {' | '.join(cells[:3])} | {f(r['kl_to_base'], 4)} | "
                     f"{' | '.join(cells[3:])} | {r['wall_seconds'] / 60:.1f} min ({r['threads']}) |")
    return "\n".join(lines)


def write_docs(out: Path, docs: Path) -> list[dict]:
    rows = []
    for meta in sorted(out.glob("*-s*/demo_seed.json")):
        run_dir = meta.parent
        tag, seed = run_dir.name.rsplit("-s", 1)
        if finished(run_dir):
            rows.append(summarise(run_dir, tag, int(seed)))
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "demo_seeds.json").write_text(json.dumps(rows, indent=1))
    commits = sorted({r["commit"] for r in rows})
    (docs / "demo_seeds.md").write_text(
        "# The demo across seeds (generated by tools/bench/demo_seeds.py)\n\n" + table(rows)
        + f"\n\nCommits: {', '.join(commits)}. Held-out: 38 prompts x the recipe's eval.samples_per_prompt, the "
        "same noise before and after; background error in 8-bit levels, grid energy the RMS of the "
        "2x2-periodic background component.\n")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="seeds side by side (one thread each when > 1)")
    ap.add_argument("--tag", default="demo", help="names this variant in the table")
    ap.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--report", action="store_true", help="only read finished runs and write the docs")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every seed (a variant of the recipe)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        threads = 1 if args.jobs > 1 else 2
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda s: run_seed(args.out, args.tag, s, args.overrides, threads), args.seeds))
    rows = write_docs(args.out, args.docs)
    print(table(rows))


if __name__ == "__main__":
    main()
