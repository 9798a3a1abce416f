"""A still of held-out videos before and after RL: frames of the same prompts and noise, side by side.

    .venv/bin/python tools/frame_strip.py runs/clean_rl/every_step-s0 runs/clean_rl/route_0.55-s0 \\
        --labels "default" "routed" --videos 0 2 5 --out docs/figures/clean_rl_strip.png

For each chosen held-out video (``--videos``: indices in the first run's ``eval/after_000000``, the
base model; then the same prompt's video in the last evaluation of every run given), a row of ``--frames`` frames, upscaled without
smoothing so the patch grid and the background's texture stay visible. The base row is taken from the
first run (every run of one recipe starts from the same base with the same evaluation noise).
``--by-run``: a row per run instead (the base first), the chosen videos side by side, for many runs:

    .venv/bin/python tools/frame_strip.py runs/frontier/latent-none-inf-e4-s2 \
        runs/frontier/latent-row-0.0001-e4-s2 --labels "no trust region" "row-decided δ 1e-4" \
        --by-run --videos 0 3 --frames 0 8 16 --scale 2 --out docs/figures/frontier_latent_frames.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flowdppo_video.runs.video import read_video


def last_eval(run: Path) -> Path:
    found = sorted(p for p in (run / "eval").glob("after_*") if p.is_dir())
    if len(found) < 2:
        raise SystemExit(f"frame_strip.py: {run}/eval holds no evaluation after training")
    return found[-1]


def prompts_of(folder: Path) -> list[str]:
    f = folder / "prompts.txt"
    return f.read_text().splitlines() if f.is_file() else []


def video_for(folder: Path, prompt: str) -> Path:
    """The video of ``prompt`` in an evaluation folder (runs may keep different prompts' videos)."""
    names = prompts_of(folder)
    if prompt not in names:
        raise SystemExit(f"frame_strip.py: {folder} holds no video of {prompt!r}")
    return folder / f"{names.index(prompt):02d}.mp4"


def strip(video: Path, frames: list[int], scale: int) -> np.ndarray:
    v = read_video(video)
    sel = [v[min(i, len(v) - 1)] for i in frames]
    gap = np.full((v.shape[1], 1, 3), 255, dtype=np.uint8)
    row = np.concatenate([x for f in sel for x in (f, gap)][:-1], axis=1)
    return row.repeat(scale, axis=0).repeat(scale, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--labels", nargs="+", default=None, help="one per run (default: the folder names)")
    ap.add_argument("--videos", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--frames", type=int, nargs="+", default=[0, 2, 4, 7])
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("docs/figures/clean_rl_strip.png"))
    ap.add_argument("--by-run", action="store_true", help="a row per run (the base first), the videos side by side")
    args = ap.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("frame_strip.py: --labels needs one label per run")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = args.runs[0] / "eval" / "after_000000"
    held_out = prompts_of(base)
    missing = [i for i in args.videos if i >= len(held_out)]
    if missing:
        raise SystemExit(f"frame_strip.py: {base} has no video {missing[0]}")
    prompts = [held_out[i] for i in args.videos]
    finals = [last_eval(run) for run in args.runs]
    # cells[r][c]: the strip of run r (0: the base) for prompt c
    cells = [[strip(video_for(folder, p), args.frames, args.scale) for p in prompts] for folder in [base] + finals]
    names = ["base"] + [f"{label} (after {int(f.name.split('_')[1])} it.)" for f, label in zip(finals, labels)]
    gap = np.full((cells[0][0].shape[0], 6 * args.scale, 3), 255, dtype=np.uint8)

    def join(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([x for p in parts for x in (p, gap)][:-1], axis=1)

    if args.by_run:             # a row per run, its label on the left; the prompts above the columns
        rows, titles, columns = [join(c) for c in cells], names, prompts
    else:                       # a row per prompt, the runs' labels above the columns
        rows, titles, columns = [join([c[i] for c in cells]) for i in range(len(prompts))], prompts, names
    h, w = rows[0].shape[:2]
    part_w = (w - 6 * args.scale * (len(columns) - 1)) / len(columns)
    if args.by_run:
        left, top = max(len(t) for t in titles) * 0.075 + 0.2, 0.35            # inches for the labels
        size = (w / 80 + left, len(rows) * (h / 80 + 0.05) + top)
        fig, axes = plt.subplots(len(rows), 1, figsize=size)
        for r, (ax, img, name) in enumerate(zip(np.atleast_1d(axes), rows, titles)):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
            if r == 0:
                for c, col in enumerate(columns):
                    ax.text(c * (part_w + 6 * args.scale) + part_w / 2, -h * 0.08, col, ha="center", va="bottom",
                            fontsize=7)
        fig.subplots_adjust(left=left / size[0], right=0.995, top=1 - top / size[1], bottom=0.005, hspace=0.06)
    else:
        # Margins in inches, not in image heights, so the run labels above the first row's prompt
        # fit whatever the rows' size.
        title, top, side = 0.25, 0.45, 0.1         # each row's prompt; the run labels above the first
        size = (w / 80 + 2 * side, len(rows) * (h / 80 + title) + top)
        fig, axes = plt.subplots(len(rows), 1, figsize=size)
        for r, (ax, img, name) in enumerate(zip(np.atleast_1d(axes), rows, titles)):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(name, fontsize=7, loc="left", pad=2)
            ax.axis("off")
            if r == 0:
                for c, col in enumerate(columns):
                    ax.annotate(col, xy=(c * (part_w + 6 * args.scale) + part_w / 2, 1.0),
                                xycoords=("data", "axes fraction"), xytext=(0, 13), textcoords="offset points",
                                ha="center", va="bottom", fontsize=8, fontweight="bold")
        fig.subplots_adjust(left=side / size[0], right=1 - side / size[0], top=1 - (top - title) / size[1] - title / size[1],
                            bottom=0.02 / size[1], hspace=title / (h / 80))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
