"""The reward registry and the call that scores a batch with every configured reward."""

from __future__ import annotations

import difflib
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch


class RewardError(ValueError):
    """A reward that cannot be built or returned unusable scores; one line naming it."""


class RewardInputError(RewardError):
    """A reward refused the videos or prompts it was given (a ``ValueError`` it raised: a prompt it
    cannot parse, too few frames, too small a frame): the caller's error, never retried. The
    reward server answers it with 422."""


class Reward(Protocol):
    """``reward(videos, prompts, fps=fps)``: ``(B, F, H, W, 3)`` uint8 videos, ``B`` prompts and the
    videos' real frame rate (a required keyword: a reward never guesses it) -> ``(B,)`` scores or a
    dict of ``(B,)`` tensors holding ``"score"``."""

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float
                 ) -> torch.Tensor | dict[str, torch.Tensor]:
        ...


@dataclass(frozen=True)
class Audio:
    """The sound of a batch of videos: ``waveforms`` ``(B, C, T)`` float32 in ``[-1, 1]`` (``C`` 1 or
    2 channels) at ``sample_rate`` samples per second. A reward that wants it takes an ``audio``
    keyword (``reward(videos, prompts, fps=fps, audio=audio)``; None when the videos have no sound);
    the others are called as before."""

    waveforms: torch.Tensor
    sample_rate: int

    def __post_init__(self) -> None:
        w = self.waveforms
        if not isinstance(w, torch.Tensor) or w.ndim != 3 or w.shape[1] not in (1, 2) or not w.is_floating_point():
            raise RewardError(f"audio waveforms must be (B, C, T) float with 1 or 2 channels, got "
                              f"{tuple(getattr(w, 'shape', ()))}")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) or self.sample_rate <= 0:
            raise RewardError(f"audio sample_rate must be an integer > 0, got {self.sample_rate!r}")

    def rows(self, index: slice | list[int]) -> "Audio":
        return Audio(self.waveforms[index], self.sample_rate)


def takes_audio(fn: Any) -> bool:
    """Whether a reward asks for the sound (its call has an ``audio`` parameter)."""
    try:
        return "audio" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


REWARDS: dict[str, Callable[..., Reward]] = {}


@dataclass(frozen=True)
class RewardSpec:
    """One configured reward: ``rewards: {name: weight}`` or ``rewards: {name: {weight: w, ...}}``.

    ``type`` is the registered reward to build (default: the entry's name, so two VLM judges
    can be ``align: {type: vlm_judge, ...}`` and ``motion: {type: vlm_judge, ...}``);
    ``retries`` how many times a failing call is retried before the iteration fails (never a
    silent default score; default: the reward class's ``default_retries``, else 0, as a local
    reward that failed once fails again); every other key is passed to the reward's constructor.
    """

    name: str
    type: str
    weight: float
    retries: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


def parse_reward_specs(entries: Mapping[str, Any], key: str = "rewards") -> dict[str, RewardSpec]:
    """Validate a config's reward mapping; errors name ``key.<name>`` and the problem."""
    if not isinstance(entries, Mapping):
        raise RewardError(f"{key} must be a mapping of reward name to weight, got {type(entries).__name__}")
    specs = {}
    for name, entry in entries.items():
        where = f"{key}.{name}"
        if isinstance(entry, bool) or not isinstance(entry, (int, float, Mapping)):
            raise RewardError(f"{where} must be a weight (number) or a mapping with 'weight', got {entry!r}")
        opts = dict(entry) if isinstance(entry, Mapping) else {"weight": entry}
        weight, rtype, retries = opts.pop("weight", 1.0), opts.pop("type", name), opts.pop("retries", None)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RewardError(f"{where}.weight must be a number, got {weight!r}")
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            raise RewardError(f"{where}.retries must be an integer >= 0, got {retries!r}")
        if not isinstance(rtype, str):
            raise RewardError(f"{where}.type must be a registered reward name, got {rtype!r}")
        specs[str(name)] = RewardSpec(str(name), rtype, float(weight), retries, opts)
    return specs


def reward_weights(entries: Mapping[str, Any]) -> dict[str, float]:
    """``{name: weight}`` of a config's reward mapping."""
    return {n: s.weight for n, s in parse_reward_specs(entries).items()}


def register(name: str) -> Callable[[Callable[[], Reward]], Callable[[], Reward]]:
    """Class or factory decorator: ``@register("frame_change")``."""
    def deco(factory: Callable[[], Reward]) -> Callable[[], Reward]:
        if name in REWARDS:
            raise RewardError(f"reward {name!r} is registered twice")
        REWARDS[name] = factory
        return factory
    return deco


