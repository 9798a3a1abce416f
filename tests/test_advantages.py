"""Tests for flowdppo_video.advantages (SPEC section 4), numbers computed by hand.

A_b = clip((r_b - mean_group) / (std + 1e-4), -A_max, A_max), std the population std of the
group (or of the whole batch). GDPO: normalise each reward within its group, weight, sum,
then (x - mean) / (std + 1e-4) over the batch (population std).
"""

from __future__ import annotations

import math

import pytest
import torch

from flowdppo_video.advantages import compute_advantages, group_normalize

EPS = 1e-4


def _pop_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _assert_close(actual: torch.Tensor, expected: list[float], rel=1e-6, abs_=1e-7):
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected):
        assert a == pytest.approx(e, rel=rel, abs=abs_)


def test_group_normalize_by_hand_pairs():
    # Groups [1, 2] and [3, 4]: mean 1.5 / 3.5, population std 0.5 (sample std would be 0.707).
    out = group_normalize(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2)
    c = 0.5 / (0.5 + EPS)
    _assert_close(out, [-c, c, -c, c], rel=1e-12)


def test_group_normalize_by_hand_group_of_four():
    # [1, 2, 4, 9]: mean 4, deviations [-3, -2, 0, 5], population variance 38/4 = 9.5.
    r = [1.0, 2.0, 4.0, 9.0, 0.0, 0.0, 1.0, 1.0]
    out = group_normalize(torch.tensor(r), 4)
    s1 = math.sqrt(9.5) + EPS
    s2 = 0.5 + EPS  # [0, 0, 1, 1]: mean 0.5, std 0.5
    _assert_close(out, [-3 / s1, -2 / s1, 0.0, 5 / s1, -0.5 / s2, -0.5 / s2, 0.5 / s2, 0.5 / s2], rel=1e-12)


def test_compute_advantages_single_reward_matches_group_formula():
    r = torch.tensor([0.2, 0.9, 0.4, 0.7, 0.1, 0.3])
    adv, stats = compute_advantages({"r": r}, {"r": 1.0}, group_size=3)
    assert adv.dtype == torch.float32 and adv.shape == (6,)
    expected = []
    vals = [float(x) for x in r]  # the float32 values, as python floats
    for g in range(2):
        grp = vals[3 * g:3 * g + 3]
        m, s = sum(grp) / 3, _pop_std(grp)
        expected += [(x - m) / (s + EPS) for x in grp]
    _assert_close(adv, expected, rel=1e-6)
    assert stats == {"zero_std_groups": 0.0, "groups": 2.0}
    # Within each group the advantages are centred.
    assert abs(float(adv[:3].sum())) < 1e-6 and abs(float(adv[3:].sum())) < 1e-6


def test_batch_std_option_uses_batch_population_std():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # Centred by the group mean, scaled by the batch std sqrt(1.25) (mean 2.5).
    s = math.sqrt(1.25) + EPS
    _assert_close(group_normalize(r, 2, std="batch"), [-0.5 / s, 0.5 / s, -0.5 / s, 0.5 / s], rel=1e-12)
    adv, _ = compute_advantages({"r": r}, {"r": 1.0}, group_size=2, std="batch")
    _assert_close(adv, [-0.5 / s, 0.5 / s, -0.5 / s, 0.5 / s], rel=1e-6)
    # It differs from the group std.
    adv_group, _ = compute_advantages({"r": r}, {"r": 1.0}, group_size=2, std="group")
    assert float(adv_group[1]) == pytest.approx(0.5 / 0.5001, rel=1e-6)
    assert float(adv[1]) != pytest.approx(float(adv_group[1]), rel=1e-3)


def test_unknown_std_mode_raises():
    with pytest.raises(ValueError, match="std"):
        group_normalize(torch.tensor([1.0, 2.0]), 2, std="global")


