"""One training run as a record for the docs' data files: how it ran, its held-out evaluations, its
training reward and the model it kept (``run.keep_best``).

    /usr/bin/time -v -o runs/x.time flowdppo-video train --config configs/latent_world.yaml run.output_dir=runs/x
    .venv/bin/python tools/run_record.py runs/x --time runs/x.time --machine "2-core CPU, one thread" \\
        --command "flowdppo-video train --config configs/latent_world.yaml run.seed=2" \\
        --into docs/data/latent_world_rl_pilots.json --key recipe_keep_best

``--checkpoint-eval DIR``: a ``flowdppo-video eval`` of the run's checkpoints (e.g. the kept one and the
last on fresh noise), its means attached. ``--time``: GNU time's ``-v`` report of the run (its wall time and peak memory); without it they are
left out. ``--into FILE --key K``: appended to the list at ``K`` in FILE (a JSON object; a record of
the same run directory there is replaced), else printed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from flowdppo_video.runs.data import load_prompts
from flowdppo_video.training.best import BEST_FILE
from flowdppo_video.training.metrics import read_metrics



def gnu_time(path: Path) -> dict[str, float]:
    """Wall seconds and peak resident memory (GiB) from a ``/usr/bin/time -v`` report."""
    text = path.read_text()
    out = {}
    m = re.search(r"Elapsed \(wall clock\) time.*?: (?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", text)
    if m:
        h, mins, s = m.groups()
        out["wall_seconds"] = round(int(h or 0) * 3600 + int(mins) * 60 + float(s))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["peak_rss_gib"] = round(int(m.group(1)) / 2 ** 20, 2)
    if not out:
        raise SystemExit(f"run_record.py: {path}: not a /usr/bin/time -v report (no wall time, no peak memory)")
    return out


def checkpoint_eval(folder: Path) -> dict:
    """The means (with 95% intervals) of a ``flowdppo-video eval`` comparison (its ``summary.json``):
    per reward and part, per model (``base``, each checkpoint)."""
    d = json.loads((folder / "summary.json").read_text())
    both = {**d["results"], **d["parts"]}
    means = {name: {m: [v["value"], v["lo"], v["hi"]] for m, v in r["mean"].items()} for name, r in both.items()}
    wins = {name: {pair: [v["value"], v["lo"], v["hi"]] for pair, v in r.get("win_rate", {}).items()}
            for name, r in both.items()}
    return {"prompts": d["prompts"], "seeds": d["seeds"], "sampler": d["sampler"], "ci": d["ci"],
            "win_rate": d["win_rate"], "videos": next(iter(next(iter(d["results"].values()))["mean"].values()))["n"],
            "means": means, "win_rates": wins}


def record(run: Path, command: str | None, machine: str | None, model: str | None,
           time_report: Path | None, compared: Path | None = None, commit: str | None = None) -> dict:
    """The record of the run in ``run`` (its ``config.yaml``, ``eval.jsonl``, ``metrics.jsonl``)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    evals = [{"after_iterations": e["after_iterations"],
              **{k[len("eval/"):-len("/mean")]: v for k, v in e.items() if k.startswith("eval/") and k.endswith("/mean")}}
             for e in read_metrics(run, "eval")]
    held_out = cfg["eval"]["prompts"]
    # The code that ran: the checkout it ran from (the current directory, as a worktree of a fixed commit).
    commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip() or None
    rec = {"run": str(run), "command": command or f"flowdppo-video train --config {run / 'config.yaml'}",
           "commit": commit, "model": model or cfg["model"].get("path"), "seed": cfg["run"]["seed"],
           "held_out_videos": (len(load_prompts(held_out)) * cfg["eval"]["samples_per_prompt"]) if held_out else 0,
           **(gnu_time(time_report) if time_report else {}), **({"machine": machine} if machine else {}),
           "evals": evals, "train_reward": [r["reward/mean"] for r in read_metrics(run)]}
    if (run / BEST_FILE).is_file():
        best = json.loads((run / BEST_FILE).read_text())
        rec["best"] = {k: best[k] for k in ("reward", "value", "iteration", "checkpoint")}
    if compared is not None:
        rec["checkpoint_eval"] = checkpoint_eval(compared)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run directory")
    ap.add_argument("--command", help="the command that ran it (default: train --config RUN/config.yaml)")
    ap.add_argument("--machine", help="where and beside what it ran")
    ap.add_argument("--model", help="what model.path was, in words (default: model.path)")
    ap.add_argument("--time", type=Path, help="its /usr/bin/time -v report")
    ap.add_argument("--checkpoint-eval", type=Path, metavar="DIR",
                    help="a `flowdppo-video eval` output folder of this run's checkpoints (its summary.json)")
    ap.add_argument("--commit", help="the commit that ran it (default: the current directory's HEAD)")
    ap.add_argument("--into", type=Path, help="a JSON object file to add the record to (with --key)")
    ap.add_argument("--key", help="the list in --into that holds the record")
    args = ap.parse_args()
    if (args.into is None) != (args.key is None):
        ap.error("--into and --key go together")
    for path, what in ((args.run / "config.yaml", "a run directory (no config.yaml)"),
                       (args.run / "eval.jsonl", "a run with a held-out evaluation (no eval.jsonl)")):
        if not path.is_file():
            ap.error(f"{args.run}: not {what}")
    if args.time is not None and not args.time.is_file():
        ap.error(f"--time {args.time}: no such file")
    if args.checkpoint_eval is not None and not (args.checkpoint_eval / "summary.json").is_file():
        ap.error(f"--checkpoint-eval {args.checkpoint_eval}: no summary.json there")
    rec = record(args.run, args.command, args.machine, args.model, args.time, args.checkpoint_eval, args.commit)
    if args.into is None:
        json.dump(rec, sys.stdout, indent=1)
        print()
        return
    data = json.loads(args.into.read_text()) if args.into.is_file() else {}
    kept = [r for r in data.get(args.key, []) if r.get("run") != rec["run"]]
    data[args.key] = [*kept, rec]
    tmp = args.into.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(args.into)
    print(f"run_record.py: {args.run} -> {args.into} [{args.key}] ({len(data[args.key])} records)")


if __name__ == "__main__":
    main()
