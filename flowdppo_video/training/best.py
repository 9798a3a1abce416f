"""The best model so far by one held-out reward (``run.keep_best``).

A run's last model is not always its best: a recipe can peak and then give part of its gain back
as it drifts from the base model (docs/latent_world.md, the recipe's seed 2). With ``run.keep_best:
NAME`` every evaluation's mean of the held-out reward ``NAME`` is compared with the best so far (the
base model's first); a better one is saved as the checkpoint ``RUN/checkpoints/best`` (the layout of
the others, so ``sample``, ``export`` and ``eval`` take it) and recorded in ``RUN/best.json``. The
base model can stay the best: then no checkpoint is written and the record says iteration 0. The
record is relative to the run directory (``checkpoints/best``), so the run can move.

The pick is made on the evaluation's own prompts and noise, so its score there is biased upward by
the choice; measure the kept model on other noise (``flowdppo-video eval --seed``) to report it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEST_FILE = "best.json"
BEST_CHECKPOINT = "best"        # under RUN/checkpoints/, beside iter_NNNNNN (never pruned with them)


@dataclass
class BestModel:
    """The best evaluation so far of ``reward`` (``eval/<reward>/mean``), after ``iteration`` updates."""

    reward: str
    value: float | None = None
    iteration: int | None = None

    @property
    def key(self) -> str:
        return f"eval/{self.reward}/mean"

    @classmethod
    def load(cls, run_dir: Path, reward: str) -> BestModel:
        """The run's record, or none yet. A record of another reward (the config changed on resume) is
        not this one's: it starts again."""
        path = Path(run_dir) / BEST_FILE
        if path.is_file():
            try:
                rec = json.loads(path.read_text())
                if rec.get("reward") == reward:
                    return cls(reward, float(rec["value"]), int(rec["iteration"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                pass                                   # unreadable: the pick starts again
        return cls(reward)

    @classmethod
    def start(cls, run_dir: Path, reward: str, start_iteration: int,
              evals: list[dict[str, Any]]) -> tuple[BestModel, str | None]:
        """The record a run (new or resumed after ``start_iteration`` updates) goes on from, and a
        one-line warning where it cannot take the one on disk. ``evals``: the evaluations the run
        keeps (``eval.jsonl``; a grid may have copied the base model's in before the run began).

        The record is dropped when it names a model past the checkpoint the run resumes from (that
        future was cut off) or one ``checkpoints/best`` does not hold (a kill between the two
        writes); the pick then starts again from the base model's evaluation."""
        run_dir = Path(run_dir)
        best, note = cls.load(run_dir, reward), None
        if best.iteration is not None and best.iteration > start_iteration:
            note = (f"{BEST_FILE} names the model after {best.iteration} iterations, past the checkpoint this run "
                    f"resumes from ({start_iteration}): the pick of run.keep_best starts again")
        elif best.iteration and best.iteration != _checkpoint_iteration(run_dir / "checkpoints" / BEST_CHECKPOINT):
            note = (f"checkpoints/{BEST_CHECKPOINT} does not hold the model {BEST_FILE} names (after {best.iteration} "
                    "iterations; a write was cut off): the pick of run.keep_best starts again")
        if note is not None:
            best = cls(reward)
        if best.value is None:                         # the base model's evaluation, where the run has one
            base = next((e for e in evals if e.get("after_iterations") == 0), None)
            if base is not None and best.improves(base):
                best.record(run_dir, 0, base, None)
        return best, note

    def improves(self, row: dict[str, Any]) -> bool:
        """Whether the evaluation in ``row`` (a metrics row; no ``eval/`` keys: no evaluation this
        iteration) beats the best so far. Ties keep the earlier model (fewer updates from the base)."""
        v = row.get(self.key)
        return v is not None and math.isfinite(v) and (self.value is None or v > self.value)

    def record(self, run_dir: Path, iteration: int, row: dict[str, Any], checkpoint: Path | None) -> None:
        """Take ``row``'s evaluation as the best and write ``best.json`` (atomically) with the other
        held-out means of that evaluation beside it."""
        self.value, self.iteration = float(row[self.key]), iteration
        rec = {"reward": self.reward, "value": self.value, "iteration": iteration,
               "checkpoint": None if checkpoint is None else f"checkpoints/{checkpoint.name}",
               "eval": {k: v for k, v in row.items() if k.startswith("eval/")}}
        tmp = Path(run_dir) / (BEST_FILE + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(Path(run_dir) / BEST_FILE)


def _checkpoint_iteration(ckpt: Path) -> int | None:
    """The updates a checkpoint holds (its ``meta.json``), or None if there is none readable."""
    try:
        return int(json.loads((ckpt / "meta.json").read_text())["next_iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


__all__ = ["BEST_CHECKPOINT", "BEST_FILE", "BestModel"]
