"""``flowdppo-video sample --prompts``: which prompts a selection picks (no model needed)."""

from __future__ import annotations

import pytest

from flowdppo_video.commands.cli import DEFAULT_RECIPE
from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.runs.data import load_prompts
from flowdppo_video.commands.sample import parse_indices, select_prompts


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEFAULT_RECIPE, [])


def test_indices():
    assert parse_indices("0-3,7", 10, "prompts") == [0, 1, 2, 3, 7]
    assert parse_indices("5,2,5,1-2", 10, "prompts") == [5, 2, 1]          # order kept, repeats once
    with pytest.raises(ConfigError, match="index 10 is past the 10 prompts"):
        parse_indices("8-10", 10, "prompts")
    with pytest.raises(ConfigError, match="runs backwards"):
        parse_indices("3-1", 10, "prompts")


def test_default_is_every_training_prompt(cfg):
    train = load_prompts(cfg.data.prompts)
    chosen, source = select_prompts(None, cfg)
    assert [p for _, p in chosen] == train and len(train) == 154
    assert source == "the run's training prompts"
    assert select_prompts("train", cfg)[0] == chosen


def test_subsets_of_either_set(cfg):
    train, heldout = load_prompts(cfg.data.prompts), load_prompts(cfg.eval.prompts)
    got, source = select_prompts("heldout:0-2,5", cfg)
    assert got == [(0, heldout[0]), (1, heldout[1]), (2, heldout[2]), (5, heldout[5])]
    assert source == "the run's held-out prompts 0-2,5"
    assert select_prompts("3,1", cfg)[0] == [(3, train[3]), (1, train[1])]   # bare indices: training prompts
    assert [p for _, p in select_prompts("heldout", cfg)[0]] == heldout


def test_a_prompt_file(cfg, tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("a red circle moves up slowly on black\n# a comment\na blue square moves left quickly on white\n")
    got, source = select_prompts(str(f), cfg)
    assert got == [(0, "a red circle moves up slowly on black"), (1, "a blue square moves left quickly on white")]
    assert source == f"prompt file {f}"


def test_bad_selections_name_the_problem(cfg):
    with pytest.raises(ConfigError, match="not a prompt file, nor train or heldout"):
        select_prompts("nonsense", cfg)
    with pytest.raises(ConfigError, match="index 200 is past the 38 held-out prompts"):
        select_prompts("heldout:200", cfg)
    no_eval = load_config(DEFAULT_RECIPE, ["eval.prompts=null"])
    with pytest.raises(ConfigError, match="no held-out prompts"):
        select_prompts("heldout", no_eval)
