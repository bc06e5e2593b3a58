"""Confidence intervals (over a sweep's seeds, over a validation's images) and the verdict a sweep
report gives for an arm against its reference.

Student-t intervals: with the 2-5 seeds a sweep affords, a normal interval would be far too narrow.
Differences to the reference arm are paired by seed (same seed: same initial weights and data
order), which removes the between-seed variance both arms share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # nan with fewer than 2 values
    high: float
    n: int

    @property
    def known(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low)

    @property
    def half_width(self) -> float:
        """Half the interval's width (an error bar); 0 where there is no interval."""
        return (self.high - self.low) / 2 if self.known else 0.0

    def __str__(self) -> str:
        if not self.known:
            return f"{self.mean:.4g} (n={self.n}, no interval)"
        return f"{self.mean:.4g} ± {self.half_width:.2g} (n={self.n})"


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and its two-sided Student-t confidence interval."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values to average")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, len(x))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x))


def paired_difference(arm: dict[int, float], reference: dict[int, float], confidence: float = CONFIDENCE) -> Interval:
    """Interval of arm - reference over the seeds both have."""
    seeds = sorted(set(arm) & set(reference))
    if not seeds:
        raise ValueError("the arm and its reference share no seed")
    return mean_interval([arm[s] - reference[s] for s in seeds], confidence)


def verdict(difference: Interval, higher_is_better: bool) -> str:
    """'better' or 'worse' when the interval of the difference excludes 0; otherwise no detectable difference."""
    if not difference.known:
        return "too few seeds to tell"
    if difference.low > 0 or difference.high < 0:
        return "better" if (difference.mean > 0) == higher_is_better else "worse"
    return "no detectable difference"
