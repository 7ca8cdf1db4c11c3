"""The smoke profile end to end through papermill, as `python -m studylib study --profile smoke` runs it.

Every notebook executes (toy 01-03, notebook 04 once per method on a tiny Llama, the report 05); the
report's tables are then checked for content, not only for existence.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pandas as pd
import pytest
from watchdog import run_until_stalled

from studylib import provenance
from studylib.losses import available_losses
from studylib.study import ROOT, recorded_run_folders, recorded_runs, stale_runs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "STUDYLIB_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "studylib", "study", "--profile", "smoke", "--results-dir", str(out / "results")]
    # bounded by work: a study that stops printing (notebooks, progress bars) for 10 minutes is hung
    returncode, output = run_until_stalled(cmd, stall_seconds=600, cwd=ROOT, env=env)
    assert returncode == 0, output[-3000:]
    return out / "results", cmd, env, output


def test_every_method_ran_and_the_table_has_it(smoke):
    results, *_ = smoke
    table = pd.read_csv(results / "report" / "lm_methods.csv")
    ufb = table[table["dataset"] == "ufb"]
    assert set(ufb["method"]) == set(available_losses())
    assert (ufb["win_rate_low"] <= ufb["win_rate"]).all() and (ufb["win_rate"] <= ufb["win_rate_high"]).all()
    assert ufb["win_rate_low"].between(0, 1).all() and ufb["win_rate_high"].between(0, 1).all()
    assert (ufb["kl_low"] <= ufb["kl"]).all() and (ufb["kl"] <= ufb["kl_high"]).all()
    assert set(ufb.loc[ufb["seeds"] == "0,1", "method"]) == {"dpo", "rdro"}
    assert (ufb["prompts"] == 3).all()
    # the paired difference from RDRO: every other method has one, with its interval around it
    others = ufb[ufb["method"] != "rdro"]
    assert others["win_rate_minus_rdro"].notna().all()
    assert (others["difference_low"] <= others["win_rate_minus_rdro"]).all()
    assert ufb.loc[ufb["method"] == "rdro", "win_rate_minus_rdro"].isna().all()
    assert {"offline", "mix14k"} <= set(table["dataset"])


def test_the_report_reads_the_run_folders_the_runner_recorded(smoke):
    results, *_ = smoke
    written = {p.parent.name for p in (results / "lm").glob("*/metrics.json")}
    record = json.loads((results / "study-smoke.json").read_text())["runs"]
    lm_runs = {name: r for name, r in record.items() if r["notebook"] == "04_lm_alignment"}
    assert lm_runs and all(len(r["run_folders"]) == 1 for r in lm_runs.values())  # each run wrote its one folder
    for r in lm_runs.values():  # ... and the record names it as the run itself named it
        folder = results / r["run_folders"][0]
        assert json.loads((folder / "metrics.json").read_text())["params"]["run"] == folder.name
    assert all(r["run_folders"] == [] for r in record.values() if r["notebook"] != "04_lm_alignment")
    assert set(recorded_run_folders(results / "study-smoke.json")) == written  # the folders the report reads
    report_nb = json.loads((results / "notebooks" / "05_report.ipynb").read_text())
    printed = "".join("".join(o.get("text", "")) for c in report_nb["cells"] for o in c.get("outputs", []))
    assert f"{len(written)} runs, seeds" in printed and "left out" not in printed


def test_alpha_sweep_and_curves(smoke):
    results, *_ = smoke
    sweep = pd.read_csv(results / "report" / "rdro_alpha_sweep.csv")
    assert sorted(sweep["alpha"].round(2)) == [0.3, 0.5, 0.7]  # 0.5 = the fixture's preferred fraction ("auto")
    assert (sweep["win_rate_low"] <= sweep["win_rate_high"]).all() and set(sweep["seeds"].astype(str)) == {"0"}
    (ddro,) = (results / "lm").glob("ufb-ddro-seed=0-*")  # named by its knobs and their hash
    curves = pd.read_csv(ddro / "curves.csv")
    assert {"loss", "grad_norm", "ratio/max", "guard/activations"} <= set(curves.columns)
    assert curves["step"].tolist() == [1, 2]
    (rdro,) = (results / "lm").glob("ufb-rdro-alpha=auto-seed=0-*")
    metrics = json.loads((rdro / "metrics.json").read_text())
    assert metrics["params"]["loss_kwargs"] == {"alpha": "auto"} and metrics["steps"] == 2
    assert 0 <= metrics["win_rate"] <= 1 and metrics["n_prompts"] == 3


def test_toy_outputs_and_executed_notebooks(smoke):
    results, *_ = smoke
    pngs = list((results / "toy").glob("*.png"))
    assert len(pngs) >= 4
    executed = results / "notebooks"
    for name in ("01_density_ratio", "02_consistency", "03_stability", "lm_exact", "05_report"):
        assert (executed / f"{name}.ipynb").is_file() and (executed / f"{name}.html").is_file()
    assert not list(executed.glob("*.failed.ipynb"))
    assert "Published numbers beside ours" in (executed / "05_report.html").read_text()
    published = pd.read_csv(results / "report" / "published_vs_ours.csv")
    assert published["published_judge_and_baseline"].notna().all() and "our_win_rate_pct" in published
    assert (results / "lm_exact" / "consistency.csv").is_file() and (
        results / "report" / "lm_exact_beside_toy.csv"
    ).is_file()


def test_second_run_skips_completed_notebooks(smoke):
    _, cmd, env, _ = smoke
    returncode, output = run_until_stalled(cmd, stall_seconds=600, cwd=ROOT, env=env)
    assert returncode == 0
    assert "executed 0 notebook(s)" in output
    summary = json.loads((smoke[0] / "study-smoke.json").read_text())
    assert len(summary["runs"]) == 21 and all(r["status"] == "complete, skipped" for r in summary["runs"].values())
    assert all(r["seconds"] > 0 and r["commit"] for r in summary["runs"].values())  # kept from the first run


def test_a_deleted_output_is_rebuilt(smoke):
    results, cmd, env, _ = smoke
    (results / "toy" / "t1_ratios.png").unlink()
    returncode, output = run_until_stalled(cmd, stall_seconds=600, cwd=ROOT, env=env)
    assert returncode == 0
    assert "executed 1 notebook(s)" in output and (results / "toy" / "t1_ratios.png").is_file()


def test_every_run_records_its_sources_and_none_is_stale(smoke):
    results, *_ = smoke
    summary = json.loads((results / "study-smoke.json").read_text())
    for name, entry in summary["runs"].items():
        notebook = f"notebooks/{entry['notebook']}.ipynb"
        assert notebook in entry["sources"] and "studylib/results.py" in entry["sources"], name
        assert not any(path in entry["sources"] for path in entry["outputs"])  # what it wrote is not a source
    assert stale_runs(*recorded_runs("smoke", results)) == {}
    (machine,) = summary["seconds_by_machine"].values()  # one machine ran them all: one sum, naming every run
    assert sorted(machine["runs"]) == sorted(summary["runs"])


def test_editing_a_module_makes_stale_only_the_runs_that_imported_it(smoke, tmp_path):
    results, *_ = smoke
    entries = json.loads((results / "study-smoke.json").read_text())["runs"]
    for path in {p for e in entries.values() for p in e["sources"]}:  # a copy of every source, edited below
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    edited = tmp_path / "studylib" / "toy" / "sweeps.py"
    edited.write_text(edited.read_text() + "\nEDITED = True\n")
    stale = {name for name, e in entries.items() if provenance.stale_reasons(e["parameters"], e, tmp_path)}
    importers = {name for name, e in entries.items() if "studylib/toy/sweeps.py" in e["sources"]}
    assert stale == importers and "02_consistency" in stale and "lm-method=dpo-seed=0" not in stale
    assert provenance.stale_reasons({}, entries["02_consistency"] | {"parameters": {}}, tmp_path) == [
        "studylib/toy/sweeps.py changed"
    ]
