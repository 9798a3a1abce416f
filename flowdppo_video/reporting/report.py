"""The run report: ``RUN_DIR/report/index.html``, one page to see a run.

Everything the page shows lies beside it under ``RUN_DIR/report/`` and is linked relatively
(PNG plots and heatmaps, H.264 mp4 videos in ``<video controls muted loop playsinline>``); no
script, style sheet or font comes from the network, so the folder can be copied anywhere and
opened offline. Sections: training curves (reward per reward, each reward's logged parts such as
VideoAlign's VQ/MQ/TA on a panel of their own, token KL, mask-drop fractions),
held-out evaluation curves, videos of the same prompts at the start, middle and end, token-KL
maps over video frames, and the run's config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flowdppo_video.runs.config import ConfigError, VideoConfig, load_yaml
from flowdppo_video.runs.fsio import write_text_atomic
from flowdppo_video.runs.run_dir import require_run_dir
from flowdppo_video.training.kl_maps import overlay, load_snapshot
from flowdppo_video.training.metrics import read_metrics
from flowdppo_video.training.monitors import PREFIX, monitor_names, hacking_warnings

from .eval_checkpoints import composite_parts
from .pages import config_table, esc, page, report_video, table, video_tag
from .plots import draw_parts, reward_parts, save_figure
from .run_summary import held_out_metrics, training_reward_names

def _pick(items: Sequence[Any], n: int = 3) -> list[Any]:
    """First, middle and last (``n`` evenly spaced, without repeats)."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


# ---------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Legends go under their plot (the figure is saved with bbox_inches="tight"), never over the lines.
_BELOW = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncol": 2, "frameon": False}


def _series(rows: list[dict], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]


def plot_training(rows: list[dict[str, Any]], path: Path) -> Path:
    """Reward per reward, token KL and mask-drop fractions per iteration, and below them one panel
    per reward that logs parts (VideoAlign's VQ, MQ, TA), each part its own curve (one PNG)."""
    plt = _plt()
    it = [r["iteration"] for r in rows]
    parts = reward_parts(rows)
    extra_rows = math.ceil(len(parts) / 3)
    fig, grid = plt.subplots(1 + extra_rows, 3, figsize=(15, 3.6 + 4.6 * extra_rows), squeeze=False)
    if extra_rows:                 # room for each row's legends below it
        fig.subplots_adjust(hspace=0.85)
    axes = list(grid[0])
    mean, std = np.array(_series(rows, "reward/mean")), np.array(_series(rows, "reward/std"))
    ax = axes[0]
    ax.plot(it, mean, color="black", lw=2, label="total (weighted)")
    ax.fill_between(it, mean - std, mean + std, color="black", alpha=0.1, label="± batch std")
    names = sorted({k for r in rows for k in r if k.startswith("reward/") and k.endswith("/mean")
                    and k != "reward/mean" and k.count("/") == 2})      # scores; parts get their own panels
    for k in names:
        ax.plot(it, _series(rows, k), lw=1.2, label=k[len("reward/"):-len("/mean")])
    ax.set_title("reward per reward (batch mean)")
    ax.legend(**_BELOW)
    ax = axes[1]
    ax.plot(it, _series(rows, "kl/mean"), color="tab:orange", label="token KL mean")
    ax.plot(it, _series(rows, "kl/max"), color="tab:red", alpha=0.6, label="token KL max")
    if any(r.get("kl_ref/mean") is not None for r in rows):
        ax.plot(it, _series(rows, "kl_ref/mean"), color="tab:purple", label="KL to reference")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_title("KL(π_old ‖ π_θ), nats per token")
    ax.legend(**_BELOW)
    ax = axes[2]
    ax.plot(it, _series(rows, "mask/drop_frac"), color="tab:green", label="all")
    ax.plot(it, _series(rows, "mask/drop_frac_pos"), color="tab:olive", alpha=0.7, label="A > 0")
    ax.plot(it, _series(rows, "mask/drop_frac_neg"), color="tab:cyan", alpha=0.7, label="A < 0")
    ax.plot(it, _series(rows, "mask/offpolicy_drop_frac"), color="black", linestyle="--", label="off-policy")
    ax.set_title("dropped fraction (trust-region mask)")
    ax.legend(**_BELOW)
    below = list(grid[1:].ravel())
    for ax, (name, ps) in zip(below, parts.items()):
        draw_parts(ax, it, rows, "reward/", name, ps)
    for ax in below[len(parts):]:
        ax.set_visible(False)
    axes += below[:len(parts)]
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(it) == 1:   # one point draws no line: show it
            for line in ax.get_lines():
                line.set_marker("o")
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    return path


