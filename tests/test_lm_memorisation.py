"""Seen and fresh log-ratios (``studylib.lm.memorisation``): the table by hand, and a tiny run end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from studylib.checks import UserError
from studylib.lm.experiment import run_experiment
from studylib.lm.memorisation import FRESH, SEEN, approval_gap, gap_label, log_ratio_table, main, seen_and_fresh


def test_the_table_averages_within_prompts_first():
    prompt = np.array([0, 0, 0, 1, 1])
    approved = np.array([True, True, False, True, False])
    log_ratio = np.array([1.0, 3.0, -1.0, 4.0, -3.0])
    rows = {r["approved"]: r for r in log_ratio_table(prompt, "seen", approved, log_ratio)}
    assert rows[True]["log_ratio"] == pytest.approx((2.0 + 4.0) / 2)  # prompt 0's mean 2, prompt 1's 4
    assert rows[True]["n"] == 3 and rows[True]["prompts"] == 2
    assert rows[False]["log_ratio"] == pytest.approx(-2.0)
    assert rows[True]["log_ratio_low"] <= rows[True]["log_ratio"] <= rows[True]["log_ratio_high"]


def test_the_gap_pairs_approved_and_rejected_within_the_prompts_that_have_both():
    prompt = np.array([0, 0, 0, 1, 1, 2])
    approved = np.array([True, True, False, True, False, True])
    log_ratio = np.array([1.0, 3.0, -1.0, 4.0, -3.0, 50.0])
    gap = approval_gap(prompt, "fresh", approved, log_ratio)
    assert gap["log_ratio"] == pytest.approx(((2.0 - -1.0) + (4.0 - -3.0)) / 2)  # prompt 2 has no rejected one
    assert gap["prompts"] == 2 and gap["n"] == 5 and gap["completions"] == "fresh: approved minus rejected"
    assert gap["log_ratio_low"] <= gap["log_ratio"] <= gap["log_ratio_high"]
    one_class = approval_gap(prompt, "seen", np.ones(6, dtype=bool), log_ratio)
    assert one_class["prompts"] == 0 and np.isnan(one_class["log_ratio"])


def test_a_tiny_offline_run_reads_back(tiny_run, tmp_path, capsys):
    offline = {"loss": "dpo", "dataset": "offline", "dataset_path": None, "n_prompts": 8, "completions_per_prompt": 2,
               "data_max_new_tokens": 4, "eval_fraction": 0.25, "max_steps": 2,
               "target_samples_per_prompt": 2}  # fmt: skip
    config = tiny_run(**offline)
    record = run_experiment(config)
    table = seen_and_fresh(config.run_dir(), n_prompts=2)
    classes = table[table["approved"].notna()]
    seen = classes[classes["completions"].str.startswith("seen")]
    fresh = classes[classes["completions"].str.startswith("fresh")]
    assert seen["n"].sum() <= 2 * 2 and fresh["n"].sum() == 2 * 2  # 2 prompts: their rows, 2 fresh samples each
    assert set(table["run"]) == {config.name()} and np.isfinite(classes["log_ratio"]).all()
    assert len(table) == len(classes) + 2  # one approved-minus-rejected row each for seen and fresh
    assert set(table["completions"]) >= {gap_label(SEEN), gap_label(FRESH)}  # the rows the memorisation study reads
    assert set(table["lora_r"]) == {config.train.lora_r} and set(table["completions_per_prompt"]) == {2}
    assert record["steps"] == 2
    main([str(config.run_dir()), "--prompts", "2"])
    assert "seen (training rows)" in capsys.readouterr().out
    saved = pd.read_csv(config.run_dir() / "memorisation.csv", comment="#")
    pd.testing.assert_series_equal(saved["log_ratio"], table["log_ratio"])


def test_a_folder_that_is_not_a_finished_run_is_named(tmp_path):
    with pytest.raises(UserError, match="not a finished run folder"):
        seen_and_fresh(tmp_path)
