"""The pilot's table, rule and verdict (``studylib.pilot``) on hand-made run folders."""

from __future__ import annotations

import pandas as pd
import pytest

from studylib.lm.memorisation import FRESH, SEEN, gap_label
from studylib.pilot import (
    chosen_training,
    memorisation_against_reference,
    memorisation_table,
    memorisation_verdict,
    pilot_table,
    pilot_verdict,
)


def point(step: int, kl: float, gain_low: float, approval: float = 0.5) -> dict:
    values = {"approval": approval, "approval_gain": 0.0, "kl_to_target": kl, "reference_kl_to_target": 1.0,
              "kl_to_target_gain": 1.0 - kl, "train_approval": approval + 0.1, "train_approval_gain": 0.0,
              "train_kl_to_target": kl, "train_kl_to_target_gain": 1.0 - kl}  # fmt: skip
    row = {"step": step, "loss": 0.7}
    for name, value in values.items():
        row[f"curve/{name}"] = value
        if name.endswith("gain"):
            low = gain_low if name == "kl_to_target_gain" else -0.1
            row |= {f"curve/{name}_low": low, f"curve/{name}_high": 0.2}
    return row


def make_run(tmp_path, name: str, rate: float, method: str, points: list[dict]) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    rows = [{"step": s, "loss": 0.7} for s in range(1, 5)] + points  # training steps without points too
    pd.DataFrame(rows).groupby("step").first().reset_index().to_csv(folder / "curves.csv", index=False)
    training = {"rows_per_step": 16, "training_rows": 32}
    return {"run_dir": str(folder), "learning_rate": rate, "loss": method, "training": training, "seed": 0}


@pytest.fixture
def runs(tmp_path) -> pd.DataFrame:
    return pd.DataFrame(
        [
            make_run(tmp_path, "a", 1e-3, "rdro", [point(2, 0.90, -0.1), point(4, 0.70, 0.05)]),
            make_run(tmp_path, "b", 1e-3, "dpo", [point(2, 0.90, -0.1), point(4, 0.705, -0.1)]),
            make_run(tmp_path, "c", 3e-4, "rdro", [point(2, 0.71, -0.1), point(4, 0.95, -0.1)]),
            make_run(tmp_path, "d", 3e-4, "dpo", [point(2, 0.70, -0.1), point(4, 0.95, -0.1)]),
        ]
    )


def test_the_table_has_one_row_per_rate_method_and_epochs(runs):
    table = pilot_table(runs)
    assert len(table) == 8 and sorted(table["epochs"].unique()) == [1.0, 2.0]
    row = table[(table["method"] == "rdro") & (table["learning_rate"] == 1e-3) & (table["epochs"] == 2.0)].iloc[0]
    assert row["kl_to_target"] == 0.70 and row["step"] == 4


def test_the_rule_takes_the_lowest_kl_to_the_target_and_fewer_epochs_within_a_tie(runs):
    rate, epochs, why = chosen_training(pilot_table(runs))
    # means: (1e-3, 2 epochs) 0.7025 and (3e-4, 1 epoch) 0.705 lie within 0.01 nats: the fewer epochs win
    assert (rate, epochs) == (3e-4, 1.0)
    assert "Chosen: lr 0.0003, 1 epoch(s)" in why
    assert chosen_training(pilot_table(runs), tie=0.0)[:2] == (1e-3, 2.0)


def test_a_setting_that_not_every_method_ran_is_not_chosen(runs, tmp_path):
    extra = make_run(tmp_path, "x", 3e-3, "rdro", [point(2, 0.1, -0.1)])  # the best KL, but DPO has no 3e-3 run
    rate, epochs, why = chosen_training(pilot_table(pd.concat([runs, pd.DataFrame([extra])], ignore_index=True)))
    assert (rate, epochs) == (3e-4, 1.0) and "lr 0.003, 1 epoch(s): KL to target 0.100" in why
    assert "(not every method)" in why


def test_the_verdict_names_the_settings_that_moved_and_which_way(runs):
    verdict = pilot_verdict(pilot_table(runs))
    assert (
        "On the validation prompts, moved beyond the 95% interval: rdro at lr 0.001, 2 epoch(s): closer to the"
        in verdict
    )
    assert verdict.endswith("On the training prompts, moved beyond the 95% interval: nothing.")
    assert (
        "approval" not in verdict.split("rdro at lr 0.001, 2 epoch(s):")[1].split(".")[0]
    )  # its approval interval holds 0


def test_runs_without_curve_points_are_refused(tmp_path):
    run = make_run(tmp_path, "e", 1e-3, "rdro", [])
    with pytest.raises(ValueError, match="no curve points"):
        pilot_table(pd.DataFrame([run]))


