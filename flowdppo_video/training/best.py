"""The best model so far by one held-out reward (``run.keep_best``).

A run's last model is not always its best: a recipe can peak and then give part of its gain back
as it drifts from the base model (docs/latent_world.md, the recipe's seed 2). With ``run.keep_best:
NAME`` every evaluation's mean of the held-out reward ``NAME`` is compared with the best so far (the
base model's first); a better one is saved as the checkpoint ``RUN/checkpoints/best`` (the layout of
the others, so ``sample``, ``export`` and ``eval`` take it) and recorded in ``RUN/best.json``. The
base model can stay the best: then no checkpoint is written and the record says iteration 0.

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
        """The run's record (a resumed run goes on from it), or none yet. A record of another reward
        (the config changed on resume) is not this one's: it starts again."""
        path = Path(run_dir) / BEST_FILE
        if path.is_file():
            rec = json.loads(path.read_text())
            if rec.get("reward") == reward:
                return cls(reward, float(rec["value"]), int(rec["iteration"]))
        return cls(reward)

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
               "checkpoint": None if checkpoint is None else str(checkpoint),
               "eval": {k: v for k, v in row.items() if k.startswith("eval/")}}
        tmp = Path(run_dir) / (BEST_FILE + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(Path(run_dir) / BEST_FILE)


__all__ = ["BEST_CHECKPOINT", "BEST_FILE", "BestModel"]
