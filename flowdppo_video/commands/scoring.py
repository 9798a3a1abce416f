"""``flowdppo-video score``: score video files with registered rewards, outside training.

    flowdppo-video score samples/ --reward motion_quality --reward frame_change=0.5
    flowdppo-video score a.mp4 b.gif --prompts prompts.txt --rewards-config recipe.yaml --out scores/

Videos: each argument is a file (any format av reads: mp4, gif, webm, ...) or a folder, whose
files ending in .mp4, .gif, .webm, .mov, .mkv or .avi are taken (not recursively). The videos are
scored in **sorted path order**, each once.

Prompts, in this order of precedence:

* ``--prompts FILE``: one line per video, in sorted path order (blank lines and ``#`` lines are
  skipped, as in prompt files); a different count is an error;
* else, per folder, ``prompts.txt`` beside the videos (as a run's ``eval/after_N/`` holds it):
  line ``i`` is the prompt of the folder's ``i``-th video file in sorted name order (all of the
  folder's videos, even when only some are scored); or else ``index.json`` (as
  ``flowdppo-video sample`` and a run's ``samples/iter_N/`` write it) mapping file names to prompts;
* else the empty prompt, with a note (prompt-free rewards such as the motion rewards need none).

Rewards: ``--reward NAME[=WEIGHT]`` (repeatable) and/or ``--rewards-config YAML``, whose
``rewards:`` mapping is read as in a training config (options allowed; the file may be a whole
training recipe, whose other sections are ignored).

Frame rate: every reward is called with the videos' real frame rate (the motion rewards measure
speed per second, the judges sample frames per second of video). Each file's own rate is read
from its container (a folder of mixed rates is scored at each file's rate); ``--fps N`` gives one
rate for every file instead. A file whose rate cannot be read is skipped with a warning naming it
(give ``--fps``).

Videos of one shape ``(F, H, W)`` and frame rate are scored together in batches of
``--batch-size``, and memory is bounded by pixels, not files: a reward works on float copies of
the frames (about :data:`WORK_FACTOR` bytes per decoded byte), so the decoded videos waiting for
a batch are held to ``--memory-budget`` (default 2 GB, the whole process's peak: what the process
already holds is subtracted) and a batch is scored early to stay within it. A single video that
alone needs more (a long or 4K clip) is decoded scaled down, frame by frame, to the largest size
that fits (aspect kept), named on a warning line; ``height`` and ``width`` in its row are the size
it was scored at. Outputs, in ``--out`` (default: ``scores/`` in the first argument's folder):
``scores.csv`` and ``scores.jsonl`` (one row per video: ``file``, ``prompt``, ``fps`` (the rate
it was scored at), ``frames`` (decoded), ``ended_early`` (fewer frames than the container
declares: a truncated file, also warned about), each reward, ``total`` = the weighted sum, then each reward's logged extras
as ``reward/key``), and ``summary.json`` (weight, mean,
population std and count per reward and of the total; the skipped files). A file that cannot be
read is reported on stderr, one line naming it, and skipped; if none can be read, the command
fails (exit 2).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

import rewards as R
from flowdppo_video.runs.data import DataError
from flowdppo_video.runs.fsio import check_output_dir
from flowdppo_video.runs.video import declared_frames, probe_video, read_audio, read_video, video_fps
from rewards import RewardError, parse_reward_specs

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi")
DEFAULT_MEMORY_GB = 2.0
# Bytes a reward works with per decoded byte: float32 copies of the frames and of their
# differences (frame_change peaks at about 13x its uint8 input).
WORK_FACTOR = 16
MIN_SHARE = 64 << 20        # what the videos may use however much the process already holds


def bounded_int(flag: str, lo: int, hi: int) -> Any:
    """An argparse type: an integer in ``[lo, hi]``, refused in one short line (``choices=range``
    would print every allowed value)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {hi}, got {text!r}")
        return value
    parse.__name__ = flag
    return parse


