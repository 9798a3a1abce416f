"""Evaluate checkpoints against each other: same prompts, same seeds, scored, compared.

``flowdppo-video eval --checkpoints base RUN/checkpoints/iter_000100 ... --prompts FILE [key=value ...]``
samples every prompt with the seeds ``seed, seed + 1, ...`` for each model (the base model
always among them, evaluated first), scores the videos, and writes into ``--out``:

``scores.jsonl``  one row per (model, prompt, seed): every reward's score and logged parts
``summary.json``  per reward: mean and 95% bootstrap interval per model, pairwise win-rates with
                  Wilson intervals, a warning when there are fewer than ``winrates.SMALL_N`` pairs,
                  and what ``total`` sums (a composite reward is never added to its own parts:
                  :func:`total_terms`); under ``parts`` the same for what each reward logs beside
                  its score (VideoAlign's ``va/vq``, ``va/mq``, ``va/ta``: one part winning while
                  another loses is what reward hacking looks like)
``table.md``      the same as Markdown tables
``index.html``    a report page: the tables and the videos of each (prompt, seed) side by side
``videos/``       the first ``--num-videos`` (prompt, seed) videos of every model

Every model sees the same initial noise for a given (prompt, seed), so scores are paired and
win-rates compare like with like (see :mod:`flowdppo_video.reporting.winrates`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from flowdppo_video.runs.config import ConfigError, config_to_dict
from flowdppo_video.runs.data import load_prompts
from flowdppo_video.runs.fsio import write_text_atomic
from flowdppo_video.runs.video import write_video
from flowdppo_video.training.checkpoint import load_checkpoint, verify_checkpoint
from flowdppo_video.training.monitors import build_monitors, score_monitors
from flowdppo_video.training.rollout import plain_sampler, reward_audio, rollout, sound
from flowdppo_video.training.run_builder import build_model, open_run
from rewards import build_rewards, reward_weights, score_videos

from .pages import config_table, esc, page, report_video, table
from .winrates import SMALL_N, Estimate, WinRate, fmt, mean_ci, small_sample_warning, win_matrix

BASE = "base"
MONITOR = "monitor/"     # scores.jsonl keys of the artifact monitors (flowdppo_video.training.monitors)


@dataclasses.dataclass
class Model:
    label: str
    path: Path | None     # None: the base model


def resolve_models(checkpoints: list[str]) -> list[Model]:
    """``base`` and checkpoint directories, base first; labels unique and readable."""
    models, seen = [Model(BASE, None)], set()
    for c in checkpoints:
        if c == BASE:
            continue
        p = Path(c)
        if not (p / "meta.json").is_file() or not (p / "model").is_dir():
            raise ConfigError(f"--checkpoints: {p} is not a checkpoint directory (no meta.json and model/ there)")
        if p.resolve() in seen:
            continue
        seen.add(p.resolve())
        models.append(Model(p.name, p))
    names = [m.label for m in models]
    for m in models:   # the same iteration of two runs: prefix the run's folder name
        if m.path is not None and names.count(m.label) > 1:
            m.label = f"{m.path.resolve().parent.parent.name}/{m.path.name}"
    return models


def reward_specs(items: list[str] | None, default: dict[str, Any]) -> dict[str, Any]:
    """``--reward`` values: registered names (weight 1), or YAML mappings of full reward entries
    (``'{judge: {type: vlm_judge, model: /ckpt}}'``); none: the run's evaluation rewards."""
    if not items:
        return dict(default)
    out: dict[str, Any] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                spec = yaml.safe_load(item)
            except yaml.YAMLError:
                raise ConfigError(f"--reward {item!r}: not a valid YAML mapping") from None
            if not isinstance(spec, dict):
                raise ConfigError(f"--reward {item!r}: expected a mapping name -> entry")
            out.update(spec)
        else:
            out[item] = 1.0
    return out


def _part_name(key: str) -> str:
    return key.rsplit("/", 1)[1]


