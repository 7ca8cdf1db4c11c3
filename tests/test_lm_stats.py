"""Bootstrap intervals over prompts: they cover the truth at about their level, pair correctly, and the power
calculation inverts."""

from __future__ import annotations

import numpy as np
import pytest

from studylib.lm.stats import bootstrap_interval, detectable_effect, paired_difference_interval, prompts_needed


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Synthetic evaluations with a known truth: 64 prompts whose win rates are Beta(3, 2) draws (true mean 0.6),
    300 repetitions. A 95% interval should miss about 15 times; the binomial 99.9% range is 5-28."""
    rng = np.random.default_rng(0)
    truth, covered = 0.6, 0
    for rep in range(300):
        values = rng.beta(3, 2, size=64)
        _, low, high = bootstrap_interval(values, n_resamples=1000, seed=rep)
        covered += low <= truth <= high
    assert 272 <= covered <= 295


def test_paired_interval_is_tighter_than_separate_ones_and_covers_the_difference():
    """Two methods share each prompt's difficulty (a common shock): the paired interval of their difference is
    far narrower than either interval, and covers the true difference 0.05 in most repetitions."""
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(200):
        shock = rng.normal(0, 0.2, size=64)
        a = 0.55 + shock + rng.normal(0, 0.03, size=64)
        b = 0.50 + shock + rng.normal(0, 0.03, size=64)
        diff, low, high = paired_difference_interval(a, b, n_resamples=1000, seed=rep)
        _, a_low, a_high = bootstrap_interval(a, n_resamples=1000, seed=rep)
        assert high - low < (a_high - a_low) / 3
        covered += low <= 0.05 <= high
    assert 178 <= covered <= 198


def test_bootstrap_hand_values_and_errors():
    mean, low, high = bootstrap_interval(np.array([0.0, 1.0]), n_resamples=2000)
    assert mean == 0.5 and low == 0.0 and high == 1.0  # resamples: both 0, both 1, or one each
    assert bootstrap_interval(np.full(10, 0.3)) == pytest.approx((0.3, 0.3, 0.3))
    with pytest.raises(ValueError, match="non-empty 1-d array of finite"):
        bootstrap_interval(np.array([]))
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(np.ones(3), level=1.5)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference_interval(np.ones(3), np.ones(4))


def test_power_calculation_hand_values_and_inverse():
    # (1.96 + 0.8416) * 0.2 / sqrt(64) = 0.0700
    assert detectable_effect(0.2, 64) == pytest.approx(0.07004, abs=1e-4)
    n = prompts_needed(0.2, 0.07004)
    assert n == 64
    assert detectable_effect(0.2, prompts_needed(0.3, 0.02)) <= 0.02 * 0.2 / 0.3 + 1e-9
    with pytest.raises(ValueError, match="effect"):
        prompts_needed(0.2, 0.0)


def test_the_interval_is_the_percentile_bootstrap_of_these_resamples():
    """``scipy.stats.bootstrap`` computes it; the same resamples drawn by hand (the seeded generator's prompt
    indices, one row per resample) and their 2.5% and 97.5% quantiles give the same interval, up to rounding."""
    values = np.random.default_rng(3).beta(3, 2, size=37)
    rng = np.random.default_rng([5, values.size])
    means = values[rng.integers(0, values.size, size=(500, values.size))].mean(axis=1)
    expected = np.quantile(means, [0.025, 0.975])
    mean, low, high = bootstrap_interval(values, n_resamples=500, seed=5)
    assert mean == pytest.approx(values.mean(), rel=1e-15)
    assert (low, high) == pytest.approx(tuple(expected), rel=1e-12)
    assert bootstrap_interval(np.array([0.25])) == (0.25, 0.25, 0.25)  # one prompt: nothing to resample
