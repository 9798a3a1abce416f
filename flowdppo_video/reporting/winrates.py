"""Comparing models on the same prompts and seeds: means with confidence intervals, win-rates.

Pure functions over scores keyed by ``(prompt, seed)``.

* Confidence intervals of means are **percentile bootstrap** intervals: ``resamples`` resamplings of
  the items with replacement, from ``numpy.random.default_rng(seed)`` with a fixed seed, so the
  same scores always give the same interval. No normality is assumed (rewards are often
  bounded and skewed).
* A **win-rate** of A over B is ``(wins + ties / 2) / n`` over the ``n`` pairs that share a
  ``(prompt, seed)``: A wins a pair when its score is higher. Ties count as half a win, so
  ``winrate(A, B) + winrate(B, A) = 1``, and a model against itself scores 0.5. Its interval is
  the **Wilson score interval** of a proportion over ``n`` pairs: unlike a bootstrap of the pairs,
  it does not collapse to ``[1, 1]`` when A wins every one of a few pairs (2 wins of 2 give
  ``[0.34, 1]``), and it is close to a paired bootstrap's when ``n`` is large. A tie varies
  less than a win-or-loss coin flip would, so counting it as half a success keeps the interval
  conservative.
* Over a handful of seeds the benchmarks' tables use :func:`bootstrap_ci` / :func:`mean_ci_text`
  (stdlib ``random``; see there why it is a second bootstrap).
* Below ``SMALL_N`` pairs :func:`small_sample_warning` says so in words.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from statistics import NormalDist
from typing import Hashable, Mapping, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0
SMALL_N = 30          # fewer (prompt, seed) pairs than this: a win-rate is called a small sample


@dataclass(frozen=True)
class Estimate:
    """A value with its ``LEVEL`` confidence interval ``[lo, hi]`` over ``n`` items."""

    value: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class WinRate(Estimate):
    """``value`` = ``(wins + ties / 2) / n``."""

    wins: int = 0
    ties: int = 0
    losses: int = 0


def _bootstrap(values: np.ndarray, stat, level: float, resamples: int, seed: int) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        v = float(stat(values[None])[0])
        return v, v
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    stats = stat(values[idx])
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def mean_ci(values: Sequence[float] | np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES,
            seed: int = SEED) -> Estimate:
    """Mean of ``values`` with a percentile-bootstrap interval (one value: a zero-width interval)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"mean_ci needs a non-empty 1-D list of scores, got shape {v.shape}")
    lo, hi = _bootstrap(v, lambda x: x.mean(axis=-1), level, resamples, seed)
    return Estimate(float(v.mean()), lo, hi, int(v.size))


def bootstrap_ci(xs: Sequence[float], n: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95% percentile interval of the mean of a handful of per-seed values (the benchmarks' tables
    over seeds): ``n`` resamplings with replacement from :class:`random.Random` (``seed``), the
    ``int(0.025 n)``-th and ``(int(0.975 n) - 1)``-th of the sorted means; degenerate with one value.

    Not :func:`mean_ci`: the frontier and clean-RL reports were computed with this one; on the
    committed frontier 20 of its 176 intervals differ from :func:`mean_ci`'s (third decimal), so the
    committed reports regenerate byte for byte only from this one.
    """
    xs = list(xs)
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def mean_ci_text(xs: Sequence[float], scale: float = 1.0, d: int = 3, signed: bool = False) -> str:
    """``"mean [lo, hi]"`` of ``xs`` times ``scale`` (NaNs dropped): the mean and its
    :func:`bootstrap_ci` interval, ``d`` decimals, a sign with ``signed``; ``"n/a"`` for nothing."""
    xs = [x * scale for x in xs if x == x]
    if not xs:
        return "n/a"
    lo, hi = bootstrap_ci(xs)
    sg = "+" if signed else ""
    return f"{statistics.fmean(xs):{sg}.{d}f} [{lo:{sg}.{d}f}, {hi:{sg}.{d}f}]"


def paired(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[np.ndarray, np.ndarray]:
    """The scores of ``a`` and ``b`` on the same keys, in a fixed order; the key sets must match."""
    if set(a) != set(b):
        only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
        raise ValueError(f"paired scores need the same (prompt, seed) items: {only_a} only in the first, "
                         f"{only_b} only in the second")
    if not a:
        raise ValueError("no paired scores to compare")
    keys = sorted(a, key=repr)
    return np.array([a[k] for k in keys], dtype=np.float64), np.array([b[k] for k in keys], dtype=np.float64)


def wilson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``successes`` may be fractional)."""
    if n < 1:
        raise ValueError("wilson needs n >= 1")
    z = float(NormalDist().inv_cdf(0.5 + level / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = LEVEL) -> WinRate:
    """Win-rate of ``a`` over ``b``, paired by key (``(prompt, seed)``), ties as half a win, with
    its Wilson score interval."""
    x, y = paired(a, b)
    points = np.where(x > y, 1.0, np.where(x == y, 0.5, 0.0))
    lo, hi = wilson(float(points.sum()), int(points.size), level)
    wins, ties = int((x > y).sum()), int((x == y).sum())
    return WinRate(float(points.mean()), lo, hi, int(points.size), wins=wins, ties=ties,
                   losses=int(points.size) - wins - ties)


def win_matrix(scores: Mapping[str, Mapping[Hashable, float]], level: float = LEVEL
               ) -> dict[tuple[str, str], WinRate]:
    """``{(A, B): win_rate(A over B)}`` for every ordered pair of distinct models in ``scores``."""
    names = list(scores)
    return {(p, q): win_rate(scores[p], scores[q], level) for p in names for q in names if p != q}


def fmt(e: Estimate, digits: int = 4) -> str:
    """``value [lo, hi]``."""
    return f"{e.value:.{digits}f} [{e.lo:.{digits}f}, {e.hi:.{digits}f}]"


def small_sample_warning(n: int, what: str = "win-rates") -> str | None:
    """A sentence for readers of ``what`` computed over ``n`` (prompt, seed) pairs, or ``None``
    when ``n >= SMALL_N``."""
    if n >= SMALL_N:
        return None
    lo, _ = wilson(n, n)
    return (f"warning: the {what} rest on only {n} (prompt, seed) pair{'s' if n != 1 else ''} per comparison; "
            f"even winning all of them gives an interval from {lo:.2f} to 1, so a difference may be luck. "
            f"Use {SMALL_N} or more pairs (more prompts, or --samples) before deciding from them.")
