"""Intervals over prompts: the percentile bootstrap, paired differences, and the power to see an effect.

An evaluation scores each held-out prompt once per method and seed (a win rate over its samples, a KL, ...);
prompts are the unit that varies, so intervals resample prompts with replacement. Two methods judged on the same
prompts against the same reference samples (``studylib.lm.evaluate``) are compared by resampling the prompts'
*differences*: the paired bootstrap, much tighter than two separate intervals when the prompts' values correlate.
Several seeds of a method: each prompt's value is its mean over the seeds, then prompts are resampled (the
interval is over prompts for those seeds' trained policies; seeds are not resampled).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import bootstrap, norm

N_RESAMPLES = 4000
LEVEL = 0.95


def bootstrap_interval(
    values: np.ndarray, n_resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of per-prompt ``values`` and its percentile bootstrap interval (prompts
    resampled with replacement ``n_resamples`` times from a generator seeded by ``(seed, number of prompts)``), by
    ``scipy.stats.bootstrap``. One prompt has nothing to resample: its interval is the value itself."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"need a non-empty 1-d array of finite per-prompt values, got shape {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(values.mean())
    if values.size == 1:
        return mean, mean, mean
    interval = bootstrap(
        (values,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=level,
        method="percentile",
        random_state=np.random.default_rng([seed, values.size]),  # scipy >= 1.15 also names it rng
    ).confidence_interval
    return mean, float(interval.low), float(interval.high)


def paired_difference_interval(
    a: np.ndarray, b: np.ndarray, n_resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``a - b`` over prompts, both measured on the same prompts in the same order."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same prompts: shapes {a.shape} and {b.shape}")
    return bootstrap_interval(a - b, n_resamples, level, seed)


def detectable_effect(sd: float, n_prompts: int, level: float = LEVEL, power: float = 0.8) -> float:
    """The smallest true effect (e.g. win rate - 0.5) a two-sided test at ``level`` detects with probability
    ``power`` from ``n_prompts`` prompts whose per-prompt values have standard deviation ``sd``:
    ``(z_{1-(1-level)/2} + z_power) sd / sqrt(n)`` (normal approximation)."""
    if sd < 0 or n_prompts < 1:
        raise ValueError(f"need sd >= 0 and n_prompts >= 1, got {sd} and {n_prompts}")
    return (norm.ppf(1 - (1 - level) / 2) + norm.ppf(power)) * sd / math.sqrt(n_prompts)


def prompts_needed(sd: float, effect: float, level: float = LEVEL, power: float = 0.8) -> int:
    """Prompts needed to detect a true ``effect`` with ``power`` (the inverse of ``detectable_effect``)."""
    if effect <= 0:
        raise ValueError(f"effect must be > 0, got {effect}")
    return math.ceil(((norm.ppf(1 - (1 - level) / 2) + norm.ppf(power)) * sd / effect) ** 2)