def composite_parts(rows: list[dict[str, Any]], reward: str) -> tuple[str, ...]:
    """The logged parts (``reward/k`` keys) whose mean ``reward``'s score is on every row, or ``()``.

    A reward that returns a dict logs its parts beside its score (the shapes world's
    ``world_adherence`` logs colour, shape, direction, smoothness, ...; its score is the mean of
    the first three). The parts are found from the numbers, not from a list kept here: the largest
    set of at least two logged parts whose mean equals the score on every row (1e-5).
    """
    keys = [k for k in rows[0] if k.startswith(reward + "/")] if rows else []
    score = np.array([r[reward] for r in rows], dtype=np.float64)
    logged = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    for size in range(len(keys), 1, -1):
        for combo in combinations(keys, size):
            if np.allclose(np.mean([logged[k] for k in combo], axis=0), score, rtol=0, atol=1e-5):
                return combo
    return ()


def total_terms(rows: list[dict[str, Any]], rewards: list[str]) -> tuple[list[str], dict[str, str]]:
    """Which rewards the ``total`` column sums, and why any other is left out.

    A composite reward and its parts are never both counted: when every part of a composite is
    among ``rewards`` the composite is left out (the parts carry their own weights); when only
    some are, those parts are left out (the composite already averages them). A part ``reward/k``
    is the reward ``Q`` named ``k`` or ``*_k`` that scores the same on every row.
    """
    left: dict[str, str] = {}
    for c in rewards:
        parts = composite_parts(rows, c)
        if not parts:
            continue
        present = {}
        for k in parts:
            for q in rewards:
                if q != c and (q == _part_name(k) or q.endswith("_" + _part_name(k))) and \
                        all(abs(r[q] - r[k]) <= 1e-6 for r in rows):
                    present[k] = q
        names = ", ".join(present.get(k, _part_name(k)) for k in parts)
        if len(present) == len(parts):
            left.setdefault(c, f"the mean of {names}, which are counted")
        else:
            for q in present.values():
                left.setdefault(q, f"already inside {c} (the mean of {names})")
    return [n for n in rewards if n not in left], left


