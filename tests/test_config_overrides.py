"""Dotted overrides set the leaf they name; a whole ``rewards`` mapping replaces the recipe's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from flowdppo_video.runs.config import ConfigError, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]

RECIPE = {"rewards": {"world_direction": 1.0, "videoalign": {"weight": 1.0, "model": "/a", "score": "VQ+MQ"}},
          "model": {"family": "wan", "lora": {"rank": 8, "alpha": 16}}, "run": {"seed": 0}}


def test_a_dotted_override_inside_rewards_keeps_the_other_rewards_and_options():
    before = copy.deepcopy(RECIPE)
    out = apply_overrides(RECIPE, ["rewards.videoalign.model=/b", "rewards.world_direction=0.5"])
    assert out["rewards"] == {"world_direction": 0.5, "videoalign": {"weight": 1.0, "model": "/b", "score": "VQ+MQ"}}
    assert RECIPE == before                                      # the recipe's tree is not modified


def test_a_whole_rewards_mapping_replaces_and_other_mappings_merge():
    out = apply_overrides(RECIPE, ["rewards={world_colour: 1.0}", "model={lora: {rank: 4}}"])
    assert out["rewards"] == {"world_colour": 1.0}
    assert out["model"] == {"family": "wan", "lora": {"rank": 4, "alpha": 16}}


def test_overrides_apply_in_order_and_errors_stay_one_config_error():
    assert apply_overrides(RECIPE, ["run.seed=1", "run.seed=2"])["run"] == {"seed": 2}
    with pytest.raises(ConfigError, match="not key.sub=value"):
        apply_overrides(RECIPE, ["run.seed"])
    with pytest.raises(ConfigError, match="override run.seed.x: seed is not a section"):
        apply_overrides(RECIPE, ["run.seed.x=1"])


def test_load_config_sets_one_eval_reward_weight():
    cfg = load_config(ROOT / "flowdppo_video" / "recipes" / "default.yaml", ["eval.rewards.world_colour=0.5"])
    assert cfg.eval.rewards["world_colour"] == 0.5 and cfg.eval.rewards["world_direction"] == 1.0
    assert len(cfg.eval.rewards) == 5
