"""Reward entries in a config: weights, options, types, retries, and their errors."""

from __future__ import annotations

import pytest
import torch

import rewards
from rewards.registry import REWARDS, RewardError, parse_reward_specs, register, reward_weights


class _Flaky:
    """Fails its first ``fail_times`` calls, then scores every video ``value``."""

    default_retries = 2

    def __init__(self, value: float = 0.5, fail_times: int = 0) -> None:
        self.value, self.fail_times, self.calls = value, fail_times, 0

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.fail_times:
            raise ConnectionError(f"judge unreachable (call {self.calls})")
        return torch.full((videos.shape[0],), self.value)


@pytest.fixture(scope="module", autouse=True)
def _flaky_registered():
    register("test_flaky")(_Flaky)
    yield
    REWARDS.pop("test_flaky")


VIDEOS = torch.zeros(2, 3, 4, 4, 3, dtype=torch.uint8)


def test_weights_and_mappings_parse() -> None:
    specs = parse_reward_specs({"frame_change": 0.5, "judge": {"type": "test_flaky", "weight": 2, "value": 0.25}})
    assert specs["frame_change"].type == "frame_change" and specs["frame_change"].weight == 0.5
    assert specs["judge"].type == "test_flaky" and specs["judge"].options == {"value": 0.25}
    assert reward_weights({"a": 1, "b": {"weight": 3.0}}) == {"a": 1.0, "b": 3.0}


def test_two_instances_of_one_type_with_their_own_options() -> None:
    built = rewards.build_rewards({"x": {"type": "test_flaky", "value": 0.1}, "y": {"type": "test_flaky", "value": 0.9}})
    scores, _ = rewards.score_videos(built, VIDEOS, ["p", "q"], fps=8.0)
    assert torch.allclose(scores["x"], torch.full((2,), 0.1)) and torch.allclose(scores["y"], torch.full((2,), 0.9))


def test_retry_then_success_and_retry_then_failure() -> None:
    ok = rewards.build_rewards({"j": {"type": "test_flaky", "fail_times": 2}})   # class default: 2 retries
    scores, _ = rewards.score_videos(ok, VIDEOS, ["p", "q"], fps=8.0)
    assert ok["j"].calls == 3 and torch.allclose(scores["j"], torch.full((2,), 0.5))
    bad = rewards.build_rewards({"j": {"type": "test_flaky", "fail_times": 5, "retries": 1}})
    with pytest.raises(RewardError, match=r"reward 'j' failed after 2 attempts: ConnectionError: judge unreachable"):
        rewards.score_videos(bad, VIDEOS, ["p", "q"], fps=8.0)
    assert bad["j"].calls == 2


@pytest.mark.parametrize("entries, message", [
    ({"frame_change": "high"}, r"rewards\.frame_change must be a weight"),
    ({"frame_change": {"weight": "x"}}, r"rewards\.frame_change\.weight must be a number"),
    ({"frame_change": {"retries": -1}}, r"rewards\.frame_change\.retries must be an integer >= 0"),
    ({"judge": {"type": "test_flakey"}}, r"unknown reward 'test_flakey' in rewards\.judge: did you mean test_flaky\?"),
    ({"judge": {"type": "test_flaky", "colour": 1}}, r"rewards\.judge: reward 'test_flaky' takes options \['value', 'fail_times'\]"),
    ({"frame_change": {"scale": 2}}, r"rewards\.frame_change: reward 'frame_change' takes options none"),
])
def test_bad_entries_name_the_key(entries, message) -> None:
    with pytest.raises(RewardError, match=message):
        rewards.build_rewards(entries)


@pytest.mark.parametrize("device, local_rank, want", [
    ("cuda", "3", "cuda:3"), ("auto", "3", "cuda:3"), ("cuda:1", "3", "cuda:1"), ("cuda", None, "cuda:0"),
    ("cpu", "3", "cpu")])
def test_reward_models_land_on_this_ranks_gpu(monkeypatch, device, local_rank, want) -> None:
    """Issue 28, item 3: rewards are built before the trainer sets the current device; a bare
    ``cuda`` (the models' ``.to(device)``) put every rank's reward model on cuda:0."""
    from rewards.common import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # the double of a GPU host
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert resolve_device(device) == torch.device(want)


def test_a_bad_local_rank_is_one_line(monkeypatch) -> None:
    from rewards.common import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(RewardError, match="LOCAL_RANK='x' is not an integer"):
        resolve_device("cuda")
