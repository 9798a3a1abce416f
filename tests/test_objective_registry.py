"""Objectives register themselves: one class and a registration add one, the config validates
against the registry, the trainer uses it, and the frontier tools read their arms from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from flowdppo_video import objectives
from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.objectives import OBJECTIVES, PolicyObjective, register_objective

ROOT = Path(__file__).resolve().parents[1]


class SignedLikelihood(PolicyObjective):
    """A user's objective: plain ``-A * log pi`` (REINFORCE on the token log-probs), with a
    ``scale`` option of its own and a knob that freezes terms whose |log-ratio| passes it."""

    knob = "delta"
    variants = {"reinforce": {}}
    calls = 0

    @classmethod
    def check(cls, section: Any) -> None:
        if section.options.get("scale", 1.0) <= 0:
            raise ValueError(f"objective.options.scale must be > 0, got {section.options['scale']}")

    def evaluate(self, logp_new, logp_old, kl, advantages):
        type(self).calls += 1
        frozen = (logp_new - logp_old).detach().abs() > self.section.delta
        terms = -advantages[:, None] * logp_new * self.section.options.get("scale", 1.0)
        loss = torch.where(frozen, torch.zeros_like(terms), terms).mean()
        return loss, {"kl_mean": kl.detach().mean()}, frozen


@pytest.fixture
def registered():
    register_objective("reinforce")(SignedLikelihood)
    SignedLikelihood.calls = 0
    yield SignedLikelihood
    OBJECTIVES.pop("reinforce")


def test_the_config_validates_against_the_registry(registered, tmp_path):
    with pytest.raises(ConfigError, match="objective.kind='nope' is not one of flow_dppo, grpo_clip, reinforce"):
        load_config(ROOT / "configs/wan_tiny.yaml", ["objective.kind=nope"])
    with pytest.raises(ConfigError, match="objective.options.scale must be > 0"):
        load_config(ROOT / "configs/wan_tiny.yaml", ["objective.kind=reinforce", "objective.options={scale: -1}"])
    with pytest.raises(ConfigError, match="objective.granularity='cell' is not one of"):
        load_config(ROOT / "configs/wan_tiny.yaml", ["objective.granularity=cell"])
    with pytest.raises(ValueError, match="already registered"):
        register_objective("flow_dppo")(SignedLikelihood)
    with pytest.raises(TypeError, match="not a PolicyObjective"):
        register_objective("other")(dict)


def test_a_user_objective_trains_and_reports_its_frozen_terms(registered, tmp_path):
    from flowdppo_video.trainer import Trainer

    cfg = load_config(ROOT / "configs/wan_tiny.yaml", [
        f"run.output_dir={tmp_path / 'run'}", "run.iterations=1", "run.sample_every=100", "run.progress=false",
        "objective.kind=reinforce", "objective.delta=1e-9", "objective.options={scale: 2.0}"])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.adapter.transformer.state_dict().items() if "lora" in k}
    try:
        rows = trainer.run()
    finally:
        trainer.close()
    assert registered.calls > 0
    after = trainer.adapter.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)          # it trained
    # The counts the trainer pools come from the frozen mask when an objective gives none: with a
    # 1e-9 knob every term after the first minibatch step is past it.
    assert 0.0 < rows[-1]["mask/drop_frac"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["iteration"] == 0


def test_the_frontier_and_calibration_tools_read_their_arms_from_the_registry(registered, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools" / "bench"))
    for name in ("algorithms", "calibrate_trust_region"):
        sys.modules.pop(name, None)
    import algorithms
    import calibrate_trust_region

    assert algorithms.ARMS["reinforce"][:2] == (["objective.kind=reinforce"], "objective.delta")
    assert algorithms.ARMS["row"][0] == ["objective.kind=flow_dppo", "objective.granularity=row"]
    assert calibrate_trust_region.GRID["reinforce"] == ("delta", [])
    assert calibrate_trust_region.SETTINGS["flow_dppo (row_gated)"] == {"kind": "flow_dppo", "granularity": "row_gated"}
    for name in ("algorithms", "calibrate_trust_region"):
        sys.modules.pop(name, None)


def test_the_builtin_objectives_are_the_registry_and_the_old_name_still_builds_one():
    assert OBJECTIVES["flow_dppo"].variants == {g: {"granularity": g} for g in objectives.GRANULARITIES}
    assert OBJECTIVES["grpo_clip"].knob == "clip_range"
    cfg = load_config(ROOT / "configs/wan_tiny.yaml", [])
    built = objectives.Objective.from_config(cfg.objective, 16)
    assert isinstance(built, objectives.FlowDPPO)
