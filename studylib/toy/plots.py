"""Figures of the toy study (matplotlib): every axis labelled with its unit, every curve in a legend."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

KL_UNIT = "KL(target || fit) [nats]"


def plot_ratios(curves: pd.DataFrame) -> Figure:
    """T1: ``g* = p+/p-`` against ``r*_alpha`` along the ``p+`` sweep (left) and as ``p- -> 0`` (right)."""
    alpha = float(curves["alpha"].iloc[0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    a = curves[curves["sweep"] == "p_plus"]
    p_minus = float(a["p_minus"].iloc[0])
    left.plot(a["p_plus"], a["g"], label="density ratio g* = p+/p-")
    left.plot(a["p_plus"], a["r"], label=f"relative ratio r* (alpha={alpha:g})")
    left.axhline(1 / alpha, color="grey", ls="--", lw=1, label=f"1/alpha = {1 / alpha:g}")
    left.set(
        xlabel="p+(y) (probability, dimensionless)",
        ylabel="ratio (dimensionless)",
        title=f"Over p+ at p- = {p_minus:g}",
    )
    b = curves[curves["sweep"] == "p_minus"]
    p_plus = float(b["p_plus"].iloc[0])
    right.loglog(b["p_minus"], b["g"], label="density ratio g*")
    right.loglog(b["p_minus"], b["r"], label=f"relative ratio r* (alpha={alpha:g})")
    right.axhline(1 / alpha, color="grey", ls="--", lw=1, label="1/alpha")
    right.invert_xaxis()
    right.set(
        xlabel="p-(y) (probability, log scale, decreasing)",
        ylabel="ratio (log scale)",
        title=f"As p- -> 0 at p+ = {p_plus:g}",
    )
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_loss_shapes(curves: pd.DataFrame, alpha: float) -> Figure:
    """T2: each method's per-row loss (top) and its slope in T (bottom); + rows solid, - rows dashed, pairs dotted."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    styles = {"+": "-", "-": "--", "pair": ":"}
    colours = dict(zip(curves["method"].unique(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for (method, row), group in curves.groupby(["method", "row"], sort=False):
        label = f"{method}, {row} row" if row != "pair" else f"{method}, pair (T = T_w - T_l)"
        kw = {"color": colours[method], "ls": styles[row], "label": label}
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
    top.set(ylabel="per-row loss (nats)", title="Loss shapes against T = log pi - log pi_ref")
    bottom.set(xlabel="T (nats)", ylabel="dloss/dT (dimensionless)", title="Slope in T: the size of a row's gradient")
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_consistency(summary: pd.DataFrame, slopes: pd.DataFrame, limits: pd.DataFrame | None = None) -> Figure:
    """T3 for one setting: seed-mean KL (band: +- 1 sd over seeds) against n on log-log axes, the fitted slope in
    the legend, each method's infinite-data limit dashed (when inside the plotted range), and a 1/n guide over
    the sizes the slope is fitted on (shaded)."""
    setting = summary["setting"].iloc[0]
    fig, ax = plt.subplots(figsize=(8.5, 5.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers, dashes = "osD^vP", ["-", "--", "-", "-.", "-", ":"]
    top = summary["kl_mean"].max() * 2
    for i, (method, group) in enumerate(summary.groupby("method", sort=False)):
        colour = colours[i % len(colours)]
        slope = slopes.loc[slopes["method"] == method, "slope"]
        label = f"{method}: slope {slope.iloc[0]:+.2f}" if len(slope) else method
        n, mean, sd = group["n"], group["kl_mean"], group["kl_sd"].fillna(0)
        ax.loglog(
            n,
            mean,
            marker=markers[i % 6],
            ls=dashes[i % 6],
            ms=4,
            color=colour,
            label=label,
            zorder=3 + (dashes[i % 6] != "-"),
        )  # dashed on top: curves that coincide stay visible
        ax.fill_between(n, np.maximum(mean - sd, mean * 0.2), mean + sd, color=colour, alpha=0.12, lw=0)
        if limits is not None:
            limit = limits.loc[limits["method"] == method, "kl_limit"]
            if len(limit) and 1e-6 < limit.iloc[0] < top:
                ax.axhline(limit.iloc[0], color=colour, ls="--", lw=1)
    n = np.asarray(sorted(summary["n"].unique()), float)
    min_n = int(slopes["min_n"].iloc[0]) if len(slopes) else int(n[0])
    fitted = n[n >= min_n]
    if len(fitted):
        anchor = summary.loc[summary["n"] == fitted[-1], "kl_mean"].min() * fitted[-1]
        ax.loglog(fitted, anchor / fitted, color="black", lw=1, ls=":", label="1/n guide")
        ax.axvspan(fitted[0], fitted[-1], color="grey", alpha=0.07, lw=0)
    ax.set(
        xlabel="n, data set size (pairs in S1 and S3, rows in S2)",
        ylabel=KL_UNIT,
        title=f"{setting}: KL to the target against n (dashed: infinite-data limit; shaded: slope fit)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def plot_stability(log: pd.DataFrame, alpha: float, title: str = "") -> Figure:
    """T4: loss, gradient norm, largest ratio exp T in the batch (with 1/alpha) and cumulative guard activations
    against the training step, one curve per method (light: raw; dark: running median of 25 steps)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [
        ("loss", "minibatch loss (nats)", False),
        ("grad_norm", "gradient norm (log scale)", True),
        ("ratio_max_batch", "max exp T in batch (log scale)", True),
        ("guard_total", "guard activations so far", False),
    ]
    for colour, (method, group) in zip(colours, log.groupby("method", sort=False), strict=False):
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
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("training step (minibatch Adam)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
