"""What a trust region does is logged where it can act: in the off-policy minibatches.

The first minibatch of an iteration replays the rollout policy (ratio 1, KL 0), so nothing is
ever frozen there; pooled over every minibatch, the frozen share hides what the mask does. The
trainer logs the share over the minibatches after the iteration's first optimizer step, and per
inner epoch, beside the pooled one.
"""

from __future__ import annotations

import math

import pytest

from flowdppo_video.training.policy_update import nan_max as _nan_max
from flowdppo_video.trainer import Trainer

from .conftest import tiny_config


@pytest.mark.parametrize("kind", ["flow_dppo", "grpo_clip"])
def test_off_policy_and_per_epoch_frozen_shares(tmp_path, kind):
    # One minibatch per epoch (4 videos), three epochs; delta = 0 freezes every pushing term that
    # moved at all, a tiny clip range clips every row that moved.
    cfg = tiny_config(tmp_path, "run.iterations=1", "optim.minibatch_size=4", "optim.inner_epochs=3",
                      f"objective.kind={kind}", "objective.delta=0.0", "objective.clip_range=1e-9",
                      "optim.lr=1e-2")
    row = Trainer(cfg).run()[0]
    by_epoch = row["mask/drop_frac_by_epoch"]
    assert len(by_epoch) == 3
    assert by_epoch[0] == 0.0                       # the on-policy minibatch: nothing to freeze
    assert by_epoch[1] > 0.0 and by_epoch[2] > 0.0  # after a step the policy has moved
    # Equal numbers of terms per epoch: the off-policy share is the mean of epochs 2-3, the
    # pooled share the mean of all three (so it is diluted by the first, on-policy one).
    assert row["mask/offpolicy_drop_frac"] == pytest.approx((by_epoch[1] + by_epoch[2]) / 2, rel=1e-6)
    assert row["mask/drop_frac"] == pytest.approx(sum(by_epoch) / 3, rel=1e-6)
    assert row["mask/offpolicy_drop_frac"] > row["mask/drop_frac"]
    for side in ("pos", "neg"):
        assert 0.0 <= row[f"mask/offpolicy_drop_frac_{side}"] <= 1.0


def test_a_nan_log_ratio_is_not_hidden_by_max():
    assert math.isnan(_nan_max(0.0, math.nan)) and math.isnan(_nan_max(math.nan, 1.0))
    assert _nan_max(0.5, 0.25) == 0.5
