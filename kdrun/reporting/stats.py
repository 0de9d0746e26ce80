"""Honest error bars: Wilson intervals for accuracies, Newcombe's interval for a difference, t-intervals over seeds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.959964


def wilson_interval(acc: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy ``acc`` measured on ``n`` images (95% by default)."""
    if n <= 0:
        raise ValueError(f"an accuracy over n={n} images has no interval")
    denom = 1 + z * z / n
    centre = (acc + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(acc1: float, n1: int, acc2: float, n2: int) -> tuple[float, float]:
    """95% interval of ``acc1 - acc2``: Newcombe's hybrid score interval (his method 10) from two Wilson intervals.

    It treats the two accuracies as independent. On one shared test set the models' errors are positively
    correlated, which makes the true interval narrower: this one errs on the wide (cautious) side.
    """
    low1, high1 = wilson_interval(acc1, n1)
    low2, high2 = wilson_interval(acc2, n2)
    diff = acc1 - acc2
    return (
        diff - math.sqrt((acc1 - low1) ** 2 + (high2 - acc2) ** 2),
        diff + math.sqrt((high1 - acc1) ** 2 + (acc2 - low2) ** 2),
    )


def contains_zero(low: float, high: float) -> bool:
    """Whether the interval [low, high] contains 0: a difference within noise."""
    return low <= 0 <= high


@dataclass(frozen=True)
class MeanInterval:
    """Mean of ``n`` values with its sample std (ddof=1) and Student-t 95% interval; None where n is too small."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None

    @property
    def within_noise(self) -> bool | None:
        """Whether the interval contains 0 (None: no interval)."""
        return None if self.low is None or self.high is None else contains_zero(self.low, self.high)


def t_interval(values: list[float], level: float = 0.95) -> MeanInterval:
    """The mean of ``values`` with Student's t interval on n-1 degrees of freedom (n=1: no std, no interval)."""
    n = len(values)
    if n == 0:
        return MeanInterval(0, None, None, None, None)
    mean = statistics.fmean(values)
    if n == 1:
        return MeanInterval(1, mean, None, None, None)
    from scipy.stats import t

    std = statistics.stdev(values)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return MeanInterval(n, mean, std, mean - half, mean + half)
