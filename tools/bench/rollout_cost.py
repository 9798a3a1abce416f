"""Rollout cost (issue 34): what the cheaper rollout options spend per iteration against the plain rollout,
and whether a cheaper tail keeps the reward's verdicts.

Two shapes, each one trainer whose ``sampler`` is swapped between variants:

* ``default``: the default recipe (``flowdppo_video/recipes/default.yaml``: the shapes world's shipped
  model, 4 prompts x 8 videos, 10 steps, 3 SDE steps in [0, 0.3], no CFG), without its evaluation;
* ``wan``: a Wan-shaped schedule on the tests' tiny Wan (``configs/wan_tiny.yaml``): 20 steps, 4 SDE steps
  drawn from [0, 0.5], CFG 4.5, 2 prompts x 4 videos.

For each variant (``sampler`` overrides: a tail of fewer steps, shared noise, a tree, both) the transformer
evaluations of one training iteration (``perf/evals/*``: rollout, tail, replay; CFG counted) and its wall
time (``Trainer.train_iteration``: rollout, rewards, update; the same iteration index, so the same prompts
and SDE steps, for every variant), timed interleaved, median of ``--repeats``; reported as ratios to
``plain``. Then the tail's reward agreement on the default recipe: the same seeds (so the same SDE steps
and noise) rolled out with the full schedule and with each tail, by the shipped model before any update,
scored by the recipe's reward; the mean
within-group Spearman correlation of the two rewards and the share of advantages whose sign agrees.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/rollout_cost.py   # ~10 min on a busy 2-core machine; the docs
    .venv/bin/python tools/bench/rollout_cost.py --smoke --out /tmp/r.json --section /tmp/b.md   # does it run?
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch; see _common.py

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import _common as C  # this folder's shared setup (the script's folder is on sys.path)

from flowdppo_video.advantages import compute_advantages
from flowdppo_video.commands import benchmarking as B
from flowdppo_video.runs.config import load_config
from flowdppo_video.runs.data import prompts_for_iteration
from flowdppo_video.trainer import Trainer
from flowdppo_video.training.rollout import rollout
from rewards import reward_weights, score_videos

RECIPE = C.REPO / "flowdppo_video" / "recipes" / "default.yaml"
WAN = C.REPO / "configs" / "wan_tiny.yaml"
DOC_DATA = C.REPO / "docs" / "data" / "rollout_cost.json"
QUIET = ["run.progress=false", "run.tensorboard=false", "run.report_every=0"]
SHAPES: dict[str, tuple[Path, list[str]]] = {
    "default": (RECIPE, ["eval.prompts=null"]),
    "wan": (WAN, ["sampler.num_steps=20", "sampler.sde_steps=4", "sampler.window=[0.0, 0.5]",
                  "sampler.guidance_scale=4.5", "sampler.shift=3.0", "data.prompts_per_iteration=2",
                  "data.group_size=4", "optim.minibatch_size=4", "optim.inner_epochs=1",
                  f"data.prompts={C.REPO / 'configs/prompts/demo.txt'}"]),
}
# --smoke: the same paths at a size that runs in seconds (1 prompt x 4 videos); its numbers mean nothing.
SMOKE = ["data.prompts_per_iteration=1", "data.group_size=4", "optim.minibatch_size=4"]


def tree(group: int, sde_steps: int) -> list[int]:
    """A binary tree: 2 children at each of the first log2(G) SDE steps, 1 after."""
    depth = group.bit_length() - 1
    if 2 ** depth != group or depth > sde_steps:
        raise SystemExit(f"rollout_cost.py: a binary tree needs G a power of 2 and log2(G) <= the SDE steps, "
                         f"got G={group}")
    return [2] * depth + [1] * (sde_steps - depth)


# The plain rollout: independent noise per video, the whole schedule (the default recipe takes both options,
# so every variant states all three).
PLAIN: dict[str, Any] = {"shared_noise": False, "branching": None, "tail_steps": None}


def variants(trainer: Trainer) -> dict[str, dict[str, Any]]:
    """The sampler overrides of each variant (``plain`` first: the baseline)."""
    branching = tree(trainer.cfg.data.group_size, trainer.cfg.sampler.sde_steps)
    return {name: {**PLAIN, **over} for name, over in {
        "plain": {},
        "tail3_dpm2m": {"tail_steps": 3, "tail_solver": "dpm2m"},
        "tail2_heun": {"tail_steps": 2, "tail_solver": "heun"},
        "shared": {"shared_noise": True},
        "tree": {"shared_noise": True, "branching": branching},
        "shared_tail3_dpm2m": {"shared_noise": True, "tail_steps": 3, "tail_solver": "dpm2m"}}.items()}


def build(shape: str, work: Path, smoke: bool) -> Trainer:
    recipe, extra = SHAPES[shape]
    return Trainer(load_config(recipe, [f"run.output_dir={work / shape}", *QUIET, *extra, *(SMOKE if smoke else [])]))


def cost(trainer: Trainer, shape: str, repeats: int, warmup: int) -> dict[str, Any]:
    """Evaluations and wall time per iteration of every variant on one trainer."""
    base = trainer.cfg
    rows: dict[str, dict[str, Any]] = {}

    def iteration(name: str, over: dict[str, Any]):
        def run() -> None:
            trainer.set_sampler(dataclasses.replace(base.sampler, **over))
            _, row = trainer.train_iteration(0)
            rows[name] = row
        return run

    vs = variants(trainer)
    print(f" {shape}: timing {', '.join(vs)} ({warmup} warm-up each, then {repeats} interleaved repeats)", flush=True)
    times, extra = B.time_interleaved({n: iteration(n, o) for n, o in vs.items()}, repeats, torch.device("cpu"),
                                      warmup=warmup)
    trainer.set_sampler(base.sampler)
    s = base.sampler
    out = {"config": {"num_steps": s.num_steps, "sde_steps": s.sde_steps, "window": s.window,
                      "guidance_scale": s.guidance_scale, "prompts_per_iteration": base.data.prompts_per_iteration,
                      "group_size": base.data.group_size, "inner_epochs": base.optim.inner_epochs,
                      "base_below": base.model.base_below, "latent": list(trainer.latent_shape),
                      "sde_steps_drawn": rows["plain"]["sde_steps"]},
           "variants": {}}
    plain_t, plain_e = B.median(times["plain"]), rows["plain"]["perf/evals/total"]
    plain_r = rows["plain"]["time/rollout_s"]
    for n, over in vs.items():
        r = rows[n]
        evals = {p: r[f"perf/evals/{p}"] for p in ("prefix", "sde", "tail", "replay", "reference")}
        rollout_evals = evals["prefix"] + evals["sde"] + evals["tail"]
        plain_rollout = sum(rows["plain"][f"perf/evals/{p}"] for p in ("prefix", "sde", "tail"))
        paired = [a / b for a, b in zip(times[n], times["plain"])]
        lo, hi, cover = B.median_interval(paired)
        out["variants"][n] = {
            "sampler": over, "evals": evals, "evals_total": r["perf/evals/total"],
            "evals_per_video": r["perf/evals_per_video"], "evals_ratio": r["perf/evals/total"] / plain_e,
            "rollout_evals_ratio": rollout_evals / plain_rollout,
            "times_s": times[n], "median_s": B.median(times[n]), "time_ratio": B.median(times[n]) / plain_t,
            "paired_time_ratio": B.median(paired), "paired_interval": [lo, hi], "paired_interval_coverage": cover,
            "others_cpu_share_median": B.median(extra[n]["others_cpu_share"]),
            "last_rollout_s": r["time/rollout_s"], "last_rollout_ratio": r["time/rollout_s"] / plain_r}
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):                      # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(trainer: Trainer, batches: int, names: list[str]) -> dict[str, Any]:
    """The default recipe's reward of tail-solved videos against full-schedule videos from the same seeds
    (``names``: ``tail<T>_<solver>``), with the trainer's model as built (before any update)."""
    cfg = trainer.cfg
    g, weights = cfg.data.group_size, reward_weights(cfg.rewards)
    rewards: dict[str, list[np.ndarray]] = {n: [] for n in ["full", *names]}
    advs: dict[str, list[np.ndarray]] = {n: [] for n in ["full", *names]}
    print(f" agreement: {batches} batches of {cfg.data.prompts_per_iteration} x {g} videos, "
          f"{len(names)} tails against the full schedule", flush=True)
    for i in range(batches):
        prompts = prompts_for_iteration(trainer.prompts, i, cfg.data.prompts_per_iteration, 1000 + i)
        for n in ["full", *names]:
            over = PLAIN if n == "full" else {**PLAIN, "tail_steps": int(n[4:].split("_")[0]), "tail_solver": n.split("_")[1]}
            smp = dataclasses.replace(cfg.sampler, **over)
            with torch.no_grad():
                traj = rollout(trainer.adapter, prompts, g, trainer.latent_shape, smp,
                               torch.Generator().manual_seed(10_000 + i), progress=False)
            scores, _ = score_videos(trainer.rewards, traj.videos, traj.prompts, fps=cfg.video.fps)
            a, _ = compute_advantages(scores, weights, g, cfg.advantages.aggregation, cfg.advantages.std,
                                      cfg.advantages.clip)
            rewards[n].append(sum(weights[k] * scores[k] for k in weights).numpy())
            advs[n].append(a.numpy())
    full_r, full_a = np.concatenate(rewards["full"]), np.concatenate(advs["full"])
    out: dict[str, Any] = {"videos": int(full_r.size), "groups": int(full_r.size // g),
                           "reward_full_mean": float(full_r.mean()), "tails": {}}
    for n in names:
        r, a = np.concatenate(rewards[n]), np.concatenate(advs[n])
        rho = [spearman(full_r[k:k + g], r[k:k + g]) for k in range(0, full_r.size, g)]
        rho = [x for x in rho if not np.isnan(x)]
        signed = full_a != 0
        out["tails"][n] = {"tail_steps": int(n[4:].split("_")[0]), "solver": n.split("_")[1],
                           "spearman_within_group_mean": float(np.mean(rho)) if rho else float("nan"),
                           "spearman_within_group_median": float(np.median(rho)) if rho else float("nan"),
                           "groups_ranked": len(rho),
                           "advantage_sign_agreement": float((np.sign(a[signed]) == np.sign(full_a[signed])).mean()),
                           "reward_mean": float(r.mean()), "reward_mean_diff": float((r - full_r).mean()),
                           "reward_abs_diff_mean": float(np.abs(r - full_r).mean())}
    return out


def section(result: dict[str, Any]) -> str:
    """The ``rollout_cost`` section of ``docs/benchmarks.md``."""
    lines = ["## Cheaper rollouts: evaluations and wall time per iteration (issue 34)", "",
             f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['torch_threads']} threads), "
             f"commit `{result['commit']}`; {result['repeats']} interleaved repeats, medians. Each variant is one "
             "training iteration (`Trainer.train_iteration`: rollout, rewards, update) with `sampler` overrides; "
             "evaluations are the iteration's `perf/evals/*` (transformer rows, CFG's unconditional rows "
             "counted), the same prompts and SDE steps for every variant. Ratios are to `plain` (independent noise "
             "and the whole schedule: each variant sets `shared_noise`, `branching` and `tail_steps`, whatever "
             "the recipe says); the paired "
             "ratio is the median of per-repeat ratios with its order-statistics interval.", ""]
    for shape, r in result["shapes"].items():
        c = r["config"]
        lines += [f"### {shape}: {c['num_steps']} steps, {c['sde_steps']} SDE steps in {c['window']} "
                  f"(drawn: {c['sde_steps_drawn']}), CFG {c['guidance_scale']}, {c['prompts_per_iteration']} x "
                  f"{c['group_size']} videos, latent {c['latent']}", "",
                  "| variant | sampler | evals / video (prefix + sde + tail + replay) | evals ratio | rollout evals "
                  "ratio | iteration s | time ratio | paired time ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, v in r["variants"].items():
            e, b = v["evals"], c["prompts_per_iteration"] * c["group_size"]
            parts = " + ".join(f"{e[p] / b:g}" for p in ("prefix", "sde", "tail", "replay"))
            lo, hi = v["paired_interval"]
            over = ", ".join(f"{k}={json.dumps(x)}" for k, x in v["sampler"].items()
                             if k not in PLAIN or PLAIN[k] != x) or "—"
            lines.append(f"| {n} | {over} | {v['evals_per_video']:g} ({parts}) | {v['evals_ratio']:.2f} | "
                         f"{v['rollout_evals_ratio']:.2f} | {v['median_s']:.3f} | {v['time_ratio']:.2f} | "
                         f"{v['paired_time_ratio']:.2f} [{lo:.2f}, {hi:.2f}] |")
        lines.append("")
    a = result["agreement"]
    lines += ["### Does a cheaper tail keep the reward's verdicts? (the default recipe, shipped model)", "",
              f"{a['videos']} videos ({a['groups']} groups of {a['videos'] // a['groups']}) rolled out twice from the "
              "same seeds, so the same SDE steps and noise: with the full schedule and with the tail. "
              "Reward: the recipe's (`world_direction`), "
              f"full-schedule mean {a['reward_full_mean']:.3f}. Spearman: within each group, the tail's rewards "
              "against the full schedule's (mean over groups); sign agreement: the share of advantages (group-"
              "normalised, as trained) with the same sign.", "",
              "| tail | evals / video in the tail | Spearman within groups (mean, median) | advantage sign "
              "agreement | reward mean (diff) | mean abs reward diff |", "|---|---|---|---|---|---|"]
    for n, t in a["tails"].items():
        ev = t["tail_steps"] * (2 if t["solver"] == "heun" else 1)
        lines.append(f"| {t['tail_steps']} x {t['solver']} | ≤ {ev} | {t['spearman_within_group_mean']:.3f}, "
                     f"{t['spearman_within_group_median']:.3f} | {t['advantage_sign_agreement']:.3f} | "
                     f"{t['reward_mean']:.3f} ({t['reward_mean_diff']:+.3f}) | {t['reward_abs_diff_mean']:.3f} |")
    lines += ["", result.get("reading", "").strip()]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=0, help="untimed iterations per variant first")
    p.add_argument("--batches", type=int, default=4, help="batches of the default recipe for the reward agreement")
    p.add_argument("--out", type=Path, default=None,
                   help="the result as JSON (default docs/data/rollout_cost.json; none with --smoke)")
    p.add_argument("--section", type=Path, default=None,
                   help="the markdown file whose rollout_cost section this writes (default docs/benchmarks.md; "
                        "none with --smoke)")
    p.add_argument("--reading", type=Path, default=None, help="a markdown file of prose appended to the section")
    p.add_argument("--smoke", action="store_true",
                   help="1 prompt x 4 videos, one repeat, one batch, no warm-up: does it run? (numbers mean nothing)")
    a = p.parse_args(argv)
    # OMP_NUM_THREADS where set (a shared machine), else the benchmarks' 2 threads.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or C.THREADS))
    repeats, batches, warmup = (1, 1, 0) if a.smoke else (a.repeats, a.batches, a.warmup)
    # Two steps of DPM-Solver++(2M) are Euler's (its first step is first order, its last the x0 prediction).
    tails = ["tail2_euler", "tail2_heun"] if a.smoke else ["tail2_euler", "tail2_heun", "tail3_euler", "tail3_heun",
                                                           "tail3_dpm2m"]
    result: dict[str, Any] = {"name": "rollout_cost", "command": " ".join(C.command_line()), "commit": C.git_commit(),
                              "machine": B.machine_info(torch.device("cpu")), "repeats": repeats, "smoke": a.smoke,
                              "shapes": {}}
    with tempfile.TemporaryDirectory() as d:
        for shape in SHAPES:
            trainer = build(shape, Path(d), a.smoke)
            if shape == "default":             # the shipped model, before the timed iterations train it
                result["agreement"] = agreement(trainer, batches, tails)
            result["shapes"][shape] = cost(trainer, shape, repeats, warmup)
            trainer.release()
    if a.reading is not None:
        result["reading"] = a.reading.read_text()
    out, doc = a.out or (None if a.smoke else DOC_DATA), a.section or (None if a.smoke else C.DOCS_BENCHMARKS)
    B.write_json(out, result)
    if doc is not None:
        B.write_section(doc, "rollout_cost", section(result))
    print(section(result))
    return result


if __name__ == "__main__":
    main()
