"""Every bad input gives one clear line naming the problem, and loses nothing written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowdppo_video import objectives
from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.trainer import Trainer, TrainingError

from .conftest import TINY_CONFIG, cli, rows, tiny_config, train


def fails_with(tmp_path, *overrides: str, config=TINY_CONFIG) -> str:
    proc = cli("train", "--config", str(config), f"run.output_dir={tmp_path / 'run'}", *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flowdppo-video: error: ")
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, expected", [
    (["model.init=null", "model.path=/nonexistent/wan"], "model.path /nonexistent/wan does not exist"),
    (["optim.lrr=1e-3"], "unknown config key optim.lrr (did you mean optim.lr?)"),
    (["rewards={no_such_reward: 1.0}"], "unknown reward 'no_such_reward'"),
    (["data.prompts=/nonexistent/prompts.txt"], "prompt file /nonexistent/prompts.txt"),
    (["video.height=36"], "video size 36x32 must be divisible by 16x16"),
    (["video.num_frames=8"], "video.num_frames=8 must be 4k+1"),
    (["sampler.kind=ddim"], "sampler.kind='ddim' is not one of"),
    (["run.sample_every=0"], "run.sample_every must be > 0, got 0"),
    (["sampler.sde_steps=9"], "sampler.sde_steps=9 exceeds the 5 candidate steps"),
    (["sampler.window=[0.6, 0.2]"], "sampler.window must satisfy 0 <= start < end <= 1"),
    (["optim.lr=[1"], "override 'optim.lr=[1': the value is not valid YAML"),
    (["objective.beta=-0.1"], "objective.beta must be >= 0"),
    (["model.init={transformer: 5}"], "model.init.transformer must be a mapping"),
    (["rewards={world_direction: 1.0}"], "reward 'world_direction' failed: ValueError: prompt"),
])
def test_cli_bad_input_one_line(tmp_path, overrides, expected):
    assert expected in fails_with(tmp_path, *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("sampler.eta=.nan", "sampler.eta must be a finite number, got nan"),
    ("optim.betas=[2, 3]", "optim.betas must be two numbers in [0, 1), got [2.0, 3.0]"),
    ("video.height=0", "video.height must be >= 1, got 0"),
])
def test_cli_config_values_are_refused_before_the_run_directory_exists(tmp_path, override, expected):
    assert expected in fails_with(tmp_path, override)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_refuses_a_second_config_and_a_non_run(tmp_path):
    proc = cli("train", "--resume", str(tmp_path), "--config", str(TINY_CONFIG), check=False)
    assert proc.returncode == 2 and "give --config or --resume, not both" in proc.stderr
    proc = cli("train", "--resume", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no config.yaml there (not a run directory)" in proc.stderr


def test_a_failing_reward_names_itself():
    import rewards

    @rewards.register("test_broken_reward")
    class Broken:
        def __call__(self, videos, prompts, *, fps):
            raise KeyError("boom")

    try:
        fns = rewards.build_rewards({"test_broken_reward": 1.0})
        with pytest.raises(rewards.RewardError, match=r"reward 'test_broken_reward' failed: KeyError"):
            rewards.score_videos(fns, torch.zeros(2, 3, 4, 4, 3, dtype=torch.uint8), ["a", "b"], fps=8.0)
    finally:
        rewards.REWARDS.pop("test_broken_reward")


@pytest.mark.slow
def test_empty_and_unreadable_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert f"prompt file {empty} holds no prompts" in fails_with(tmp_path, f"data.prompts={empty}")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80garbage")
    assert f"prompt file {binary} is unreadable" in fails_with(tmp_path, f"data.prompts={binary}")


@pytest.mark.slow
def test_not_a_diffusers_directory(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    assert "is not a diffusers checkpoint (no model_index.json)" in fails_with(
        tmp_path, "model.init=null", f"model.path={d}")


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    train(run, "run.iterations=1")
    before = (run / "metrics.jsonl").read_text()
    assert "already holds a run" in fails_with(tmp_path)
    assert (run / "metrics.jsonl").read_text() == before


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"optim.minibatch_size must be an integer"):
        load_config(TINY_CONFIG, ["optim.minibatch_size=two"])
    with pytest.raises(ConfigError, match=r"unknown config key sampler.etaa \(did you mean sampler.eta\?\)"):
        load_config(TINY_CONFIG, ["sampler.etaa=1"])
    with pytest.raises(ConfigError, match=r"unknown config key bogus"):
        load_config(TINY_CONFIG, ["bogus.x=1"])
    with pytest.raises(ConfigError, match=r"config file .*missing.yaml does not exist"):
        load_config("missing.yaml")
    assert load_config(TINY_CONFIG, ["optim.lr=1e-3"]).optim.lr == 1e-3   # YAML 1.1 "1e-3" is a number


def test_nonfinite_loss_is_skipped_counted_then_stops(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "run.iterations=3", "run.max_nonfinite_in_row=2", "optim.minibatch_size=4",
                      "optim.inner_epochs=1")
    trainer = Trainer(cfg)
    real = objectives.Objective.__call__
    state = {"poison": False}

    def maybe_nan(self, *a, **k):
        out = real(self, *a, **k)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if state["poison"] else out

    monkeypatch.setattr(objectives.Objective, "__call__", maybe_nan)
    weights = [p.detach().clone() for p in trainer.adapter.trainable_parameters()]
    # One clean iteration, written and checkpointed.
    trainer.cfg.run.iterations = 1
    trainer.run()
    written = (tmp_path / "run" / "metrics.jsonl").read_text()
    # Now every step is non-finite: the first is skipped (weights untouched), the second stops the run.
    state["poison"] = True
    trainer2 = Trainer(tiny_config(tmp_path, "run.iterations=3", "run.max_nonfinite_in_row=2",
                                   "optim.minibatch_size=4", "optim.inner_epochs=2"), resume=True)
    before = [p.detach().clone() for p in trainer2.adapter.trainable_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(weights, before))   # the clean step did train
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient in 2 optimizer steps in a row"):
        trainer2.run()
    after = [p.detach().clone() for p in trainer2.adapter.trainable_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))         # skipped steps changed nothing
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == written   # nothing written is lost
    assert rows(tmp_path / "run")[0]["nonfinite_skipped"] == 0


def test_nonfinite_skip_is_counted_in_metrics(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "run.iterations=1", "run.max_nonfinite_in_row=5", "optim.minibatch_size=2",
                      "optim.inner_epochs=1")
    real = objectives.Objective.__call__
    calls = {"n": 0}

    def first_nan(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if calls["n"] == 1 else out

    monkeypatch.setattr(objectives.Objective, "__call__", first_nan)
    row = Trainer(cfg).run()[0]
    assert row["nonfinite_skipped"] == 1
    assert row["loss"] == row["loss"]                                    # the other minibatch trained