def resident_bytes() -> int:
    """This process's resident memory in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def fit_size(frames: int, height: int, width: int, share: int) -> tuple[int, int] | None:
    """The ``(height, width)`` to decode a video at so that a reward's work on it fits ``share``
    bytes (aspect kept, even sizes, at least 2x2), or None when it fits at its own size."""
    need = frames * height * width * 3 * WORK_FACTOR
    if need <= share:
        return None
    scale = (share / need) ** 0.5
    return max(2, int(height * scale) // 2 * 2), max(2, int(width * scale) // 2 * 2)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``score`` command to the CLI's subparsers."""
    s = subparsers.add_parser("score", help="score video files with rewards (CSV, JSONL and a summary)",
                              description="Score video files with registered rewards; see flowdppo_video/commands/scoring.py.")
    s.add_argument("inputs", nargs="+", metavar="VIDEO_DIR_OR_FILE", help="video files or folders of them")
    s.add_argument("--prompts", metavar="FILE", help="one prompt a line, one line per video in sorted path order "
                   "(default: prompts.txt or index.json beside the videos)")
    s.add_argument("--reward", action="append", default=[], metavar="NAME[=WEIGHT]",
                   help="a registered reward and its weight (default 1); repeatable")
    s.add_argument("--rewards-config", metavar="YAML", help="YAML file with a rewards: mapping (options allowed)")
    s.add_argument("--out", metavar="DIR", help="output folder (default: scores/ in the first argument's folder)")
    s.add_argument("--fps", type=float, help="frame rate to score every video at (default: each file's own, "
                   "read from its container)")
    s.add_argument("--batch-size", type=bounded_int("--batch-size", 1, 1024), default=8, metavar="N",
                   help="videos scored together (default 8)")
    s.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_GB, metavar="GB",
                   help=f"peak memory to stay within while decoding and scoring (default {DEFAULT_MEMORY_GB:g}); a "
                        "video that needs more alone is scored at a smaller size, with a warning")
    s.set_defaults(func=run_score)
    return s


# --------------------------------------------------------------------------- inputs

def collect_videos(inputs: list[str]) -> list[Path]:
    """The video files named by ``inputs`` (files, or folders of video files), in sorted path order."""
    found: set[Path] = set()
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            files = [f for f in p.iterdir() if _is_video_file(f)]
            if not files:
                raise DataError(f"{p}: no video files ({', '.join(VIDEO_SUFFIXES)}) in this folder")
            found.update(files)
        elif p.is_file():
            found.add(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return sorted(found, key=lambda f: str(f))


def _is_video_file(f: Path) -> bool:
    # write_video's unfinished files are NAME.part.mp4
    return f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES and not f.stem.endswith(".part")


def _prompt_lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} is unreadable: {e}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def match_prompts(videos: list[Path], prompts_file: str | None) -> list[str]:
    """The prompt of each video (see the module docstring for the rule); a count mismatch names the file."""
    if prompts_file is not None:
        if not Path(prompts_file).is_file():
            raise DataError(f"--prompts {prompts_file} does not exist")
        lines = _prompt_lines(Path(prompts_file), "--prompts")
        if len(lines) != len(videos):
            raise DataError(f"--prompts {prompts_file}: {len(lines)} prompts for {len(videos)} videos "
                            "(one line per video, in sorted path order)")
        return lines
    by_file: dict[Path, str] = {}
    missing: dict[Path, int] = {}
    for folder in sorted({v.parent for v in videos}, key=str):
        txt, index = folder / "prompts.txt", folder / "index.json"
        if txt.is_file():
            siblings = sorted((f for f in folder.iterdir() if _is_video_file(f)), key=lambda f: f.name)
            lines = _prompt_lines(txt, "prompt file")
            if len(lines) != len(siblings):
                raise DataError(f"{txt}: {len(lines)} prompts for the {len(siblings)} videos in {folder} "
                                "(one line per video, in sorted file-name order)")
            by_file.update(zip(siblings, lines))
        elif index.is_file():
            try:
                rows = json.loads(index.read_text(encoding="utf-8"))["videos"]
                by_file.update({folder / r["file"]: str(r["prompt"]) for r in rows})
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{index}: not a samples index ({{'videos': [{{'file', 'prompt'}}]}}): "
                                f"{type(e).__name__}: {e}") from None
    out = []
    for v in videos:
        if v not in by_file:
            missing[v.parent] = missing.get(v.parent, 0) + 1
        out.append(by_file.get(v, ""))
    for folder, n in missing.items():
        print(f"flowdppo-video: note: no prompt for {n} video(s) in {folder} (no --prompts, and no prompts.txt or "
              "index.json entry): scoring with the empty prompt", file=sys.stderr)
    return out