def evaluate_checkpoints(run_dir: Path, checkpoints: list[str], prompts: str, out: Path,
                         rewards: list[str] | None = None, samples: int = 2, seed: int = 0, sde: bool = False,
                         num_videos: int = 8, overrides: list[str] | None = None, progress: bool = True
                         ) -> dict[str, Any]:
    """Sample, score and compare; returns the summary written to ``out/summary.json``."""
    cfg = open_run(run_dir, overrides)
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    models = resolve_models(checkpoints)
    for m in models:                       # every checkpoint verified before minutes of sampling the base
        reason = verify_checkpoint(m.path) if m.path is not None else None
        if reason is not None:
            raise ConfigError(f"--checkpoints: {m.path} is damaged ({reason})")
    prompt_list = load_prompts(prompts)
    specs = reward_specs(rewards, cfg.eval.rewards or cfg.rewards)
    reward_fns = build_rewards(specs, "--reward")
    weights = reward_weights(specs)
    sampler = plain_sampler(cfg.sampler)         # independent noise, the full schedule
    sampler = sampler if sde else dataclasses.replace(sampler, sde_steps=0)
    # Image-to-video: with the images of the run's training and held-out prompts; the prompts' rows
    # from the run's text cache (an encoder is built, and released first, only for rows it lacks).
    built = build_model(cfg, prompts=prompt_list, run_dir=run_dir, progress=progress)
    adapter, latent_shape = built.adapter, built.latent_shape
    monitors = build_monitors(cfg.eval.monitors, cfg.eval.monitor_period, adapter,    # artifacts, higher = worse
                              (cfg.video.height, cfg.video.width))
    seeds = list(range(seed, seed + samples))
    out.mkdir(parents=True, exist_ok=True)

    # scores[reward][model][(prompt_index, seed)]
    names = list(reward_fns)
    scores: dict[str, dict[str, dict[tuple[int, int], float]]] = {n: {m.label: {} for m in models} for n in names}
    parts: dict[str, dict[str, dict[tuple[int, int], float]]] = {}      # "va/vq" -> model -> item -> score
    watched: dict[str, dict[str, dict[tuple[int, int], float]]] = {n: {m.label: {} for m in models} for n in monitors}
    rows: list[dict[str, Any]] = []
    videos: dict[str, dict[tuple[int, int], str]] = {m.label: {} for m in models}
    bar = tqdm(total=len(models) * len(seeds), desc="eval", disable=not progress)
    try:
        for m in models:                       # base first: the adapter has no trained weights yet
            if m.path is not None:
                load_checkpoint(m.path, adapter, None)
            for s in seeds:
                with torch.no_grad():
                    traj = rollout(adapter, prompt_list, 1, latent_shape, sampler, torch.Generator().manual_seed(s),
                                   negative_prompt=cfg.data.negative_prompt, progress=False)
                got, extras = score_videos(reward_fns, traj.videos, traj.prompts, fps=cfg.video.fps,
                                           audio=reward_audio(traj))
                mon = score_monitors(monitors, traj.videos, traj.prompts, fps=cfg.video.fps)
                for i, prompt in enumerate(prompt_list):
                    row = {"model": m.label, "checkpoint": str(m.path) if m.path else BASE, "prompt_index": i,
                           "prompt": prompt, "seed": s, **{n: float(got[n][i]) for n in names},
                           **{n: float(v[i]) for n, v in extras.items()},
                           **{f"{MONITOR}{n}": float(v[i]) for n, v in mon.items()}}
                    rows.append(row)
                    for n, v in mon.items():
                        watched[n][m.label][(i, s)] = float(v[i])
                    for n in names:
                        scores[n][m.label][(i, s)] = row[n]
                    for k in extras:
                        parts.setdefault(k, {q.label: {} for q in models})[m.label][(i, s)] = row[k]
                    if i * len(seeds) + (s - seed) < num_videos:      # the first items, prompt-major
                        rel = f"videos/{m.label.replace('/', '_')}/p{i:03d}_s{s}.mp4"
                        write_video(out / rel, traj.videos[i], fps=cfg.video.fps, **sound(traj, i))
                        videos[m.label][(i, s)] = rel
                bar.update(1)
    finally:
        bar.close()                        # an error's line starts on its own line, not after the bar
    terms, left_out = total_terms(rows, names)
    if len(terms) > 1:                      # one reward alone: its own column says it all
        scores["total"] = {m.label: {} for m in models}
        for row in rows:
            row["total"] = sum(weights[n] * row[n] for n in terms)
            scores["total"][row["model"]][(row["prompt_index"], row["seed"])] = row["total"]
        names.append("total")

    summary: dict[str, Any] = {"run": str(run_dir), "prompts": prompts, "seeds": seeds,
                               "sampler": "sde" if sde else "ode", "rewards": specs,
                               "models": {m.label: str(m.path) if m.path else BASE for m in models},
                               "ci": "95% percentile bootstrap (10,000 resamples, seed 0)",
                               "win_rate": "row over column, paired by (prompt, seed), ties count half; "
                                           "95% Wilson score interval",
                               "warnings": [w for w in [small_sample_warning(len(prompt_list) * len(seeds))]
                                            if w and len(models) > 1],
                               "results": {}}
    if "total" in names:
        summary["total"] = {"sums": {n: weights[n] for n in terms}, "left_out": left_out}
    summary["results"] = {n: compare(scores[n]) for n in names}
    if parts:
        summary["parts"] = {k: compare(by_model) for k, by_model in parts.items()}
    if watched:
        summary["monitors"] = {n: compare(by_model) for n, by_model in watched.items()}
    with open(out / "scores.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(markdown_tables(summary))
    write_eval_report(out, summary, cfg, prompt_list, videos, scores)
    return summary


def compare(by_model: dict[str, dict[tuple[int, int], float]]) -> dict[str, Any]:
    """One score's ``{"mean": {model: estimate}, "win_rate": {"A > B": win-rate}}`` as summary.json
    holds it, from ``{model: {(prompt_index, seed): score}}``."""
    return {"mean": {lab: dataclasses.asdict(mean_ci(list(v.values()))) for lab, v in by_model.items()},
            "win_rate": {f"{a} > {b}": dataclasses.asdict(w) for (a, b), w in win_matrix(by_model).items()}}


def _estimates(summary: dict[str, Any], reward: str, section: str = "results"
               ) -> tuple[dict[str, Estimate], dict[tuple[str, str], WinRate]]:
    res = summary[section][reward]
    means = {k: Estimate(**v) for k, v in res["mean"].items()}
    wins = {tuple(k.split(" > ")): WinRate(**v) for k, v in res["win_rate"].items()}
    return means, wins


def total_note(total: dict[str, Any]) -> str:
    """``total = a + 0.5 x b (c left out: ...)``: what the total column sums."""
    sums = " + ".join(n if w == 1 else f"{w:g} x {n}" for n, w in total["sums"].items())
    left = "; ".join(f"{n} left out: {why}" for n, why in total["left_out"].items())
    return f"total = {sums}" + (f" ({left})" if left else "")


def markdown_tables(summary: dict[str, Any]) -> str:
    """Mean [95% CI] per model and reward, then one win-rate matrix per reward."""
    models = list(summary["models"])
    rewards = list(summary["results"])
    lines = [f"Prompts {summary['prompts']}, seeds {summary['seeds']}, {summary['sampler'].upper()} sampling; "
             f"CI: {summary['ci']}; win-rate: {summary['win_rate']}.", ""]
    if summary.get("total"):
        lines += [total_note(summary["total"]), ""]
    lines += [*[f"**{w}**" for w in summary.get("warnings", [])], *([""] if summary.get("warnings") else []),
              "| model | " + " | ".join(rewards) + " |", "|---" * (len(rewards) + 1) + "|"]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(fmt(_estimates(summary, r)[0][m]) for r in rewards) + " |")
    for r in rewards:
        _, wins = _estimates(summary, r)
        lines += ["", f"Win-rate on {r} (row over column)", "",
                  "| | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        for a in models:
            cells = ["—" if a == b else f"{wins[(a, b)].value:.3f} [{wins[(a, b)].lo:.2f}, {wins[(a, b)].hi:.2f}]"
                     for b in models]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if summary.get("parts"):
        head, rows = parts_table(summary)
        lines += ["", "Parts logged beside a reward's score (not added to the total again): mean [95% CI], "
                  f"and win-rate over {models[0]} [95% CI]", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|",
                  *("| " + " | ".join(r) + " |" for r in rows)]
    if summary.get("monitors"):
        head, rows = monitors_table(summary)
        lines += ["", "Artifact monitors (pixels only, higher = worse; not in the total): mean [95% CI], the change "
                  f"from {models[0]}, and how often a model is worse than {models[0]} on the same (prompt, seed) "
                  "[95% CI]", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|",
                  *("| " + " | ".join(r) + " |" for r in rows)]
    return "\n".join(lines) + "\n"


def monitors_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``: per monitor, each model's mean, its change from the first model (the base)
    and its worse-rate over the base (the win-rate on a higher-is-worse score)."""
    models = list(summary["models"])
    head = ["monitor", *models, *(f"{m} - {models[0]}" for m in models[1:]),
            *(f"{m} worse than {models[0]}" for m in models[1:])]
    rows = []
    for k in summary["monitors"]:
        means, wins = _estimates(summary, k, "monitors")
        base = means[models[0]].value
        rows.append([k, *(fmt(means[m]) for m in models), *(f"{means[m].value - base:+.4f}" for m in models[1:]),
                     *(f"{wins[(m, models[0])].value:.3f} [{wins[(m, models[0])].lo:.2f}, {wins[(m, models[0])].hi:.2f}]"
                       for m in models[1:])])
    return head, rows


def parts_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``: per logged part, each model's mean and each other model's win-rate over
    the first (the base model), e.g. ``va/vq | base | iter_N | iter_N > base``."""
    models = list(summary["models"])
    head = ["part", *models, *(f"{m} > {models[0]}" for m in models[1:])]
    rows = []
    for k in summary["parts"]:
        means, wins = _estimates(summary, k, "parts")
        over = [wins[(m, models[0])] for m in models[1:]]
        rows.append([k, *(fmt(means[m]) for m in models), *(f"{w.value:.3f} [{w.lo:.2f}, {w.hi:.2f}]" for w in over)])
    return head, rows


def write_eval_report(out: Path, summary: dict[str, Any], cfg: Any, prompts: list[str],
                      videos: dict[str, dict[tuple[int, int], str]],
                      scores: dict[str, dict[str, dict[tuple[int, int], float]]]) -> Path:
    """``out/index.html``: score table, win-rate matrices, videos side by side, setup."""
    models = list(summary["models"])
    rewards = list(summary["results"])
    score_rows = []
    for m in models:
        cells = []
        for r in rewards:
            e = _estimates(summary, r)[0][m]
            cells.append(f'{e.value:.4f} <span class="muted">[{e.lo:.4f}, {e.hi:.4f}]</span>')
        score_rows.append([esc(m), *cells, str(_estimates(summary, rewards[0])[0][m].n)])
    notes = "".join(f'<p class="bad">{esc(w)}</p>' for w in summary.get("warnings", []))
    if summary.get("total"):
        notes += f'<p class="muted">{esc(total_note(summary["total"]))}</p>'
    scores_html = (f"<p>Mean score per model with its 95% percentile-bootstrap interval, over "
                   f"{len(prompts)} prompts × {len(summary['seeds'])} seeds ({summary['sampler'].upper()} sampling; "
                   f"the same initial noise for every model).</p>" + notes +
                   table(["model", *rewards, "n"], score_rows, raw=True))
    win_parts = [*(f'<p class="bad">{esc(w)}</p>' for w in summary.get("warnings", [])),
                 "<p>Each cell: how often the row model scores higher than the column model on the same "
                 "(prompt, seed), ties counting half, with a 95% Wilson score interval and wins-ties-losses.</p>"]
    for r in rewards:
        _, wins = _estimates(summary, r)
        rows = []
        for a in models:
            cells = [esc(a)]
            for b in models:
                if a == b:
                    cells.append('<span class="muted">—</span>')
                    continue
                w = wins[(a, b)]
                cls = "good" if w.lo > 0.5 else "bad" if w.hi < 0.5 else ""
                cells.append(f'<span class="{cls}">{w.value:.3f}</span> <span class="muted">[{w.lo:.2f}, '
                             f'{w.hi:.2f}] {w.wins}-{w.ties}-{w.losses}</span>')
            rows.append(cells)
        win_parts.append(f"<h3>{esc(r)}</h3>" + table(["row over column", *models], rows, raw=True))
    if summary.get("parts"):
        head, rows = parts_table(summary)
        win_parts.append("<h3>parts logged beside a reward's score</h3><p>Mean [95% CI] per model, "
                         f"and the win-rate over {esc(models[0])}: one part winning while another loses is "
                         "what reward hacking looks like (VideoAlign: VQ up, TA down).</p>" + table(head, rows))
    if summary.get("monitors"):
        head, rows = monitors_table(summary)
        win_parts.append("<h3>artifact monitors (higher = worse)</h3><p>Pixels-only measurements of what a reward "
                         "can break unseen (docs/rewards.md gives each scale): mean [95% CI] per model, the change "
                         f"from {esc(models[0])}, and how often a model is worse than {esc(models[0])} on the same "
                         "(prompt, seed).</p>" + table(head, rows))
    items = sorted({k for v in videos.values() for k in v})
    video_rows = []
    for i, s in items:
        cells = [f'<span class="prompt">{esc(prompts[i])}</span><br><span class="muted">seed {s}</span>']
        for m in models:
            rel = videos[m].get((i, s))
            if rel is None:
                cells.append('<span class="muted">—</span>')
                continue
            shown = f"report_{rel}"
            _, width = report_video(out / rel, out / shown, cfg.video.fps)
            score = " ".join(f"{r} {scores[r][m][(i, s)]:.3f}" for r in rewards)
            cells.append(f'<video src="{esc(shown)}" width="{width}" controls muted loop playsinline autoplay '
                         f'preload="auto"></video><span class="muted">{esc(score)}</span>')
        video_rows.append(cells)
    videos_html = (table(["prompt", *models], video_rows, cls="videos", raw=True) if video_rows
                   else '<p class="muted">No videos kept (--num-videos 0).</p>')
    setup = table(["item", "value"], [["run", summary["run"]], ["prompts", summary["prompts"]],
                             ["seeds", ", ".join(map(str, summary["seeds"]))], ["sampler", summary["sampler"]],
                             ["rewards", json.dumps(summary["rewards"])],
                             *[[f"model {k}", v] for k, v in summary["models"].items()]])
    sections = [("scores", "Scores", scores_html), ("winrates", "Win-rates", "\n".join(win_parts)),
                ("videos", "Videos side by side", videos_html),
                ("setup", "Setup", setup + "<h3>Run config</h3>" + config_table(config_to_dict(cfg)))]
    index = out / "index.html"
    write_text_atomic(index, page("flowdppo-video checkpoint evaluation", sections, esc(out.resolve())))
    return index


def _run_dir_of(checkpoints: list[str]) -> Path | None:
    """The run directory holding the first checkpoint (``RUN/checkpoints/iter_N``)."""
    for c in checkpoints:
        if c != BASE and (Path(c).resolve().parent.parent / "config.yaml").is_file():
            return Path(c).resolve().parent.parent
    return None


_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)+=")


