"""The LM report's tables from run folders: per-prompt values averaged over seeds, bootstrap intervals, the paired
difference from RDRO, the alpha sweep, and the sentences built from the intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from studylib import pilot, report


def _run(root, name, loss, seed, win, logratio, alpha=None, sweep=False):
    folder = root / name
    folder.mkdir(parents=True)
    n = len(win)
    samples = pd.DataFrame(
        {
            "prompt_index": np.repeat(np.arange(n), 2),
            "win": np.repeat(win, 2),
            "logratio": np.repeat(logratio, 2),
            "approved": (np.repeat(win, 2) > 0.5).astype(float),
            "reference_approved": 0.25,
        }
    )
    samples.to_csv(folder / "samples.csv", index=False)
    kwargs = {"alpha": alpha} if alpha is not None else {}
    record = {
        "loss": loss, "dataset": "offline", "seed": seed, "win_rate": float(np.mean(win)), "n_prompts": n,
        "reference_approval": 0.4, "length": 20.0, "samples_per_prompt": 2, "data": {"preferred_fraction": 0.45},
        "params": {"loss_kwargs": kwargs, "sweep": sweep},
    }  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(record))


def test_method_table_intervals_and_paired_difference(tmp_path):
    rng = np.random.default_rng(0)
    hardness = rng.uniform(0.2, 0.8, size=40)  # prompts differ a lot; every method shares this
    for seed in (0, 1):
        _run(tmp_path, f"rdro-{seed}", "rdro", seed, hardness, np.full(40, 1.0 + seed), alpha="auto")
        _run(tmp_path, f"dpo-{seed}", "dpo", seed, hardness - 0.1, np.full(40, 3.0))
    runs = report.collect_runs(tmp_path)
    table = report.method_table(runs).set_index("method")
    assert table.loc["rdro", "win_rate"] == pytest.approx(hardness.mean())
    assert table.loc["rdro", "kl"] == pytest.approx(1.5) and table.loc["rdro", "kl_low"] == pytest.approx(1.5)
    assert table.loc["rdro", "win_rate_low"] < hardness.mean() - 0.03  # prompts vary: a wide interval
    # DPO is RDRO minus 0.1 on every prompt: the paired difference is exactly -0.1, with no width at all
    assert table.loc["dpo", "win_rate_minus_rdro"] == pytest.approx(-0.1)
    assert table.loc["dpo", "difference_low"] == pytest.approx(-0.1)
    assert table.loc["dpo", "difference_high"] == pytest.approx(-0.1)
    assert np.isnan(table.loc["rdro", "win_rate_minus_rdro"])
    assert table.loc["dpo", "seeds"] == "0,1" and table.loc["dpo", "prompts"] == 40
    approved = (hardness > 0.5).mean()
    assert table.loc["rdro", "approval"] == pytest.approx(approved)
    assert table.loc["rdro", "approval_gain"] == pytest.approx(approved - 0.25)
    sentence = report.beats_reference(table.reset_index())  # DPO: 0.42, interval below 0.5; RDRO: 0.52 around it
    assert "above 0.5 (beats the reference): none" in sentence and "below 0.5 (loses to it): dpo" in sentence
    assert "contains 0.5: rdro" in sentence


def test_alpha_sweep_reads_auto_as_the_preferred_fraction_and_lists_seeds(tmp_path):
    for seed in (0, 1):
        _run(tmp_path, f"auto-{seed}", "rdro", seed, np.full(8, 0.6), np.zeros(8), alpha="auto")
        _run(tmp_path, f"a02-{seed}", "rdro", seed, np.full(8, 0.4), np.zeros(8), alpha=0.2, sweep=True)
    sweep = report.alpha_sweep(report.collect_runs(tmp_path))
    assert sweep["alpha"].tolist() == [0.2, 0.45] and sweep["win_rate"].tolist() == pytest.approx([0.4, 0.6])
    assert set(sweep["seeds"]) == {"0,1"}
    _run(tmp_path, "auto-2", "rdro", 2, np.full(8, 0.9), np.zeros(8), alpha="auto")  # a seed only "auto" has
    again = report.alpha_sweep(report.collect_runs(tmp_path))
    assert set(again["seeds"]) == {"0,1"} and again["win_rate"].tolist() == pytest.approx([0.4, 0.6])
    table = report.method_table(report.collect_runs(tmp_path))
    assert table["method"].tolist() == ["rdro"] and table["seeds"].tolist() == ["0,1,2"]  # the sweep's runs left out


def test_collect_runs_reads_only_the_named_folders_and_says_what_it_left(tmp_path):
    win = np.full(4, 0.6)
    _run(tmp_path, "offline-rdro-seed=0-new", "rdro", 0, win, win)
    _run(tmp_path, "offline-rdro-seed=0-old", "rdro", 0, 1 - win, win)  # an earlier config's run, same seed
    every = report.collect_runs(tmp_path)
    assert sorted(every["run"]) == ["offline-rdro-seed=0-new", "offline-rdro-seed=0-old"]
    named = report.collect_runs(tmp_path, only=["offline-rdro-seed=0-new", "offline-dpo-seed=0-new"])
    assert named["run"].tolist() == ["offline-rdro-seed=0-new"] and named["win_rate"].tolist() == [0.6]
    assert named.attrs["ignored"] == ["offline-rdro-seed=0-old"]
    assert named.attrs["missing"] == ["offline-dpo-seed=0-new"]
    note = report.runs_note(named, tmp_path, "cpu").splitlines()
    assert note[0] == "1 runs, seeds 0, methods rdro"
    assert note[1].startswith("left out: 1 run folders") and note[1].endswith("that no run of 'cpu' names")
    assert note[2] == "not found (not run, or failed): offline-dpo-seed=0-new"
    assert report.runs_note(every, tmp_path, None) == "2 runs, seeds 0, methods rdro"
    with pytest.raises(FileNotFoundError, match="1 run folders named"):
        report.collect_runs(tmp_path, only=["offline-dpo-seed=0-new"])


def test_the_table_averages_kl_to_target_and_training_approval_over_seeds_prompt_by_prompt(tmp_path):
    n = 6
    for seed in (0, 1):
        _run(tmp_path, f"rdro-{seed}", "rdro", seed, np.full(n, 0.6), np.zeros(n))
        folder = tmp_path / f"rdro-{seed}"
        samples = pd.read_csv(folder / "samples.csv")
        kl = np.where(samples["prompt_index"] == seed, np.nan, 1.0 + seed)  # a prompt without target in each seed
        samples.assign(kl_to_target=kl, reference_kl_to_target=2.0).to_csv(folder / "samples.csv", index=False)
        record = json.loads((folder / "metrics.json").read_text())
        train = {"approval": [0.5 + 0.1 * seed] * 4, "reference_approval": [0.5] * 4}
        record |= {"epochs": 2.0, "target_prompts": n - 1, "train_per_prompt": train}
        (folder / "metrics.json").write_text(json.dumps(record))
    row = report.method_table(report.collect_runs(tmp_path)).iloc[0]
    assert row["epochs"] == 2.0 and row["target_prompts"] == n - 2  # prompts with a target in both seeds
    assert row["kl_to_target"] == pytest.approx(1.5) and row["reference_kl_to_target"] == pytest.approx(2.0)
    assert row["kl_to_target_gain"] == pytest.approx(0.5) and row["kl_to_target_gain_low"] == pytest.approx(0.5)
    assert row["train_approval"] == pytest.approx(0.55) and row["train_approval_gain"] == pytest.approx(0.05)


def test_the_reward_model_note_gives_the_held_out_interval_or_says_none_was_fit():
    info = {"reward_accuracy_held_out": 0.625, "reward_accuracy_held_out_low": 0.55,
            "reward_accuracy_held_out_high": 0.7, "reward_held_out_prompts": 32, "reward_held_out_pairs": 180,
            "reward_pairs": 720}  # fmt: skip
    note = report.reward_model_note(pd.DataFrame({"training": [{"trainer": "offline"}, info]}))
    assert "held-out accuracy 0.625" in note and "[0.550, 0.700]" in note and "32 held-out prompts" in note
    assert report.reward_model_note(pd.DataFrame({"training": [{}]})) == "No run of this report fitted a reward model."


def test_without_a_run_that_fits_one_the_note_reads_the_benchs_record(tmp_path):
    record = {"reward_accuracy_held_out": 0.474, "reward_accuracy_held_out_low": 0.364,
              "reward_accuracy_held_out_high": 0.564, "reward_held_out_prompts": 32, "reward_held_out_pairs": 190,
              "reward_pairs": 770}  # fmt: skip
    (tmp_path / "reward_fit.json").write_text(json.dumps(record))
    no_fit = pd.DataFrame({"training": [{"trainer": "offline"}]})
    note = report.reward_model_note(no_fit, tmp_path / "reward_fit.json")
    assert "bench/reward_fit.py" in note and "is at chance" in note and "[0.364, 0.564]" in note
    (tmp_path / "reward_fit.json").write_text(json.dumps(record | {"reward_accuracy_held_out_low": 0.51}))
    assert "excludes 0.5" in report.reward_model_note(no_fit, tmp_path / "reward_fit.json")
    missing = report.reward_model_note(no_fit, tmp_path / "absent.json")
    assert missing == "No run of this report fitted a reward model."


def test_a_runs_conclusion_says_how_far_it_got_toward_its_target():
    record = {
        "loss": "rdro", "dataset": "offline", "seed": 0, "steps": 80, "train_seconds": 600.0, "epochs": 2.0,
        "n_prompts": 64, "win_rate": 0.55, "win_rate_low": 0.51, "win_rate_high": 0.6, "samples_per_prompt": 2,
        "approval": 0.6, "reference_approval": 0.5, "kl": 0.8, "kl_low": 0.6, "kl_high": 1.0, "length": 20.0,
        "reference_length": 22.0, "kl_to_target": 0.5, "reference_kl_to_target": 0.7, "kl_to_target_gain": 0.2,
        "kl_to_target_gain_low": 0.05, "kl_to_target_gain_high": 0.35, "target_prompts": 60, "train_eval_prompts": 32,
        "train_approval": 0.8, "train_reference_approval": 0.5, "train_approval_gain_low": 0.2,
        "train_approval_gain_high": 0.4,
        "training": {"reward_accuracy_held_out": 0.58, "reward_accuracy_held_out_low": 0.49},
    }  # fmt: skip
    text = report.run_conclusion(record)
    assert "80 optimizer steps (2 epochs of its rows)" in text and "beats the reference" in text
    assert "0.500 nats against the reference's 0.700" in text and "the policy is closer to its target" in text
    assert "On 32 training prompts: approval 0.800" in text
    assert "reward model is at chance: 0.58" in text  # above 0.55, but its interval reaches below 0.5
    record |= {"kl_to_target_gain_low": -0.1, "training": {"reward_accuracy_held_out": 0.7,
                                                           "reward_accuracy_held_out_low": 0.6}}  # fmt: skip
    text = report.run_conclusion(record)
    assert "not measurably closer to its target" in text and "at chance" not in text
    assert "80 optimizer steps (1 epoch of its rows)" in report.run_conclusion(record | {"epochs": 1.0})


def test_a_runs_conclusion_counts_one_epoch_in_the_singular():
    assert report.epochs_text(1.0) == "1 epoch" and report.epochs_text(2.0) == "2 epochs"
    assert report.epochs_text(0.5) == "0.5 epochs" and report.epochs_text(1.004) == "1 epoch"


COMMITTED = Path(__file__).resolve().parent.parent / "results" / "report" / "lm_methods.csv"


def test_the_distance_to_the_target_is_plotted_per_method_against_the_reference_band():
    table = pd.read_csv(COMMITTED)
    fig = report.plot_kl_to_target(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == table["method"].tolist()
    assert ax.get_ylabel().startswith("KL(p+ || policy), nats")
    means = [line for line in ax.lines if line.get_marker() not in ("None", "", None, "_")]
    assert sorted(round(float(m.get_ydata()[0]), 6) for m in means) == sorted(table["kl_to_target"].round(6))
    band = ax.collections[1].get_paths()[0].vertices[:, 1]  # the first method's reference interval
    assert band.min() == pytest.approx(table["reference_kl_to_target_low"].iloc[0])
    assert band.max() == pytest.approx(table["reference_kl_to_target_high"].iloc[0])
    further = table.loc[table["kl_to_target_gain_high"] < 0, "method"].tolist()
    assert f"further: {', '.join(further)}" in ax.get_title()
    frontier = report.plot_frontier(table).axes[0]
    assert frontier.get_xlabel().startswith("KL(policy || reference), nats")
    empty = report.plot_kl_to_target(table.drop(columns="kl_to_target")).axes[0]
    assert "No run of this report measured KL(p+ || pi)" in empty.texts[0].get_text()


def test_published_beside_ours_notes_a_method_that_drifted_at_a_rate_not_its_own():
    table = pd.read_csv(COMMITTED)
    runs = pd.DataFrame({"dataset": "offline", "loss": table["method"], "learning_rate": 3e-4, "sweep": False})
    published = report.published_beside_ours(table, runs, tuned_on=["dpo", "rdro"])
    pmle = table.set_index("method").loc["pmle"]
    note = published.loc[published["method"] == "pmle", "our_note"].iloc[0]
    assert "learning rate 0.0003, shared by every method, not chosen on pmle" in note and "it drifted" in note
    assert f"KL(pi || pi_ref) {pmle['kl']:.2f} [{pmle['kl_low']:.2f}, {pmle['kl_high']:.2f}]" in note
    assert "ordering against DPO is confounded" in note
    dpo = published.loc[published["method"] == "dpo", "our_note"].iloc[0]
    assert dpo.startswith("learning rate 0.0003, chosen by the pilot on dpo, rdro") and "drifted" not in dpo
    assert (published.loc[published["our_win_rate_pct"].isna(), "our_note"] == "").all()
    calm = table.assign(kl_low=0.1, kl_high=0.2)
    assert "drifted" not in report.published_beside_ours(calm, runs, ["dpo", "rdro"])["our_note"].str.cat()


def test_the_report_conclusion_is_written_from_the_tables():
    table = pd.read_csv(COMMITTED)
    ledger = pd.DataFrame({"claim": ["a holds", "b holds in part"], "verdict": ["supported", "partly"],
                           "why": ["both agree", "only one agrees"]})  # fmt: skip
    falls = pd.DataFrame({"split": ["heldout", "heldout", "train"], "setting": ["S1", "S3", "S1"],
                          "method": ["DPO", "PMLE", "DPO"], "fall_seed0": [2.1, 11.0, 2.0],
                          "fall_seed0_doubled": [3.1, 11.2, 2.0], "converged": [False, True, False]})  # fmt: skip
    cures = pd.DataFrame({"lora_r": [16, 1], "completions_per_prompt": [4, 4], "control": [True, False],
                          "kl_to_target": [1.4, 0.8], "reference_kl_to_target": [0.77, 0.77],
                          "kl_to_target_gain": [-0.6, -0.04], "kl_to_target_gain_low": [-0.9, -0.13],
                          "kl_to_target_gain_high": [-0.4, 0.06], "kl_minus_control": [0.0, -0.6],
                          "kl_minus_control_low": [0.0, -0.9], "kl_minus_control_high": [0.0, -0.3],
                          "fresh_gap": [0.1, 0.3], "fresh_gap_low": [-0.1, 0.1],
                          "fresh_gap_high": [0.4, 0.4]})  # fmt: skip
    text = report.conclusion(ledger, table, falls, pilot.memorisation_conclusion(cures))
    assert "- a holds: **supported**\n" in text and "- b holds in part: **partly** (only one agrees)" in text
    assert "for 1 of 2 methods" in text and "S1 DPO (2.1x -> 3.1x)" in text
    least = table.loc[table["kl_to_target"].idxmin()]
    assert f"Least far: {least['method']} ({least['kl_to_target']:.2f}" in text
    further = table.loc[table["kl_to_target_gain_high"] < 0, "method"].tolist()
    assert f"further: {', '.join(further)};" in text
    assert "Cured by 1 of 1 changes." in text
    assert "r 16, 4 completions a prompt (the control): KL(p+ ‖ π) 1.400" in text
    assert "gain -0.600 [-0.900, -0.400]: further from p+ than the reference" in text
    assert "gain -0.040 [-0.130, +0.060]: not told from the reference" in text
    assert report.conclusion(None, table.drop(columns="kl_to_target")) == ""


def test_the_summary_lists_each_sampled_methods_distance_to_the_target_beside_the_reference():
    from studylib.summary import lm_columns

    table = pd.read_csv(COMMITTED)
    rdro = table.set_index("method").loc["rdro"]
    cells = lm_columns(table)["rdro"]
    kl = cells["LM KL(p+ || pi) (nats) [95% interval], offline"]
    assert kl.startswith(f"{rdro['kl_to_target']:.2f} [{rdro['kl_to_target_low']:.2f}, ")
    assert f"against the reference's {rdro['reference_kl_to_target']:.2f}: further from p+" in kl
    assert cells["LM KL(pi || pi_ref) (nats) [95% interval], offline"].startswith(f"{rdro['kl']:.2f} [")
    unmeasured = lm_columns(table.drop(columns="kl_to_target"))["rdro"]
    assert "LM KL(p+ || pi) (nats) [95% interval], offline" not in unmeasured