def held_out_groups(evals: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[str, tuple[str, ...]]]:
    """The held-out metrics to show, each once: ``(rewards, logged parts, composites)``.

    ``rewards`` are the evaluated rewards' names, ``parts`` what a reward logged beside its score
    that no other reward shows (``world_adherence/smoothness``), ``composites`` maps a reward
    whose score is the mean of some of its parts to those parts (``world_adherence`` -> colour,
    shape, direction), found from the numbers (:func:`eval_checkpoints.composite_parts`).
    """
    keys = held_out_metrics(evals)
    name = {k: k[len("eval/"):-len("/mean")] for k in keys}
    rewards = [name[k] for k in keys if "/" not in name[k]]
    parts = [name[k] for k in keys if "/" in name[k]]
    rows = [{n[len("eval/"):-len("/mean")]: r[n] for n in r if n.startswith("eval/") and n.endswith("/mean")
             and r[n] is not None} for r in evals]
    complete = [r for r in rows if all(q in r for q in rows[0])] if rows else []
    composites = {}
    for c in rewards:
        got = composite_parts(complete, c) if len(complete) >= 2 else ()
        if got:
            composites[c] = tuple(k.rsplit("/", 1)[1] for k in got)
    return rewards, parts, composites


def plot_evaluation(evals: list[dict[str, Any]], path: Path) -> Path:
    """Held-out rewards, the parts a reward logs, and the KL to the base model, after each
    evaluated iteration count; legends below the plots, never over the lines."""
    plt = _plt()
    x = [r["after_iterations"] for r in evals]
    rewards, parts, composites = held_out_groups(evals)
    by_reward: dict[str, list[str]] = {}       # each reward's parts on a panel of their own
    for p in parts:
        head, _, tail = p.partition("/")
        by_reward.setdefault(head, []).append(tail)
    has_kl = any(r.get("eval/kl_base/mean") is not None for r in evals)
    panels = 1 + len(by_reward) + has_kl
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.4), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    for n in rewards:
        if n in composites:     # a composite is drawn once, marked, beside the parts it averages
            ax.plot(x, _series(evals, f"eval/{n}/mean"), color="black", lw=2.2, ls="--", marker="o", ms=4,
                    label=f"{n} (mean of {', '.join(composites[n])})")
        else:
            ax.plot(x, _series(evals, f"eval/{n}/mean"), marker="o", ms=4, label=n)
    ax.set_title("held-out reward (fixed prompts and noise)")
    ax.legend(**_BELOW)
    for name, ps in by_reward.items():
        draw_parts(axes.pop(0), x, evals, "eval/", name, ps, marker="o")
    if has_kl:
        ax = axes.pop(0)
        ax.plot(x, _series(evals, "eval/kl_base/mean"), marker="o", ms=4, color="black")
        ax.set_title("KL(π_θ ‖ π_base), nats per token")
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.set_xlabel("after iterations")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    return path


