"""The distance to the target on sampled text (``studylib.lm.target``) and the training curves that use it
(``studylib.lm.curves``): the importance-weighted estimate against exact KLs on a categorical, by hand on two
samples, and end to end through both trainers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from studylib.lm.experiment import run_experiment
from studylib.lm.target import summarise_target_kl, target_kl_per_prompt


def exact_kl(p: np.ndarray, q: np.ndarray) -> float:
    kept = p > 0
    return float((p[kept] * np.log(p[kept] / q[kept])).sum())


def test_the_estimate_converges_to_the_exact_kls_of_a_categorical():
    rng = np.random.default_rng(0)
    reference = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    policy = np.array([0.1, 0.3, 0.3, 0.2, 0.1])
    approve = np.array([0.0, 0.5, 1.0, 1.0, 0.0])  # the majority rule's values, ties included
    target = reference * approve / (reference * approve).sum()
    k = 200_000
    items = rng.choice(5, size=k, p=reference)
    per_prompt = target_kl_per_prompt(approve[items], np.log(reference[items]), np.log(policy[items]), k)
    row = per_prompt.iloc[0]
    assert row["target_mass"] == pytest.approx((reference * approve).sum(), abs=0.005)
    assert row["reference_kl_to_target"] == pytest.approx(exact_kl(target, reference), abs=0.01)
    assert row["kl_to_target"] == pytest.approx(exact_kl(target, policy), abs=0.01)
    assert exact_kl(target, policy) < exact_kl(target, reference)  # this policy moved toward the target


def test_two_samples_by_hand_and_a_prompt_without_target():
    # prompt 0: samples approved 1 and 0 -> Z = 1/2, all weight on sample 0: KL(p+||ref) = log 2,
    # KL(p+||pi) = log 2 + (log ref - log pi) of sample 0 = log 2 + (-3 - (-2)); prompt 1: nothing approved
    approvals = np.array([1.0, 0.0, 0.0, 0.0])
    reference_logps = np.array([-3.0, -1.0, -2.0, -2.0])
    policy_logps = np.array([-2.0, -5.0, -2.0, -2.0])
    per_prompt = target_kl_per_prompt(approvals, reference_logps, policy_logps, 2)
    assert per_prompt.loc[0, "reference_kl_to_target"] == pytest.approx(math.log(2))
    assert per_prompt.loc[0, "kl_to_target"] == pytest.approx(math.log(2) - 1.0)
    assert per_prompt.loc[1, ["kl_to_target", "reference_kl_to_target"]].isna().all()
    summary = summarise_target_kl(per_prompt)
    assert summary["target_prompts"] == 1
    assert summary["kl_to_target_gain"] == pytest.approx(1.0)  # one prompt: its own value, no interval
    assert summary["kl_to_target_gain_low"] == summary["kl_to_target_gain_high"] == pytest.approx(1.0)


def test_half_approvals_weigh_half_and_the_gain_is_the_weighted_log_ratio():
    approvals = np.array([1.0, 0.5, 0.0])
    reference_logps, policy_logps = np.array([-1.0, -2.0, -3.0]), np.array([-0.5, -3.0, -9.0])
    row = target_kl_per_prompt(approvals, reference_logps, policy_logps, 3).iloc[0]
    z = 0.5
    weights = np.array([2 / 3, 1 / 3, 0.0])
    assert row["reference_kl_to_target"] == pytest.approx(2 / 3 * math.log(1 / z) + 1 / 3 * math.log(0.5 / z))
    gain = row["reference_kl_to_target"] - row["kl_to_target"]
    assert gain == pytest.approx(float((weights * (policy_logps - reference_logps)).sum()))


@pytest.mark.parametrize(
    ("approvals", "k", "message"),
    [([0.5, 1.5], 2, r"\[0, 1\]"), ([1.0, 0.0, 1.0], 2, "prompts x 2 samples")],
)
def test_bad_input_is_named(approvals, k, message):
    n = len(approvals)
    with pytest.raises(ValueError, match=message):
        target_kl_per_prompt(np.array(approvals), np.zeros(n), np.zeros(n), k)


def test_no_prompt_with_a_target_gives_a_count_and_no_numbers():
    per_prompt = target_kl_per_prompt(np.zeros(4), np.zeros(4), np.zeros(4), 2)
    assert summarise_target_kl(per_prompt) == {"target_prompts": 0}


@pytest.mark.parametrize("loss", ["rdro", "reverse_kl"])  # the offline trainer, and the on-policy one
def test_a_run_records_curve_points_and_its_distance_to_the_target(tiny_run, loss):
    knobs = {"loss": loss, "loss_kwargs": {} if loss == "rdro" else {"gamma": 0.1, "beta": 0.1}, "max_steps": 4}
    config = tiny_run(**knobs, curve_every=2, curve_prompts=3, target_samples_per_prompt=4, train_eval_prompts=3)
    record = run_experiment(config)
    curves = pd.read_csv(config.run_dir() / "curves.csv", comment="#")
    assert curves["step"].tolist() == [1, 2, 3, 4]  # a curve point shares its step's row
    points = curves.dropna(subset=["curve/approval"])
    assert points["step"].tolist() == [2, 4]
    for column in ("curve/train_approval", "curve/reference_approval", "curve/approval_gain"):
        assert points[column].between(-1, 1).all()
    assert points["curve/reference_approval"].nunique() == 1  # the same reference samples at every point
    assert curves["loss"].notna().all()
    assert record["epochs"] == pytest.approx(
        4 * record["training"]["rows_per_step"] / record["training"]["training_rows"]
    )
    assert record["train_eval_prompts"] == 3 and 0 <= record["train_approval"] <= 1
    if record["target_prompts"]:
        low, high = record["kl_to_target_gain_low"], record["kl_to_target_gain_high"]
        assert low <= record["kl_to_target_gain"] <= high
        gain = record["reference_kl_to_target"] - record["kl_to_target"]
        assert record["kl_to_target_gain"] == pytest.approx(gain)
    assert record["approval_gain"] == pytest.approx(record["approval"] - record["reference_approval"])
    train = pd.DataFrame(record["train_per_prompt"])  # per training prompt: what the report averages over seeds
    assert len(train) == 3 and train["approval"].mean() == pytest.approx(record["train_approval"])
    samples = pd.read_csv(config.run_dir() / "samples.csv", comment="#")
    per_prompt = samples.groupby("prompt_index")["kl_to_target"].first().dropna()
    assert len(per_prompt) == record["target_prompts"]
    if len(per_prompt):
        assert per_prompt.mean() == pytest.approx(record["kl_to_target"])


def test_measuring_during_training_leaves_the_training_unchanged(tiny_run):
    runs = [tiny_run(max_steps=4, curve_every=every, run_name=f"every{every}") for every in (0, 2)]
    losses = [pd.read_csv(c.run_dir() / "curves.csv", comment="#")["loss"] for c in runs if run_experiment(c)]
    pd.testing.assert_series_equal(losses[0], losses[1])
