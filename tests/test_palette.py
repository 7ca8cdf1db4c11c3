"""One palette: every method a figure can name has one fixed colour and marker."""

from __future__ import annotations

import pytest

from studylib.losses import available_losses
from studylib.palette import STYLES, method_key, style
from studylib.toy import loss_curves, make_problem
from studylib.toy.stability import stability_methods
from studylib.toy.sweeps import default_methods


def figure_labels() -> list[str]:
    """Every method label the study's figures draw: toy sweeps, stability runs, loss shapes, LM losses."""
    labels = list(available_losses())
    for setting in ("S1", "S2", "S3"):
        labels += [m.label for m in default_methods(make_problem(setting))]
    for setting in ("S1", "S2"):
        labels += [m.label for m in stability_methods(make_problem(setting))]
    labels += list(loss_curves(alpha=0.3)["method"].unique())
    return labels


def test_every_method_in_a_figure_maps_to_the_palette():
    keys = {label: method_key(label) for label in figure_labels()}
    assert all(key in STYLES for key in keys.values())
    assert keys["RDRO flat (alpha=0.20)"] == "rdro_flat" and keys["RDRO per-class (alpha=0.20)"] == "rdro"
    assert keys["reverse KL"] == keys["reverse_kl"] == "reverse_kl" and keys["distillation"] == "distill"
    assert style("KTO (beta=1)") == style("kto")  # one method, one style, whatever the label


def test_styles_are_distinct_and_unknown_methods_fail():
    assert len({s.color for s in STYLES.values()}) == len(STYLES)
    with pytest.raises(KeyError, match="no palette style for method 'IPO'"):
        method_key("IPO")


def test_the_lm_figures_draw_every_method_in_its_palette_style(tmp_path):
    """Per-run curves, the frontier and the training-curve panels: each method's lines in its own colour and
    marker (the per-run figures were all default blue once)."""
    import matplotlib.colors as mcolors
    import pandas as pd

    from studylib.report import plot_frontier, plot_run_curves, plot_training_curves

    def drawn(fig) -> list[tuple[str, str, str]]:
        return [
            (line.get_label(), mcolors.to_hex(line.get_color()), line.get_marker())
            for ax in fig.axes
            for line in ax.get_lines()
        ]

    curves = pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.5, 0.4], "grad_norm": [2.0, 1.0, 0.5]})
    for method in ("ddro", "pmle"):
        lines = drawn(plot_run_curves(curves, "title", method))
        assert lines and {(c, m) for _, c, m in lines} == {(STYLES[method].color, STYLES[method].marker)}
    runs = []
    for method in ("rdro", "dpo"):
        (tmp_path / method).mkdir()
        curves.assign(**({"ratio/max": [1.0, 1.5, 2.0]} if method == "rdro" else {})).to_csv(
            tmp_path / method / "curves.csv", index=False
        )
        runs.append({"run_dir": str(tmp_path / method), "loss": method, "dataset": "offline", "seed": 0,
                     "alpha": 0.5 if method == "rdro" else None, "sweep": False,
                     "training": {"trainer": "offline"}})  # fmt: skip
    for label, color, marker in drawn(plot_training_curves(pd.DataFrame(runs), seed=0)):
        if not label.startswith("RDRO's"):
            key = label.split(" (")[0]
            assert (color, marker) == (STYLES[key].color, STYLES[key].marker), label
    table = pd.DataFrame([
        {"method": m, "kl": k, "kl_low": k / 2, "kl_high": k * 2, "win_rate": 0.5, "win_rate_low": 0.4,
         "win_rate_high": 0.6, "prompts": 8} for m, k in (("rdro", 0.5), ("kto", 2.0))
    ])  # fmt: skip
    points = [c for ax in plot_frontier(table).axes for c in ax.containers]  # one error-bar point per method
    assert sorted(c.get_label() for c in points) == ["kto", "rdro"]
    for point in points:
        line, key = point.lines[0], point.get_label()
        assert (mcolors.to_hex(line.get_color()), line.get_marker()) == (STYLES[key].color, STYLES[key].marker)
