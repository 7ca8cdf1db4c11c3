"""Notebook 06's verdicts: bootstrap intervals over seeds on each fall and slope, and the rules that read them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from studylib.lm_exact.story import FALL, _fall_and_slope, bootstrap_falls, falls, reading, verdict

SIZES = np.array([2**15, 2**16, 2**17, 2**18])


def test_a_one_over_n_excess_falls_8x_with_slope_minus_one_whatever_the_seeds_scale():
    excess = (1 / SIZES)[None] * np.array([[1.0], [1.3], [0.8], [1.1], [0.9]])
    out = bootstrap_falls(excess, SIZES)
    assert out["fall_low"] == pytest.approx(8.0) and out["fall_high"] == pytest.approx(8.0)
    assert out["slope_low"] == pytest.approx(-1.0) and out["slope_high"] == pytest.approx(-1.0)


def test_the_interval_holds_the_estimate_and_widens_with_the_seeds_spread():
    rng = np.random.default_rng(0)
    calm = (0.1 * (SIZES / SIZES[0]) ** -0.5)[None] * (1 + 0.05 * rng.standard_normal((5, 4)))
    wild = (0.1 * (SIZES / SIZES[0]) ** -0.5)[None] * (1 + 0.4 * rng.standard_normal((5, 4)))
    widths = []
    for excess in (calm, wild):
        out = bootstrap_falls(excess, SIZES)
        fall, slope = _fall_and_slope(excess.mean(0), np.log(SIZES))
        assert out["fall_low"] <= fall <= out["fall_high"] and out["slope_low"] <= slope <= out["slope_high"]
        widths.append(out["fall_high"] - out["fall_low"])
    assert widths[1] > 3 * widths[0]
    assert bootstrap_falls(calm, SIZES) == bootstrap_falls(calm, SIZES)  # seeded


def test_an_excess_below_the_floor_is_a_fall_to_the_floor_and_its_slope_uses_the_positive_means():
    fall, slope = _fall_and_slope(np.array([0.08, 0.04, 0.02, -0.001]), np.log(SIZES))
    assert math.isinf(fall) and slope == pytest.approx(-1.0)
    assert math.isnan(_fall_and_slope(np.array([-0.1, 0.04, 0.02, 0.01]), np.log(SIZES))[0])


def test_verdicts_are_read_from_the_interval_and_the_limit():
    assert verdict(FALL, 9.0) == "holds" and verdict(1.0, FALL - 1e-9) == "fails" and verdict(2.9, 3.1) == "undecided"
    assert reading({"verdict": "holds", "limit_excess": 1.0, "excess_at_n_max": 0.1}) == "falls with n"
    assert reading({"verdict": "fails", "limit_excess": 0.07, "excess_at_n_max": 0.071}).startswith("sits at")
    assert reading({"verdict": "undecided", "limit_excess": 0.001, "excess_at_n_max": 0.05}).startswith("above")


def test_the_falls_table_carries_the_intervals_the_rate_the_seeds_and_the_limit():
    rows = []
    for seed in range(5):
        for n in SIZES:
            for method, excess in (("RDRO", 1000 / n), ("DPO", 0.07 + 0 * n)):
                rows += [
                    {"setting": "S1", "method": method, "n": n, "seed": seed, "split": "heldout", "excess": excess}
                ]
    limits = pd.DataFrame({"setting": ["S1", "S1"], "method": ["RDRO", "DPO"], "limit_excess_heldout": [0.0, 0.07]})
    conv = pd.DataFrame({"setting": [], "method": [], "n": [], "converged": []})
    table = falls(pd.DataFrame(rows), limits, conv, {("S1", "RDRO"): 0.01, ("S1", "DPO"): 0.003}).set_index("method")
    assert table.loc["RDRO", "verdict"] == "holds" and table.loc["RDRO", "fall"] == pytest.approx(8.0)
    assert table.loc["DPO", "verdict"] == "fails" and table.loc["DPO", "reading"] == "sits at its infinite-data limit"
    assert table.loc["DPO", "lr"] == 0.003 and (table["seeds"] == 5).all()
    assert table.loc["RDRO", "as_expected"] and table.loc["DPO", "as_expected"]
