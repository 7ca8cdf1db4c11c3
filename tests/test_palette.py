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
