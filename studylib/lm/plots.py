"""One run's figure: its training curves (``save_run`` writes it beside the run; the report re-exports it)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from studylib.palette import style

RUN_PANELS = (
    ("loss", "training loss", "linear"),
    ("grad_norm", "gradient norm", "log"),
    ("ratio/max", "max exp(T) in batch", "log"),
    ("rewards/margins", "reward margin", "linear"),
)


def run_title(params: dict) -> str:
    """A run's figure title from its knobs: the loss and its knobs, the learning rate, steps and seed."""
    knobs = ", ".join(f"{k}={v}" for k, v in sorted((params.get("loss_kwargs") or {}).items()))
    return (f"{params['loss']}{f' ({knobs})' if knobs else ''}, lr {params['learning_rate']:g}, "
            f"seed {params['seed']}, {params['dataset']} data: training curves")  # fmt: skip


# evaluation during training (studylib.lm.curves): validation prompts solid, training prompts dashed, the
# reference's value dotted
CURVE_PANELS = (
    ("curve/approval", "approval (fraction approved)"),
    ("curve/kl_to_target", "KL(p+ || pi) (nats)"),
)


def plot_run_curves(curves: pd.DataFrame, title: str, method: str | None = None):
    """One run's training curves against optimizer steps: loss, gradient norm and max ratio (log axes, since
    they span decades), reward margin, and where the run measured them (``curve_every``) its approval and KL to the
    target on validation and training prompts with the reference's; panels whose column the run did not log are
    left out. ``method``: the loss, whose palette colour and marker the lines take."""
    panels = [p for p in RUN_PANELS + CURVE_PANELS if p[0] in curves and curves[p[0]].notna().any()]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.6 * max(len(panels), 1), 3.2), squeeze=False)
    look = style(method) if method is not None else {"color": "black", "marker": "."}
    for ax, (column, label, *scale) in zip(axes[0], panels, strict=False):
        if column.startswith("curve/"):
            _plot_curve_points(ax, curves, column, label, look)
            continue
        scale = scale[0]
        values = curves[column]
        ax.plot(curves["step"], values, ms=4, **look)
        if scale == "log" and (values.dropna() > 0).all():
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="optimizer step", ylabel=label, title=label)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_curve_points(ax, curves: pd.DataFrame, column: str, label: str, look: dict) -> None:
    """One measured quantity at its curve points: validation prompts with its 95% interval, training prompts,
    and the reference's value on each."""
    points = curves.dropna(subset=[column])
    train = column.replace("curve/", "curve/train_")
    reference = column.replace("curve/", "curve/reference_")
    ax.plot(points["step"], points[column], label="validation prompts", **look)
    if f"{column}_low" in points:
        ax.fill_between(
            points["step"], points[f"{column}_low"], points[f"{column}_high"], alpha=0.2, color=look["color"]
        )
    if train in points:
        ax.plot(points["step"], points[train], ls="--", label="training prompts", **look)
    for name, ls in ((reference, ":"), (reference.replace("curve/", "curve/train_"), "-.")):
        if name in points:
            which = "training" if "train_" in name else "validation"
            ax.axhline(points[name].iloc[0], color="grey", ls=ls, lw=1, label=f"reference, {which}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="optimizer step", ylabel=label, title=label.split(" (")[0])
    ax.legend(fontsize=7)
