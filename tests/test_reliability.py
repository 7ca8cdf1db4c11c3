"""Nothing lost, nothing silent: run identity, locks, held-out prompts, up-front checks, flags, what moved."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
from filelock import FileLock

from studylib.__main__ import main
from studylib.compare import compare_tables
from studylib.lm.annotators import AnnotatorPool
from studylib.lm.config import RunConfig
from studylib.lm.data import prompt_key
from studylib.lm.experiment import load_preferences, run_experiment
from studylib.lm.runs import LOCK_NAME, claim_run, release_run, run_flags
from studylib.study import ROOT


def test_a_grid_over_learning_rate_keeps_both_results(tiny_run, tmp_path):
    first, second = tiny_run(learning_rate=1e-3), tiny_run(learning_rate=1e-2)
    assert first.name() != second.name() and first.name().rsplit("-", 1)[0] == second.name().rsplit("-", 1)[0]
    for config in (first, second):
        run_experiment(config)
    saved = {
        json.loads((d / "metrics.json").read_text())["params"]["learning_rate"] for d in (tmp_path / "lm").iterdir()
    }
    assert saved == {1e-3, 1e-2}
    assert json.loads((first.run_dir() / "run_config.json").read_text())["learning_rate"] == 1e-3
    FileLock(first.run_dir() / LOCK_NAME, timeout=0).acquire()  # released once saved: another process may take it


def test_a_named_run_with_other_knobs_is_refused_and_left_alone(tiny_run):
    run_experiment(tiny_run(run_name="mine", learning_rate=1e-3))
    metrics = (tiny_run(run_name="mine").run_dir() / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"holds a run with other knobs \(learning_rate: saved 0.001, now 0.01\)"):
        run_experiment(tiny_run(run_name="mine", learning_rate=1e-2))
    assert (tiny_run(run_name="mine").run_dir() / "metrics.json").read_text() == metrics


def test_a_second_live_process_is_refused_and_a_dead_ones_lock_is_taken_over(tiny_run):
    config = tiny_run()
    config.run_dir().mkdir(parents=True)
    lock = config.run_dir() / LOCK_NAME
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import filelock, time; lock = filelock.FileLock({str(lock)!r}); lock.acquire(); "
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="is in progress in another process"):
            claim_run(config)
    finally:
        holder.kill()  # as a SIGKILLed run: the OS drops its lock
        holder.wait()
    claim_run(config)
    claim_run(config)  # the same process again: still its own
    release_run(config)
    release_run(config)


def test_one_file_is_split_into_disjoint_prompts(tiny_run, tmp_path):
    rows = (ROOT / "tests/fixtures/ufb_small/train_prefs.jsonl").read_text().splitlines()
    single = tmp_path / "ufb.jsonl"
    single.write_text("\n".join(rows + rows) + "\n")  # every row twice
    config = tiny_run(dataset_path=str(single), eval_prompts=50)
    with pytest.warns(UserWarning, match="18 duplicate training rows"):
        data = load_preferences(config, None, None, AnnotatorPool(seed=0))
    train = {prompt_key(p) for p in data.paired["prompt"]}
    held = {prompt_key(p) for p in data.eval_prompts}
    assert held and train and not train & held
    assert len(train) == 18 and len(held) == round(0.25 * 24) == 6
    assert data.description["split"] == "one file, held out by prompt" and data.description["split_seed"] == 0
    assert data.description["duplicate_rows"] == 18 and data.description["eval_prompts_seen_in_training"] == 0
    other_seed = load_preferences(tiny_run(dataset_path=str(single), data_seed=1), None, None, AnnotatorPool(0))
    assert {prompt_key(p) for p in other_seed.eval_prompts} != held  # the split is drawn with data_seed


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"eval_prompts": 0}, "eval_prompts must be >= 1"),
        ({"training_args": {"not_a_field": 1}}, r"\['not_a_field'\] are not fields of transformers.TrainingArguments"),
        ({"training_args": {"learning_rate": 1.0}}, "set it with the run knob 'learning_rate'"),
        ({"training_args": {"output_dir": "x"}}, "'output_dir' cannot be given here \\(the trainer sets it\\)"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_steps": 0}, "max_steps must be >= 1, or -1"),
        ({"loss": "rlhf", "max_steps": -1}, "on-policy training counts steps"),
        ({"learning_rate": "1e-3"}, r"learning_rate must be a number \(its default is 0.0005\), got '1e-3'"),
        ({"loss_kwargs": {"alpha": 1.5}}, r"alpha must lie strictly inside \(0, 1\)"),
        ({"loss": "ipo"}, "unknown loss 'ipo'"),
        ({"online": True}, "rdro uses no reward model"),
        ({"max_prompt_length": 500}, r"max_prompt_length must be in \[1, max_length\)"),
    ],
)
def test_bad_knobs_fail_before_anything_is_written(tmp_path, monkeypatch, tiny_knobs, knobs, message):
    monkeypatch.chdir(ROOT)
    params = tiny_knobs | {"results_dir": str(tmp_path / "lm")} | knobs
    with pytest.raises((ValueError, KeyError), match=message):
        RunConfig.from_flat(params)
    (tmp_path / "run.json").write_text(json.dumps(params))
    assert main(["train", "--params", str(tmp_path / "run.json")]) == 2
    assert not (tmp_path / "lm").exists()


def test_data_problems_fail_before_the_run_folder_exists(tiny_run, tmp_path):
    empty = tmp_path / "empty.jsonl"
    row = json.loads((ROOT / "tests/fixtures/ufb_small/train_prefs.jsonl").read_text().splitlines()[0])
    row["chosen"][-1]["content"] = ""
    empty.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="cannot hold out prompts|no training rows|empty completion: nothing to train"):
        run_experiment(tiny_run(dataset_path=str(empty)))
    assert not (tmp_path / "lm").exists()


def test_bf16_runs_end_to_end_on_a_cpu_and_records_its_precision(tiny_run):
    record = run_experiment(tiny_run(bf16=True))  # the paper profile's precision, here on a CPU
    assert math.isfinite(record["kl"]) and record["params"]["bf16"] is True
    assert record["runtime"]["bf16"] is True and record["runtime"]["precision"].startswith("bf16: true in the config")


def test_collapse_and_drift_are_flagged():
    curves = pd.DataFrame({"step": [1, 2, 3, 4, 5, 6], "grad_norm": [3.0, 1.0, 0.0, 0.0, 0.0, 0.0]})
    with pytest.warns(UserWarning, match="collapsed: gradient norm 0 from step 3"):
        flags = run_flags(curves, {"kl": 1.0})
    assert flags == ["collapsed: gradient norm 0 from step 3 to the end"]
    with pytest.warns(UserWarning, match="drifted"):
        assert run_flags(curves.iloc[:3], {"kl": 31.5}) == ["drifted: KL(pi || pi_ref) = 31.5 nats per completion > 20"]
    assert run_flags(curves.iloc[:4], {"kl": 1.0}) == []  # two zero steps: not yet a collapse


def test_what_moved_names_the_column_row_and_size():
    old = pd.DataFrame({"method": ["DDRO", "RDRO"], "slope": [-1.18, -0.96], "win": ["0.50 ± 0.1", "0.40 ± 0.2"]})
    new = pd.DataFrame(
        {"method": ["DDRO", "RDRO", "SimPO"], "slope": [-1.18, -0.90, -0.1], "win": ["0.50 ± 0.1", "0.45 ± 0.1", "0.5"]}
    )
    lines = compare_tables(new, old)
    assert "new rows: SimPO" in lines
    assert "slope: max change 0.06 (-0.96 -> -0.9 at RDRO)" in lines
    assert "win: max change 0.05 (0.4 -> 0.45 at RDRO)" in lines
    assert compare_tables(old, old) == ["unchanged"]
    sweep = pd.DataFrame({"dataset": ["x", "x"], "alpha": [0.2, 0.8], "win": [0.5, 0.6]})
    assert "not identified by ['dataset']" in compare_tables(sweep, sweep)[0]  # a numeric key must be named
    moved = sweep.assign(win=[0.5, 0.7])
    assert compare_tables(moved, sweep, keys=["dataset", "alpha"]) == ["win: max change 0.1 (0.6 -> 0.7 at x, 0.8)"]
    gone = sweep.assign(win=[0.5, float("nan")])  # a number that became NaN is a change
    assert compare_tables(gone, sweep, keys=["dataset", "alpha"])[0].startswith("win: max change inf")
    assert "missing" in compare_tables(sweep, sweep, keys=["dataset", "beta"])[0]


def test_a_learning_rate_of_1e3_is_flagged_as_collapsed(tiny_run):
    """The issue's case on a real (tiny) run: the logits saturate, gradients vanish, and the record says so."""
    config = tiny_run(learning_rate=1000.0, max_steps=8, batch_size=4, use_lora=False, warmup_ratio=0.0)
    with pytest.warns(UserWarning, match="collapsed: gradient norm 0 from step"):
        record = run_experiment(config)
    assert record["flags"] and record["flags"][0].startswith("collapsed")
    saved = json.loads((config.run_dir() / "metrics.json").read_text())
    assert saved["flags"] == record["flags"]
