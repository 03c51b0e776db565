"""Statistics over training seeds: mean, spread, a Student-t interval, and a paired sign-flip test (exact up to
16 seeds, a seeded Monte Carlo beyond).

scipy is not a dependency and torch's StudentT has no `icdf` (NotImplementedError in torch 2.13) nor does
torch.special have the incomplete beta function, so the t quantile comes from the t distribution's closed-form
CDF for an integer number of degrees of freedom (ours is always n − 1) and a bisection.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # every interval in the report is a 95% interval
# Up to EXACT_UP_TO seeds all 2^n sign patterns are enumerated; beyond, DRAWS random ones (a seeded Monte Carlo)
EXACT_UP_TO = 16
DRAWS = 2**16  # the report's texts say "2^16"


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with an integer `df` ≥ 1 (Abramowitz & Stegun 26.7.3-4, finite sums)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2:  # odd: A = 2/π (θ + sin θ cos θ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + …))
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = (2 / math.pi) * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:  # even: A = sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + …)
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = s * total
    return 0.5 + math.copysign(inside / 2, t)  # `inside` is P(|T| < |t|)


def t_quantile(p: float, df: int) -> float:
    """The t such that P(T ≤ t) = p, by bisection on `t_cdf` (to about 1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Spread:
    """Mean of n values with, for n ≥ 2, the sample standard deviation and a Student-t interval of the mean."""

    n: int
    mean: float
    std: float | None = None  # None for n = 1: one value has no spread (not a spread of 0)
    half_width: float | None = None
    low: float | None = None
    high: float | None = None

    def as_dict(self) -> dict[str, float | int | list[float] | None]:
        ci = None if self.low is None else [self.low, self.high]
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "ci95": ci,
            "ci95_half_width": self.half_width,
        }


def spread(values: list[float], level: float = LEVEL) -> Spread:
    """n, mean, std (n − 1 in the denominator) and the `level` t interval mean ± t_{(1+level)/2, n−1}·std/√n."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Spread(1, mean)
    std = statistics.stdev(values)
    half = t_quantile((1 + level) / 2, len(values) - 1) * std / math.sqrt(len(values))
    return Spread(len(values), mean, std, half, mean - half, mean + half)


def smallest_p(n: int) -> float:
    """The smallest two-sided p the sign-flip test can give with n pairs: 2 / 2^n when exact (the observed
    pattern and its negation always count); beyond EXACT_UP_TO, 1 / (DRAWS + 1), the Monte Carlo's floor."""
    return 2.0 / 2**n if n <= EXACT_UP_TO else 1.0 / (DRAWS + 1)


def p_method(n: int) -> str:
    """How `sign_flip_p` computes p for n pairs, in words."""
    if n <= EXACT_UP_TO:
        return "exact: all 2^n sign patterns"
    return (
        "Monte Carlo: 2^16 random sign patterns (seeded), the observed one counted; smallest p 1/(2^16 + 1)"
    )


def sign_flip_p(differences: list[float]) -> float:
    """Two-sided p of the paired sign-flip permutation test of "mean difference = 0".

    Under the null each pair's difference is as likely to have either sign, so the observed |mean| is ranked
    among the |mean| of all 2^n sign patterns (exact up to EXACT_UP_TO pairs; the observed pattern counts).
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no differences")
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))  # ties that differ only by rounding count as ties
    if d.size <= EXACT_UP_TO:
        bits = (np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1  # row k: the binary digits of k
        signs = 1.0 - 2.0 * bits
        return float(np.mean(np.abs(signs @ d) / d.size >= observed - tolerance))
    signs = np.random.default_rng(0).choice((1.0, -1.0), size=(DRAWS, d.size))
    hits = np.sum(np.abs(signs @ d) / d.size >= observed - tolerance)
    return float((hits + 1) / (DRAWS + 1))
