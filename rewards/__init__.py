"""Reward models for generated videos, registered by name.

A reward is a callable ``reward(videos, prompts, fps=fps) -> scores``: ``videos`` is
``(B, F, H, W, 3)`` uint8, ``prompts`` a list of ``B`` strings, ``fps`` the videos' real frame
rate (a required keyword: training passes ``video.fps``, ``score`` each file's own rate, the
reward server the one on the wire), ``scores`` a ``(B,)`` float tensor, or a dict of ``(B,)``
tensors holding at least ``"score"`` (the rest is logged). A reward that judges sound also takes
``audio=`` (a :class:`rewards.registry.Audio`, the waveforms and their sample rate; None for
silent videos); the others are called without it. A config names rewards
with weights, ``rewards: {frame_change: 1.0}``, or with options,
``rewards: {align: {type: vlm_judge, weight: 0.5, retries: 2, model: /ckpt/qwen2-vl}}``
(see :class:`rewards.registry.RewardSpec`).
"""

from __future__ import annotations

from .registry import (REWARDS, Audio, RewardError, RewardInputError, RewardSpec, build_rewards, parse_reward_specs,
                       register, reward_weights, score_videos, takes_audio)

from . import basic  # noqa: F401,E402  (registers the built-in rewards)
from . import world  # noqa: F401,E402
from . import latent_checks  # noqa: F401,E402  (the latent world's checkers)
from . import vlm  # noqa: F401,E402  (VLM judges; transformers is imported when one is built)
from . import clip  # noqa: F401,E402
from . import clap  # noqa: F401,E402  (text-audio alignment of the videos' sound; transformers imported when built)
from . import remote  # noqa: F401,E402  (the client of rewards.server)
from . import motion  # noqa: F401,E402
from . import videoalign  # noqa: F401,E402  (VideoAlign VideoReward; transformers imported when built)
from . import hpsv3  # noqa: F401,E402  (HPSv3 over sampled frames; transformers imported when built)
from . import artifacts  # noqa: F401,E402  (artifact monitors: patch grid, exposure, flicker, frozen frames)

__all__ = ["REWARDS", "Audio", "RewardError", "RewardSpec", "build_rewards", "parse_reward_specs", "register", "reward_weights",
           "score_videos", "takes_audio"]
