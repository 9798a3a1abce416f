"""Per-iteration metrics: an append-only ``metrics.jsonl``, TensorBoard scalars and videos, and
optionally Weights & Biases."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flowdppo_video.exceptions import TrainingError
from flowdppo_video.runs.config import ConfigError
from flowdppo_video.runs.fsio import write_text_atomic


class MetricsWriter:
    """One JSON object per iteration, flushed and synced so a kill loses nothing written."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, name: str = "metrics",
                 step_key: str = "iteration", purge_step: int | None = None, wandb_run: Any = None) -> None:
        self.path = run_dir / f"{name}.jsonl"
        self.step_key = step_key
        self._wandb = wandb_run
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard

                # purge_step: on resume, TensorBoard drops its events from the redone steps.
                self._tb = SummaryWriter(str(run_dir / "tensorboard" / name), purge_step=purge_step)
            except ImportError:  # tensorboard is an optional extra
                self._tb = None

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            step = int(row[self.step_key])
            for k, v in row.items():
                if k != self.step_key and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            # wandb's own step counter: eval rows (after it + 1) are written before metric rows (it).
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float)) and v is not None})

    def add_videos(self, tag: str, videos: Any, step: int, fps: float) -> None:
        """A few ``(N, F, H, W, 3)`` uint8 videos as animated GIFs: TensorBoard's image dashboard
        plays them (written as image summaries, so moviepy is not needed), and wandb when on."""
        if self._tb is None and self._wandb is None:
            return
        arr = videos.numpy() if hasattr(videos, "numpy") else np.asarray(videos)
        for k, frames in enumerate(arr):
            gif, (h, w) = gif_bytes(frames, fps)
            if self._tb is not None:
                from tensorboard.compat.proto.summary_pb2 import Summary

                image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
                self._tb._get_file_writer().add_summary(
                    Summary(value=[Summary.Value(tag=f"{tag}/{k}", image=image)]), step)
            if self._wandb is not None:
                import wandb

                path = self.path.parent / "wandb_media" / f"{tag.replace('/', '_')}_{step:06d}_{k}.gif"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(gif)
                self._wandb.log({f"{tag}/{k}": wandb.Video(str(path), fps=fps, format="gif"), self.step_key: step})
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def gif_bytes(frames: np.ndarray, fps: float, min_size: int = 128) -> tuple[bytes, tuple[int, int]]:
    """``(F, H, W, 3)`` uint8 frames as a looping animated GIF, nearest-neighbour upscaled to at least
    ``min_size`` pixels. Returns ``(bytes, (height, width))``."""
    k = max(1, math.ceil(min_size / max(1, min(frames.shape[1:3]))))
    frames = np.asarray(frames).repeat(k, axis=1).repeat(k, axis=2)
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)),
                   loop=0, disposal=1)
    return buf.getvalue(), (int(frames.shape[1]), int(frames.shape[2]))


def import_wandb() -> Any:
    """The wandb module, or a one-line error when ``run.wandb`` is on without it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("run.wandb is true but the wandb package is not installed "
                          "(pip install 'flowdppo-video[wandb]')") from None
    return wandb


def start_wandb(run_dir: Path, config: dict[str, Any]) -> Any:
    """A Weights & Biases run logging into ``run_dir`` (``run.wandb: true``). Offline by default, so
    it needs no network or account: ``WANDB_MODE=online`` (and a login) syncs as it goes, or
    ``wandb sync RUN_DIR/wandb/offline-run-*`` later."""
    wandb = import_wandb()
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "flowdppo-video"), name=Path(run_dir).name,
                      dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"))


def _log_lines(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """The non-blank lines of a JSONL log with each parsed row (None for the torn last line a kill
    leaves); any other line that is not a JSON object is one :class:`TrainingError` naming the
    file and line (it was not written by a run, and resuming over it would lose it)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingError(f"{path} is not a metrics log (not UTF-8 text at byte {e.start}); move it aside "
                            "or restore it") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    out: list[tuple[str, dict[str, Any] | None]] = []
    for k, ln in enumerate(lines):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(lines) - 1 and not text.endswith("\n"):
                out.append((ln, None))                   # a kill mid-write: its row is redone
                continue
            raise TrainingError(f"{path} line {k + 1} is not a JSON row ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:120]}); move the file aside or fix "
                                "that line") from None
        out.append((ln, row))
    return out


def read_metrics(run_dir: str | Path, name: str = "metrics") -> list[dict[str, Any]]:
    """The rows of ``name.jsonl`` (a torn last line left out; another bad line is one error)."""
    path = Path(run_dir) / f"{name}.jsonl"
    if not path.is_file():
        return []
    return [row for _, row in _log_lines(path) if row is not None]


def truncate_metrics(run_dir: Path, keep_below: int, name: str = "metrics", key: str = "iteration") -> int:
    """Keep rows of ``name.jsonl`` with ``row[key] < keep_below``; move the rest to ``name.stale.jsonl``.

    Used on resume: rows after the checkpoint are recomputed, and the old ones are kept aside
    rather than deleted. Returns the number of rows moved.
    """
    path = run_dir / f"{name}.jsonl"
    if not path.is_file():
        return 0
    keep, stale = [], []
    for ln, row in _log_lines(path):
        try:
            (keep if row is not None and row[key] < keep_below else stale).append(ln)
        except (KeyError, TypeError):
            stale.append(ln)  # a row without its step: not this run's to keep
    if stale:
        with open(run_dir / f"{name}.stale.jsonl", "a") as f:
            f.write("\n".join(stale) + "\n")
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))   # a full disk leaves the old file whole
    return len(stale)
