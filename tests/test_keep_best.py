"""run.keep_best: the model that scored a held-out reward highest so far, kept as checkpoints/best."""

from __future__ import annotations

import filecmp
import json
import math
import sys

import pytest

from flowdppo_video.reporting.run_summary import summary_lines
from flowdppo_video.runs.config import ConfigError
from flowdppo_video.runs.data import load_prompts
from flowdppo_video.trainer import Trainer
from flowdppo_video.training.best import BestModel
from flowdppo_video.training.checkpoint import list_checkpoints
from flowdppo_video.training.metrics import read_metrics

from .conftest import ROOT, tiny_config

HELD_OUT = f"eval.prompts={ROOT / 'configs/prompts/demo.txt'}"
QUIET = ["run.sample_every=100", "run.num_sample_videos=0", "eval.kl_to_base=false", "eval.num_videos=0"]


def test_best_model_picks_the_highest_finite_score_and_keeps_the_earlier_on_a_tie(tmp_path):
    best = BestModel("frame_change")
    assert not best.improves({"reward/mean": 1.0})                    # no evaluation this iteration
    assert best.improves({"eval/frame_change/mean": 0.2})
    best.record(tmp_path, 0, {"eval/frame_change/mean": 0.2, "eval/other/mean": 0.5, "reward/mean": 9.0}, None)
    assert not best.improves({"eval/frame_change/mean": 0.2})         # a tie keeps the earlier model
    assert not best.improves({"eval/frame_change/mean": math.nan})
    assert best.improves({"eval/frame_change/mean": 0.3})
    rec = json.loads((tmp_path / "best.json").read_text())
    assert rec == {"reward": "frame_change", "value": 0.2, "iteration": 0, "checkpoint": None,
                   "eval": {"eval/frame_change/mean": 0.2, "eval/other/mean": 0.5}}
    assert BestModel.load(tmp_path, "frame_change") == BestModel("frame_change", 0.2, 0)
    assert BestModel.load(tmp_path, "other").value is None           # another reward's record is not this one's


@pytest.mark.parametrize("overrides, message", [
    (["run.keep_best=frame_change"], "run.keep_best=frame_change: needs a held-out evaluation to pick by"),
    (["run.keep_best=aesthetic", HELD_OUT], "run.keep_best=aesthetic: not a reward the evaluation scores "
                                            "(rewards: frame_change)"),
])
def test_keep_best_names_a_reward_the_evaluation_scores(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, *overrides)


def test_the_run_keeps_its_best_evaluated_model_and_a_resume_goes_on_from_it(tmp_path, monkeypatch):
    # The held-out score is the real evaluation's plus a bump per evaluation (the tiny model's own
    # score barely moves in five updates): the best is after 2 updates, then after 4 on resume.
    from flowdppo_video import trainer as trainer_module

    real, bumps = trainer_module.evaluate, iter([0.0, 0.1, 0.3, 0.2, 0.5, 0.4])

    def bumped(*args, **kwargs):
        out, traj = real(*args, **kwargs)
        out["eval/frame_change/mean"] += next(bumps)
        return out, traj

    monkeypatch.setattr(trainer_module, "evaluate", bumped)
    cfg = tiny_config(tmp_path, "run.iterations=3", "run.keep_checkpoints=10", "eval.every=1", "optim.lr=3e-3",
                      "run.keep_best=frame_change", HELD_OUT, *QUIET)
    rows = Trainer(cfg).run()
    run = tmp_path / "run"

    def check() -> dict:
        evals = read_metrics(run, "eval")
        scores = [e["eval/frame_change/mean"] for e in evals]
        top = max(scores)
        it = evals[scores.index(top)]["after_iterations"]      # the first of equal scores
        rec = json.loads((run / "best.json").read_text())
        assert (rec["value"], rec["iteration"]) == (pytest.approx(top), it)
        best = run / "checkpoints" / "best"
        if it == 0:
            assert rec["checkpoint"] is None and not best.exists()
        else:       # the same weights as that iteration's numbered checkpoint, and not among the numbered
            same = run / "checkpoints" / f"iter_{it:06d}" / "model"
            cmp = filecmp.dircmp(same, best / "model")
            assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
            assert json.loads((best / "meta.json").read_text())["next_iteration"] == it
            assert best not in list_checkpoints(run)
        return rec

    rec = check()
    assert rec["iteration"] == 2 and rec["checkpoint"].endswith("best")
    shown = summary_lines(run, rows, read_metrics(run, "eval"))
    assert any(ln.startswith(f"best by held-out frame_change: {rec['value']:.4f}") for ln in shown)

    resumed = tiny_config(tmp_path, "run.iterations=5", "run.keep_checkpoints=10", "eval.every=1", "optim.lr=3e-3",
                          "run.keep_best=frame_change", HELD_OUT, *QUIET)
    Trainer(resumed, resume=True).run()
    assert check()["iteration"] == 4
    assert len(read_metrics(run, "eval")) == 6

    # tools/run_record.py: the run as a record for the docs' data files, the kept model with it.
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import run_record
    finally:
        sys.path.remove(str(ROOT / "tools"))
    rec = run_record.record(run, None, None, None, None)
    assert [e["after_iterations"] for e in rec["evals"]] == list(range(6)) and len(rec["train_reward"]) == 5
    assert rec["evals"][2]["frame_change"] == pytest.approx(read_metrics(run, "eval")[2]["eval/frame_change/mean"])
    assert rec["best"]["iteration"] == 4 and rec["held_out_videos"] == len(load_prompts(HELD_OUT.split("=", 1)[1]))
