"""Which held-out videos a run keeps, and ``RUN_DIR/before_after/``: base beside final, labelled.

A run evaluates every held-out prompt several times but keeps only ``eval.num_videos`` videos
per evaluation (``eval/after_N/``), the same ones every time, and ``before_after/`` shows the
base model's beside the final model's. Keeping the first few videos showed one or two prompts
(the held-out file's first lines, all "moves left" in the shapes world), which cannot show that a
model now follows the other directions too. :func:`pick_videos` spreads the kept videos over the
prompts' words instead: one sample of as many different prompts as fit, chosen so every word
(each direction, speed, background, colour, shape) appears as evenly as it can.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flowdppo_video.runs.fsio import write_text_atomic
from flowdppo_video.runs.video import read_video
from flowdppo_video.training.evaluation import write_side_by_side

from .pages import esc, page, table, video_tag

INDEX = "index.html"


def pick_videos(prompts: list[str], samples_per_prompt: int, n: int) -> list[int]:
    """Indices of ``n`` videos of an evaluation batch (prompt-major: video ``p * samples_per_prompt
    + s`` is sample ``s`` of prompt ``p``) that cover the prompts' words evenly.

    Greedy and deterministic: each pick is the first sample of the unpicked prompt whose words are
    the least shown so far (a word shown ``c`` times counts ``1 / (1 + c)``; ties go to the earlier
    prompt). Once every prompt has one video, further picks take second samples, and so on.
    """
    total = len(prompts) * samples_per_prompt
    n = max(0, min(n, total))
    words = [set(p.lower().split()) for p in prompts]
    shown: dict[str, int] = {}
    picked: list[int] = []
    for s in range(samples_per_prompt):
        left = list(range(len(prompts)))
        while left and len(picked) < n:
            # fsum: exact, so the score does not depend on the set's order, which differs between
            # processes (string hashing is salted) and broke ties differently run to run.
            best = max(left, key=lambda p: (math.fsum(1.0 / (1 + shown.get(w, 0)) for w in words[p]), -p))
            left.remove(best)
            picked.append(best * samples_per_prompt + s)
            for w in words[best]:
                shown[w] = shown.get(w, 0) + 1
        if len(picked) >= n:
            break
    return picked


def _prompts(folder: Path) -> list[str]:
    f = folder / "prompts.txt"
    return f.read_text(encoding="utf-8").splitlines() if f.is_file() else []


def write_before_after(base_dir: Path, final_dir: Path, out_dir: Path, fps: float, final_label: str
                       ) -> list[Path]:
    """``out_dir/NN.mp4`` (base left, final right) for every kept video whose prompt is the same
    in both folders, and ``out_dir/index.html`` labelling each with its prompt, "base" and
    ``final_label`` (e.g. "after 40"). Returns the videos written."""
    before, after = _prompts(base_dir), _prompts(final_dir)
    # A run resumed from before the videos were picked this way kept other prompts at the start:
    # pair only videos that show the same prompt.
    same = {f"{k:02d}.mp4" for k, (a, b) in enumerate(zip(before, after)) if a == b}
    written = [p for p in write_side_by_side(base_dir, final_dir, out_dir, fps) if not before or p.name in same]
    for p in sorted(out_dir.glob("*.mp4")):
        if p not in written:
            p.unlink()
    rows, listing = [], []
    for p in written:
        k = int(p.stem)
        prompt = before[k] if k < len(before) else ""
        rows.append([f'<span class="prompt">{esc(prompt)}</span>', video_tag(p.name, _width(p))])
        listing.append({"file": p.name, "prompt": prompt})
    (out_dir / "index.json").write_text(json.dumps({"left": "base", "right": final_label, "videos": listing},
                                                   indent=1))
    body = (f"<p>The same held-out prompts and noise: the base model on the left, the model {esc(final_label)} "
            f"iterations on the right.</p>" +
            table(["prompt", f"base (left) | {final_label} (right)"], rows, cls="videos", raw=True))
    write_text_atomic(out_dir / INDEX, page("before and after", [("videos", f"base | {final_label}", body)],
                                        esc(out_dir.resolve())))
    return written


def _width(video: Path) -> int:
    return int(read_video(video).shape[2])
