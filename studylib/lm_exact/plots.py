"""Figures of the answer-set study (matplotlib): every axis labelled with its unit, every curve in a legend, one
colour and marker per method (``studylib.palette``)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from studylib.palette import style

EXCESS_UNIT = "excess KL = KL(target || pi_theta) - floor [nats]"
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _plain_log_axis(axis) -> None:
    """Log-scale ticks written as plain numbers (0.02, 5, 100); minor ticks at 2 and 5, labelled too unless the axis
    spans more than four decades (call after plotting)."""
    low, high = axis.get_view_interval()
    axis.set_minor_locator(LogLocator(subs=(2, 5)))
    axis.set_major_formatter(PLAIN)
    axis.set_minor_formatter(PLAIN if high / max(low, 1e-300) <= 1e4 else NullFormatter())


def _excess_panel(ax: plt.Axes, part: pd.DataFrame, falls: pd.DataFrame) -> None:
    for method, group in part.groupby("method", sort=False):
        kw = style(method)
        row = falls[falls["method"] == method]
        fall = row["fall"].iloc[0] if len(row) else float("nan")
        label = f"{method}: " + ("reaches the floor" if math.isinf(fall) else f"falls {fall:.3g}x")
        if len(row):
            label += f" [{row['fall_low'].iloc[0]:.3g}, {row['fall_high'].iloc[0]:.3g}], {row['verdict'].iloc[0]}"
        n, mean, sd = group["n"], group["excess_mean"], group["excess_sd"].fillna(0)
        shown = mean > 0  # an excess at or below 0 (the floor reached) has no place on log axes
        if (~shown).any():
            label += f" (excess <= 0 at n = {', '.join(str(int(v)) for v in n[~shown])})"
        ax.loglog(n[shown], mean[shown], ls="-", ms=5, label=label, **kw)
        low = np.maximum(mean - sd, mean * 0.2)
        ax.fill_between(n[shown], low[shown], (mean + sd)[shown], color=kw["color"], alpha=0.12, lw=0)
    sizes = np.asarray(sorted(part["n"].unique()), float)
    positive = part.loc[part["excess_mean"] > 0, "excess_mean"]
    if len(positive):
        anchor = positive.min() * sizes[-1]
        ax.loglog(sizes, anchor / sizes, color="black", lw=1, ls=":", label="1/n guide")
    ax.grid(alpha=0.3, which="both")


def plot_consistency(
    summary: pd.DataFrame, fall_table: pd.DataFrame, limits: pd.DataFrame, setting: str, model: str
) -> Figure:
    """One setting: seed-mean excess KL (band: +- 1 sd over seeds) against n on log-log axes, held-out prompts left
    and training prompts right; each method's fall from the smallest to the largest n with its bootstrap interval
    and verdict in its legend, and its infinite-data limit (``limits``) as a dashed line in its colour."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), sharey=True)
    unit = "pairs" if setting in ("S1", "S3") else "labelled rows"
    for ax, split in zip(axes, ("heldout", "train"), strict=True):
        part = summary[(summary["setting"] == setting) & (summary["split"] == split)]
        fell = fall_table[(fall_table["setting"] == setting) & (fall_table["split"] == split)]
        _excess_panel(ax, part, fell)
        for row in limits[limits["setting"] == setting].itertuples():
            value = getattr(row, f"limit_excess_{split}")
            if value > 0:
                ax.axhline(value, color=style(row.method)["color"], ls="--", lw=1, alpha=0.8)
        sizes = sorted(part["n"].unique())
        ax.set_xticks(sizes, [f"$2^{{{math.log2(n):g}}}$" for n in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        _plain_log_axis(ax.yaxis)
        where = "held-out prompts" if split == "heldout" else "training prompts"
        ax.set(xlabel=f"n, data set size ({unit}, log scale)", title=f"{setting}, {where}")
        handles, _ = ax.get_legend_handles_labels()
        handles.append(Patch(color="grey", alpha=0.25, label="band: +- 1 sd over seeds"))
        handles.append(Line2D([], [], color="grey", ls="--", lw=1, label="dashed: the method's infinite-data limit"))
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axes[0].set_ylabel(f"{EXCESS_UNIT}, log scale")
    floor = summary.loc[summary["setting"] == setting].groupby("split")["floor_mean"].mean()
    fig.suptitle(
        f"{setting} on the answer-set policy of {model}: excess KL over the floor "
        f"(floor: {floor.get('heldout', np.nan):.2g} nats held-out, {floor.get('train', np.nan):.2g} training)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


CURVE_PANELS = (
    ("ratio_max", "max exp T over the data's cells\n(log scale, dimensionless)", True),
    ("grad_norm", "adapter gradient norm\n(log scale)", True),
    ("guard_total", "DDRO guard activations so far\n(cells past the guard, summed over steps)", False),
)


def plot_training_curves(curves: pd.DataFrame, n: int, one_over_alpha: dict[str, float]) -> Figure:
    """Per setting (columns): the largest ratio ``exp T`` (with RDRO's ``1/alpha``), the gradient norm and DDRO's
    cumulative guard activations against the step, for the runs of size ``n`` (seed of ``curves``), each method at
    the learning rate in its legend."""
    part = curves[curves["n"].eq(n).fillna(False).astype(bool)].copy()
    part["guard_total"] = part.groupby(["setting", "method"])["guard"].cumsum()
    settings = list(part["setting"].unique())
    fig, axes = plt.subplots(3, len(settings), figsize=(5.2 * len(settings), 9.5), sharex=True, squeeze=False)
    for j, setting in enumerate(settings):
        for method, group in part[part["setting"] == setting].groupby("method", sort=False):
            for i, (column, _, _) in enumerate(CURVE_PANELS):
                if column != "guard_total" or method.startswith("DDRO"):
                    label = f"{method}, lr {group['lr'].iloc[0]:g}" if "lr" in group else method
                    axes[i, j].plot(group["step"], group[column], color=style(method)["color"], label=label, lw=1.3)
        if not axes[2, j].lines:
            axes[2, j].text(0.5, 0.5, "no DDRO run in this setting", ha="center", transform=axes[2, j].transAxes)
        if setting in one_over_alpha:
            value = one_over_alpha[setting]
            axes[0, j].axhline(value, color="black", ls="--", lw=1, label=f"RDRO's 1/alpha = {value:.3g}")
        axes[0, j].set_title(f"{setting}, n = {n}")
        axes[-1, j].set_xlabel("training step (full-batch AdamW)")
        for i, (_, ylabel, log_scale) in enumerate(CURVE_PANELS):
            if log_scale:
                axes[i, j].set_yscale("log")
                _plain_log_axis(axes[i, j].yaxis)
            axes[i, j].grid(alpha=0.3)
            if j == 0:
                axes[i, j].set_ylabel(ylabel)
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_alpha_sweep(sweep: pd.DataFrame) -> Figure:
    """RDRO (per-class) against alpha: exact KL on held-out (solid) and training (dashed) prompts, mean +- sd over
    seeds, the data's preferred fraction marked (the alpha the theory prescribes)."""
    settings = list(sweep["setting"].unique())
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.6), squeeze=False)
    colour = style("RDRO")["color"]
    for ax, setting in zip(axes[0], settings, strict=True):
        part = sweep[sweep["setting"] == setting]
        for column, ls, where in (("kl_heldout", "-", "held-out"), ("kl_train", "--", "training")):
            stats = part.groupby("alpha")[column].agg(["mean", "std"])
            ax.errorbar(
                stats.index,
                stats["mean"],
                stats["std"],
                color=colour,
                ls=ls,
                marker="o",
                ms=4,
                capsize=3,
                label=f"RDRO per-class, {where} prompts (mean, bars +- 1 sd over {part['seed'].nunique()} seeds)",
            )
        fraction = part["preferred_fraction"].mean()
        ax.axvline(fraction, color="black", ls=":", lw=1.2, label=f"preferred fraction of the data = {fraction:.3f}")
        ax.set(
            xlabel="alpha (RDRO's mixing weight)",
            ylabel="KL(target || pi_theta) [nats], log scale",
            yscale="log",
            title=f"{setting}, n = {int(part['n'].iloc[0])}: exact KL against alpha",
        )
        _plain_log_axis(ax.yaxis)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
