"""Figures of the toy study (matplotlib): every axis labelled with its unit, every curve in a legend."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from studylib.palette import style
from studylib.toy.shapes import ratio_curves

KL_UNIT = "KL(target || fit) [nats]"


def _alpha_shades(alphas: list[float]) -> dict[float, str]:
    """RDRO's colour, from light (small alpha) to dark (large alpha)."""
    cmap = plt.get_cmap("Blues")
    return {a: cmap(0.45 + 0.5 * i / max(1, len(alphas) - 1)) for i, a in enumerate(sorted(alphas))}


def plot_ratios(curves: pd.DataFrame) -> Figure:
    """T1 (RDRO Figure 1a): ``g* = p+/p-`` against ``r*_alpha`` for each alpha, along the ``p+`` sweep (left) and
    as ``p- -> 0`` (right); each ``1/alpha`` bound dashed in its alpha's colour."""
    alphas = sorted(curves["alpha"].unique())
    shades = _alpha_shades(alphas)
    ddro = style("DDRO")["color"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    a = curves[(curves["sweep"] == "p_plus") & (curves["alpha"] == alphas[0])]
    p_minus = float(a["p_minus"].iloc[0])
    framing = "density ratio g* = p+/p- (DDRO as the RDRO paper frames it)"
    left.plot(a["p_plus"], a["g"], color=ddro, lw=2, label=framing)
    b = curves[(curves["sweep"] == "p_minus") & (curves["alpha"] == alphas[0])]
    right.loglog(b["p_minus"], b["g"], color=ddro, lw=2, label="density ratio g*")
    for alpha in alphas:
        for ax, sweep in ((left, "p_plus"), (right, "p_minus")):
            part = curves[(curves["sweep"] == sweep) & (curves["alpha"] == alpha)]
            x = part["p_plus"] if sweep == "p_plus" else part["p_minus"]
            ax.plot(x, part["r"], color=shades[alpha], lw=2, label=f"relative ratio r*, alpha = {alpha:g}")
            ax.axhline(1 / alpha, color=shades[alpha], ls="--", lw=1, label=f"bound 1/alpha = {1 / alpha:.3g}")
    p_plus = float(b["p_plus"].iloc[0])
    left.set(
        xlabel="p+(y) (probability)",
        ylabel="ratio (dimensionless)",
        title=f"Over p+ at p- = {p_minus:g}: g* reaches 1/p- = {1 / p_minus:g}; r* bends under 1/alpha",
    )
    right.invert_xaxis()
    right.set(
        xlabel="p-(y) (probability, log scale, decreasing)",
        ylabel="ratio (log scale)",
        title=f"As p- -> 0 at p+ = {p_plus:g}: g* diverges, r* saturates at 1/alpha",
    )
    for ax in (left, right):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig


def ratio_figure(
    alpha: float, compare_alphas: Sequence[float] = (), p_minus: float = 0.1, p_plus_fixed: float = 0.5
) -> Figure:
    """T1's figure (``plot_ratios``) for ``alpha`` and the overlaid ``compare_alphas``: what the slider redraws."""
    return plot_ratios(ratio_curves(sorted({alpha, *compare_alphas}), p_minus=p_minus, p_plus_fixed=p_plus_fixed))


def widget_front_end() -> bool:
    """Whether this runs in a Jupyter kernel driven by a person's front end (JupyterLab, Notebook, VS Code), whose
    cells may read input, rather than by papermill or nbconvert (``nbclient`` runs every cell with ``allow_stdin``
    off)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or not hasattr(kernel, "get_parent"):
        return False
    return bool(kernel.get_parent("shell").get("content", {}).get("allow_stdin", False))


def alpha_slider(
    alpha: float,
    compare_alphas: Sequence[float] = (),
    p_minus: float = 0.1,
    p_plus_fixed: float = 0.5,
    interactive: bool | None = None,
) -> Any:
    """In Jupyter, a slider over alpha that redraws T1's figure (``ratio_figure``) as it moves; otherwise None.

    ``interactive`` None: a person's front end (``widget_front_end``). Under papermill, or without ipywidgets
    (``pip install 'studylib[notebooks]'``), nothing is drawn here: the static figure for the parameter's alpha,
    drawn before, is the one shown. Returns an ``ipywidgets.VBox`` (the slider, then the figure) or None.
    """
    if not (widget_front_end() if interactive is None else interactive):
        return None
    try:
        import ipywidgets
    except ImportError:
        warnings.warn("the alpha slider needs ipywidgets (pip install ipywidgets): the figure is static", stacklevel=2)
        return None
    from IPython.display import display

    slider = ipywidgets.FloatSlider(
        value=alpha, min=min(0.05, alpha), max=max(0.95, alpha), step=0.05, description="alpha",
        continuous_update=False, readout_format=".2f",
    )  # fmt: skip
    figure = ipywidgets.Output()

    def redraw(change: dict | None = None) -> None:
        drawn = ratio_figure(slider.value, compare_alphas, p_minus=p_minus, p_plus_fixed=p_plus_fixed)
        with figure:
            figure.clear_output(wait=True)
            display(drawn)
        plt.close(drawn)

    slider.observe(redraw, names="value")
    redraw()
    return ipywidgets.VBox([slider, figure])


def plot_loss_shapes(curves: pd.DataFrame, alpha: float) -> Figure:
    """T2: each method's per-row loss (top) and its slope in T (bottom); + rows solid, - rows dashed, pairs dotted."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    styles = {"+": "-", "-": "--", "pair": ":"}
    for (method, row), group in curves.groupby(["method", "row"], sort=False):
        label = f"{method}, {row} row" if row != "pair" else f"{method}, pair (T = T_w - T_l)"
        kw = {"color": style(method)["color"], "ls": styles[row], "label": label}
        top.plot(group["T"], group["loss"], **kw)
        bottom.plot(group["T"], group["slope"], **kw)
    top.set_ylim(-2.5, 5.0)
    bottom.set_ylim(-1.5, 4.0)
    for ax in (top, bottom):
        ax.axvline(np.log(2), color="grey", lw=0.8, ls="-.")
        ax.axvline(np.log(1 / alpha), color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        ymax = ax.get_ylim()[1]
        ax.text(np.log(2), ymax, "log 2: DDRO pole ", fontsize=8, va="top", ha="right")
        ax.text(np.log(1 / alpha), ymax, " log(1/alpha): RDRO + minimum", fontsize=8, va="top")
    top.set(
        ylabel="per-row loss (nats)",
        title=f"Loss against T: RDRO's + loss is least at log(1/alpha) = {np.log(1 / alpha):.2f}, DDRO's never",
    )
    bottom.set(
        xlabel="T = log pi - log pi_ref (nats)",
        ylabel="dloss/dT (dimensionless)",
        title="Slope in T (a row's gradient): bounded for RDRO and KTO, steep at DDRO's pole",
    )
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_consistency(summary: pd.DataFrame, slopes: pd.DataFrame, limits: pd.DataFrame | None = None) -> Figure:
    """T3 for one setting: seed-mean KL (band: +- 1 sd over seeds) against n on log-log axes, the fitted slope in
    the legend, each method's infinite-data limit dashed (every limit above 1e-6: the axis reaches the largest, so
    a limit far above the curves, KTO's, is drawn too), and a 1/n guide over the sizes the slope is fitted on
    (shaded)."""
    setting = summary["setting"].iloc[0]
    fig, ax = plt.subplots(figsize=(8.5, 5.4))
    dashes = ["-", "--", "-", "-.", "-", ":"]
    shown = limits[limits["method"].isin(summary["method"])]["kl_limit"] if limits is not None else pd.Series([])
    top = max([summary["kl_mean"].max(), *shown[shown > 1e-6]]) * 2
    for i, (method, group) in enumerate(summary.groupby("method", sort=False)):
        colour, marker = style(method)["color"], style(method)["marker"]
        slope = slopes.loc[slopes["method"] == method, "slope"]
        label = f"{method}: slope {slope.iloc[0]:+.2f}" if len(slope) else method
        n, mean, sd = group["n"], group["kl_mean"], group["kl_sd"].fillna(0)
        ax.loglog(
            n,
            mean,
            marker=marker,
            ls=dashes[i % 6],
            ms=4,
            color=colour,
            label=label,
            zorder=3 + (dashes[i % 6] != "-"),
        )  # dashed on top: curves that coincide stay visible
        ax.fill_between(n, np.maximum(mean - sd, mean * 0.2), mean + sd, color=colour, alpha=0.12, lw=0)
        if limits is not None:
            limit = limits.loc[limits["method"] == method, "kl_limit"]
            if len(limit) and limit.iloc[0] > 1e-6:
                ax.axhline(limit.iloc[0], color=colour, ls="--", lw=1)
    n = np.asarray(sorted(summary["n"].unique()), float)
    min_n = int(slopes["min_n"].iloc[0]) if len(slopes) else int(n[0])
    fitted = n[n >= min_n]
    if len(fitted):
        anchor = summary.loc[summary["n"] == fitted[-1], "kl_mean"].min() * fitted[-1]
        ax.loglog(fitted, anchor / fitted, color="black", lw=1, ls=":", label="1/n guide")
        ax.axvspan(fitted[0], fitted[-1], color="grey", alpha=0.07, lw=0)
    falling = slopes.loc[slopes["slope"] < -0.5, "method"].tolist()
    if limits is not None:  # and with an infinite-data limit of 0: consistent, not merely falling for now
        falling = [m for m in falling if limits.loc[limits["method"] == m, "kl_limit"].le(1e-8).all()]
    finding = f"converging (limit 0, slope < -0.5): {', '.join(falling)}" if falling else "no method converges"
    ax.set_ylim(top=top)
    ax.set(xlabel="n, data set size (pairs in S1 and S3, rows in S2)", ylabel=KL_UNIT, title=f"{setting}: {finding}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, which="both")
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Patch(color="grey", alpha=0.25, label="band: +- 1 sd over seeds"),
        Line2D([], [], color="grey", ls="--", lw=1, label="dashed line: infinite-data limit"),
        Patch(color="grey", alpha=0.07, label="shaded span: sizes the slope is fitted on"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_stability(log: pd.DataFrame, alpha: float, title: str = "") -> Figure:
    """T4: loss, gradient norm, largest ratio exp T in the batch (with 1/alpha) and cumulative guard activations
    against the training step, one curve per method (light: raw; dark: running median of 25 steps)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    panels = [
        ("loss", "minibatch loss (nats)", False),
        ("grad_norm", "gradient norm (log scale)", True),
        ("ratio_max_batch", "max exp T in batch (log scale)", True),
        ("guard_total", "guard activations so far", False),
    ]
    for method, group in log.groupby("method", sort=False):
        colour = style(method)["color"]
        for ax, (column, _, _) in zip(axes.flat, panels, strict=True):
            values = group[column]
            if column == "guard_total":
                ax.plot(group["step"], values, color=colour, label=method)
                continue
            ax.plot(group["step"], values, color=colour, alpha=0.25, lw=0.7)
            ax.plot(group["step"], values.rolling(25, min_periods=1).median(), color=colour, label=method)
    axes[1, 0].axhline(1 / alpha, color="black", ls="--", lw=1, label=f"1/alpha = {1 / alpha:g}")
    axes[1, 0].set_ylim(bottom=0.5)
    axes[1, 1].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1, 1].set_ylim(-0.5, max(1.0, float(log["guard_total"].max())) * 1.1)
    for ax, (_, ylabel, log_scale) in zip(axes.flat, panels, strict=True):
        if log_scale:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            low, high = ax.get_ylim()  # label minor ticks on short ranges, only the decades on long ones
            minor = FuncFormatter(lambda v, _: f"{v:g}") if high / max(low, 1e-300) < 30 else NullFormatter()
            ax.yaxis.set_minor_formatter(minor)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    handles, _ = axes[0, 0].get_legend_handles_labels()
    handles += [
        Line2D([], [], color="grey", alpha=0.3, lw=0.7, label="light: each step"),
        Line2D([], [], color="grey", label="dark: running median of 25 steps"),
    ]
    axes[0, 0].legend(handles=handles, fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("training step (minibatch Adam)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
