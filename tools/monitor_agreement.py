"""Does the general patch-grid monitor (rewards.artifacts.patch_grid at the shapes world's period, 2 px)
agree with the shapes world's own grid energy (world_fidelity's, which knows the asked background)?

Reads the held-out videos that runs kept (``RUN/eval/after_N/NN.mp4`` with ``prompts.txt``; a run with
``eval.num_videos`` as large as its held-out set keeps them all), measures both on every video, and
prints and writes (``--out``, JSON) their Spearman rank correlation over all videos and per evaluation,
and each evaluation's monitor means beside the run's rewards with the reward-hacking warnings the
report would raise (:func:`flowdppo_video.training.monitors.hacking_warnings`).

    python tools/monitor_agreement.py RUN_DIR [RUN_DIR ...] --out docs/data/monitor_agreement.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from flowdppo_video.training.metrics import read_metrics
from flowdppo_video.training.monitors import hacking_warnings, monitor_means, score_monitors
from flowdppo_video.reporting.run_summary import run_config, training_reward_names
from flowdppo_video.runs.video import read_video
from rewards import build_rewards
from rewards.artifacts import monitor_specs
from rewards.world import artifact_measurements


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(np.asarray(a, float)), ranks(np.asarray(b, float)))[0, 1])


def measure_run(run: Path, monitors: dict) -> list[dict]:
    """Per evaluation folder: the videos' world grid energy and monitor scores."""
    out = []
    for folder in sorted((run / "eval").glob("after_*")):
        prompts = (folder / "prompts.txt").read_text().splitlines()
        videos = torch.from_numpy(np.stack([read_video(folder / f"{k:02d}.mp4") for k in range(len(prompts))]))
        import yaml

        fps = float(yaml.safe_load((run / "config.yaml").read_text())["video"]["fps"])
        world = artifact_measurements(videos, prompts)["grid_energy"]
        per = score_monitors(monitors, videos, prompts, fps=fps)
        out.append({"after": int(folder.name.split("_")[1]), "world_grid": world.tolist(),
                    "patch_grid": per["patch_grid"].tolist(), "means": monitor_means(per)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    monitors = build_rewards(monitor_specs(2))
    report: dict = {"runs": {}}
    world_all, grid_all = [], []
    for run in args.runs:
        evals = measure_run(run, monitors)
        logged = {r["after_iterations"]: r for r in read_metrics(run, "eval")}
        rows = [{**logged.get(e["after"], {"after_iterations": e["after"]}), **e["means"]} for e in evals]
        warnings = hacking_warnings(rows, read_metrics(run), training_reward_names(run_config(run)))
        for e in evals:
            world_all += e["world_grid"]
            grid_all += e["patch_grid"]
        report["runs"][str(run)] = {
            "evaluations": [{"after": e["after"], "videos": len(e["world_grid"]),
                             "spearman": spearman(e["world_grid"], e["patch_grid"]),
                             "world_grid_energy_mean": float(np.mean(e["world_grid"])),
                             "monitors": e["means"]} for e in evals],
            "warnings": warnings}
        for e in report["runs"][str(run)]["evaluations"]:
            print(f"{run} after {e['after']}: {e['videos']} videos, Spearman {e['spearman']:.3f}, world grid "
                  f"{e['world_grid_energy_mean']:.3f}, patch_grid {e['monitors']['monitor/patch_grid/mean']:.3f}")
        print(f"{run}: warnings: {warnings or 'none'}")
    report["spearman_all"] = spearman(np.array(world_all), np.array(grid_all))
    report["videos"] = len(world_all)
    print(f"Spearman over all {len(world_all)} videos: {report['spearman_all']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