def split_overrides(checkpoints: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--checkpoints a b run.device=cpu`` -> ``([a, b], [run.device=cpu])``: the option takes
    several values, so it swallows the positional ``key=value`` overrides that follow it; an item
    that looks like ``section.key=value`` and is not a path on disk is an override."""
    ckpts = [c for c in checkpoints if not (_OVERRIDE.match(c) and not Path(c).exists())]
    return ckpts, [c for c in checkpoints if c not in ckpts] + list(overrides)


def _main(args: Any) -> None:
    args.checkpoints, overrides = split_overrides(args.checkpoints, args.overrides)
    if args.override:
        print("flowdppo-video: note: --override is deprecated; give overrides as key=value after the "
              "command, as train and sample take them", file=sys.stderr)
    if not args.checkpoints:
        raise ConfigError("eval: --checkpoints needs at least one checkpoint directory (or base)")
    resolve_models(args.checkpoints)       # a bad checkpoint path is the first thing to name
    run_dir = Path(args.run) if args.run else _run_dir_of(args.checkpoints)
    if run_dir is None:
        raise ConfigError("eval: give --run RUN_DIR (the run whose config built the checkpoints); none of "
                          "--checkpoints lies in a run directory")
    out = Path(args.out) if args.out else run_dir / "eval_checkpoints"
    summary = evaluate_checkpoints(run_dir, args.checkpoints, args.prompts, out, args.reward, args.samples,
                                   args.seed, args.sde, args.num_videos, [*overrides, *args.override])
    print(markdown_tables(summary), end="")
    for w in summary["warnings"]:           # again at the end, where the eye lands
        print(w)
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'} and the report {out / 'index.html'}")


def add_parser(sub: Any) -> None:
    """The ``eval`` subcommand."""
    e = sub.add_parser("eval", help="compare checkpoints (and the base model) on the same prompts and seeds")
    e.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="checkpoint directories (RUN/checkpoints/iter_N); 'base' is always included")
    e.add_argument("--prompts", required=True, help="prompt file, one prompt a line")
    e.add_argument("--reward", action="append", metavar="NAME",
                   help="a registered reward, or a YAML mapping of reward entries; repeatable "
                        "(default: the run's eval.rewards, else its rewards)")
    e.add_argument("--run", help="run directory whose config built the checkpoints (default: the first "
                                 "checkpoint's run)")
    e.add_argument("--samples", type=int, default=2, help="seeds per prompt (seed, seed+1, ...; default 2); under "
                   f"{SMALL_N} (prompt, seed) pairs in all the win-rates come with a small-sample warning")
    e.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    e.add_argument("--sde", action="store_true", help="sample with the training SDE steps (default: ODE)")
    e.add_argument("--num-videos", type=int, default=8, help="(prompt, seed) items whose videos are kept")
    e.add_argument("--out", help="output folder (default: RUN_DIR/eval_checkpoints)")
    e.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help=argparse.SUPPRESS)   # deprecated: overrides are positional, as in train and sample
    e.add_argument("overrides", nargs="*", help="dotted overrides of the run's config, e.g. run.device=cpu")
    e.set_defaults(func=_main)
