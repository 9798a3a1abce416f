"""Per-iteration metrics: an append-only ``metrics.jsonl`` and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsWriter:
    """One JSON object per iteration, flushed and synced so a kill loses nothing written."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, name: str = "metrics",
                 step_key: str = "iteration", purge_step: int | None = None) -> None:
        self.path = run_dir / f"{name}.jsonl"
        self.step_key = step_key
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, name: str = "metrics") -> list[dict[str, Any]]:
    path = Path(run_dir) / f"{name}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, keep_below: int, name: str = "metrics", key: str = "iteration") -> int:
    """Keep rows of ``name.jsonl`` with ``row[key] < keep_below``; move the rest to ``name.stale.jsonl``.

    Used on resume: rows after the checkpoint are recomputed, and the old ones are kept aside
    rather than deleted. Returns the number of rows moved.
    """
    path = run_dir / f"{name}.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep, stale = [], []
    for ln in lines:
        try:
            (keep if json.loads(ln)[key] < keep_below else stale).append(ln)
        except (ValueError, KeyError):
            stale.append(ln)  # a torn last line from a kill
    if stale:
        with open(run_dir / f"{name}.stale.jsonl", "a") as f:
            f.write("\n".join(stale) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)
    return len(stale)
