"""Gather language-model runs into the study's tables and figures (used by notebook 05)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from studylib.palette import style

METRICS = ("win_rate", "approval", "kl", "length")

# STUDY.md section 4. Their judge is GPT-4 (AlpacaEval 2 LC, TL;DR win rate); ours is the simulated annotator
# pool against our own reference model: compare orderings and trends, never values.
PUBLISHED = pd.DataFrame(
    [
        ("paper 3", "Llama-3-8B-Instruct", "AlpacaEval-2 LC", "base", 29.62),
        ("paper 3", "Llama-3-8B-Instruct", "AlpacaEval-2 LC", "dpo", 44.72),
        ("paper 3", "Llama-3-8B-Instruct", "AlpacaEval-2 LC", "pmle", 53.23),
        ("paper 3", "Llama-3-8B-Instruct", "AlpacaEval-2 LC", "rebel", 52.04),
        ("paper 3", "Llama-3-8B-Instruct", "AlpacaEval-2 LC", "distill", 54.49),
        ("paper 3", "Pythia-2.8B", "TL;DR GPT-4 win rate", "dpo", 47.3),
        ("paper 3", "Pythia-2.8B", "TL;DR GPT-4 win rate", "pmle", 49.1),
        ("paper 3", "Pythia-2.8B", "TL;DR GPT-4 win rate", "distill", 73.8),
        ("paper 3", "Pythia-2.8B", "TL;DR GPT-4 win rate", "rlhf", 72.0),
        ("paper 3", "Pythia-2.8B", "TL;DR GPT-4 win rate", "reverse_kl", 73.0),
        ("paper 3", "Pythia-6.9B", "TL;DR GPT-4 win rate", "dpo", 55.6),
        ("paper 3", "Pythia-6.9B", "TL;DR GPT-4 win rate", "pmle", 59.0),
        ("paper 3", "Pythia-6.9B", "TL;DR GPT-4 win rate", "distill", 83.9),
        ("paper 3", "Pythia-6.9B", "TL;DR GPT-4 win rate", "rlhf", 82.0),
        ("paper 3", "Pythia-6.9B", "TL;DR GPT-4 win rate", "reverse_kl", 84.0),
    ],
    columns=["source", "model", "benchmark", "method", "published_win_rate_pct"],
)
PUBLISHED_NOTE = (
    "RDRO's paper reports RDRO comparable to or better than KTO and DDRO on Qwen 2.5 and Llama 3 (UF-G, MIX-14K, "
    "AlpacaEval LC) without a table we could read; its Figures 2-3 plot LC win rate against alpha."
)


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per ``metrics.json`` under ``root`` (a run's directory), with its parameters flattened."""
    rows = []
    for path in sorted(Path(root).glob("**/metrics.json")):
        record = json.loads(path.read_text())
        params = record.pop("params", {})
        knobs = params.get("loss_kwargs") if isinstance(params.get("loss_kwargs"), dict) else {}
        alpha = knobs.get("alpha")
        if alpha == "auto":  # RDRO's prescription: the training set's preferred fraction
            alpha = record.get("data", {}).get("preferred_fraction")
        rows.append({"run": path.parent.name, "run_dir": str(path.parent), "alpha": alpha, **params, **record})
    if not rows:
        raise FileNotFoundError(f"no metrics.json under {root}: run the LM notebooks (04) first")
    return pd.DataFrame(rows)


def run_conclusion(record: dict) -> str:
    """What one run shows, in sentences built from its own record (``metrics.json``), with the binomial standard
    error of its win rate so a reader can tell a difference from noise."""
    n, win = record["n_prompts"], record["win_rate"]
    se = (max(win * (1 - win), 0.25 / n) / n) ** 0.5  # binomial; kept above 0 for a win rate of 0 or 1
    verdict = (
        "beats the reference beyond two standard errors"
        if win - 2 * se > 0.5
        else "loses to the reference beyond two standard errors"
        if win + 2 * se < 0.5
        else "is within two standard errors of a tie with the reference"
    )
    lines = [
        f"- **{record['loss']}** on `{record['dataset']}`, seed {record['seed']}, {record['steps']} optimizer steps "
        f"({record['train_seconds']:.0f} s of training).",
        f"- Win rate against the reference {win:.3f} over {n} held-out prompts (standard error {se:.3f}): the "
        f"policy {verdict}.",
        f"- Approval {record['approval']:.3f} against the reference's {record['reference_approval']:.3f}; "
        f"$\\mathrm{{KL}}(\\pi \\,\\|\\, \\pi_{{\\mathrm{{ref}}}})$ = {record['kl']:.2f} nats per completion; "
        f"mean length {record['length']:.1f} tokens (reference {record['reference_length']:.1f}).",
    ]
    flags = record.get("flags") or []
    lines.append("- Flags: " + ("; ".join(flags) if flags else "none (no collapse, KL within bound)."))
    return "\n".join(lines)