def build_rewards(entries: Mapping[str, Any], key: str = "rewards") -> dict[str, Reward]:
    """Instantiate each configured reward (see :class:`RewardSpec`); an unknown type or option is
    an error naming the entry and what is known."""
    out: dict[str, Reward] = {}
    for name, spec in parse_reward_specs(entries, key).items():
        if spec.type not in REWARDS:
            near = difflib.get_close_matches(spec.type, list(REWARDS), n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise RewardError(f"unknown reward {spec.type!r} in {key}.{name}: {hint}known: {', '.join(sorted(REWARDS))}")
        factory = REWARDS[spec.type]
        try:
            inspect.signature(factory).bind(**spec.options)
        except TypeError:
            params = [p for p in inspect.signature(factory).parameters if p != "self"]
            # fps was an option of the motion rewards and judges; now every call carries the real one
            hint = (" (fps is not an option: rewards receive the videos' real frame rate, video.fps in "
                    "training, each file's own in score)" if "fps" in spec.options and "fps" not in params else "")
            raise RewardError(f"{key}.{name}: reward {spec.type!r} takes options {params or 'none'}, "
                              f"got {sorted(spec.options)}{hint}") from None
        except ValueError:  # builtins without a signature: let the call decide
            pass
        try:
            reward = factory(**spec.options)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"{key}.{name}: building reward {spec.type!r} failed: {type(e).__name__}: "
                              f"{_first_line(e)}") from e
        retries = spec.retries if spec.retries is not None else getattr(factory, "default_retries", 0)
        setattr(reward, "_flowdppo_retries", retries)
        out[name] = reward
    return out


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def check_fps(fps: Any, where: str = "fps") -> float:
    """``fps`` as a float if it is a finite number > 0 (frames per second), else a :class:`RewardError`."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise RewardError(f"{where} must be the videos' frame rate, a number > 0, got {fps!r}")
    return float(fps)


def score_videos(rewards: dict[str, Reward], videos: torch.Tensor, prompts: list[str], *, fps: float,
                 audio: Audio | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Score ``(B, F, H, W, 3)`` uint8 videos, shown at ``fps`` frames per second, with every reward;
    ``audio``: their sound (:class:`Audio`), handed to the rewards that take it.

    Returns ``(scores, extras)``: ``scores[name]`` ``(B,)`` float32; ``extras["name/key"]`` the
    other entries of rewards that return dicts. A wrong shape or a non-finite score is an error,
    never a silent default.
    """
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != torch.uint8:
        raise RewardError(f"videos must be (B, F, H, W, 3) uint8, got {tuple(videos.shape)} {videos.dtype}")
    fps = check_fps(fps)
    b = videos.shape[0]
    if audio is not None and audio.waveforms.shape[0] != b:
        raise RewardError(f"audio has {audio.waveforms.shape[0]} waveforms for {b} videos")
    scores, extras = {}, {}
    for name, fn in rewards.items():
        out = _call_with_retries(name, fn, videos, prompts, fps, audio)
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


def _call_with_retries(name: str, fn: Reward, videos: torch.Tensor, prompts: list[str], fps: float,
                       audio: Audio | None = None) -> Any:
    """Call a reward; on an exception retry ``retries`` times (a remote judge may time out once),
    then fail the iteration with the last error: a failed reward is never a silent default."""
    retries = int(getattr(fn, "_flowdppo_retries", 0))
    extra = {"audio": audio} if takes_audio(fn) else {}       # a reward without sound is called as always
    for attempt in range(retries + 1):
        try:
            return fn(videos, prompts, fps=fps, **extra)
        except RewardError as e:
            err: BaseException = e
        except ValueError as e:     # the input's fault: the same input fails again, and it is the caller's
            raise RewardInputError(f"reward {name!r} failed: {type(e).__name__}: {_first_line(e)}") from e
        except Exception as e:
            err = e
        if attempt < retries:
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
    tries = f" after {retries + 1} attempts" if retries else ""
    if isinstance(err, RewardInputError):
        raise RewardInputError(f"reward {name!r} failed{tries}: {_first_line(err)}") from err
    if isinstance(err, RewardError):
        raise RewardError(f"reward {name!r} failed{tries}: {_first_line(err)}") from err
    raise RewardError(f"reward {name!r} failed{tries}: {type(err).__name__}: {_first_line(err)}") from err