def plot_klmap(snapshot: dict[str, Any], path: Path, min_size: int = 96) -> Path:
    """One snapshot: for each kept video and SDE step, every token frame's KL drawn over its
    video frame (cyan outlines: dropped tokens), with one colour scale for the snapshot."""
    plt = _plt()
    kl, drop, frames = snapshot["kl"], snapshot["drop"], snapshot.get("frames")
    s, rows, fp = kl.shape[:3]
    vmax = float(kl.max()) if float(kl.max()) > 0 else 1.0
    if frames is None:   # no decoded videos: the maps alone on grey
        frames = np.full((rows, fp, kl.shape[3] * 8, kl.shape[4] * 8, 3), 128, np.uint8)
    scale = max(1, math.ceil(min_size / max(frames.shape[2:4])))
    fig, axes = plt.subplots(s * rows, fp, figsize=(1.9 * fp + 1.4, 1.9 * s * rows + 0.6), squeeze=False,
                             layout="constrained")
    for r in range(rows):
        for j in range(s):
            for f in range(fp):
                ax = axes[r * s + j, f]
                ax.imshow(overlay(frames[r, f], kl[j, r, f], drop[j, r, f], vmax, scale), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if f == 0:
                    ax.set_ylabel(f"video {r} A={snapshot['advantages'][r]:+.2f}\nstep {int(snapshot['steps'][j])} "
                                  f"σ={float(snapshot['sigmas'][j]):.2f}", fontsize=7)
                if r == 0 and j == 0:
                    fi = snapshot.get("frame_index")
                    ax.set_title(f"token frame {f}" + (f" (px {int(fi[f])})" if fi is not None else ""), fontsize=7)
                ax.text(1, 1, f"max {kl[j, r, f].max():.1e}\ndrop {int(drop[j, r, f].sum())}", fontsize=5,
                        color="white", va="top", ha="left",
                        transform=ax.transData, bbox={"facecolor": "black", "alpha": 0.4, "lw": 0, "pad": 1})
    import matplotlib as mpl

    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, vmax), cmap="inferno")
    cb = fig.colorbar(sm, ax=axes, fraction=0.04, pad=0.02)
    cb.set_label("token KL (nats)", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    fig.suptitle(f"iteration {snapshot['iteration']}: token KL(π_old ‖ π_θ) of the update's last minibatch",
                 fontsize=9)
    save_figure(fig, path, dpi=100)
    return path


# ---------------------------------------------------------------------- sections
def _videos_section(run_dir: Path, out: Path, fps: float) -> str:
    """The same held-out prompts and noise after the first, a middle and the last evaluation;
    without held-out evaluation, training samples (whose prompts differ between iterations)."""
    evals = sorted(p for p in (run_dir / "eval").glob("after_*") if p.is_dir()) if (run_dir / "eval").is_dir() else []
    cols: list[tuple[str, Path, list[str]]] = []
    if evals:
        for d in _pick(evals):
            prompts = (d / "prompts.txt").read_text().splitlines() if (d / "prompts.txt").is_file() else []
            cols.append((f"after {int(d.name.split('_')[1])} iterations", d, prompts))
        intro = ("Held-out prompts with the same noise at every evaluation: the base model (left), "
                 "a middle evaluation and the last one.")
    else:
        samples = sorted(p for p in (run_dir / "samples").glob("iter_*") if p.is_dir()) \
            if (run_dir / "samples").is_dir() else []
        for d in _pick(samples):
            idx = json.loads((d / "index.json").read_text()) if (d / "index.json").is_file() else {"videos": []}
            cols.append((f"iteration {int(d.name.split('_')[1])}", d, [v["prompt"] for v in idx["videos"]]))
        intro = ("Training samples of the first, a middle and the last sampled iteration. No held-out "
                 "evaluation is configured (<code>eval.prompts</code>), so prompts differ between columns.")
    if not cols:
        return '<p class="muted">No videos yet (no evaluation or sample iteration has finished).</p>'
    names = sorted({p.name for _, d, _ in cols for p in d.glob("*.mp4")})
    rows = []
    for name in names:
        k = int(Path(name).stem) if Path(name).stem.isdigit() else -1
        cells, prompts = [], []
        for label, d, ps in cols:
            src = d / name
            if not src.is_file():
                cells.append('<span class="muted">—</span>')
                continue
            rel = f"videos/{d.parent.name}_{d.name}_{name}"
            _, width = report_video(src, out / rel, fps)
            cells.append(video_tag(rel, width))
            if 0 <= k < len(ps):
                prompts.append(ps[k])
        same = len(set(prompts)) <= 1
        prompt = esc(prompts[0]) if prompts and same else "<br>".join(esc(p) for p in prompts)
        rows.append([f'<span class="prompt">{prompt}</span>', *cells])
    return f"<p>{intro}</p>" + table(["prompt", *[c[0] for c in cols]], rows, cls="videos", raw=True)


def _by_epoch(snap: dict[str, Any]) -> str:
    """The iteration's frozen share per inner epoch (snapshots from before it was recorded have none)."""
    fr = snap.get("frozen_by_epoch")
    if fr is None or len(fr) == 0:
        return ""
    return "; frozen share by inner epoch " + ", ".join(f"{100 * float(x):.1f}%" for x in fr)


def _klmap_section(run_dir: Path, out: Path) -> str:
    snaps = sorted((run_dir / "klmaps").glob("iter_*.npz")) if (run_dir / "klmaps").is_dir() else []
    if not snaps:
        return ('<p class="muted">No token-KL snapshots (they are taken at the first and last iteration and '
                'every <code>run.report_every</code> iterations).</p>')
    parts = ["<p>Token KL between the rollout policy π_old and the policy being updated, for the last "
             "minibatch of the update (the KL and mask its last optimizer step used), per SDE step, drawn "
             "over one frame per token frame of the video. Up to two videos: the highest and the lowest advantage. "
             "Tokens outlined in cyan were dropped by the trust-region mask. With a single optimizer step "
             "per iteration the KL is zero by construction (the replay of π_old).</p>"]
    for p in _pick(snaps):
        snap = load_snapshot(p)
        rel = f"klmaps/{p.stem}.png"
        (out / "klmaps").mkdir(parents=True, exist_ok=True)
        if not (out / rel).is_file() or (out / rel).stat().st_mtime < p.stat().st_mtime:
            plot_klmap(snap, out / rel)
        prompts = "; ".join(f"video {i}: {esc(t)}" for i, t in enumerate(snap["prompts"]))
        parts.append(f"<h3>iteration {snap['iteration']}</h3><p class=\"muted\">{prompts}. Minibatch mean "
                     f"token KL {float(snap['kl_mean_all']):.3g} nats, dropped fraction "
                     f"{float(snap['drop_frac_all']):.3g}{_by_epoch(snap)}.</p><img class=\"plot\" src=\"{esc(rel)}\" "
                     f"alt=\"token KL map, iteration {snap['iteration']}\">")
    return "\n".join(parts)


def evaluation_table(evals: list[dict[str, Any]]) -> str:
    """One row per held-out metric (each once; a composite next to a note of its parts), one
    column per evaluation: as many columns as evaluations, not as metrics, so it fits the page."""
    rewards, parts, composites = held_out_groups(evals)
    rows = []
    for n in [*rewards, *parts]:
        label = f"{n} (mean of {', '.join(composites[n])})" if n in composites else n
        rows.append([label, *[float("nan") if r.get(f"eval/{n}/mean") is None else float(r[f"eval/{n}/mean"])
                              for r in evals]])
    for m in monitor_names(evals):      # pixels-only artifact monitors, below the rewards
        rows.append([f"monitor: {m} (higher = worse)", *[float("nan") if r.get(f"{PREFIX}{m}/mean") is None
                                                        else float(r[f"{PREFIX}{m}/mean"]) for r in evals]])
    if any(r.get("eval/kl_base/mean") is not None for r in evals):
        rows.append(["KL to base (nats/token)", *[float("nan") if r.get("eval/kl_base/mean") is None
                                                   else float(r["eval/kl_base/mean"]) for r in evals]])
    head = ["held-out metric", *[("base" if r["after_iterations"] == 0 else f"after {r['after_iterations']}")
                                 for r in evals]]
    return table(head, rows)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Build ``RUN_DIR/report/index.html`` from what the run has written so far; returns its path."""
    run_dir = Path(run_dir)
    config = load_yaml(require_run_dir(run_dir, ""))      # an unparsable file is one line naming it
    if not isinstance(config.get("run", {}), dict) or not isinstance(config.get("video", {}), dict):
        raise ConfigError(f"config file {run_dir / 'config.yaml'}: run and video must be mappings")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    fps = float(config.get("video", {}).get("fps", VideoConfig.fps))
    rows, evals = read_metrics(run_dir), read_metrics(run_dir, "eval")

    if rows:
        plot_training(rows, out / "training.png")
        last = rows[-1]
        summary = [["iterations done", len(rows)], ["configured iterations", config.get("run", {}).get("iterations", "?")],
                   ["reward/mean, first → last", f"{rows[0]['reward/mean']:.4f} → {last['reward/mean']:.4f}"],
                   ["kl/mean, last", last.get("kl/mean")], ["mask/drop_frac, last", last.get("mask/drop_frac")]]
        parts = reward_parts(rows)
        note = ("" if not parts else
                '<p class="muted">Below the curves, one panel per reward that logs parts beside its score ('
                + "; ".join(f"{esc(n)}: {esc(', '.join(ps))}" for n, ps in parts.items()) +
                "), each part its own curve: a part that climbs while the others stall or fall is the usual "
                "sign of reward hacking (VideoAlign: VQ; see docs/rewards.md).</p>")
        training = (table(["", ""], summary) +
                    '<img class="plot" src="training.png" alt="reward, KL and mask-drop curves">' + note)
    else:
        training = '<p class="muted">No iteration has finished yet.</p>'
    warnings = hacking_warnings(evals, rows, training_reward_names(config))   # the config read above
    if evals:
        plot_evaluation(evals, out / "evaluation.png")
        evaluation = ('<img class="plot" src="evaluation.png" alt="held-out evaluation curves">' +
                      evaluation_table(evals) +
                      '<p class="muted">Monitors: artifacts measured from pixels alone (rewards.artifacts; '
                      'docs/rewards.md gives each scale), logged at weight 0 beside the rewards.</p>')
    else:
        evaluation = '<p class="muted">No held-out evaluation configured (<code>eval.prompts</code>) or none done yet.</p>'
    sections = [("warnings", "Warnings", "".join(f'<p class="bad"><b>warning:</b> {esc(w)}</p>' for w in warnings))
                ] if warnings else []
    sections += [("training", "Training curves", training),
                ("evaluation", "Held-out evaluation", evaluation),
                ("videos", "Videos: start, middle, end", _videos_section(run_dir, out, fps)),
                ("klmaps", "Token-KL maps", _klmap_section(run_dir, out)),
                ("config", "Config", config_table(config))]
    index = out / "index.html"
    write_text_atomic(index, page(f"flowdppo-video run: {run_dir.resolve().name}", sections,
                              f"{esc(run_dir.resolve())} — {len(rows)} iterations recorded"))
    return index


def _main(args: Any) -> None:
    index = write_report(args.run_dir, args.out)
    print(f"wrote {index}")


def add_parser(sub: Any) -> None:
    """The ``report`` subcommand."""
    r = sub.add_parser("report", help="write RUN_DIR/report/index.html (curves, videos, token-KL maps, config)")
    r.add_argument("run_dir", help="run directory")
    r.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    r.set_defaults(func=_main)
