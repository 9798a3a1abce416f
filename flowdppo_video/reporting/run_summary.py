"""What ``flowdppo-video train`` prints when it ends: one aligned table and the files to open.

The held-out rows of ``eval.jsonl`` repeat numbers: a reward that returns a dict (the shapes
world's ``world_adherence``) logs its parts as ``eval/world_adherence/colour/mean``, which is
``eval/world_colour/mean`` again when that reward is evaluated too. The summary shows each
number once (:func:`held_out_metrics`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from flowdppo_video.training.best import BEST_FILE
from flowdppo_video.training.monitors import PREFIX, hacking_warnings, monitor_names

KL_KEY = "eval/kl_base/mean"


def _name(key: str) -> str:
    """``eval/world_colour/mean`` -> ``world_colour``."""
    return key[len("eval/"):-len("/mean")] if key.endswith("/mean") else key[len("eval/"):]


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def duplicate_parts(names: Sequence[str], values: Mapping[str, Sequence[Any]]) -> dict[str, str]:
    """``{part: reward}`` for every logged part ``R/k`` that is another reward ``Q`` again.

    ``Q`` must be named for the part (``Q == k`` or ``Q`` ends in ``_k``: ``world_colour`` for
    ``world_adherence/colour``) and hold the same value in every row; the name keeps two parts
    that happen to agree on a few videos from being merged, the values keep a part that merely
    shares a name from being dropped.
    """
    rewards = [n for n in names if "/" not in n]
    out = {}
    for n in names:
        if "/" not in n:
            continue
        part = n.rsplit("/", 1)[1]
        for q in rewards:
            if (q == part or q.endswith("_" + part)) and len(values[n]) == len(values[q]) and \
                    all(_same(a, b) for a, b in zip(values[n], values[q])):
                out[n] = q
                break
    return out


def held_out_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``eval/.../mean`` keys to show, each number once, rewards before their logged parts;
    the KL to the base model is left out (it gets its own line)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k.startswith("eval/") and k != KL_KEY and k not in keys]
    names = {_name(k): k for k in keys}
    dup = duplicate_parts(list(names), {n: [r.get(k) for r in rows] for n, k in names.items()})
    kept = [k for n, k in names.items() if n not in dup]
    return sorted(kept, key=lambda k: "/" in _name(k))       # stable: rewards first, in logged order


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{float(v):.4f}"


def _change(a: Any, b: Any) -> str:
    return "" if a is None or b is None else f"{float(b) - float(a):+.4f}"


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as written (unvalidated); ``{}`` when it cannot be read."""
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def training_reward_names(config: Mapping[str, Any]) -> list[str]:
    """The names in a run config's ``rewards`` (the rewards it trained on)."""
    rewards = config.get("rewards")
    return [str(k) for k in rewards] if isinstance(rewards, dict) else []


def summary_lines(run_dir: Path, rows: Sequence[Mapping[str, Any]],
                  evals: Sequence[Mapping[str, Any]]) -> list[str]:
    """The end of a run: training reward, then held-out base -> final per metric, the artifact
    monitors (higher = worse) and the KL to the base model in one aligned table, a warning per
    reward that rose while a monitor worsened past the base model's spread, the model
    ``run.keep_best`` kept, then the files worth opening (those that exist)."""
    run_dir = Path(run_dir)
    lines = []
    if rows:
        lines.append(f"done: {len(rows)} iterations; training reward/mean "
                     f"{rows[0]['reward/mean']:.4f} -> {rows[-1]['reward/mean']:.4f}")
    else:
        lines.append("done: no iterations left to run")
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        a, b = first["after_iterations"], last["after_iterations"]
        head = ("base" if a == 0 else f"after {a}", f"after {b}")
        body = [(_name(k), _fmt(first.get(k)), _fmt(last.get(k)), _change(first.get(k), last.get(k)))
                for k in held_out_metrics(evals)]
        monitors = monitor_names([first, last])
        if monitors:
            body.append(("artifact monitors (higher = worse):", "", "", ""))
            body += [(f"  {m}", _fmt(first.get(f"{PREFIX}{m}/mean")), _fmt(last.get(f"{PREFIX}{m}/mean")),
                      _change(first.get(f"{PREFIX}{m}/mean"), last.get(f"{PREFIX}{m}/mean"))) for m in monitors]
        if any(KL_KEY in r for r in (first, last)):
            body.append(("KL to base (nats/token)", _fmt(first.get(KL_KEY)), _fmt(last.get(KL_KEY)), ""))
        table = [("held-out", *head, "change"), *body]
        w = [max(len(r[i]) for r in table) for i in range(4)]
        lines.append("")
        for r in table:
            lines.append(f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}".rstrip())
        warnings = hacking_warnings(evals, rows, training_reward_names(run_config(run_dir)))
        if warnings:
            lines.append("")
            lines += [f"warning: {w}" for w in warnings]
    best = run_dir / BEST_FILE
    if best.is_file():                  # run.keep_best: which model the run kept
        try:
            rec = json.loads(best.read_text())
            lines += ["", f"best by held-out {rec['reward']}: {rec['value']:.4f} "
                      + (f"after {rec['iteration']} iterations ({run_dir / rec['checkpoint']})" if rec["iteration"]
                         else "the base model: no evaluation beat it, no checkpoint kept")]
        except (ValueError, KeyError, TypeError) as e:
            lines += ["", f"best: {best} is unreadable ({type(e).__name__}: {e})"]
    ba = run_dir / "before_after"
    opens = [("report", run_dir / "report" / "index.html", ""),
             ("before/after", ba / "index.html" if (ba / "index.html").is_file() else ba,
              "base model left, final model right"),
             ("curves", run_dir / "curves.png", ""),
             ("checkpoints", run_dir / "checkpoints", "")]
    found = [(label, p, note) for label, p, note in opens if p.exists()]
    lines += ["", f"run directory {run_dir}"]
    width = max((len(label) for label, *_ in found), default=0)
    for label, p, note in found:
        shown = f"{p}/" if p.is_dir() else str(p)
        if label == "before/after":
            note = f"{len(list(ba.glob('*.mp4')))} videos, {note}"
        lines.append(f"  {label:<{width}}  {shown}" + (f"  ({note})" if note else ""))
    return lines
