"""Seed-level statistics of the sweep report, against known numbers and scipy."""

import math

import numpy as np
import pytest
from scipy import stats

from eval.stats import mean_interval, paired_difference, verdict


def test_mean_interval_matches_known_numbers_and_scipy():
    ci = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, s = 1.5811, t(0.975, 4) = 2.7764
    assert ci.mean == 3.0 and ci.n == 5
    assert ci.low == pytest.approx(1.03675, abs=1e-4) and ci.high == pytest.approx(4.96325, abs=1e-4)
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        x = rng.normal(size=n)
        low, high = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        ci = mean_interval(list(x))
        assert ci.low == pytest.approx(low) and ci.high == pytest.approx(high)


def test_paired_difference_uses_shared_seeds_and_agrees_with_a_paired_t_test():
    arm = {0: 10.0, 1: 12.0, 2: 11.5, 3: 99.0}  # seed 3 has no reference: left out
    reference = {0: 9.0, 1: 10.5, 2: 10.0}
    diff = paired_difference(arm, reference)
    assert diff.n == 3 and diff.mean == pytest.approx((1.0 + 1.5 + 1.5) / 3)
    p = stats.ttest_rel([10.0, 12.0, 11.5], [9.0, 10.5, 10.0]).pvalue
    assert (p < 0.05) == (diff.low > 0)  # the 95% interval excludes 0 exactly when the paired test rejects
    assert verdict(diff, higher_is_better=True) == "better" and verdict(diff, higher_is_better=False) == "worse"


def test_verdicts_for_overlap_and_single_seeds():
    noisy = paired_difference({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert verdict(noisy, higher_is_better=True) == "no detectable difference"
    single = mean_interval([4.0])
    assert single.n == 1 and math.isnan(single.low) and verdict(single, True) == "too few seeds to tell"
    assert "no interval" in str(single)
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})