def test_advantages_clipped_at_a_max():
    # One success in ten: mean 0.1, population std 0.3 -> A = 0.9/0.3001 = 2.999 and -0.1/0.3001.
    r = torch.tensor([0.0] * 9 + [1.0])
    high, low = 0.9 / (0.3 + EPS), -0.1 / (0.3 + EPS)
    adv_unclipped, _ = compute_advantages({"r": r}, {"r": 1.0}, group_size=10, clip=5.0)
    _assert_close(adv_unclipped, [low] * 9 + [high], rel=1e-6)
    adv, _ = compute_advantages({"r": r}, {"r": 1.0}, group_size=10, clip=2.0)
    _assert_close(adv, [low] * 9 + [2.0], rel=1e-6)
    # And symmetric on the negative side.
    adv_neg, _ = compute_advantages({"r": -r}, {"r": 1.0}, group_size=10, clip=2.0)
    _assert_close(adv_neg, [-low] * 9 + [-2.0], rel=1e-6)
    assert float(adv_neg.min()) == -2.0


def test_default_clip_is_five():
    # One success in 50: A = 0.98 / sqrt(0.0196) = 7 > 5.
    r = torch.tensor([0.0] * 49 + [1.0])
    adv, _ = compute_advantages({"r": r}, {"r": 1.0}, group_size=50)
    assert float(adv[-1]) == 5.0


@pytest.mark.parametrize("std", ["group", "batch"])
@pytest.mark.parametrize("aggregation", ["sum", "gdpo"])
def test_all_equal_group_gets_exactly_zero_and_is_counted(std, aggregation):
    # 0.1 is not exact in binary: the group mean may round, the advantage must still be exactly 0.
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7, 0.2, 0.4, 0.4, 0.4])
    adv, stats = compute_advantages({"r": r}, {"r": 1.0}, group_size=3, aggregation=aggregation, std=std)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.equal(adv[6:], torch.zeros(3))
    assert bool((adv[3:6] != 0).all())
    assert stats["zero_std_groups"] == 2.0 and stats["groups"] == 3.0


def test_all_groups_equal_gives_all_zero_without_nan():
    r = torch.tensor([0.5, 0.5, 2.0, 2.0])
    for aggregation in ("sum", "gdpo"):
        adv, stats = compute_advantages({"r": r}, {"r": 1.0}, group_size=2, aggregation=aggregation)
        assert torch.equal(adv, torch.zeros(4))
        assert stats["zero_std_groups"] == 2.0


# Two rewards, G = 2, two prompts.
A_REW = [1.0, 0.0, 0.0, 1.0]
B_REW = [0.0, 4.0, 1.0, 3.0]
WEIGHTS = {"a": 1.0, "b": 0.5}


def _two_rewards():
    return {"a": torch.tensor(A_REW), "b": torch.tensor(B_REW)}


def test_weighted_sum_aggregation_by_hand():
    # total = a + 0.5 b = [1, 2, 0.5, 2.5]; groups [1, 2] (std 0.5) and [0.5, 2.5] (std 1).
    adv, stats = compute_advantages(_two_rewards(), WEIGHTS, group_size=2, aggregation="sum", clip=10.0)
    c, d = 0.5 / (0.5 + EPS), 1.0 / (1.0 + EPS)
    _assert_close(adv, [-c, c, -d, d], rel=1e-6)
    assert stats["zero_std_groups"] == 0.0


