"""run.keep_best: the model that scored a held-out reward highest so far, kept as checkpoints/best."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest

from flowdppo_video.reporting.run_summary import summary_lines
from flowdppo_video.runs.config import ConfigError
from flowdppo_video.runs.data import load_prompts
from flowdppo_video.trainer import Trainer
from flowdppo_video.training.best import BestModel
from flowdppo_video.training.checkpoint import list_checkpoints, verify_checkpoint
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

    # A record past the checkpoint a run resumes from names a cut-off future: dropped, said, and the
    # pick starts again from the base model's evaluation.
    best.record(tmp_path, 5, {"eval/frame_change/mean": 0.4}, None)
    again, note = BestModel.start(tmp_path, "frame_change", 4, [{"after_iterations": 0, "eval/frame_change/mean": 0.1}])
    assert note.startswith("best.json names the model after 5 iterations, past the checkpoint this run resumes from (4)")
    assert again == BestModel("frame_change", 0.1, 0) and json.loads((tmp_path / "best.json").read_text())["iteration"] == 0
    (tmp_path / "best.json").write_text("{not json")
    assert BestModel.start(tmp_path, "frame_change", 0, []) == (BestModel("frame_change"), None)


@pytest.mark.parametrize("overrides, message", [
    (["run.keep_best=frame_change"], "run.keep_best=frame_change: needs a held-out evaluation to pick by"),
    (["run.keep_best=aesthetic", HELD_OUT], "run.keep_best=aesthetic: not a reward the evaluation scores "
                                            "(rewards: frame_change)"),
])
def test_keep_best_names_a_reward_the_evaluation_scores(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, *overrides)


def bump_evaluations(monkeypatch, bumps: list[float]) -> None:
    """The held-out score is the real evaluation's plus the next bump (the tiny model's own score
    barely moves in a few updates), so the test sets where the best lies."""
    from flowdppo_video import trainer as trainer_module
    from flowdppo_video.training import evaluation

    real, left = evaluation.evaluate, iter(bumps)      # the real one, also when patched before

    def bumped(*args, **kwargs):
        out, traj = real(*args, **kwargs)
        out["eval/frame_change/mean"] += next(left)
        return out, traj

    monkeypatch.setattr(trainer_module, "evaluate", bumped)


def config(tmp_path, iterations: int, *more: str):
    return tiny_config(tmp_path, f"run.iterations={iterations}", "run.keep_checkpoints=10", "eval.every=1",
                       "run.keep_best=frame_change", HELD_OUT, *QUIET, *more)


def test_the_run_keeps_its_best_evaluated_model_and_a_resume_goes_on_from_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    best = run / "checkpoints" / "best"

    def record() -> dict:
        rec = json.loads((run / "best.json").read_text())
        evals = {e["after_iterations"]: e["eval/frame_change/mean"] for e in read_metrics(run, "eval")}
        assert rec["value"] == pytest.approx(evals[rec["iteration"]])
        if rec["iteration"]:
            assert rec["checkpoint"] == "checkpoints/best" and verify_checkpoint(best) is None
            assert json.loads((best / "meta.json").read_text())["next_iteration"] == rec["iteration"]
            assert best not in list_checkpoints(run)        # never resumed from, never pruned
        return rec

    # Checkpoints every 2 iterations: the best (after 1) has no numbered twin, so it is written.
    bump_evaluations(monkeypatch, [0.0, 0.3, 0.1, 0.2, 0.1])
    rows = Trainer(config(tmp_path, 4, "run.checkpoint_every=2")).run()
    assert record()["iteration"] == 1 and not (run / "checkpoints" / "iter_000001").exists()
    shown = summary_lines(run, rows, read_metrics(run, "eval"))
    assert any(ln.startswith("best by held-out frame_change: ") and ln.endswith(f"after 1 iterations ({best})")
               for ln in shown)

    # Resumed from iteration 4, with lower scores after: the record goes on, the model after 1 stays.
    bump_evaluations(monkeypatch, [0.25, 0.2])
    Trainer(config(tmp_path, 6, "run.checkpoint_every=2"), resume=True).run()
    assert record()["iteration"] == 1

    # A best folder that does not hold the recorded model (a write cut off): the pick starts again
    # from the base model, said in one line; the best after 7 is the checkpoint just written, linked.
    shutil.rmtree(best)
    bump_evaluations(monkeypatch, [0.9])
    Trainer(config(tmp_path, 7, "run.checkpoint_every=2"), resume=True).run()
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "run.keep_best" in ln]
    assert warned == ["flowdppo-video: warning: checkpoints/best does not hold the model best.json names (after 1 "
                      "iterations; a write was cut off): the pick of run.keep_best starts again"]
    assert record()["iteration"] == 7
    twin = run / "checkpoints" / "iter_000007"
    assert all((best / f.relative_to(twin)).samefile(f) for f in twin.rglob("*") if f.is_file())

    # tools/run_record.py: the run as a record for the docs' data files, the kept model with it.
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import run_record
    finally:
        sys.path.remove(str(ROOT / "tools"))
    rec = run_record.record(run, None, None, None, None)
    assert [e["after_iterations"] for e in rec["evals"]] == list(range(8)) and len(rec["train_reward"]) == 7
    assert rec["evals"][2]["frame_change"] == pytest.approx(read_metrics(run, "eval")[2]["eval/frame_change/mean"])
    assert rec["best"]["iteration"] == 7 and rec["held_out_videos"] == len(load_prompts(HELD_OUT.split("=", 1)[1]))


def test_the_base_model_can_stay_the_best_also_when_its_evaluation_was_copied_in(tmp_path, monkeypatch):
    """The frontier copies the shared base evaluation into a run before it starts: that evaluation
    counts, and a run that never beats it keeps no checkpoint."""
    bump_evaluations(monkeypatch, [0.0, -0.1, -0.2])
    trainer = Trainer(config(tmp_path, 2))
    trainer.evaluate(0)                        # eval.jsonl holds the base model's before run() starts
    rows = trainer.run()
    run = tmp_path / "run"
    rec = json.loads((run / "best.json").read_text())
    assert (rec["iteration"], rec["checkpoint"]) == (0, None) and not (run / "checkpoints" / "best").exists()
    assert len(read_metrics(run, "eval")) == 3
    assert any(ln.endswith("the base model: no evaluation beat it, no checkpoint kept")
               for ln in summary_lines(run, rows, read_metrics(run, "eval")))
