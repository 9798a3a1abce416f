"""A still of held-out videos before and after RL: frames of the same prompts and noise, side by side.

    .venv/bin/python tools/frame_strip.py runs/clean_rl/every_step-s0 runs/clean_rl/route_0.55-s0 \\
        --labels "default" "routed" --videos 0 2 5 --out docs/figures/clean_rl_strip.png

For each chosen held-out video (``--videos``: indices in the first run's ``eval/after_000000``, the
base model; then the same prompt's video in the last evaluation of every run given), a row of ``--frames`` frames, upscaled without
smoothing so the patch grid and the background's texture stay visible. The base row is taken from the
first run (every run of one recipe starts from the same base with the same evaluation noise).
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
    args = ap.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("frame_strip.py: --labels needs one label per run")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["base"] + [f"{label} (after {int(last_eval(r).name.split('_')[1])} it.)"
                          for r, label in zip(args.runs, labels)]
    rows, names = [], []
    base = args.runs[0] / "eval" / "after_000000"
    for i in args.videos:
        prompt = prompts_of(base)[i] if i < len(prompts_of(base)) else None
        if prompt is None:
            raise SystemExit(f"frame_strip.py: {base} has no video {i}")
        parts = [strip(video_for(base, prompt), args.frames, args.scale)]
        parts += [strip(video_for(last_eval(run), prompt), args.frames, args.scale) for run in args.runs]
        gap = np.full((parts[0].shape[0], 6 * args.scale, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([x for p in parts for x in (p, gap)][:-1], axis=1))
        names.append(prompt)
    h, w = rows[0].shape[:2]
    fig, axes = plt.subplots(len(rows), 1, figsize=(w / 80 + 0.2, len(rows) * (h / 80 + 0.3) + 0.3))
    part_w = (w - 6 * args.scale * len(args.runs)) / (len(args.runs) + 1)
    for r, (ax, img, name) in enumerate(zip(np.atleast_1d(axes), rows, names)):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=7, loc="left", pad=2)
        ax.axis("off")
        if r == 0:
            for c, col in enumerate(columns):
                ax.text(c * (part_w + 6 * args.scale) + part_w / 2, -h * 0.28, col, ha="center", fontsize=8,
                        fontweight="bold")
    fig.tight_layout(pad=0.3, h_pad=0.5)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
