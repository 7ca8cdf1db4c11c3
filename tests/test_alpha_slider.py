"""Notebook 01's alpha slider: it redraws T1 as alpha moves in Jupyter; under papermill, or without ipywidgets, the
static figure drawn before it is all there is."""

from __future__ import annotations

import importlib.util
import sys

import matplotlib.pyplot as plt
import pytest
from jupyter_client.manager import start_new_kernel

from studylib.study import ROOT
from studylib.toy import plots


def bounds(figure) -> set[float]:
    """The dashed 1/alpha lines of T1's left panel."""
    return {round(float(line.get_ydata()[0]), 6) for line in figure.axes[0].lines if line.get_linestyle() == "--"}


def test_redrawing_for_another_alpha_moves_its_bound():
    first, second = plots.ratio_figure(0.25, [0.5]), plots.ratio_figure(0.8, [0.5])
    assert bounds(first) == {4.0, 2.0} and bounds(second) == {1.25, 2.0}
    plt.close("all")


def test_outside_a_front_end_there_is_no_slider():
    assert not plots.widget_front_end()  # plain Python: no kernel, so no person's front end
    assert plots.alpha_slider(0.3, [0.5]) is None


def test_moving_the_slider_redraws_the_figure(monkeypatch):
    pytest.importorskip("ipywidgets")
    drawn = []

    def recording(*args, **kwargs):
        figure = real(*args, **kwargs)
        drawn.append(bounds(figure))
        return figure

    real, open_before = plots.ratio_figure, set(plt.get_fignums())
    monkeypatch.setattr(plots, "ratio_figure", recording)
    widget = plots.alpha_slider(0.3, [0.5], interactive=True)
    slider, _ = widget.children
    assert slider.value == pytest.approx(0.3) and drawn == [{round(1 / 0.3, 6), 2.0}]
    slider.value = 0.8
    assert drawn[-1] == {1.25, 2.0}
    assert set(plt.get_fignums()) <= open_before  # each redraw closes its figure once shown


def test_without_ipywidgets_the_static_figure_stands(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    with pytest.warns(UserWarning, match="needs ipywidgets"):
        assert plots.alpha_slider(0.3, [0.5], interactive=True) is None


def test_a_kernel_shows_the_slider_to_a_front_end_and_nothing_to_papermill():
    """In a real kernel: a front end runs cells with ``allow_stdin`` on (the widget is the cell's result, or nothing
    without ipywidgets); papermill's client (nbclient) runs them with it off (nothing, as before the slider existed)."""
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        client.execute_interactive("from studylib.toy.plots import alpha_slider", timeout=120)
        shown: dict[bool, set] = {}
        for allow_stdin in (False, True):
            messages = []
            reply = client.execute_interactive(
                "alpha_slider(0.3, [0.5])",
                allow_stdin=allow_stdin,
                timeout=120,
                output_hook=lambda msg, out=messages: out.append((msg["msg_type"], msg["content"].get("data", {}))),
            )
            assert reply["content"]["status"] == "ok"
            shown[allow_stdin] = {(kind, key) for kind, data in messages for key in data}
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert shown[False] == set()
    if importlib.util.find_spec("ipywidgets") is None:
        assert shown[True] == set()  # a warning on stderr; the static figure drawn before stands
    else:
        assert ("execute_result", "application/vnd.jupyter.widget-view+json") in shown[True]
        assert ("display_data", "image/png") in shown[True]  # the figure, sent into the slider's output area