def memorisation_run(tmp_path, name: str, lora_r: int, completions: int, kl: list[float], fresh_gap: float) -> dict:
    """A memorisation-study run folder: per-prompt KL to the target in samples.csv (2 samples a prompt), and the
    seen/fresh table's two gap rows."""
    folder = tmp_path / name
    folder.mkdir()
    samples = pd.DataFrame({"prompt_index": [i for i in range(len(kl)) for _ in range(2)],
                            "kl_to_target": [v for v in kl for _ in range(2)]})  # fmt: skip
    samples.to_csv(folder / "samples.csv", index=False)
    gaps = [{"completions": gap_label(kind), "approved": None, "log_ratio": gap,
             "log_ratio_low": gap - 0.5, "log_ratio_high": gap + 0.5}
            for kind, gap in ((SEEN, 3.0), (FRESH, fresh_gap))]  # fmt: skip
    pd.DataFrame(gaps).to_csv(folder / "memorisation.csv", index=False)
    mean = sum(kl) / len(kl)
    return {"run": name, "run_dir": str(folder), "lora_r": lora_r, "completions_per_prompt": completions, "seed": 0,
            "training": {"training_rows": 160 * completions}, "steps": 80, "epochs": 320 / (40 * completions),
            "kl_to_target": mean, "kl_to_target_low": mean - 0.1, "kl_to_target_high": mean + 0.1,
            "reference_kl_to_target": 0.9, "kl_to_target_gain": 0.9 - mean, "kl_to_target_gain_low": 0.8 - mean,
            "kl_to_target_gain_high": 1.0 - mean, "approval_gain": 0.0, "approval_gain_low": -0.1,
            "approval_gain_high": 0.1}  # fmt: skip


def test_the_memorisation_table_pairs_each_change_with_the_control_and_the_rule_reads_both_measures(tmp_path):
    control_kl = [1.0, 2.0, 3.0, 4.0]
    runs = pd.DataFrame(
        [
            memorisation_run(tmp_path, "control", 16, 4, control_kl, fresh_gap=-0.1),
            memorisation_run(tmp_path, "small", 1, 4, [v - 0.5 for v in control_kl], fresh_gap=-0.2),  # closer only
            memorisation_run(tmp_path, "more", 16, 8, [v - 0.3 for v in control_kl], fresh_gap=1.0),  # both
        ]
    )
    table = memorisation_table(runs)
    assert list(table["run"]) == ["control", "more", "small"]  # the control first
    row = table.set_index("run").loc["small"]
    assert row["kl_minus_control"] == pytest.approx(-0.5) and row["kl_minus_control_high"] == pytest.approx(-0.5)
    assert row["fresh_gap"] == -0.2 and row["seen_gap"] == 3.0 and row["training_rows"] == 640
    assert table.set_index("run").loc["control", "kl_minus_control"] == 0.0
    verdict = memorisation_verdict(table)
    assert "r 1, 4 completions a prompt: KL(p+ ‖ π) minus the control's -0.500" in verdict
    assert "(closer), fresh approved minus rejected -0.200 [-0.700, +0.300] (does not separate): no cure" in verdict
    assert "r 16, 8 completions a prompt" in verdict and "(separates): a cure" in verdict
    assert verdict.endswith("Cured by 1 of 2 changes.")
    with pytest.raises(ValueError, match="exactly one control run"):
        memorisation_table(runs.iloc[1:])


def test_the_memorisation_study_says_where_each_run_ended_against_the_reference(tmp_path):
    runs = pd.DataFrame(
        [
            memorisation_run(tmp_path, "control", 16, 4, [1.0, 2.0], fresh_gap=-0.1),  # mean 1.5: further
            memorisation_run(tmp_path, "small", 1, 4, [0.8, 1.0], fresh_gap=1.0),  # mean 0.9: gain [-0.1, 0.1]
            memorisation_run(tmp_path, "more", 16, 8, [0.2, 0.4], fresh_gap=1.0),  # mean 0.3: closer
        ]
    )
    table = memorisation_table(runs)
    assert table.set_index("run").loc["more", "kl_to_target_gain"] == pytest.approx(0.6)
    lines = memorisation_against_reference(table).splitlines()
    assert lines[0].startswith("- r 16, 4 completions a prompt (the control): KL(p+ ‖ π) 1.500 against the ")
    assert lines[0].endswith("gain -0.600 [-0.700, -0.500]: further from p+ than the reference")
    assert lines[1].endswith("gain +0.600 [+0.500, +0.700]: closer to p+ than the reference")
    assert lines[2].endswith(": not told from the reference") and lines[2].startswith("- r 1, 4 completions")