def test_gdpo_aggregation_by_hand():
    # a per group: [1, 0] -> [c, -c]; [0, 1] -> [-c, c], c = 0.5/0.5001.
    # b per group: [0, 4] -> mean 2, std 2 -> [-e, e], e = 2/2.0001; [1, 3] -> [-d, d], d = 1/1.0001.
    c, d, e = 0.5 / (0.5 + EPS), 1.0 / (1.0 + EPS), 2.0 / (2.0 + EPS)
    per = [c - 0.5 * e, -c + 0.5 * e, -c - 0.5 * d, c + 0.5 * d]
    m = sum(per) / 4
    s = _pop_std(per)
    expected = [(p - m) / (s + EPS) for p in per]
    adv, stats = compute_advantages(_two_rewards(), WEIGHTS, group_size=2, aggregation="gdpo", clip=10.0)
    _assert_close(adv, expected, rel=1e-5, abs_=1e-6)
    assert stats["zero_std_groups"] == 0.0
    # GDPO and the weighted sum disagree on the sign of video 0 here: normalising each
    # reward first keeps reward "a"'s signal from being swamped by "b"'s larger scale.
    adv_sum, _ = compute_advantages(_two_rewards(), WEIGHTS, group_size=2, aggregation="sum", clip=10.0)
    assert float(adv[0]) > 0 > float(adv_sum[0])
    # Batch-normalised: mean 0, population std ~1.
    assert abs(float(adv.double().mean())) < 1e-6
    assert float(adv.double().std(unbiased=False)) == pytest.approx(1.0, rel=1e-3)


def test_gdpo_group_with_every_reward_constant_is_zero_and_counted():
    rewards = {"a": torch.tensor([1.0, 1.0, 0.0, 1.0]), "b": torch.tensor([2.0, 2.0, 0.0, 3.0])}
    adv, stats = compute_advantages(rewards, WEIGHTS, group_size=2, aggregation="gdpo")
    assert torch.equal(adv[:2], torch.zeros(2))
    assert bool((adv[2:] != 0).all())
    assert stats["zero_std_groups"] == 1.0


def test_gdpo_keeps_signal_when_only_the_weighted_total_is_constant():
    # a = [1, 0] -> [c, -c]; b = [0, 2] -> [-d, d]; weights (1, 0.5): total [1, 1] is constant,
    # but per = [c - d/2, -(c - d/2)] != 0, batch-normalised to about [+1, -1].
    rewards = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0])}
    c, d = 0.5 / (0.5 + EPS), 1.0 / (1.0 + EPS)
    per = [c - 0.5 * d, -(c - 0.5 * d)]
    s = _pop_std(per)
    expected = [p / (s + EPS) for p in per]
    adv, _ = compute_advantages(rewards, WEIGHTS, group_size=2, aggregation="gdpo")
    _assert_close(adv, expected, rel=1e-5, abs_=1e-6)


def test_weights_scale_and_select_rewards():
    # A weight of 0 removes a reward from the sum; weights only listed rewards are used.
    rewards = {"a": torch.tensor(A_REW), "b": torch.tensor(B_REW)}
    adv_a, _ = compute_advantages(rewards, {"a": 1.0, "b": 0.0}, group_size=2, clip=10.0)
    adv_only_a, _ = compute_advantages(rewards, {"a": 1.0}, group_size=2, clip=10.0)
    c = 0.5 / (0.5 + EPS)
    _assert_close(adv_a, [c, -c, -c, c], rel=1e-6)
    assert torch.equal(adv_a, adv_only_a)


def test_batch_not_divisible_by_group_size_raises():
    with pytest.raises(ValueError, match="not a whole number of groups of 2"):
        compute_advantages({"r": torch.arange(5.0)}, {"r": 1.0}, group_size=2)
    with pytest.raises(ValueError, match="not a whole number of groups of 4"):
        group_normalize(torch.arange(6.0), 4)
    with pytest.raises(ValueError, match="groups"):
        compute_advantages(_two_rewards(), WEIGHTS, group_size=3, aggregation="gdpo")


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError, match="aggregation"):
        compute_advantages({"r": torch.ones(4)}, {"r": 1.0}, group_size=2, aggregation="mean")


def test_missing_reward_for_weight_raises():
    with pytest.raises(ValueError, match="no scores for rewards"):
        compute_advantages({"a": torch.ones(4)}, {"a": 1.0, "b": 1.0}, group_size=2)


def test_rewards_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        group_normalize(torch.ones(2, 2), 2)