def method_table(runs: pd.DataFrame, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Methods x data sets, each metric as ``mean ± sd`` over seeds (and the seed count)."""
    main = runs[runs.get("sweep", pd.Series(False, index=runs.index)).fillna(False) == False]  # noqa: E712
    groups = main.groupby(["dataset", "loss"])

    def fmt(values: pd.Series) -> str:
        v = values.dropna().to_numpy(float)
        if v.size == 0:
            return "-"
        return f"{v.mean():.3f}" if v.size == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"

    table = groups[list(metrics)].agg(fmt)
    table["seeds"] = groups["seed"].nunique()
    return table.reset_index()


def alpha_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """RDRO's win rate (mean and sd over seeds) against alpha (the runs whose loss has an ``alpha`` knob)."""
    rdro = runs[runs["alpha"].notna()].copy()
    rdro["alpha"] = rdro["alpha"].astype(float)
    out = rdro.groupby(["dataset", "alpha"])["win_rate"].agg(["mean", "std", "count"]).reset_index()
    return out.rename(columns={"mean": "win_rate_mean", "std": "win_rate_sd", "count": "seeds"})


def plot_alpha_sweep(sweep: pd.DataFrame, preferred_fraction: float | None = None, runs: pd.DataFrame | None = None):
    """Win rate against alpha per data set (RDRO Figures 2-3, with our judge); with ``runs``, each seed a dot."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if runs is not None:
        seeds = runs[runs["alpha"].notna()]
        ax.scatter(seeds["alpha"].astype(float), seeds["win_rate"], color="black", s=12, zorder=3, label="one seed")
    for dataset, part in sweep.groupby("dataset"):
        ax.errorbar(
            part["alpha"],
            part["win_rate_mean"],
            yerr=part["win_rate_sd"].fillna(0),
            capsize=3,
            label=f"{dataset} (mean ± sd over seeds)",
            **style("rdro"),
        )
    if preferred_fraction is not None:
        ax.axvline(preferred_fraction, color="grey", ls="--", label=f"preferred fraction {preferred_fraction:.2f}")
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="tie with reference")
    seeds = sweep["seeds"].astype(int).tolist()
    spread = f"{sweep['win_rate_mean'].min():.2f}-{sweep['win_rate_mean'].max():.2f}"
    title = f"RDRO: win rate {spread} over {len(sweep)} alphas (seeds per alpha: {', '.join(map(str, seeds))})"
    ax.set(xlabel="alpha (RDRO)", ylabel="win rate vs reference (annotator pool)", title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


RUN_PANELS = (
    ("loss", "training loss", "linear"),
    ("grad_norm", "gradient norm", "log"),
    ("ratio/max", "max exp(T) in batch", "log"),
    ("rewards/margins", "reward margin", "linear"),
)


def plot_run_curves(curves: pd.DataFrame, title: str):
    """One run's training curves against optimizer steps: loss, gradient norm and max ratio (log axes, since
    they span decades), reward margin; panels whose column the run did not log are left out."""
    panels = [p for p in RUN_PANELS if p[0] in curves and curves[p[0]].notna().any()]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.6 * max(len(panels), 1), 3.2), squeeze=False)
    for ax, (column, label, scale) in zip(axes[0], panels, strict=False):
        values = curves[column]
        ax.plot(curves["step"], values, marker=".")
        if scale == "log" and (values.dropna() > 0).all():
            ax.set_yscale("log")
        ax.set(xlabel="optimizer step", ylabel=label, title=label)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def ratio_findings(runs: pd.DataFrame) -> str:
    """The largest ``exp(T)`` each method's training logged (over steps and seeds, main runs), with RDRO's
    ``1/alpha`` beside it: the LM counterpart of notebook 03's ratio column."""
    lines = []
    main = runs[runs.get("sweep", pd.Series(False, index=runs.index)).fillna(False) == False]  # noqa: E712
    several = main["dataset"].nunique() > 1
    for (dataset, loss), part in main.groupby(["dataset", "loss"]):
        peaks = []
        for run_dir in part["run_dir"]:
            curves = pd.read_csv(Path(run_dir) / "curves.csv")
            if "ratio/max" in curves and curves["ratio/max"].notna().any():
                peaks.append(float(curves["ratio/max"].max()))
        if not peaks:
            continue
        bound = ""
        alphas = part["alpha"].dropna().astype(float)
        if len(alphas):
            bound = f" (1/alpha = {1 / alphas.iloc[0]:.2f}: {max(peaks) * alphas.iloc[0]:.1f} times the bound)"
        name = f"{loss} ({dataset})" if several else loss
        lines.append(f"- {name}: largest exp(T) in a batch {max(peaks):.3g}{bound}")
    return "\n".join(lines)


