"""Means with bootstrap intervals and paired win-rates, checked by hand on small tables."""

from __future__ import annotations

import numpy as np
import pytest

from flowdppo_video.reporting.winrates import (
    SMALL_N, mean_ci, small_sample_warning, wilson, win_matrix, win_rate)

# 3 prompts x 2 seeds; keys are (prompt index, seed).
KEYS = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
A = dict(zip(KEYS, [0.9, 0.5, 0.3, 0.7, 0.2, 0.6]))
B = dict(zip(KEYS, [0.8, 0.5, 0.4, 0.7, 0.1, 0.6]))
C = dict(zip(KEYS, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))


def test_win_rate_by_hand():
    # A beats B on (0,0) and (2,0); ties on (0,1), (1,1), (2,1); loses on (1,0): (2 + 3/2) / 6.
    w = win_rate(A, B)
    assert (w.wins, w.ties, w.losses, w.n) == (2, 3, 1, 6)
    assert w.value == pytest.approx(3.5 / 6)
    assert win_rate(B, A).value == pytest.approx(2.5 / 6)       # ties are shared: the two sum to 1
    assert win_rate(A, A).value == 0.5
    assert 0.0 <= w.lo <= w.value <= w.hi <= 1.0
    # C is above A everywhere: a win-rate of 1, but 6 pairs cannot rule out much less (Wilson:
    # 6 wins of 6 give [0.61, 1]; a bootstrap of the pairs would say [1, 1]).
    c = win_rate(C, A)
    assert (c.value, c.hi, c.wins) == (1.0, 1.0, 6)
    assert c.lo == pytest.approx(0.6097, abs=1e-4)


def test_pairing_is_by_key_not_by_order():
    shuffled = dict(reversed(list(B.items())))
    assert win_rate(A, shuffled) == win_rate(A, B)
    with pytest.raises(ValueError, match="1 only in the first"):
        win_rate(A, {k: v for k, v in B.items() if k != (2, 1)})


def test_win_matrix_covers_every_ordered_pair():
    m = win_matrix({"a": A, "b": B, "c": C})
    assert set(m) == {("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")}
    for (p, q), w in m.items():
        assert w.value + m[(q, p)].value == pytest.approx(1.0)


def test_mean_ci():
    e = mean_ci([0.2, 0.4, 0.9])
    assert e.value == pytest.approx(0.5) and e.n == 3
    assert 0.2 <= e.lo < 0.5 < e.hi <= 0.9
    assert mean_ci([0.2, 0.4, 0.9]) == e                       # fixed seed: the same interval every time
    same = mean_ci([0.7] * 5)
    assert (same.lo, same.hi) == (0.7, 0.7)
    one = mean_ci([0.3])
    assert (one.value, one.lo, one.hi) == (0.3, 0.3, 0.3)
    # Many normal samples: the bootstrap interval is close to mean +- 1.96 s / sqrt(n).
    x = np.random.default_rng(1).normal(size=400)
    big = mean_ci(x)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert (big.hi - big.lo) / 2 == pytest.approx(half, rel=0.1)
    with pytest.raises(ValueError):
        mean_ci([])


def test_wilson_interval_reflects_small_samples():
    # Textbook values (Wilson 1927; e.g. 0 of 10 -> [0, 0.278], 5 of 10 -> [0.237, 0.763]).
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo2, hi2 = wilson(2, 2)
    assert (round(lo2, 2), hi2) == (0.34, 1.0)             # 2 wins of 2 prove little
    assert wilson(200, 200)[0] > 0.98                      # 200 of 200 prove a lot
    # Many pairs: close to the paired bootstrap of the win points (what the interval was before).
    rng = np.random.default_rng(0)
    a = {i: float(v) for i, v in enumerate(rng.normal(size=400))}
    b = {i: float(v) for i, v in enumerate(rng.normal(0.2, 1.0, size=400))}
    w = win_rate(a, b)
    points = np.array([1.0 if a[i] > b[i] else 0.0 for i in a])
    boot = points[rng.integers(0, 400, size=(10_000, 400))].mean(axis=1)
    assert w.lo == pytest.approx(np.quantile(boot, 0.025), abs=0.01)
    assert w.hi == pytest.approx(np.quantile(boot, 0.975), abs=0.01)


def test_small_sample_warning():
    msg = small_sample_warning(2)
    assert msg.startswith("warning: the win-rates rest on only 2 (prompt, seed) pairs")
    assert "from 0.34 to 1" in msg and f"{SMALL_N} or more pairs" in msg
    assert small_sample_warning(SMALL_N) is None
