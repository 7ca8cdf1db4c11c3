"""The toy notebooks run under papermill with small parameters, and what they write says what it should."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, out_dir: Path, **params: object) -> nbformat.NotebookNode:
    """Run notebook ``name`` with ``params`` (results to ``out_dir``) and return the executed notebook."""
    output = out_dir / f"executed_{name}"
    papermill.execute_notebook(
        str(NOTEBOOKS / name),
        str(output),
        parameters={"out_dir": str(out_dir), **params},
        progress_bar=False,
        log_output=False,
        kernel_name="python3",
    )
    return nbformat.read(output, as_version=4)


def markdown_outputs(nb: nbformat.NotebookNode) -> str:
    """The Markdown a notebook displayed (its findings), joined."""
    return "\n".join(
        o["data"]["text/markdown"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "data" in o and "text/markdown" in o["data"]
    )


def check_png(path: Path, params: dict) -> dict:
    """The PNG is a real image of some size, and its sidecar stamp carries the notebook's parameters."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000, path
    stamp = json.loads(path.with_name(path.name + ".json").read_text())
    for key, value in params.items():
        assert stamp["params"][key] == value, (path, key)
    assert "seed" in stamp and stamp["studylib_version"]
    return stamp


@pytest.mark.parametrize("stored", sorted(NOTEBOOKS.glob("0[1-5]_*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs_and_have_a_parameters_cell(stored):
    nb = nbformat.read(stored, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


def test_density_ratio_notebook(tmp_path):
    executed = execute("01_density_ratio.ipynb", tmp_path, alpha=0.25, compare_alphas=[0.5], p_minus=0.2)
    check_png(tmp_path / "t1_ratios.png", {"alpha": 0.25, "p_minus": 0.2, "compare_alphas": [0.5]})
    check_png(tmp_path / "t2_loss_shapes.png", {"alpha": 0.25})
    t1 = pd.read_csv(tmp_path / "t1_ratios.csv").set_index(["sweep", "alpha"])
    assert sorted(t1.index.get_level_values("alpha").unique()) == [0.25, 0.5]  # alpha and the overlaid ones
    assert 3.99 < t1.loc[("p_minus", 0.25), "r_max"] <= 4.0  # 1/alpha, approached
    assert 1.99 < t1.loc[("p_minus", 0.5), "r_max"] <= 2.0
    assert t1.loc[("p_minus", 0.25), "g_max"] > 1e5
    t2 = pd.read_csv(tmp_path / "t2_loss_shapes.csv").set_index(["method", "row"])
    assert t2.loc[("RDRO (alpha=0.25)", "+"), "argmin_T"] == pytest.approx(
        math.log(1 / 0.25), abs=0.02
    )  # alpha drives T2
    findings = markdown_outputs(executed)
    assert "the largest $r^*_\\alpha$ on either sweep is 4, not above its bound $1/\\alpha = 4$ (holds)" in findings
    assert t2.loc[("DDRO (eps=0.01)", "-"), "slope_max"] == pytest.approx(199.0)
    assert "alpha" in (tmp_path / "t1_ratios.md").read_text()


def test_consistency_notebook(tmp_path):
    executed = execute("02_consistency.ipynb", tmp_path, max_log2n=12, seeds=2, slope_min_n=512)
    table = pd.read_csv(tmp_path / "t3_slopes.csv").set_index(["setting", "method"])
    assert set(table.index.get_level_values("setting")) == {"S1", "S2", "S3"}
    assert len(table) == 13 and table["slope"].notna().all()
    for key in [("S1", "RDRO (alpha=1/2)"), ("S2", "RDRO per-class (alpha=0.20)"), ("S3", "PMLE")]:
        assert table.loc[key, "kl_limit"] < 1e-10, key
    for key in [("S1", "DPO (beta=1)"), ("S2", "RDRO flat (alpha=0.20)"), ("S3", "RLHF (beta tuned)")]:
        assert table.loc[key, "kl_limit"] > 0.05, key
    assert table.loc[("S1", "RDRO (alpha=1/2)"), "slope"] < -0.5
    for setting in ("S1", "S2", "S3"):
        stamp = check_png(tmp_path / f"t3_{setting}.png", {"setting": setting, "max_log2n": 12, "seeds": 2})
        assert stamp["seed"]["data_seeds"] == [0, 1]
        kl = pd.read_csv(tmp_path / f"t3_{setting}_kl.csv")
        assert kl["n"].max() == 4096 and (kl["kl_mean"] > 0).all() and (kl["seeds"] == 2).all()
    conclusion = markdown_outputs(executed)
    assert "- S1: as the theory says, exactly DDRO, RDRO (alpha=1/2) converge." in conclusion


def test_stability_notebook(tmp_path):
    executed = execute("03_stability.ipynb", tmp_path, steps=300, n=64, spread_seeds=2)
    table = pd.read_csv(tmp_path / "t4_summary.csv")
    assert list(table["setting"].unique()) == ["S1", "S2"]
    assert table.groupby("setting").size().tolist() == [3, 3]
    rdro = table[table["method"].str.startswith("RDRO")].set_index("setting")
    assert rdro.loc["S1", "one_over_alpha"] == pytest.approx(2.0)
    assert rdro.loc["S2", "one_over_alpha"] == pytest.approx(5.0, rel=1e-6)
    assert (rdro["grad_norm_max"] < 1.0).all() and (table["guard_total"] >= 0).all()
    for setting in ("S1", "S2"):
        check_png(tmp_path / f"t4_{setting}.png", {"setting": setting, "steps": 300, "n": 64})
    spread = pd.read_csv(tmp_path / "t4_seed_spread.csv")
    assert (spread["runs"] == 2).all() and len(spread) == 6
    rdro_spread = spread[spread["method"].str.startswith("RDRO")]
    assert (rdro_spread["largest_ratio_times_alpha"] < 1.5).all()
    assert (rdro_spread["runs_with_guard_activations"] == 0).all()
    per_seed = pd.read_csv(tmp_path / "t4_seeds.csv")
    assert sorted(per_seed["seed"].unique()) == [0, 1] and len(per_seed) == 12
    assert "DDRO's largest gradient norms are at least 10x RDRO's: S1" in markdown_outputs(executed)


EXPLANATORY = sorted(NOTEBOOKS.glob("0[1-5]_*.ipynb"))


@pytest.mark.parametrize("stored", EXPLANATORY, ids=lambda p: p.name)
def test_notebooks_hold_the_story(stored):
    """Equations rendered, short code cells (logic lives in studylib), a conclusion, a link to the guide."""
    nb = nbformat.read(stored, as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "$" in text and "README.md" in text
    assert any(c.source.startswith("## Conclusion") or "## What this run shows" in c.source for c in nb.cells)
    long = [
        c.source.count("\n") + 1
        for c in nb.cells
        if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])
    ]
    assert max(long) <= 15, f"{stored.name}: a code cell of {max(long)} lines"


def test_running_notebook_01_by_hand_leaves_results_untouched(tmp_path):
    """With its defaults (as a reader in Jupyter runs it) a notebook writes to scratch/, never over results/."""
    results = NOTEBOOKS.parent / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    output = tmp_path / "01.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / "01_density_ratio.ipynb"), str(output), progress_bar=False, log_output=False, cwd=str(tmp_path)
    )
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    assert after == before
    assert (NOTEBOOKS.parent / "scratch" / "toy" / "t1_ratios.png").is_file()
