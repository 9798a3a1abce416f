"""Reward models for generated videos, registered by name.

A reward is a callable ``reward(videos, prompts) -> scores``: ``videos`` is ``(B, F, H, W, 3)``
uint8, ``prompts`` a list of ``B`` strings, ``scores`` a ``(B,)`` float tensor, or a dict of
``(B,)`` tensors holding at least ``"score"`` (the rest is logged). A config names rewards
with weights: ``rewards: {frame_change: 1.0}``.
"""

from __future__ import annotations

from .registry import REWARDS, RewardError, build_rewards, register, score_videos

from . import basic  # noqa: F401,E402  (registers the built-in rewards)
from . import world  # noqa: F401,E402

__all__ = ["REWARDS", "RewardError", "build_rewards", "register", "score_videos"]
