"""Trust regions compared on the shapes world, at the same rollout budget.

    .venv/bin/python tools/bench/algorithms.py                       # full grid: 4 x 2 x 3 runs
    .venv/bin/python tools/bench/algorithms.py --seeds 0 --epochs 1 4 --iterations 30

Variants: Flow-DPPO token-wise, Flow-DPPO ``granularity: sample``, Flow-GRPO ratio clipping,
and no trust region (Flow-DPPO with an infinite delta: every token kept, plain importance
ratio). Each with 1 and 4 inner epochs, several seeds, every run the default recipe (``flowdppo_video/recipes/default.yaml``) otherwise.
Reports the final train reward (mean of the last 5 iterations), held-out direction adherence,
held-out KL to the base model, and forgetting (held-out colour and shape adherence lost
against the base model). Writes ``docs/algorithms.json``, ``docs/algorithms.png`` and a
markdown table to paste into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

VARIANTS = {
    "flow_dppo (token)": ["objective.kind=flow_dppo", "objective.granularity=token"],
    "flow_dppo (sample)": ["objective.kind=flow_dppo", "objective.granularity=sample"],
    "grpo_clip": ["objective.kind=grpo_clip"],
    "no trust region": ["objective.kind=flow_dppo", "objective.delta=.inf"],
}
RECIPE = Path(__file__).resolve().parents[2] / "flowdppo_video" / "recipes" / "default.yaml"
EVAL_REWARDS = "eval.rewards={world_direction: 1.0, world_colour: 1.0, world_shape: 1.0}"


def one_run(out: Path, variant: str, epochs: int, seed: int, iterations: int, extra: list[str]) -> dict:
    from flowdppo_video.config import load_config
    from flowdppo_video.metrics import read_metrics
    from flowdppo_video.trainer import Trainer

    run_dir = out / f"{variant.replace(' ', '_').replace('(', '').replace(')', '')}-e{epochs}-s{seed}"
    overrides = [f"run.output_dir={run_dir}", f"run.seed={seed}", f"run.iterations={iterations}",
                 f"optim.inner_epochs={epochs}", "run.progress=false", "run.tensorboard=false",
                 f"eval.every={iterations}", EVAL_REWARDS, *VARIANTS[variant], *extra]
    if not (run_dir / "eval.jsonl").is_file() or len(read_metrics(run_dir, "eval")) < 2:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        Trainer(load_config(RECIPE, overrides)).run()
    rows, evals = read_metrics(run_dir), read_metrics(run_dir, "eval")
    base, final = evals[0], evals[-1]
    return {
        # Rollout + reward + update time from the run's own metrics, so a reused run reports it too.
        "variant": variant, "epochs": epochs, "seed": seed,
        "train_seconds": sum(r["time/rollout_s"] + r["time/reward_s"] + r["time/update_s"] for r in rows),
        "train_reward_final": statistics.fmean(r["reward/mean"] for r in rows[-5:]),
        "train_reward_first": rows[0]["reward/mean"],
        "heldout_direction_base": base["eval/world_direction/mean"],
        "heldout_direction": final["eval/world_direction/mean"],
        "kl_to_base": final.get("eval/kl_base/mean"),
        "forgetting": (base["eval/world_colour/mean"] + base["eval/world_shape/mean"]
                       - final["eval/world_colour/mean"] - final["eval/world_shape/mean"]) / 2,
        "drop_frac_mean": statistics.fmean(r["mask/drop_frac"] for r in rows),
    }


def summarise(results: list[dict]) -> str:
    keys = ["train_reward_final", "heldout_direction", "kl_to_base", "forgetting"]
    lines = ["| variant | inner epochs | runs | train reward (last 5) | held-out direction | KL to base "
             "(nats/token) | forgetting (colour+shape, pts) |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["epochs"]), []).append(r)
    for (variant, epochs), rs in groups.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rs if r[k] is not None]
            m = statistics.fmean(vals)
            sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{100 * m:.1f} ± {100 * sd:.1f}" if k == "forgetting" else f"{m:.3f} ± {sd:.3f}")
        lines.append(f"| {variant} | {epochs} | {len(rs)} | " + " | ".join(cells) + " |")
    base = statistics.fmean(r["heldout_direction_base"] for r in results)
    lines.append(f"\nBase model held-out direction score: {base:.3f}.\n")
    lines += ["| variant | inner epochs | seed | train reward first → last 5 | held-out direction | KL to base "
              "| forgetting (pts) | dropped/clipped terms | train time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["epochs"], list(VARIANTS).index(r["variant"]), r["seed"])):
        lines.append(f"| {r['variant']} | {r['epochs']} | {r['seed']} | {r['train_reward_first']:.3f} → "
                     f"{r['train_reward_final']:.3f} | {r['heldout_direction_base']:.3f} → {r['heldout_direction']:.3f} | "
                     f"{r['kl_to_base']:.3f} | {100 * r['forgetting']:.1f} | {100 * r['drop_frac_mean']:.2f}% | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = {1: "o", 4: "s"}
    colours = dict(zip(VARIANTS, ["tab:blue", "tab:cyan", "tab:red", "tab:gray"]))
    for r in results:
        ax.scatter(r["kl_to_base"], r["heldout_direction"], marker=markers.get(r["epochs"], "x"),
                   color=colours[r["variant"]], alpha=0.8)
    for v, c in colours.items():
        ax.scatter([], [], color=c, label=v)
    for e, m in markers.items():
        ax.scatter([], [], color="black", marker=m, label=f"{e} inner epoch(s)")
    base = sum(r["heldout_direction_base"] for r in results) / len(results)
    ax.axhline(base, color="black", linestyle="--", linewidth=0.8, label="base model")
    ax.set_xscale("log")
    kls = [r["kl_to_base"] for r in results]
    ax.set_xticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0) if min(kls) / 1.5 <= t <= max(kls) * 1.5])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # 2x10^-2 style labels collide
    ax.set_xlabel("held-out KL(π_θ ‖ π_base), nats per token (log)")
    ax.set_ylabel("held-out direction score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--out", default="runs/bench_algorithms")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.docs).mkdir(parents=True, exist_ok=True)   # before the first run, not after it
    results = []
    for seed in args.seeds:
        for epochs in args.epochs:
            for variant in args.variants:
                r = one_run(out, variant, epochs, seed, args.iterations, args.overrides)
                results.append(r)
                print(json.dumps(r), flush=True)
                (Path(args.docs) / "algorithms.json").write_text(json.dumps(results, indent=1))
    plot(results, Path(args.docs) / "algorithms.png")
    table = summarise(results)
    (Path(args.docs) / "algorithms.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