def reward_entries(reward_args: list[str], config: str | None) -> dict[str, Any]:
    """The ``rewards:`` mapping from ``--rewards-config`` and ``--reward NAME[=WEIGHT]`` flags."""

    entries: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise RewardError(f"--rewards-config {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RewardError(f"--rewards-config {path} is not readable YAML: {_first_line(e)}") from None
        if not isinstance(data, dict) or not isinstance(data.get("rewards"), dict) or not data["rewards"]:
            raise RewardError(f"--rewards-config {path} needs a non-empty 'rewards:' mapping of name to weight")
        entries.update(data["rewards"])
    for arg in reward_args:
        name, eq, weight = arg.partition("=")
        name = name.strip()
        if not name:
            raise RewardError(f"--reward {arg!r}: expected NAME or NAME=WEIGHT")
        if name in entries:
            raise RewardError(f"--reward {name} is given twice (or also in --rewards-config)")
        try:
            entries[name] = float(weight) if eq else 1.0
        except ValueError:
            raise RewardError(f"--reward {arg}: the weight {weight!r} is not a number") from None
        if not math.isfinite(entries[name]):
            raise RewardError(f"--reward {arg}: the weight must be finite")
    if not entries:
        raise RewardError("no rewards to score with: give --reward NAME[=WEIGHT] or --rewards-config YAML")
    return entries


def check_fps_flag(fps: float | None) -> float | None:
    """``--fps``: ``None`` (each file's own rate) or a positive number."""
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise RewardError(f"--fps must be a positive number, got {fps}")
    return fps


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# --------------------------------------------------------------------------- scoring

def score_files(videos: list[Path], prompts: list[str], entries: dict[str, Any], batch_size: int = 8,
                fps: float | None = None, memory_budget: float = DEFAULT_MEMORY_GB * 1e9
                ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Read and score ``videos``; returns ``(rows, reward_names, skipped)``.

    ``fps``: the frame rate every video is scored at; ``None``: each file's own (its container's).
    ``rows`` in the order of ``videos`` (unreadable ones left out, and reported on stderr), each
    ``{"file", "prompt", "fps", "frames", "ended_early", <reward>: score, ..., "total",
    <reward/key>: extra, ...}``; ``ended_early`` marks a file that decoded to fewer frames than its
    container declares (a truncated file: scored from what it has, with a warning naming it).

    Memory is bounded whatever the mix of sizes: at most ``batch_size`` decoded videos wait for
    their batch (over that, the largest waiting group is scored at once, however small), and their
    reward work (:data:`WORK_FACTOR` per byte) stays within ``memory_budget`` bytes less what the
    process holds already; a video over that alone is decoded at :func:`fit_size`'s size.
    """


    built = R.build_rewards(entries)
    weights = {n: s.weight for n, s in R.parse_reward_specs(entries).items()}
    results: dict[int, dict[str, Any]] = {}
    # one batch per (frames, height, width, fps): a batch's videos share one frame rate
    pending: dict[tuple[Any, ...], list[tuple[int, np.ndarray]]] = {}
    skipped: list[str] = []
    early: set[int] = set()
    # A reward that judges sound (it takes audio=) gets each file's audio stream (none: None); a
    # batch's files then share one sound length and rate as well.
    wants_audio = any(R.takes_audio(fn) for fn in built.values())
    sounds: dict[int, tuple[np.ndarray, int]] = {}
    share = max(MIN_SHARE, int(memory_budget) - resident_bytes())

    def held() -> int:
        return sum(v.nbytes for items in pending.values() for _, v in items) * WORK_FACTOR

    def flush(key: tuple[Any, ...]) -> None:
        items = pending.pop(key)
        idx = [i for i, _ in items]
        batch = torch.from_numpy(np.stack([v for _, v in items]))
        rate = key[-1]
        audio = None
        if key[-2] is not None:
            audio = R.Audio(torch.from_numpy(np.stack([sounds.pop(i)[0] for i in idx])), int(key[-2][2]))
        scores, extras = R.score_videos(built, batch, [prompts[i] for i in idx], fps=rate, audio=audio)
        for j, i in enumerate(idx):
            row: dict[str, Any] = {"file": str(videos[i]), "prompt": prompts[i], "fps": rate,
                                   "frames": int(batch.shape[1]), "height": int(batch.shape[2]),
                                   "width": int(batch.shape[3]), "ended_early": i in early}
            row.update({n: float(s[j]) for n, s in scores.items()})
            row["total"] = float(sum(weights[n] * float(s[j]) for n, s in scores.items()))
            row.update({k: float(e.reshape(-1)[j]) for k, e in extras.items() if e.numel() == len(idx)})
            results[i] = row

    for i, path in enumerate(tqdm(videos, desc="scoring", unit="video", disable=None)):
        try:
            try:
                n, h, w = probe_video(path)
            except Exception:  # noqa: BLE001 - no header to go by: decode as it is (the read names what fails)
                n = None
            size = fit_size(n, h, w, share) if n else None
            if size is not None:
                print(f"flowdppo-video: warning: {path}: {n} frames of {w}x{h} need about "
                      f"{n * h * w * 3 * WORK_FACTOR / 1e9:.1f} GB to score, over --memory-budget "
                      f"{memory_budget / 1e9:g} GB: scored at {size[1]}x{size[0]}", file=sys.stderr)
            arr = read_video(path) if size is None else read_video(path, size)
            if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] < 1:
                raise ValueError(f"decoded to {arr.shape} {arr.dtype}, not (F, H, W, 3) uint8 frames")
            rate = fps if fps is not None else video_fps(path)
        except Exception as e:  # a broken file must not stop the others: report it by name
            print(f"flowdppo-video: warning: skipping {path}: cannot read it ({type(e).__name__}: {_first_line(e)})",
                  file=sys.stderr)
            skipped.append(str(path))
            continue
        declared = declared_frames(path)
        if declared is not None and arr.shape[0] < declared:
            early.add(i)
            print(f"flowdppo-video: warning: {path} ends early: {arr.shape[0]} of the {declared} frames its "
                  f"container declares decoded; scored from those (ended_early in the output)", file=sys.stderr)
        sound = read_audio(path) if wants_audio else None
        if sound is not None:
            sounds[i] = sound
        key = (*arr.shape[:3], None if sound is None else (*sound[0].shape, sound[1]), rate)
        while pending and held() + arr.nbytes * WORK_FACTOR > share:    # bounded by pixels, not files
            flush(max(pending, key=lambda k: sum(v.nbytes for _, v in pending[k])))
        pending.setdefault(key, []).append((i, np.ascontiguousarray(arr)))
        if len(pending[key]) >= batch_size:
            flush(key)
        elif sum(map(len, pending.values())) > batch_size:   # many sizes: bound what is held
            flush(max(pending, key=lambda k: len(pending[k])))
    for key in list(pending):
        flush(key)
    if not results:
        raise DataError(f"none of the {len(videos)} video files could be read (see the warnings above)")
    return [results[i] for i in sorted(results)], list(built), skipped


def summarize(rows: list[dict[str, Any]], names: list[str], weights: dict[str, float]) -> dict[str, Any]:
    """Weight, mean, population std and count of each reward's column and of ``total``."""
    out: dict[str, Any] = {}
    for n in [*names, "total"]:
        vals = np.array([r[n] for r in rows], dtype=np.float64)
        out[n] = {"weight": weights.get(n), "mean": float(vals.mean()), "std": float(vals.std()),
                  "count": int(vals.size)}
    return out


def write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``scores.csv``, ``scores.jsonl`` and ``summary.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    with open(out / "scores.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


def run_score(args: argparse.Namespace) -> None:
    """The ``score`` command."""
    fps = check_fps_flag(args.fps)
    if not (math.isfinite(args.memory_budget) and args.memory_budget > 0):
        raise RewardError(f"--memory-budget must be a positive number of GB, got {args.memory_budget}")
    entries = reward_entries(args.reward, args.rewards_config)
    parse_reward_specs(entries)                       # bad weights fail before any video is read
    videos = collect_videos(args.inputs)
    prompts = match_prompts(videos, args.prompts)
    first = Path(args.inputs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "scores"
    check_output_dir(out, "--out")                    # a file or read-only folder fails before scoring
    rows, names, skipped = score_files(videos, prompts, entries, args.batch_size, fps,
                                       memory_budget=args.memory_budget * 1e9)
    weights = {n: s.weight for n, s in parse_reward_specs(entries).items()}
    per_reward = summarize(rows, names, weights)
    write_outputs(out, rows, {"rewards": per_reward, "count": len(rows), "skipped": skipped})
    print(f"scored {len(rows)} of {len(videos)} videos" + (f" ({len(skipped)} skipped)" if skipped else "")
          + f"; wrote {out / 'scores.csv'}, scores.jsonl, summary.json")
    print(f"{'reward':<24} {'weight':>8} {'mean':>10} {'std':>10} {'count':>6}")
    for n, s in per_reward.items():
        weight = "" if s["weight"] is None else f"{s['weight']:g}"
        print(f"{n:<24} {weight:>8} {s['mean']:>10.4f} {s['std']:>10.4f} {s['count']:>6}")
