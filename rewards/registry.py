"""The reward registry and the call that scores a batch with every configured reward."""

from __future__ import annotations

import difflib
from typing import Callable, Protocol

import torch


class RewardError(ValueError):
    """A reward that cannot be built or returned unusable scores; one line naming it."""


class Reward(Protocol):
    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        ...


REWARDS: dict[str, Callable[[], Reward]] = {}


def register(name: str) -> Callable[[Callable[[], Reward]], Callable[[], Reward]]:
    """Class or factory decorator: ``@register("frame_change")``."""
    def deco(factory: Callable[[], Reward]) -> Callable[[], Reward]:
        if name in REWARDS:
            raise RewardError(f"reward {name!r} is registered twice")
        REWARDS[name] = factory
        return factory
    return deco


def build_rewards(weights: dict[str, float]) -> dict[str, Reward]:
    """Instantiate each named reward; an unknown name is an error naming the known ones."""
    out = {}
    for name in weights:
        if name not in REWARDS:
            near = difflib.get_close_matches(name, list(REWARDS), n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise RewardError(f"unknown reward {name!r} in rewards: {hint}known: {', '.join(sorted(REWARDS))}")
        out[name] = REWARDS[name]()
    return out


def score_videos(rewards: dict[str, Reward], videos: torch.Tensor, prompts: list[str]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Score ``(B, F, H, W, 3)`` uint8 videos with every reward.

    Returns ``(scores, extras)``: ``scores[name]`` ``(B,)`` float32; ``extras["name/key"]`` the
    other entries of rewards that return dicts. A wrong shape or a non-finite score is an error,
    never a silent default.
    """
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != torch.uint8:
        raise RewardError(f"videos must be (B, F, H, W, 3) uint8, got {tuple(videos.shape)} {videos.dtype}")
    b = videos.shape[0]
    scores, extras = {}, {}
    for name, fn in rewards.items():
        try:
            out = fn(videos, prompts)
        except RewardError:
            raise
        except Exception as e:  # a reward that fails stops the iteration, never a silent default
            raise RewardError(f"reward {name!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              ) from e
        if isinstance(out, dict):
            if "score" not in out:
                raise RewardError(f"reward {name!r} returned a dict without 'score'")
            extras.update({f"{name}/{k}": torch.as_tensor(v).float() for k, v in out.items() if k != "score"})
            out = out["score"]
        s = torch.as_tensor(out).float().reshape(-1)
        if s.shape != (b,):
            raise RewardError(f"reward {name!r} returned shape {tuple(s.shape)} for {b} videos")
        if not torch.isfinite(s).all():
            raise RewardError(f"reward {name!r} returned non-finite scores")
        scores[name] = s
    return scores, extras
