"""Tests for flowdppo_video.objectives: SPEC section 3 and section 5 invariant 3.

Truth table of the Flow-DPPO mask (SPEC section 3), delta in nats per latent element:
    drop = (KL / D > delta) and ((rho > 1 and A > 0) or (rho < 1 and A < 0))
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flowdppo_video.objectives import (
    dppo_drop_mask,
    flow_dppo_loss,
    grpo_clip_loss,
    reference_kl_loss,
    trust_region_mask,
)

DELTA = 0.5       # nats per latent element
D = 4             # elements per token: a per-token threshold reads these tables wrongly


def _dppo(logp_new, logp_old, kl_per_element, adv, delta, **kw):
    """flow_dppo_loss with the token KL given per element (the token KL is D times it)."""
    return flow_dppo_loss(logp_new, logp_old, kl_per_element * D, adv, delta, elements_per_token=D, **kw)


def _spec_drop(kl: float, log_ratio: float, a: float, delta: float) -> bool:
    rho = math.exp(log_ratio)
    return (kl > delta) and ((rho > 1 and a > 0) or (rho < 1 and a < 0))


# All 8 combinations of KL > delta, rho > 1 / < 1, A > 0 / < 0, with the expected drop.
TRUTH_TABLE = [
    # (kl_above, rho_above_one, a_positive, expected_drop)
    (True, True, True, True),
    (True, True, False, False),
    (True, False, True, False),
    (True, False, False, True),
    (False, True, True, False),
    (False, True, False, False),
    (False, False, True, False),
    (False, False, False, False),
]


@pytest.mark.parametrize("kl_above,rho_above,a_pos,expected", TRUTH_TABLE)
def test_drop_mask_truth_table_single_entry(kl_above, rho_above, a_pos, expected):
    kl = torch.tensor([[DELTA + 0.1 if kl_above else DELTA - 0.1]])
    log_ratio = torch.tensor([[0.3 if rho_above else -0.3]])
    adv = torch.tensor([1.2 if a_pos else -1.2])
    mask = dppo_drop_mask(log_ratio, kl, adv, DELTA)
    assert mask.dtype == torch.bool and mask.shape == (1, 1)
    assert bool(mask[0, 0]) is expected
    assert expected == _spec_drop(float(kl), float(log_ratio), float(adv), DELTA)


def test_drop_mask_truth_table_all_combinations_in_one_batch():
    # Rows: A > 0 and A < 0; columns: every (KL, rho) combination plus the edge cases
    # rho == 1 (log-ratio 0) with KL above delta, and KL == delta exactly (not "> delta").
    kl_vals = [0.9, 0.9, 0.1, 0.1, 0.9, DELTA, DELTA]
    lr_vals = [0.2, -0.2, 0.2, -0.2, 0.0, 0.2, -0.2]
    adv = torch.tensor([2.0, -2.0, 0.0])
    kl = torch.tensor([kl_vals] * 3)
    log_ratio = torch.tensor([lr_vals] * 3)
    mask = dppo_drop_mask(log_ratio, kl, adv, DELTA)
    expected = torch.tensor([
        [True, False, False, False, False, False, False],   # A > 0
        [False, True, False, False, False, False, False],   # A < 0
        [False] * 7,                                        # A == 0: never dropped
    ])
    assert torch.equal(mask, expected)
    for b, n in itertools.product(range(3), range(7)):
        assert bool(mask[b, n]) == _spec_drop(kl_vals[n], lr_vals[n], float(adv[b]), DELTA)


@pytest.mark.parametrize("a", [3.0, -3.0])
def test_drop_mask_ratio_exactly_one_is_never_dropped(a):
    kl = torch.full((1, 4), 100.0)
    log_ratio = torch.zeros(1, 4)
    assert not dppo_drop_mask(log_ratio, kl, torch.tensor([a]), DELTA).any()
    # Through the loss too: rho == 1 with huge KL keeps every term.
    logp = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    _, stats = _dppo(logp.clone(), logp, kl, torch.tensor([a]), DELTA)
    assert float(stats["dropped"]) == 0.0


@pytest.mark.parametrize("log_ratio", [5.0, -5.0])
def test_drop_mask_zero_advantage_is_never_dropped(log_ratio):
    kl = torch.full((1, 3), 100.0)
    lr = torch.full((1, 3), log_ratio)
    assert not dppo_drop_mask(lr, kl, torch.tensor([0.0]), DELTA).any()


@pytest.mark.parametrize("kl_above,rho_above,a_pos,expected", TRUTH_TABLE)
def test_flow_dppo_loss_follows_truth_table(kl_above, rho_above, a_pos, expected):
    # Same table through the loss: a dropped single term gives loss 0, a kept one -A*rho.
    logp_old = torch.tensor([[-3.0]])
    lr = 0.3 if rho_above else -0.3
    logp_new = logp_old + lr
    kl = torch.tensor([[DELTA + 0.1 if kl_above else DELTA - 0.1]])
    a = 1.2 if a_pos else -1.2
    loss, stats = _dppo(logp_new, logp_old, kl, torch.tensor([a]), DELTA)
    assert float(stats["dropped"]) == float(expected)
    if expected:
        assert loss.item() == 0.0
    else:
        assert loss.item() == pytest.approx(-a * math.exp(lr), rel=1e-6)


def _mixed_batch():
    """(B=2, N=4): each row has a dropped and kept terms, by the SPEC table."""
    logp_old = torch.tensor([[-1.0, -2.0, -3.0, -4.0],
                             [-1.5, -2.5, -3.5, -4.5]])
    log_ratio = torch.tensor([[0.4, -0.3, 0.2, 0.1],
                              [-0.4, 0.3, -0.2, 0.05]])
    kl = torch.tensor([[0.9, 0.9, 0.1, 0.7],
                       [0.9, 0.9, 0.6, 0.1]])
    adv = torch.tensor([1.5, -0.8])
    # Row 0 (A>0): drop where KL > .5 and lr > 0 -> cols 0, 3.
    # Row 1 (A<0): drop where KL > .5 and lr < 0 -> cols 0, 2.
    drop = torch.tensor([[True, False, False, True],
                         [True, False, True, False]])
    return logp_old, log_ratio, kl, adv, drop


def test_mixed_batch_mask_matches_spec():
    logp_old, log_ratio, kl, adv, drop = _mixed_batch()
    assert torch.equal(dppo_drop_mask(log_ratio, kl, adv, DELTA), drop)
    for b, n in itertools.product(range(2), range(4)):
        assert bool(drop[b, n]) == _spec_drop(float(kl[b, n]), float(log_ratio[b, n]), float(adv[b]), DELTA)


@pytest.mark.parametrize("normalize", ["all", "kept"])
def test_flow_dppo_loss_value_by_hand(normalize):
    logp_old, log_ratio, kl, adv, drop = _mixed_batch()
    logp_new = logp_old + log_ratio
    loss, stats = _dppo(logp_new, logp_old, kl, adv, DELTA, normalize=normalize)
    total = 0.0
    kept = 0
    for b, n in itertools.product(range(2), range(4)):
        if not bool(drop[b, n]):
            total += float(adv[b]) * math.exp(float(logp_new[b, n]) - float(logp_old[b, n]))
            kept += 1
    assert kept == 4
    z = 8 if normalize == "all" else kept
    assert loss.item() == pytest.approx(-total / z, rel=1e-6)
    assert float(stats["dropped"]) == 4.0 and float(stats["terms"]) == 8.0
    assert float(stats["drop_frac"]) == pytest.approx(0.5)


def test_flow_dppo_loss_kept_normalisation_with_everything_dropped_is_zero():
    logp_old = torch.zeros(2, 3)
    logp_new = torch.full((2, 3), 0.5)
    kl = torch.full((2, 3), 10.0)
    loss, stats = _dppo(logp_new, logp_old, kl, torch.tensor([1.0, 2.0]), DELTA, normalize="kept")
    assert float(stats["drop_frac"]) == 1.0
    assert loss.item() == 0.0 and torch.isfinite(loss)


def test_flow_dppo_stats_drop_fractions_by_hand():
    # Three rows: A>0, A<0, A>0; 5 tokens each.
    log_ratio = torch.tensor([[0.1, 0.1, -0.1, 0.1, 0.0],
                              [-0.1, -0.1, -0.1, 0.1, -0.1],
                              [0.1, 0.1, 0.1, 0.1, 0.1]])
    kl = torch.tensor([[0.9, 0.1, 0.9, 0.9, 0.9],
                       [0.9, 0.9, 0.9, 0.9, 0.1],
                       [0.1, 0.1, 0.1, 0.9, 0.1]])
    adv = torch.tensor([1.0, -1.0, 0.3])
    # Dropped: row 0 -> cols 0, 3 (2); row 1 -> cols 0, 1, 2 (3); row 2 -> col 3 (1).
    logp_old = torch.zeros(3, 5)
    _, stats = _dppo(logp_old + log_ratio, logp_old, kl, adv, DELTA)
    assert float(stats["dropped"]) == 6.0
    assert float(stats["drop_frac"]) == pytest.approx(6 / 15)
    assert float(stats["drop_frac_pos"]) == pytest.approx(3 / 10)   # rows 0 and 2
    assert float(stats["drop_frac_neg"]) == pytest.approx(3 / 5)    # row 1
    assert float(stats["kl_mean"]) == pytest.approx(D * float(kl.double().mean()), rel=1e-6)   # token KL
    assert float(stats["kl_max"]) == pytest.approx(D * 0.9)
    assert float(stats["log_ratio_max_abs"]) == pytest.approx(0.1, rel=1e-5)


def test_flow_dppo_stats_without_negative_advantages_report_zero():
    logp_old = torch.zeros(2, 2)
    _, stats = _dppo(logp_old + 0.1, logp_old, torch.full((2, 2), 0.9), torch.tensor([1.0, 2.0]), DELTA)
    assert float(stats["drop_frac_pos"]) == 1.0
    assert float(stats["drop_frac_neg"]) == 0.0


# --------------------------------------------------------------------------------------------
# Invariant 3: a dropped token has exactly zero gradient, a kept one does not.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["all", "kept"])
def test_dropped_token_has_exactly_zero_gradient_kept_token_nonzero(normalize):
    logp_old, log_ratio, kl, adv, drop = _mixed_batch()
    logp_new = (logp_old + log_ratio).requires_grad_(True)
    loss, _ = _dppo(logp_new, logp_old, kl, adv, DELTA, normalize=normalize)
    loss.backward()
    grad = logp_new.grad
    assert grad is not None
    assert torch.equal(grad[drop], torch.zeros(int(drop.sum())))
    assert bool((grad[~drop] != 0).all())
    # Kept terms: d/d logp_new of -(1/Z) A exp(logp_new - logp_old) = -(A/Z) rho.
    z = 8 if normalize == "all" else int((~drop).sum())
    expected = -(adv[:, None] / z) * torch.exp(log_ratio)
    torch.testing.assert_close(grad[~drop], expected[~drop], rtol=1e-6, atol=1e-8)
    # logp_old carries no gradient path in the API, kl is only compared.
    assert not logp_old.requires_grad


def test_overflowing_dropped_ratio_gives_finite_loss_and_zero_gradient():
    logp_old = torch.tensor([[0.0, -10.0, -5.0]])
    logp_new = torch.tensor([[1000.0, -10.2, -5.0]], requires_grad=True)  # rho_0 = exp(1000) = inf
    kl = torch.tensor([[5.0, 0.1, 0.1]])
    adv = torch.tensor([1.0])
    assert bool(torch.isinf(torch.exp(torch.tensor(1000.0))))  # the naive product would be inf*0
    loss, stats = _dppo(logp_new, logp_old, kl, adv, DELTA)
    assert bool(torch.isfinite(loss))
    loss.backward()
    g = logp_new.grad
    assert bool(torch.isfinite(g).all()), g
    assert not bool(torch.isnan(g).any())
    assert float(g[0, 0]) == 0.0
    assert float(g[0, 1]) != 0.0 and float(g[0, 2]) != 0.0
    expected = -(math.exp(-0.2) + 1.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert float(stats["dropped"]) == 1.0


def test_overflowing_dropped_ratio_negative_advantage_is_finite():
    # A < 0 and log-ratio -1000 with large KL: dropped; exp underflows to 0, still no NaN.
    logp_old = torch.tensor([[1000.0, 0.0]])
    logp_new = torch.tensor([[0.0, 0.1]], requires_grad=True)
    kl = torch.tensor([[5.0, 5.0]])
    loss, stats = _dppo(logp_new, logp_old, kl, torch.tensor([-1.0]), DELTA)
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(logp_new.grad).all())
    assert float(logp_new.grad[0, 0]) == 0.0
    # Column 1 is corrective (rho > 1 with A < 0): kept despite its KL.
    assert float(stats["dropped"]) == 1.0
    assert loss.item() == pytest.approx(math.exp(0.1) / 2, rel=1e-6)
    assert float(logp_new.grad[0, 1]) == pytest.approx(math.exp(0.1) / 2, rel=1e-6)


def test_overflowing_ratio_in_sample_granularity_is_finite_when_dropped():
    d = 4
    logp_old = torch.zeros(1, 2)
    logp_new = torch.tensor([[4000.0, 4000.0]], requires_grad=True)  # mean log-ratio 1000
    kl = torch.full((1, 2), 100.0)
    loss, stats = flow_dppo_loss(logp_new, logp_old, kl, torch.tensor([1.0]), 1e-3,
                                 granularity="sample", elements_per_token=d)
    loss.backward()
    assert float(stats["drop_frac"]) == 1.0
    assert loss.item() == 0.0
    assert torch.equal(logp_new.grad, torch.zeros(1, 2))


def test_flow_dppo_loss_rejects_bad_arguments():
    z = torch.zeros(2, 3)
    a = torch.ones(2)
    with pytest.raises(ValueError, match="granularity"):
        _dppo(z, z, z, a, 0.1, granularity="element")
    with pytest.raises(ValueError, match="normalize"):
        _dppo(z, z, z, a, 0.1, normalize="sum")
    with pytest.raises(ValueError, match="advantages"):
        _dppo(z, z, z, torch.ones(3), 0.1)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        _dppo(z, torch.zeros(2, 4), z, a, 0.1)


def test_delta_is_per_latent_element_not_per_token():
    # SPEC invariant 3 with D > 1: a token KL of 3 nats over D = 12 elements is 0.25 nats per
    # element. delta = 0.3 per element keeps it (a per-token reading, 3 > 0.3, would drop it);
    # delta = 0.2 per element drops it (a per-token reading of 3 > 2 would too, so also check 2.9).
    logp_old = torch.zeros(1, 1)
    logp_new = torch.full((1, 1), 0.1)
    kl = torch.tensor([[3.0]])
    adv = torch.tensor([1.0])
    for delta, expected in [(0.3, 0.0), (0.2, 1.0), (0.26, 0.0), (0.24, 1.0)]:
        _, stats = flow_dppo_loss(logp_new, logp_old, kl, adv, delta, elements_per_token=12)
        assert float(stats["dropped"]) == expected, delta
    with pytest.raises(ValueError, match="elements_per_token"):
        flow_dppo_loss(logp_new, logp_old, kl, adv, 0.1, elements_per_token=0)


def test_kept_normalisation_divides_by_exactly_the_kept_count():
    # Three terms dropped, one kept: "kept" divides by 1, "all" by 4 (a count of the dropped
    # terms, 3, would give a third of the kept loss).
    logp_old = torch.zeros(1, 4)
    log_ratio = torch.tensor([[0.2, 0.2, 0.2, -0.2]])
    kl = torch.tensor([[0.9, 0.9, 0.9, 0.9]])              # per element, all past delta
    adv = torch.tensor([2.0])                               # A > 0: rho > 1 is pushing
    loss_kept, stats = _dppo(logp_old + log_ratio, logp_old, kl, adv, DELTA, normalize="kept")
    loss_all, _ = _dppo(logp_old + log_ratio, logp_old, kl, adv, DELTA, normalize="all")
    assert float(stats["dropped"]) == 3.0 and float(stats["terms"]) == 4.0
    assert loss_kept.item() == pytest.approx(-2.0 * math.exp(-0.2), rel=1e-6)
    assert loss_all.item() == pytest.approx(-2.0 * math.exp(-0.2) / 4, rel=1e-6)


def test_mask_stats_keys_and_zero_advantage_rows_on_neither_side():
    # The trainer pools these exact keys; a row with A == 0 (a silent group) is counted in
    # "terms" but neither in the positive nor the negative side.
    logp_old = torch.zeros(3, 2)
    log_ratio = torch.tensor([[0.3, -0.3], [-0.3, 0.3], [0.3, -0.3]])
    kl = torch.full((3, 2), 0.9)
    adv = torch.tensor([1.0, -1.0, 0.0])
    _, stats = _dppo(logp_old + log_ratio, logp_old, kl, adv, DELTA)
    expected = {"dropped": 2.0, "terms": 6.0, "dropped_pos": 1.0, "terms_pos": 2.0,
                "dropped_neg": 1.0, "terms_neg": 2.0}
    for k, v in expected.items():
        assert float(stats[k]) == v, k
    assert float(stats["drop_frac_pos"]) == 0.5 and float(stats["drop_frac_neg"]) == 0.5
    assert float(stats["drop_frac"]) == pytest.approx(1 / 3)
    # The clipping baseline reports the same keys, per row.
    _, cstats = grpo_clip_loss(logp_old + log_ratio * 100, logp_old, adv, 1e-3, 1)
    for k in expected:
        assert k in cstats, k
    assert float(cstats["terms"]) == 3.0 and float(cstats["terms_pos"]) == 1.0 and float(cstats["terms_neg"]) == 1.0


def test_row_gated_freezes_far_tokens_only_in_rows_that_drift_as_a_whole():
    # Row 0: one token far (a concentrated change), row mean below delta: nothing frozen.
    # Row 1: every token past delta (diffuse drift): the pushing tokens are frozen.
    d = 2
    log_ratio = torch.tensor([[0.2, 0.0, 0.0, 0.0], [0.2, 0.2, -0.2, 0.2]])
    kl = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])   # token KL (D = 2); row means 0.25, 0.5
    adv = torch.tensor([1.0, 1.0])
    delta = 0.4                                                          # per element
    token = trust_region_mask("flow_dppo", log_ratio, kl, adv, elements_per_token=d, delta=delta)
    gated = trust_region_mask("flow_dppo", log_ratio, kl, adv, elements_per_token=d, delta=delta,
                              granularity="row_gated")
    assert token.tolist() == [[True, False, False, False], [True, True, False, True]]
    assert gated.tolist() == [[False, False, False, False], [True, True, False, True]]
    logp_old = torch.zeros(2, 4)
    _, stats = flow_dppo_loss(logp_old + log_ratio, logp_old, kl, adv, delta, elements_per_token=d,
                              granularity="row_gated")
    assert float(stats["dropped"]) == 3.0


def test_row_decides_on_the_row_mean_and_tests_each_tokens_push():
    # Row 0: one token far (a concentrated change), row mean below delta: nothing frozen, even the
    # far token (which the token rule freezes). Row 1: the row drifts as a whole: every token that
    # pushes the way its advantage wants is frozen, near ones included (row_gated keeps those);
    # the corrective token (rho < 1 under A > 0) passes.
    d = 2
    log_ratio = torch.tensor([[0.2, 0.0, 0.0, 0.0], [0.2, 0.1, -0.2, 0.2]])
    kl = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.6, 0.4, 1.0, 1.0]])   # token KL (D = 2); row means 0.25, 0.5
    adv = torch.tensor([1.0, 1.0])
    kw = {"elements_per_token": d, "delta": 0.4}
    row = trust_region_mask("flow_dppo", log_ratio, kl, adv, granularity="row", **kw)
    gated = trust_region_mask("flow_dppo", log_ratio, kl, adv, granularity="row_gated", **kw)
    assert row.tolist() == [[False, False, False, False], [True, True, False, True]]
    assert gated.tolist() == [[False, False, False, False], [True, False, False, True]]
    # Negative advantage: tokens with rho < 1 push; the same row decision.
    row_neg = trust_region_mask("flow_dppo", log_ratio, kl, -adv, granularity="row", **kw)
    assert row_neg.tolist() == [[False, False, False, False], [False, False, True, False]]
    # The loss keeps token ratios: a kept token's gradient is its own A * rho / Z.
    logp_old = torch.zeros(2, 4)
    logp_new = (logp_old + log_ratio).requires_grad_(True)
    loss, stats = flow_dppo_loss(logp_new, logp_old, kl, adv, 0.4, elements_per_token=d, granularity="row")
    loss.backward()
    assert float(stats["dropped"]) == 3.0
    expected = torch.where(row, torch.zeros(()), -adv[:, None] * torch.exp(log_ratio) / 8)
    torch.testing.assert_close(logp_new.grad, expected)


def test_trust_region_mask_is_the_rule_the_losses_apply():
    g = torch.Generator().manual_seed(3)
    d = 3
    logp_old = torch.randn(4, 6, generator=g)
    log_ratio = 0.2 * torch.randn(4, 6, generator=g)
    kl = torch.rand(4, 6, generator=g) * d
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    for gran in ("token", "sample", "row_gated", "row"):
        m = trust_region_mask("flow_dppo", log_ratio, kl, adv, elements_per_token=d, delta=0.5, granularity=gran)
        _, st = flow_dppo_loss(logp_old + log_ratio, logp_old, kl, adv, 0.5, elements_per_token=d, granularity=gran)
        per_row = m[:, :1] if gran == "sample" else m
        assert float(st["dropped"]) == float(per_row.sum()), gran
    m = trust_region_mask("grpo_clip", log_ratio, kl, adv, elements_per_token=d, clip_range=1e-3)
    _, st = grpo_clip_loss(logp_old + log_ratio, logp_old, adv, 1e-3, d)
    assert float(st["dropped"]) == float(m[:, 0].sum())


# --------------------------------------------------------------------------------------------
# Flow-GRPO ratio clipping
# --------------------------------------------------------------------------------------------

EPS = 1e-3


def _grpo_case():
    """Rows with per-element mean log-ratio r_b; N=2 tokens, D=4 -> 8 elements per row."""
    n, d = 2, 4
    mean_lr = torch.tensor([5e-4, 0.01, 0.01, -0.01, -0.01, -5e-4])
    adv = torch.tensor([1.0, 2.0, -1.5, 0.5, -0.7, -1.0])
    # Split each row's total log-ratio unevenly over its two tokens (only the sum matters).
    total = mean_lr * n * d
    logp_old = torch.tensor([[-3.0, -4.0]]).repeat(6, 1)
    logp_new = logp_old + torch.stack([0.25 * total, 0.75 * total], dim=1)
    return logp_new, logp_old, adv, n, d, mean_lr


def test_grpo_clip_loss_value_by_hand():
    logp_new, logp_old, adv, n, d, mean_lr = _grpo_case()
    loss, stats = grpo_clip_loss(logp_new, logp_old, adv, EPS, d)
    terms = []
    for b in range(6):
        rho = math.exp(float((logp_new[b].double() - logp_old[b].double()).sum()) / (n * d))
        a = float(adv[b])
        clipped = min(max(rho, 1 - EPS), 1 + EPS)
        terms.append(max(-a * rho, -a * clipped))
    assert loss.item() == pytest.approx(sum(terms) / 6, rel=1e-5)
    # Rows 1..4 are outside the clip range, rows 0 and 5 inside.
    assert float(stats["clip_frac"]) == pytest.approx(4 / 6)
    # Row 1 (rho > 1+eps, A > 0) and row 4 (rho < 1-eps, A < 0) are frozen.
    assert float(stats["dropped"]) == 2.0


def test_grpo_clip_loss_hand_numbers_small():
    # One row, one token of D=2: log-ratio sum 0.02 -> mean 0.01 -> rho = e^0.01 > 1 + eps.
    logp_old = torch.tensor([[-1.0]])
    logp_new = torch.tensor([[-0.98]])
    loss_pos, _ = grpo_clip_loss(logp_new, logp_old, torch.tensor([2.0]), EPS, 2)
    assert float(loss_pos) == pytest.approx(-2.0 * (1 + EPS), rel=1e-6)       # clipped
    loss_neg, _ = grpo_clip_loss(logp_new, logp_old, torch.tensor([-2.0]), EPS, 2)
    assert float(loss_neg) == pytest.approx(2.0 * math.exp(0.01), rel=1e-5)   # unclipped
    # Inside the range: plain -A*rho.
    logp_in = torch.tensor([[-1.0 + 2 * 4e-4]])
    loss_in, stats_in = grpo_clip_loss(logp_in, logp_old, torch.tensor([2.0]), EPS, 2)
    assert float(loss_in) == pytest.approx(-2.0 * math.exp(4e-4), rel=1e-6)
    assert float(stats_in["clip_frac"]) == 0.0


def test_grpo_clip_loss_gradient_zero_when_clipped_in_advantage_direction():
    logp_new, logp_old, adv, n, d, mean_lr = _grpo_case()
    logp_new = logp_new.clone().requires_grad_(True)
    loss, _ = grpo_clip_loss(logp_new, logp_old, adv, EPS, d)
    loss.backward()
    g = logp_new.grad
    # Frozen rows: 1 (rho > 1+eps, A > 0) and 4 (rho < 1-eps, A < 0).
    assert torch.equal(g[1], torch.zeros(n)) and torch.equal(g[4], torch.zeros(n))
    # All other rows carry the unclipped gradient -A*rho/(B*N*D) to every token.
    for b in (0, 2, 3, 5):
        rho = math.exp(float((logp_new[b].detach().double() - logp_old[b].double()).sum()) / (n * d))
        expected = -float(adv[b]) * rho / (6 * n * d)
        assert bool((g[b] != 0).all())
        for t in range(n):
            assert float(g[b, t]) == pytest.approx(expected, rel=1e-5)


def test_grpo_clip_loss_kl_stats_only_when_given():
    logp_new, logp_old, adv, n, d, _ = _grpo_case()
    _, stats = grpo_clip_loss(logp_new, logp_old, adv, EPS, d)
    assert "kl_mean" not in stats and "clip_frac" in stats
    kl = torch.full((6, n), 0.25)
    _, stats_kl = grpo_clip_loss(logp_new, logp_old, adv, EPS, d, kl=kl)
    assert float(stats_kl["kl_mean"]) == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------
# KL to the reference model
# --------------------------------------------------------------------------------------------

def test_reference_kl_loss_is_beta_times_mean():
    kl_ref = torch.tensor([[0.1, 0.4, 0.0], [1.0, 0.2, 0.3]], requires_grad=True)
    loss = reference_kl_loss(kl_ref, 0.004)
    assert loss.item() == pytest.approx(0.004 * 2.0 / 6, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(kl_ref.grad, torch.full((2, 3), 0.004 / 6))
    assert float(reference_kl_loss(kl_ref.detach(), 0.0)) == 0.0