def plot_training_curves(runs: pd.DataFrame, seed: int | None = None):
    """Training loss, gradient norm and max exp(T) against steps, one line per method in the method's own colour
    (``studylib.palette``) on every panel (RDRO Figures 4-5); log axes where values span decades."""
    panels = [
        ("loss", "training loss"),
        ("grad_norm", "gradient norm (log)"),
        ("ratio/max", "max exp(T) in batch (log)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    chosen = runs if seed is None else runs[runs["seed"] == seed]
    chosen = chosen[chosen.get("sweep", pd.Series(False, index=chosen.index)).fillna(False) == False]  # noqa: E712
    for _, run in chosen.drop_duplicates(["dataset", "loss"]).iterrows():
        curves_path = Path(run["run_dir"]) / "curves.csv"
        if not curves_path.exists():
            continue
        curves = pd.read_csv(curves_path)
        look = style(run["loss"])
        for ax, (column, _) in zip(axes, panels, strict=True):
            if column in curves and curves[column].notna().any():
                ax.plot(
                    curves["step"],
                    curves[column],
                    color=look["color"],
                    marker=look["marker"],
                    ms=4,
                    label=f"{run['loss']} ({run['dataset']})",
                )
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set(xlabel="optimizer step", ylabel=label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    with_alpha = chosen[chosen["alpha"].notna()].drop_duplicates(["dataset", "alpha"])
    for _, run in with_alpha.iterrows():  # RDRO's target ratio is bounded by 1/alpha: draw the bound the text cites
        label = "RDRO's 1/alpha" + (f" ({run['dataset']})" if len(with_alpha) > 1 else "")
        axes[2].axhline(1 / float(run["alpha"]), color=style("rdro")["color"], ls="--", lw=1, label=label)
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    peaks = {}
    for line in axes[1].get_lines():
        peaks[line.get_label()] = max(line.get_ydata())
    top = max(peaks, key=peaks.get) if peaks else None
    finding = f": largest gradient norm {top} ({peaks[top]:.3g})" if top else ""
    fig.suptitle("Training curves per method" + ("" if seed is None else f", seed {seed}") + finding)
    fig.tight_layout()
    return fig


def published_beside_ours(table: pd.DataFrame) -> pd.DataFrame:
    """Published win rates (their judge) beside our win rates (the annotator pool), by method."""
    ours = table[["loss", "dataset", "win_rate"]].rename(columns={"loss": "method", "win_rate": "our_win_rate"})
    merged = PUBLISHED.merge(ours, on="method", how="left")
    merged["units_and_baselines"] = (
        "theirs: percent, GPT-4 judge (AlpacaEval 2 LC: against GPT-4 Turbo's outputs; TL;DR: against reference "
        "summaries); ours: a fraction, annotator pool against our own reference model"
    )
    return merged


def win_rate_bars(runs: pd.DataFrame):
    """Mean win rate per method (bar, the method's colour) with each seed's win rate as a dot, per data set."""
    main = runs[runs.get("sweep", pd.Series(False, index=runs.index)).fillna(False) == False]  # noqa: E712
    groups = sorted(main.groupby(["dataset", "loss"]), key=lambda item: item[0])
    several = main["dataset"].nunique() > 1
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(groups)), 4))
    for x, ((_, loss), part) in enumerate(groups):
        ax.bar(x, part["win_rate"].mean(), 0.7, color=style(loss)["color"], alpha=0.8)
        ax.scatter([x] * len(part), part["win_rate"], color="black", s=12, zorder=3)
    ax.scatter([], [], color="black", s=12, label="one seed")
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="tie with the reference")
    names = [f"{loss}\n({dataset})" if several else loss for (dataset, loss), _ in groups]
    ax.set_xticks(range(len(groups)), names, fontsize=8)
    seeds = int(main.groupby(["dataset", "loss"])["seed"].nunique().max())
    ax.set(ylabel="win rate against the reference", title=f"Win rate per method: bar = mean of {seeds} seed(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
