"""Group-relative advantages and multi-reward aggregation (SPEC section 4).

A batch of ``B = P * G`` videos holds ``P`` prompts, each sampled ``G`` times, grouped
contiguously: video ``b`` belongs to group ``b // G``.
"""

from __future__ import annotations

import torch

STD_MODES = ("group", "batch")
AGGREGATIONS = ("sum", "gdpo")
_EPS = 1e-4


def _groups(r: torch.Tensor, group_size: int) -> torch.Tensor:
    if r.ndim != 1:
        raise ValueError(f"rewards must be (B,), got shape {tuple(r.shape)}")
    if group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"batch of {r.shape[0]} rewards is not a whole number of groups of {group_size}")
    return r.double().view(-1, group_size)


def group_normalize(rewards: torch.Tensor, group_size: int, std: str = "group") -> torch.Tensor:
    """``(r_b - mean_group) / (std + 1e-4)``, std of the group or of the whole batch. ``(B,)``."""
    if std not in STD_MODES:
        raise ValueError(f"advantages.std must be one of {STD_MODES}, got {std!r}")
    g = _groups(rewards, group_size)
    centered = g - g.mean(dim=1, keepdim=True)
    scale = g.std(dim=1, unbiased=False, keepdim=True) if std == "group" else g.std(unbiased=False)
    return (centered / (scale + _EPS)).reshape(-1)


def compute_advantages(rewards: dict[str, torch.Tensor], weights: dict[str, float], group_size: int,
                       aggregation: str = "sum", std: str = "group", clip: float = 5.0
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages ``(B,)`` float32 from one or several ``(B,)`` rewards.

    ``sum``: weighted sum of raw rewards, then group-normalised. ``gdpo``: each reward
    normalised within its group, weighted and summed, then normalised over the batch.
    Both clipped to ``[-clip, clip]``. A group without signal (``sum``: equal totals; ``gdpo``:
    every reward constant in the group) gets zero advantage and is counted.

    Returns ``(advantages, stats)`` with ``zero_std_groups`` (count) and ``groups``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"advantages.aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    missing = set(weights) - set(rewards)
    if missing:
        raise ValueError(f"no scores for rewards {sorted(missing)}")
    names = list(weights)
    total = sum(weights[n] * rewards[n].double() for n in names)
    if aggregation == "sum":
        adv = group_normalize(total, group_size, std)
    else:
        per = sum(weights[n] * group_normalize(rewards[n], group_size, "group") for n in names)
        adv = (per - per.mean()) / (per.std(unbiased=False) + _EPS)
    # A group with no signal gets zero; batch-wide steps must not invent one. For a weighted
    # sum that is a constant total; GDPO normalises each reward alone, so only a group where
    # every reward is constant is silent.
    def constant(r: torch.Tensor) -> torch.Tensor:
        g = _groups(r, group_size)
        return g.max(dim=1).values - g.min(dim=1).values == 0

    if aggregation == "sum":
        equal = constant(total)
    else:
        equal = torch.stack([constant(rewards[n]) for n in names]).all(dim=0)
    adv = adv.view(-1, group_size).masked_fill(equal[:, None], 0.0).reshape(-1)
    adv = adv.clamp(-clip, clip).float()
    return adv, {"zero_std_groups": float(equal.sum().item()), "groups": float(equal.numel())}
