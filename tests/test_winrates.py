"""Means with bootstrap intervals and paired win-rates, checked by hand on small tables."""

from __future__ import annotations

import numpy as np
import pytest

from flowdppo_video.winrates import mean_ci, win_matrix, win_rate

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
    # C is above A everywhere: a win-rate of 1 with a zero-width interval.
    c = win_rate(C, A)
    assert (c.value, c.lo, c.hi, c.wins) == (1.0, 1.0, 1.0, 6)


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
