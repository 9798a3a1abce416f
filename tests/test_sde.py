"""Tests for flowdppo_video.sde: SPEC section 5 invariants 2, 4 and 5, schedules, step choice,
and the token order of SPEC section 2.

Expected values are written out from SPEC.md in float64 (python floats / float64 tensors),
independently of the implementation.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from flowdppo_video.objectives import flow_dppo_loss
from flowdppo_video.sde import (
    choose_sde_steps,
    flow_schedule,
    ode_step,
    patch_count,
    sde_step,
    token_kl,
    token_log_prob,
    token_sum,
)

SHAPE = (3, 4, 2, 4, 6)  # (B, C, F, H, W)
PATCH = (1, 2, 2)


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def _as_list(value, batch):
    """A float or (B,) tensor as a list of python floats, one per row."""
    if isinstance(value, torch.Tensor):
        return [float(t) for t in value.reshape(-1)]
    return [float(value)] * batch


# --------------------------------------------------------------------------------------------
# Reference formulas of SPEC section 1, in float64, one batch row at a time.
# --------------------------------------------------------------------------------------------

def ref_flow_sde(x, v, sigma, sigma_next, eta, sigma_1=None):
    """Flow-SDE mean/std per SPEC section 1: g = eta*sqrt(sigma/(1 - sigma~))."""
    b = x.shape[0]
    sig, sig_n = _as_list(sigma, b), _as_list(sigma_next, b)
    sig1 = _as_list(sigma_1, b) if sigma_1 is not None else [None] * b
    means, stds = [], []
    for i in range(b):
        s, sn = sig[i], sig_n[i]
        s_tilde = sig1[i] if s == 1.0 else s
        g = eta * math.sqrt(s / (1.0 - s_tilde))
        dt = sn - s
        xi, vi = x[i].double(), v[i].double()
        means.append(xi + (vi + g * g / (2.0 * s) * (xi + (1.0 - s) * vi)) * dt)
        stds.append(g * math.sqrt(-dt))
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


def ref_cps(x, v, sigma, sigma_next, eta):
    """CPS mean/std per SPEC section 1."""
    b = x.shape[0]
    sig, sig_n = _as_list(sigma, b), _as_list(sigma_next, b)
    means, stds = [], []
    for i in range(b):
        s, sn = sig[i], sig_n[i]
        std = sn * math.sin(eta * math.pi / 2.0)
        xi, vi = x[i].double(), v[i].double()
        x0_hat = xi - s * vi
        x1_hat = xi + (1.0 - s) * vi
        means.append((1.0 - sn) * x0_hat + math.sqrt(max(sn * sn - std * std, 0.0)) * x1_hat)
        stds.append(std)
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


def _f32(t: float | torch.Tensor):
    """The value as the float32 the implementation sees (so references match exactly)."""
    if isinstance(t, torch.Tensor):
        return t.float()
    return float(torch.tensor(t, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# Invariant 5: sampler mean and std equal the SPEC formulas.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("sigma,sigma_next", [(0.8, 0.65), (0.5, 0.3), (0.12, 0.05)])
def test_flow_sde_mean_std_match_spec_float_sigma(eta, sigma, sigma_next):
    x, v = _rand(SHAPE, 0), _rand(SHAPE, 1)
    mean, std = sde_step("flow_sde", x, v, sigma, sigma_next, eta)
    ref_mean, ref_std = ref_flow_sde(x, v, _f32(sigma), _f32(sigma_next), eta)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    assert mean.shape == SHAPE and std.shape == (SHAPE[0],)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-7)


def test_flow_sde_mean_std_match_spec_tensor_sigma():
    x, v = _rand(SHAPE, 2), _rand(SHAPE, 3)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    sigma_next = torch.tensor([0.8, 0.45, 0.0])
    mean, std = sde_step("flow_sde", x, v, sigma, sigma_next, 0.7)
    ref_mean, ref_std = ref_flow_sde(x, v, sigma, sigma_next, 0.7)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-7)
    # Rows are independent: row i equals the float-sigma call on row i alone.
    for i in range(SHAPE[0]):
        m_i, s_i = sde_step("flow_sde", x[i:i + 1], v[i:i + 1], float(sigma[i]), float(sigma_next[i]), 0.7)
        torch.testing.assert_close(m_i[0], mean[i], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s_i[0], std[i], rtol=1e-6, atol=1e-8)


def test_flow_sde_at_sigma_one_uses_sigma_1_float():
    sched = flow_schedule(10, shift=3.0)
    sigma_0, sigma_1 = float(sched[0]), float(sched[1])
    assert sigma_0 == 1.0
    x, v = _rand(SHAPE, 4), _rand(SHAPE, 5)
    mean, std = sde_step("flow_sde", x, v, sigma_0, sigma_1, 0.7, sigma_1=sigma_1)
    ref_mean, ref_std = ref_flow_sde(x, v, 1.0, _f32(sigma_1), 0.7, sigma_1=_f32(sigma_1))
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-7)
    # By hand: g = eta/sqrt(1 - sigma_1), s = g*sqrt(1 - sigma_1) = eta.
    torch.testing.assert_close(std, torch.full((SHAPE[0],), 0.7), rtol=1e-5, atol=1e-6)


def test_flow_sde_at_sigma_one_uses_sigma_1_tensor_mixed_rows():
    x, v = _rand(SHAPE, 6), _rand(SHAPE, 7)
    sigma = torch.tensor([1.0, 0.6, 1.0])
    sigma_next = torch.tensor([0.95, 0.5, 0.9])
    sigma_1 = torch.tensor([0.95, 0.95, 0.9])
    mean, std = sde_step("flow_sde", x, v, sigma, sigma_next, 0.5, sigma_1=sigma_1)
    ref_mean, ref_std = ref_flow_sde(x, v, sigma, sigma_next, 0.5, sigma_1=sigma_1)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-7)
    # The row below 1 ignores sigma_1: g = eta*sqrt(0.6/0.4).
    g = 0.5 * math.sqrt(_f32(0.6) / (1.0 - _f32(0.6)))
    assert float(std[1]) == pytest.approx(g * math.sqrt(_f32(0.6) - _f32(0.5)), rel=1e-5)


def test_flow_sde_at_sigma_one_without_sigma_1_raises():
    x, v = _rand(SHAPE, 8), _rand(SHAPE, 9)
    with pytest.raises(ValueError, match="sigma_1"):
        sde_step("flow_sde", x, v, 1.0, 0.9, 0.7)
    with pytest.raises(ValueError, match="sigma_1"):
        sde_step("flow_sde", x, v, torch.tensor([0.5, 1.0, 0.5]), torch.tensor([0.4, 0.9, 0.4]), 0.7)
    # Below sigma == 1, sigma_1 is not needed.
    mean, std = sde_step("flow_sde", x, v, 0.9, 0.8, 0.7)
    assert torch.isfinite(mean).all() and (std > 0).all()


@pytest.mark.parametrize("eta", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.7, 0.55), (0.2, 0.1)])
def test_cps_mean_std_match_spec_float_sigma(eta, sigma, sigma_next):
    x, v = _rand(SHAPE, 10), _rand(SHAPE, 11)
    mean, std = sde_step("cps", x, v, sigma, sigma_next, eta)
    ref_mean, ref_std = ref_cps(x, v, _f32(sigma), _f32(sigma_next), eta)
    assert mean.dtype == torch.float32 and std.shape == (SHAPE[0],)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-7)


def test_cps_mean_std_match_spec_tensor_sigma():
    x, v = _rand(SHAPE, 12), _rand(SHAPE, 13)
    sigma = torch.tensor([1.0, 0.5, 0.25])
    sigma_next = torch.tensor([0.9, 0.3, 0.1])
    mean, std = sde_step("cps", x, v, sigma, sigma_next, 0.6)
    ref_mean, ref_std = ref_cps(x, v, sigma, sigma_next, 0.6)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-7)


def test_cps_std_is_zero_at_final_step_and_mean_is_x0_hat():
    x, v = _rand(SHAPE, 14), _rand(SHAPE, 15)
    mean, std = sde_step("cps", x, v, 0.1, 0.0, 0.8)
    assert torch.equal(std, torch.zeros(SHAPE[0]))
    # sigma' = 0: mu = x0_hat = x - sigma*v, which is also the Euler step.
    ref = x.double() - _f32(0.1) * v.double()
    torch.testing.assert_close(mean.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, ode_step(x, v, 0.1, 0.0), rtol=1e-6, atol=1e-6)
    # Per-row tensor sigma with one row at sigma' = 0.
    _, std_t = sde_step("cps", x, v, torch.tensor([0.5, 0.1, 0.3]), torch.tensor([0.4, 0.0, 0.2]), 0.8)
    assert float(std_t[1]) == 0.0 and bool((std_t[[0, 2]] > 0).all())


def test_ode_step_is_euler():
    x, v = _rand(SHAPE, 16), _rand(SHAPE, 17)
    out = ode_step(x, v, 0.6, 0.45)
    torch.testing.assert_close(out.double(), x.double() + v.double() * (_f32(0.45) - _f32(0.6)),
                               rtol=1e-6, atol=1e-6)
    sig, sig_n = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])
    out_t = ode_step(x, v, sig, sig_n)
    ref = x.double() + v.double() * (sig_n - sig).double().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(out_t.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma,sigma_next", [(0.8, 0.7), (0.3, 0.1), (1.0, 0.95)])
def test_flow_sde_with_eta_to_zero_is_the_euler_step(sigma, sigma_next):
    x, v = _rand(SHAPE, 18), _rand(SHAPE, 19)
    mean, std = sde_step("flow_sde", x, v, sigma, sigma_next, 1e-8, sigma_1=0.95)
    torch.testing.assert_close(mean, ode_step(x, v, sigma, sigma_next), rtol=1e-6, atol=1e-6)
    assert float(std.max()) < 1e-7


def test_sde_step_computes_in_float32_from_low_precision_inputs():
    x, v = _rand(SHAPE, 20), _rand(SHAPE, 21)
    mean_bf, std_bf = sde_step("flow_sde", x.bfloat16(), v.bfloat16(), 0.5, 0.4, 0.7)
    mean_ref, _ = sde_step("flow_sde", x.bfloat16().float(), v.bfloat16().float(), 0.5, 0.4, 0.7)
    assert mean_bf.dtype == torch.float32 and std_bf.dtype == torch.float32
    torch.testing.assert_close(mean_bf, mean_ref, rtol=0, atol=0)


def test_sde_step_rejects_unknown_kind_and_bad_shapes():
    x, v = _rand(SHAPE, 22), _rand(SHAPE, 23)
    with pytest.raises(ValueError, match="unknown sampler"):
        sde_step("ddim", x, v, 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match="same shape"):
        sde_step("cps", x, v[:, :2], 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        sde_step("cps", x, v, torch.tensor([0.5, 0.4]), 0.3, 0.7)


# --------------------------------------------------------------------------------------------
# flow_schedule
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 0.5])
@pytest.mark.parametrize("num_steps", [1, 4, 20, 50])
def test_flow_schedule_endpoints_monotone_and_shift_formula(num_steps, shift):
    s = flow_schedule(num_steps, shift)
    assert s.dtype == torch.float64 and s.shape == (num_steps + 1,)
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0
    assert bool((s[1:] < s[:-1]).all()), "schedule must be strictly decreasing"
    for k in range(num_steps + 1):
        t = 1.0 - k / num_steps
        expected = shift * t / (1.0 + (shift - 1.0) * t)
        assert float(s[k]) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_flow_schedule_shift_pushes_sigmas_towards_noise():
    base, shifted = flow_schedule(10, 1.0), flow_schedule(10, 3.0)
    torch.testing.assert_close(base, torch.linspace(1.0, 0.0, 11, dtype=torch.float64))
    assert bool((shifted[1:-1] > base[1:-1]).all())


def test_flow_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        flow_schedule(0)
    with pytest.raises(ValueError, match="shift"):
        flow_schedule(10, shift=0.0)


# --------------------------------------------------------------------------------------------
# choose_sde_steps
# --------------------------------------------------------------------------------------------

def _choose(num_steps, count, window, kind, seed, schedule=None):
    return choose_sde_steps(num_steps, count, window, kind, torch.Generator().manual_seed(seed), schedule)


@pytest.mark.parametrize("kind", ["flow_sde", "cps"])
def test_choose_sde_steps_is_deterministic_per_seed(kind):
    for seed in range(5):
        assert _choose(20, 4, (0.0, 0.6), kind, seed) == _choose(20, 4, (0.0, 0.6), kind, seed)
    draws = {tuple(_choose(20, 4, (0.0, 0.6), kind, seed)) for seed in range(20)}
    assert len(draws) > 1, "different seeds should give different step choices"


@pytest.mark.parametrize("kind", ["flow_sde", "cps"])
@pytest.mark.parametrize("num_steps,count,window", [
    (10, 3, (0.0, 0.5)), (20, 5, (0.25, 0.75)), (16, 2, (0.5, 1.0)), (7, 3, (0.1, 0.9)),
])
def test_choose_sde_steps_stays_in_window(kind, num_steps, count, window):
    # Exact (decimal) window bounds: start*K <= k < end*K.
    lo, hi = Fraction(str(window[0])), Fraction(str(window[1]))
    seen = set()
    for seed in range(25):
        steps = _choose(num_steps, count, window, kind, seed)
        assert len(steps) == count and len(set(steps)) == count
        assert steps == sorted(steps)
        for k in steps:
            assert lo * num_steps <= k < hi * num_steps, (k, window)
            assert 0 <= k < num_steps
        seen.update(steps)
    # Over many seeds, the draws cover the window (no candidate is silently excluded).
    cands = {k for k in range(num_steps) if lo * num_steps <= k < hi * num_steps}
    if kind == "cps":
        cands.discard(num_steps - 1)
    assert seen == cands


def test_choose_sde_steps_full_window_count_returns_all_candidates():
    assert _choose(10, 5, (0.0, 0.5), "flow_sde", 0) == [0, 1, 2, 3, 4]
    assert _choose(10, 10, (0.0, 1.0), "flow_sde", 0) == list(range(10))


def test_choose_sde_steps_cps_never_picks_the_final_step():
    k = 8
    for seed in range(40):
        steps = _choose(k, 3, (0.5, 1.0), "cps", seed)
        assert k - 1 not in steps
    # Taking every candidate shows exactly which ones exist.
    assert _choose(k, k - 1, (0.0, 1.0), "cps", 0) == list(range(k - 1))
    sched = flow_schedule(k, shift=5.0)
    assert _choose(k, k - 1, (0.0, 1.0), "cps", 1, schedule=sched) == list(range(k - 1))
    # Flow-SDE may use the final step.
    assert _choose(k, k, (0.0, 1.0), "flow_sde", 0) == list(range(k))


def test_choose_sde_steps_count_above_candidates_raises_clearly():
    with pytest.raises(ValueError, match=r"sde_steps=6 exceeds the 5 candidate steps"):
        _choose(10, 6, (0.0, 0.5), "flow_sde", 0)
    # CPS over the whole schedule has K-1 candidates.
    with pytest.raises(ValueError, match=r"sde_steps=8 exceeds the 7 candidate steps"):
        _choose(8, 8, (0.0, 1.0), "cps", 0)


@pytest.mark.parametrize("num_steps,window", [(50, (0.0, 0.14)), (50, (0.28, 0.5)), (100, (0.07, 0.55))])
def test_choose_sde_steps_window_bounds_are_exact_for_decimal_fractions(num_steps, window):
    lo, hi = Fraction(str(window[0])), Fraction(str(window[1]))
    expected = [k for k in range(num_steps) if lo * num_steps <= k < hi * num_steps]
    # Taking every candidate must give exactly the window; one more must be refused.
    assert _choose(num_steps, len(expected), window, "flow_sde", 0) == expected
    with pytest.raises(ValueError, match="exceeds"):
        _choose(num_steps, len(expected) + 1, window, "flow_sde", 0)


@pytest.mark.parametrize("window", [(0.5, 0.5), (0.6, 0.2), (-0.1, 0.5), (0.0, 1.5)])
def test_choose_sde_steps_rejects_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        _choose(10, 1, window, "flow_sde", 0)


# --------------------------------------------------------------------------------------------
# Token order (SPEC section 2) and patch divisibility
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,patch", [
    ((2, 3, 2, 4, 6), (1, 2, 2)),
    ((1, 2, 4, 4, 2), (2, 2, 1)),
    ((2, 1, 3, 2, 3), (1, 1, 1)),
    ((1, 2, 4, 6, 4), (2, 3, 2)),
])
def test_token_sum_matches_explicit_fhw_loop(shape, patch):
    vals = _rand(shape, 30)
    out = token_sum(vals, patch)
    b, c, f, h, w = shape
    pt, ph, pw = patch
    n, d = patch_count(shape, patch)
    assert out.shape == (b, n) and d == c * pt * ph * pw
    expected = torch.zeros(b, n, dtype=torch.float64)
    for bi in range(b):
        idx = 0
        for fi in range(f // pt):
            for hi in range(h // ph):
                for wi in range(w // pw):
                    block = vals[bi, :, fi * pt:(fi + 1) * pt, hi * ph:(hi + 1) * ph, wi * pw:(wi + 1) * pw]
                    assert block.numel() == d
                    expected[bi, idx] = block.double().sum()
                    idx += 1
    assert idx == n
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_token_sum_order_matches_wan_patch_embedding():
    # diffusers WanTransformer3DModel: Conv3d(kernel=stride=patch), then flatten(2).transpose(1, 2).
    shape, patch = (2, 3, 3, 4, 6), (1, 2, 2)
    vals = _rand(shape, 31)
    conv = torch.nn.Conv3d(shape[1], 1, kernel_size=patch, stride=patch, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        emb = conv(vals).flatten(2).transpose(1, 2)[..., 0]  # (B, N)
    torch.testing.assert_close(token_sum(vals, patch), emb, rtol=1e-5, atol=1e-5)


def test_token_sum_unique_marker_lands_on_its_token():
    # A single nonzero element at (f, h, w) must land on token (f//pt, h//ph, w//pw) row-major.
    shape, patch = (1, 2, 4, 6, 8), (2, 2, 2)
    nf, nh, nw = 2, 3, 4
    for (f, h, w) in [(0, 0, 0), (3, 5, 7), (1, 2, 5), (2, 1, 0)]:
        vals = torch.zeros(shape)
        vals[0, 1, f, h, w] = 1.0
        out = token_sum(vals, patch)[0]
        n = (f // 2) * nh * nw + (h // 2) * nw + (w // 2)
        assert out.shape == (nf * nh * nw,)
        assert float(out[n]) == 1.0 and float(out.sum()) == 1.0


@pytest.mark.parametrize("shape,patch", [((1, 2, 3, 4, 4), (2, 2, 2)), ((1, 2, 2, 5, 4), (1, 2, 2)),
                                         ((2, 1, 2, 4, 3), (1, 2, 2))])
def test_token_functions_reject_latents_not_divisible_by_patch(shape, patch):
    _, _, f, h, w = shape
    needle = rf"\({f}, {h}, {w}\)"
    vals = torch.zeros(shape)
    with pytest.raises(ValueError, match=needle):
        patch_count(shape, patch)
    with pytest.raises(ValueError, match=needle):
        token_sum(vals, patch)
    with pytest.raises(ValueError, match=needle):
        token_kl(vals, vals, torch.ones(shape[0]), patch)
    with pytest.raises(ValueError, match=needle):
        token_log_prob(vals, vals, torch.ones(shape[0]), patch)


def test_patch_count_rejects_non_5d_latent():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\)"):
        patch_count((2, 3, 4, 4), (1, 2, 2))


# --------------------------------------------------------------------------------------------
# Token log-prob and KL against the formulas of section 2
# --------------------------------------------------------------------------------------------

def test_token_log_prob_matches_spec_formula_per_token():
    shape, patch = (2, 3, 2, 4, 4), (1, 2, 2)
    x_next, mean = _rand(shape, 40), _rand(shape, 41)
    std = torch.tensor([0.3, 1.7])
    out = token_log_prob(x_next, mean, std, patch)
    n, d = patch_count(shape, patch)
    assert out.shape == (2, n) and out.dtype == torch.float32
    for b in range(2):
        s = float(std[b])
        idx = 0
        for fi in range(2):
            for hi in range(2):
                for wi in range(2):
                    sl = (b, slice(None), slice(fi, fi + 1), slice(2 * hi, 2 * hi + 2), slice(2 * wi, 2 * wi + 2))
                    sq = float(((x_next[sl].double() - mean[sl].double()) ** 2).sum())
                    ref = -sq / (2 * s * s) - d * (math.log(s) + 0.5 * math.log(2 * math.pi))
                    assert float(out[b, idx]) == pytest.approx(ref, rel=1e-5, abs=1e-4)
                    idx += 1


def test_token_kl_is_zero_for_equal_means_and_log_prob_ratio_is_one():
    shape = (2, 3, 2, 4, 4)
    mean, x_next = _rand(shape, 42), _rand(shape, 43)
    std = torch.tensor([0.4, 0.9])
    assert torch.equal(token_kl(mean, mean.clone(), std, PATCH), torch.zeros(2, 8))
    lp = token_log_prob(x_next, mean, std, PATCH)
    assert torch.equal(lp, token_log_prob(x_next, mean.clone(), std, PATCH))


# --------------------------------------------------------------------------------------------
# Invariant 2: closed-form token KL equals a Monte-Carlo estimate under x' ~ pi_old.
# --------------------------------------------------------------------------------------------

def test_token_kl_matches_monte_carlo_estimate():
    # l(mu_old) - l(mu_new) = KL_n - sum_e eps_e*dmu_e/s^2 with eps ~ N(0, s^2): unbiased,
    # per-sample variance sum_e dmu_e^2/s^2 = 2*KL_n, so the MC standard error is sqrt(2 KL_n / M).
    shape, patch = (2, 2, 2, 4, 4), (1, 2, 2)   # 8 tokens of D = 8 per row
    m = 20000
    mu_old = _rand(shape, 50)
    std = torch.tensor([0.5, 1.2])
    g = torch.Generator().manual_seed(51)
    # dmu sized so KL_n is O(0.1..2) nats per token.
    dmu = torch.randn(shape, generator=g) * std.view(-1, 1, 1, 1, 1) * 0.4
    mu_new = mu_old + dmu
    kl = token_kl(mu_new, mu_old, std, patch)                     # (2, 8)

    z = torch.randn((m,) + shape, generator=g)
    x_next = (mu_old + std.view(-1, 1, 1, 1, 1) * z).reshape((m * shape[0],) + shape[1:])
    rep = lambda t: t.expand((m,) + shape).reshape((m * shape[0],) + shape[1:])  # noqa: E731
    std_rep = std.repeat(m)
    lp_old = token_log_prob(x_next, rep(mu_old), std_rep, patch)
    lp_new = token_log_prob(x_next, rep(mu_new), std_rep, patch)
    diff = (lp_old - lp_new).double().reshape(m, shape[0], -1)    # (M, B, N)
    mc = diff.mean(dim=0)
    se = (2.0 * kl.double() / m).sqrt()
    # The empirical SE agrees with the analytic one (sanity of the bound we test against).
    torch.testing.assert_close(diff.std(dim=0) / math.sqrt(m), se, rtol=0.05, atol=1e-6)
    assert float(kl.min()) > 0.02
    # 5 standard errors (two-sided p ~ 6e-7 per token) plus float32 round-off headroom.
    err = (mc - kl.double()).abs()
    assert bool((err <= 5.0 * se + 1e-4).all()), (err / se).max()
    # The whole-row KL too, with its own (smaller relative) standard error.
    row_err = (mc.sum(dim=1) - kl.double().sum(dim=1)).abs()
    row_se = (2.0 * kl.double().sum(dim=1) / m).sqrt()
    assert bool((row_err <= 5.0 * row_se + 1e-3).all())


# --------------------------------------------------------------------------------------------
# Invariant 4: token quantities sum to the whole-latent quantities; granularity="sample".
# --------------------------------------------------------------------------------------------

def test_token_kl_sums_to_whole_latent_kl():
    shape, patch = (3, 4, 2, 4, 6), (1, 2, 2)
    mu_new, mu_old = _rand(shape, 60), _rand(shape, 61)
    std = torch.tensor([0.2, 0.8, 1.5])
    kl = token_kl(mu_new, mu_old, std, patch)
    whole = ((mu_new.double() - mu_old.double()) ** 2).sum(dim=(1, 2, 3, 4)) / (2 * std.double() ** 2)
    torch.testing.assert_close(kl.double().sum(dim=1), whole, rtol=1e-5, atol=1e-5)


def test_token_log_prob_sums_to_whole_latent_gaussian_log_density():
    shape, patch = (3, 4, 2, 4, 6), (1, 2, 2)
    x_next, mean = _rand(shape, 62), _rand(shape, 63)
    std = torch.tensor([0.3, 1.0, 2.5])
    lp = token_log_prob(x_next, mean, std, patch)
    ref = torch.distributions.Normal(mean.double(), std.double().view(-1, 1, 1, 1, 1)) \
        .log_prob(x_next.double()).sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(lp.double().sum(dim=1), ref, rtol=1e-5, atol=1e-3)


def _sample_setup(target_mean_kl):
    """Two rows of real latents whose per-element mean KL is exactly ``target_mean_kl``."""
    shape, patch = (2, 4, 2, 4, 4), (1, 2, 2)
    n, d = patch_count(shape, patch)
    mu_old = _rand(shape, 70)
    std = torch.tensor([0.5, 0.5])
    direction = _rand(shape, 71)
    # Scale dmu so that mean_e dmu^2/(2 s^2) = target (per row).
    per_el = (direction.double() ** 2).mean(dim=(1, 2, 3, 4)) / (2 * 0.25)
    dmu = direction * (target_mean_kl / per_el).sqrt().float().view(-1, 1, 1, 1, 1)
    mu_new = mu_old + dmu
    kl = token_kl(mu_new, mu_old, std, patch)
    return kl, n, d, (mu_new, mu_old, std)


def test_sample_granularity_kl_is_whole_latent_kl_over_element_count():
    kl, n, d, (mu_new, mu_old, std) = _sample_setup(1e-3)
    whole_over_el = ((mu_new.double() - mu_old.double()) ** 2 / (2 * std.double().view(-1, 1, 1, 1, 1) ** 2)) \
        .mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(kl.double().sum(dim=1) / (n * d), whole_over_el, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(whole_over_el, torch.full((2,), 1e-3, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("factor,dropped", [(1.001, False), (0.999, True)])
def test_sample_granularity_mask_uses_per_element_mean_kl(factor, dropped):
    # The per-element mean KL is 1e-3; delta just above it keeps the row, just below drops it.
    mean_kl = 1e-3
    kl, n, d, _ = _sample_setup(mean_kl)
    delta = mean_kl * factor
    # rho > 1 and A > 0 on both rows: the "pushing further" case, so only KL decides.
    logp_old = torch.zeros(2, n)
    logp_new = torch.full((2, n), 0.01 * d)  # per-element mean log-ratio 0.01
    adv = torch.tensor([1.5, 0.5])
    loss, stats = flow_dppo_loss(logp_new, logp_old, kl, adv, delta, granularity="sample",
                                 elements_per_token=d)
    if dropped:
        assert float(stats["drop_frac"]) == 1.0
        assert float(loss) == 0.0
    else:
        assert float(stats["drop_frac"]) == 0.0
        expected = -(1.5 + 0.5) * math.exp(0.01) / 2  # Z = B terms, one per (b, k)
        assert float(loss) == pytest.approx(expected, rel=1e-6)
    # Token granularity, the same delta per element: exactly the tokens whose own KL per element
    # is past delta (a per-token reading, every token KL > 5 delta, would drop them all).
    assert float(kl.min()) > 5 * delta
    _, tok_stats = flow_dppo_loss(logp_new, logp_old, kl, adv, delta, granularity="token",
                                  elements_per_token=d)
    assert float(tok_stats["dropped"]) == float((kl / d > delta).sum())


def test_sample_granularity_loss_value_uses_per_element_mean_log_ratio():
    n, d = 6, 8
    g = torch.Generator().manual_seed(80)
    logp_old = torch.randn(3, n, generator=g) * 10
    logp_new = logp_old + torch.randn(3, n, generator=g)
    kl = torch.rand(3, n, generator=g)
    adv = torch.tensor([1.0, -2.0, 0.5])
    # Per-element mean KL <= 1/8 < delta: nothing dropped.
    loss, stats = flow_dppo_loss(logp_new, logp_old, kl, adv, 0.2, granularity="sample",
                                 elements_per_token=d)
    assert float(stats["drop_frac"]) == 0.0
    rho = [math.exp(float((logp_new[b].double() - logp_old[b].double()).sum()) / (n * d)) for b in range(3)]
    expected = -sum(float(adv[b]) * rho[b] for b in range(3)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Row 0 (A>0) with a positive mean log-ratio and a mean KL above delta is dropped alone;
    # row 1 (A<0) has the same KL but is not dropped when its update is corrective (rho > 1).
    logp_new2 = logp_new.clone()
    logp_new2[0] = logp_old[0] + 0.5      # mean log-ratio 0.5/8 > 0, A_0 > 0: pushing
    logp_new2[1] = logp_old[1] + 0.25     # mean log-ratio > 0, A_1 < 0: corrective
    kl2 = kl.clone()
    kl2[0] = 1.0  # mean KL over elements = 1/8 > delta
    kl2[1] = 1.0
    loss2, stats2 = flow_dppo_loss(logp_new2, logp_old, kl2, adv, 0.1, granularity="sample",
                                   elements_per_token=d)
    rho2 = [math.exp(float((logp_new2[b].double() - logp_old[b].double()).sum()) / (n * d)) for b in range(3)]
    expected2 = -(float(adv[1]) * rho2[1] + float(adv[2]) * rho2[2]) / 3
    assert float(loss2) == pytest.approx(expected2, rel=1e-5)
    assert float(stats2["dropped"]) == 1.0 and float(stats2["terms"]) == 3.0
    # The same token KL of 1.0 is 1/8 per element, below a delta of 0.2 per element: token mode
    # keeps all; at 0.1 per element it drops row 0's tokens (pushing) and keeps row 1's (corrective).
    _, tok_stats = flow_dppo_loss(logp_new2, logp_old, kl2, adv, 0.2, granularity="token", elements_per_token=d)
    assert float(tok_stats["dropped"]) == 0.0
    _, tok_stats = flow_dppo_loss(logp_new2, logp_old, kl2, adv, 0.1, granularity="token", elements_per_token=d)
    assert float(tok_stats["dropped"]) == float(n)


@pytest.mark.parametrize("granularity", ["token", "sample"])
def test_every_granularity_requires_elements_per_token(granularity):
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="elements_per_token"):
        flow_dppo_loss(z, z, z, torch.ones(2), 0.1, granularity=granularity, elements_per_token=None)
