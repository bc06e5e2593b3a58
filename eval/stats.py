"""Confidence intervals (over a sweep's seeds, over a validation's images, over one run's samples) and
the verdict a sweep report gives for an arm against its reference.

Student-t intervals: with the 2-5 seeds a sweep affords, a normal interval would be far too narrow.
Differences to the reference arm are paired by seed (same seed: same initial weights and data
order), which removes the between-seed variance both arms share.

The noise of one run's FID, KID or CMMD, from its N generated samples alone (the reference held
fixed), is a delete-a-group jackknife: the samples split into G seeded groups (G = N: leave-one-out),
the statistic recomputed without each group, SE² = (G-1)/G Σ(θ_g - θ̄)², and θ̂ ± t(G-1)·SE. Measured on
Gaussian features (2048-d, against the spread of 40 independent sample sets): at N = 128 the
leave-one-out SE came within 6% of the true SD, at N = 512 with 128 groups within 8-18% (wide). A
bootstrap with replacement doubled it (1.9-2.3×): a resample repeats samples, which FID reads as less
diversity, and the extra spread is the repeats', not the samples'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
JACKKNIFE_SEED = 0  # fixed: the same groups in every run, so two runs' intervals differ by their samples only


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # nan with fewer than 2 values
    high: float
    n: int
    sd: float = math.nan  # of the values (ddof 1)

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
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * sd / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x), sd)


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


def jackknife_groups(n: int, groups: int, seed: int = JACKKNIFE_SEED) -> list[np.ndarray]:
    """The row indices of min(n, groups) seeded groups of range(n), of sizes differing by at most one."""
    return np.array_split(np.random.default_rng(seed).permutation(n), min(n, groups))


def jackknife_interval(
    estimate: float, held_out: list[float] | np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """estimate ± t·SE from the statistic recomputed without each group (`held_out`)."""
    values = np.asarray(held_out, dtype=np.float64)
    g = len(values)
    if g < 2:
        raise ValueError("a jackknife needs at least 2 groups")
    se = math.sqrt((g - 1) / g * float(((values - values.mean()) ** 2).sum()))
    half = float(stats.t.ppf(0.5 + confidence / 2, g - 1)) * se
    return estimate - half, estimate + half
