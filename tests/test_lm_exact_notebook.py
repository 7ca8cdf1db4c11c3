"""Notebook 06 runs under papermill on the tiny model, writes what it says it writes, and holds its story."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "06_lm_exact.ipynb"
SMALL = {
    "model": "tiny",
    "candidates_path": "data/lm_exact/candidates_tiny.json",
    "bf16": False,
    "settings": ["S1", "S2"],
    "log2_sizes": [8, 9, 11],
    "seeds": 2,
    "lr_grid": [0.01, 0.03],
    "floor_lr_grid": [0.03],
    "steps": 12,
    "floor_steps": 24,
    "guard_eps_grid": [0.01, 0.1],
    "alphas": [0.1, 0.2, 0.3, 0.5, 0.8],
    "alpha_log2n": 9,
}


def test_notebook_writes_the_tables_and_figures(tmp_path):
    output = tmp_path / "06.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(output), parameters=SMALL | {"out_dir": str(tmp_path)}, progress_bar=False, log_output=False
    )
    table = pd.read_csv(tmp_path / "consistency.csv")
    assert list(table.columns) == ["setting", "method", "n", "seed", "split", "kl", "floor_kl"]
    assert set(table["split"]) == {"train", "heldout"} and set(table["setting"]) == {"S1", "S2"}
    assert sorted(table["n"].unique()) == [256, 512, 2048] and sorted(table["seed"].unique()) == [0, 1]
    assert (table["kl"] > 0).all() and (table["floor_kl"] > 0).all()
    assert table.groupby(["setting", "method", "n", "split"]).size().eq(2).all()
    falls = pd.read_csv(tmp_path / "falls.csv")
    assert {"DDRO", "RDRO (alpha=1/2)", "DPO (beta=1)", "KTO (beta=1)"} <= set(falls["method"])
    falls = falls.set_index(["setting", "method", "split"])
    assert (falls["seeds"] == 2).all() and (falls["fall_low"] <= falls["fall"]).all()
    assert (falls["fall"] <= falls["fall_high"]).all() and (falls["slope_low"] <= falls["slope_high"]).all()
    assert set(falls["verdict"]) <= {"holds", "fails", "undecided"}
    limits = pd.read_csv(tmp_path / "limits.csv")
    assert list(limits.columns[:7]) == [
        "setting",
        "method",
        "lr",
        "limit_excess_heldout",
        "limit_excess_train",
        "floor_heldout",
        "floor_train",
    ]
    assert len(limits) == 8 and set(limits["lr"]) <= {0.01, 0.03}
    grid = pd.read_csv(tmp_path / "lr_grid.csv")
    assert len(grid) == 16 and grid.groupby(["setting", "method"])["chosen"].sum().eq(1).all()
    chosen = grid[grid["chosen"]].set_index(["setting", "method"])["lr"]
    for (setting, method), lr in chosen.items():  # the rate rule 2 chose is the one each method's runs used
        assert falls.loc[(setting, method, "heldout"), "lr"] == lr
    best = grid.loc[grid.groupby(["setting", "method"])["objective_at_n_max"].idxmin()]
    assert best["chosen"].all()
    convergence = pd.read_csv(tmp_path / "convergence.csv")
    assert len(convergence) == 8 * 4 + 2 and {"heldout_steps", "heldout_doubled", "converged"} <= set(
        convergence.columns
    )
    guard = pd.read_csv(tmp_path / "guard_eps.csv")
    assert sorted(guard["guard_eps"].unique()) == [0.01, 0.1] and len(guard) == 2 * 2 * 3
    fits, floors = pd.read_csv(tmp_path / "floor_lr.csv"), pd.read_csv(tmp_path / "floors.csv")
    best = fits.groupby(["setting", "seed"])["kl_train"].min().rename("best")
    assert floors.join(best, on=["setting", "seed"]).eval("kl_train == best").all() and len(floors) == 4
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert (runs["init_seed"] == 1000 + runs["seed"]).all()
    sweep = pd.read_csv(tmp_path / "alpha_sweep.csv")
    assert sorted(sweep["alpha"].unique()) == SMALL["alphas"] and len(sweep) == 10
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert {"grad_norm", "ratio_max", "guard"} <= set(curves.columns) and (curves["seed"] == 0).all()
    for name in ("consistency_S1", "consistency_S2", "training_curves", "alpha_sweep"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        stamp = json.loads(png.with_name(png.name + ".json").read_text())
        assert stamp["params"]["log2_sizes"] == [8, 9, 11] and stamp["seed"]["data_seeds"] == [0, 1]
        assert stamp["seed"]["init_seeds"] == [1000, 1001]
        assert stamp["precision"] == {"frozen_pass_bf16": False, "why": "bf16: false in the config"}
    executed = nbformat.read(output, as_version=4)
    shown = "\n".join(
        o["data"]["text/markdown"]
        for c in executed.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "data" in o and "text/markdown" in o["data"]
    )
    assert "- **S1**: DDRO" in shown and "Floors (rule 1: each seed's best fit over the rates): S1 0.03 x 2" in shown
    assert "The adapter (rank 16) has " in shown and " trainable parameters for " in shown


def test_notebook_is_stored_clean_and_holds_the_story():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "$" in text and "README.md" in text and any(c.source.startswith("## Conclusion") for c in nb.cells)
    code = [c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
    assert max(c.source.count("\n") + 1 for c in code) <= 15


def test_the_frozen_pass_defaults_to_bf16_only_where_the_processor_runs_it_natively():
    from studylib.lm.runtime import cpu_bf16_support
    from studylib.lm_exact.experiment import frozen_pass_precision
    from studylib.study import load_study, parameter_defaults

    assert parameter_defaults(NOTEBOOK)["bf16"] == "auto"
    native, why = cpu_bf16_support()
    assert frozen_pass_precision("auto") == (native, f"bf16: auto, {why}")
    assert frozen_pass_precision(False) == (False, "bf16: false in the config")
    assert frozen_pass_precision(True)[0] is True  # forced: obeyed (with a warning where the CPU has no native bf16)
    for profile in ("cpu", "smoke"):  # the runner type-checks what each profile passes notebook 06 against "auto"
        _, runs = load_study(profile)
        assert [r for r in runs if r.notebook == "06_lm_exact"]
