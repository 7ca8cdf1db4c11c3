"""Gather language-model runs into the study's tables and figures (used by notebook 05)."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

from studylib.lm.plots import plot_run_curves, run_title  # noqa: F401 (notebook 04's, re-exported)
from studylib.lm.stats import bootstrap_interval, detectable_effect, paired_difference_interval, prompts_needed
from studylib.palette import style

METRICS = ("win_rate", "approval", "kl", "length")

# STUDY.md section 4. Their judge is GPT-4 (AlpacaEval 2 LC, TL;DR win rate); ours is the simulated annotator
# pool against our own reference model: compare orderings and trends, never values.
PUBLISHED = pd.DataFrame(
    [
        ("paper 3", "Llama-3-8B-Instruct", "AlpacaEval-2 LC", "none (the instruct model itself)", 29.62),
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


def collect_runs(root: str | Path, only: Collection[str] | None = None) -> pd.DataFrame:
    """One row per ``metrics.json`` under ``root`` (a run's directory), with its parameters flattened.

    ``only``: the run folder names to read (``studylib.study.recorded_run_folders``), None for all. The
    frame's ``attrs`` then list the folders under ``root`` left out (``"ignored"``) and those named but absent
    (``"missing"``).
    """
    paths = sorted(Path(root).glob("**/metrics.json"))
    ignored: list[str] = []
    missing: list[str] = []
    if only is not None:
        wanted, found = set(only), {p.parent.name for p in paths}
        ignored, missing = sorted(found - wanted), sorted(wanted - found)
        paths = [p for p in paths if p.parent.name in wanted]
    rows = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not readable JSON (truncated? rerun its run): {err}") from None
        params = record.pop("params", {})
        knobs = params.get("loss_kwargs") if isinstance(params.get("loss_kwargs"), dict) else {}
        alpha = knobs.get("alpha")
        if alpha == "auto":  # RDRO's prescription: the training set's preferred fraction
            alpha = record.get("data", {}).get("preferred_fraction")
        rows.append({"run": path.parent.name, "run_dir": str(path.parent), "alpha": alpha, **params, **record})
    if not rows:
        named = f" in the {len(missing)} run folders named" if only is not None else ""
        raise FileNotFoundError(f"no metrics.json under {root}{named}: run the LM notebooks (04) first")
    frame = pd.DataFrame(rows)
    frame.attrs.update(ignored=ignored, missing=missing)
    return frame


def runs_note(runs: pd.DataFrame, root: str | Path, profile: str | None) -> str:
    """What ``collect_runs`` read: how many runs, their seeds and methods, and (with ``only``) the folders under
    ``root`` it left out and the runs it did not find."""
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique()))
    lines = [f"{len(runs)} runs, seeds {seeds}, methods {', '.join(sorted(runs['loss'].unique()))}"]
    if runs.attrs.get("ignored"):  # an earlier config's runs, say: never mixed into this profile's tables
        left_out = len(runs.attrs["ignored"])
        lines.append(f"left out: {left_out} run folders under {root} that no run of {profile!r} names")
    if runs.attrs.get("missing"):
        lines.append(f"not found (not run, or failed): {', '.join(runs.attrs['missing'])}")
    return "\n".join(lines)


def run_conclusion(record: dict, curves: pd.DataFrame | None = None) -> str:
    """What one run shows, in sentences built from its own record (``metrics.json``) and training curves, with the
    95% bootstrap interval of its win rate over prompts so a reader can tell a difference from noise, and the
    caveats its numbers carry (a training loss that rose, a reward model at chance, a reconstructed loss)."""
    n, win, low, high = record["n_prompts"], record["win_rate"], record["win_rate_low"], record["win_rate_high"]
    verdict = (
        "beats the reference (the whole interval lies above 0.5)"
        if low > 0.5
        else "loses to the reference (the whole interval lies below 0.5)"
        if high < 0.5
        else "cannot be told from a tie with the reference (the interval contains 0.5)"
    )
    lines = [
        f"- **{record['loss']}** on `{record['dataset']}`, seed {record['seed']}, {record['steps']} optimizer steps "
        f"({record['train_seconds']:.0f} s of training).",
        f"- Win rate against the reference {win:.3f} (95% interval {low:.3f}-{high:.3f}) over {n} held-out prompts x "
        f"{record.get('samples_per_prompt', 1)} samples: the policy {verdict}.",
        f"- Approval {record['approval']:.3f} against the reference's {record['reference_approval']:.3f}; "
        f"$\\mathrm{{KL}}(\\pi \\,\\|\\, \\pi_{{\\mathrm{{ref}}}})$ = {record['kl']:.2f} nats per completion "
        f"({record['kl_low']:.2f}-{record['kl_high']:.2f}); mean length {record['length']:.1f} tokens (reference "
        f"{record['reference_length']:.1f}).",
    ]
    if record.get("epochs") is not None:
        rows = f" optimizer steps ({epochs_text(record['epochs'])} of its rows)"
        lines[0] = lines[0].replace(" optimizer steps", rows)
    if record.get("kl_to_target") is not None:
        gain, glow, ghigh = (record[f"kl_to_target_gain{k}"] for k in ("", "_low", "_high"))
        toward = "closer to" if glow > 0 else "further from" if ghigh < 0 else "not measurably closer to"
        lines.append(
            f"- Distance to the target $p^+$: $\\mathrm{{KL}}(p^+ \\,\\|\\, \\pi)$ = {record['kl_to_target']:.3f} nats "
            f"against the reference's {record['reference_kl_to_target']:.3f} (gain {gain:.3f}, 95% interval "
            f"{glow:.3f} to {ghigh:.3f}, over {record['target_prompts']} prompts): the policy is {toward} its target."
        )
    if record.get("train_approval") is not None:
        lines.append(
            f"- On {record['train_eval_prompts']} training prompts: approval {record['train_approval']:.3f} against "
            f"the reference's {record['train_reference_approval']:.3f} (gain {record['train_approval_gain_low']:.3f} "
            f"to {record['train_approval_gain_high']:.3f})."
        )
    flags = record.get("flags") or []
    lines.append("- Flags: " + ("; ".join(flags) if flags else "none (no collapse, KL within bound)."))
    return "\n".join(lines + run_caveats(record, curves))


def epochs_text(epochs: float) -> str:
    """``"1 epoch"``, ``"2 epochs"``, ``"0.5 epochs"``: the count as printed (two significant digits), then the word."""
    count = f"{epochs:.2g}"
    return f"{count} epoch" if count == "1" else f"{count} epochs"


CHANCE = 0.55  # a reward model whose held-out pair accuracy is at most this is at chance for our purposes


def run_caveats(record: dict, curves: pd.DataFrame | None = None) -> list[str]:
    """Markdown lines for what a run's own numbers warn about: its training loss rose, its reward model is at chance,
    its loss is reconstructed."""
    lines = []
    if curves is not None and "loss" in curves and curves["loss"].notna().sum() >= 2:
        losses = curves["loss"].dropna()
        first, last = float(losses.iloc[0]), float(losses.iloc[-1])
        if last > first:
            rose = f"from {first:.3g} at the first logged step to {last:.3g} at the last"
            lines.append(f"- The training loss **rose**, {rose} (each the loss of that step's minibatch).")
    training = record.get("training") or {}
    accuracy, low = training.get("reward_accuracy_held_out"), training.get("reward_accuracy_held_out_low")
    if accuracy is not None and (accuracy <= CHANCE if low is None else low <= 0.5):
        interval = "" if low is None else f" (95% interval down to {low:.2f}: chance is inside it)"
        lines.append(f"- Its reward model is at chance: {accuracy:.2f} accuracy on held-out pairs{interval}, so the "
                     "rewards it learns from carry no preference signal here.")  # fmt: skip
    if record.get("loss") == "ddro":
        lines.append("- DDRO's loss is **reconstructed** (`docs/STUDY.md`), and its guard is this repository's.")
    return lines


def training_caveats(runs: pd.DataFrame) -> str:
    """``run_caveats`` of every run (its training loss, reward model, loss), one line each, for notebook 05."""
    lines = []
    for _, run in _main_runs(runs).sort_values(["loss", "seed"]).iterrows():
        curves = pd.read_csv(Path(run["run_dir"]) / "curves.csv")
        for line in run_caveats(run.to_dict(), curves):
            lines.append(f"- {run['loss']} seed {run['seed']}: {line[2:]}")
    return "\n".join(lines) if lines else "No run's numbers carry a caveat."


def _main_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs.get("sweep", pd.Series(False, index=runs.index)).fillna(False) == False]  # noqa: E712


def per_prompt_values(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Prompts x runs: each run's mean of ``column`` (``win``, ``logratio``, ``approved``, or ``approval_gain``: the
    policy's approval minus the reference's) over its samples of each held-out prompt, from the run's
    ``samples.csv``."""
    columns = {}
    for _, run in runs.iterrows():
        # completions may hold a lone "\r": only "\n" ends a row of the CSV that studylib.results.save_table writes
        samples = pd.read_csv(Path(run["run_dir"]) / "samples.csv", lineterminator="\n")
        if "prompt_index" not in samples:
            raise ValueError(f"{run['run_dir']}/samples.csv has no prompt_index column: rerun this run")
        if column == "approval_gain":
            samples[column] = samples["approved"] - samples["reference_approved"]
        columns[run["run"]] = samples.groupby("prompt_index")[column].mean()
    return pd.DataFrame(columns)


def _seed_mean(runs: pd.DataFrame, column: str) -> np.ndarray:
    """Each prompt's value averaged over the runs (the seeds of one method); prompts every run evaluated."""
    return per_prompt_values(runs, column).dropna().mean(axis=1).to_numpy()


def _with_interval(name: str, values: np.ndarray) -> dict[str, float]:
    """``{name, name_low, name_high}``: the mean of per-prompt ``values`` and its 95% bootstrap interval."""
    estimate, low, high = bootstrap_interval(values)
    return {name: estimate, f"{name}_low": low, f"{name}_high": high}


def method_table(runs: pd.DataFrame, baseline: str = "rdro") -> pd.DataFrame:
    """One row per (data set, method): win rate, KL, approval and the approval gain over the reference's samples
    (paired by prompt), each with a 95% bootstrap interval over prompts (each prompt's value averaged over the
    method's seeds; ``studylib.lm.stats``), the win-rate difference from ``baseline`` paired prompt by prompt (same
    prompts, same reference samples per seed), length, and counts."""
    rows = []
    main = _main_runs(runs)
    groups = main.groupby(["dataset", "loss"])
    baseline_wins = {dataset: _seed_mean(part, "win") for (dataset, loss), part in groups if loss == baseline}
    for (dataset, loss), part in groups:
        win, kl, approval, gain = (_seed_mean(part, c) for c in ("win", "logratio", "approved", "approval_gain"))
        row = {"dataset": dataset, "method": loss, "epochs": part["epochs"].mean() if "epochs" in part else None}
        for name, values in (("win_rate", win), ("kl", kl), ("approval", approval), ("approval_gain", gain)):
            row |= _with_interval(name, values)
        row |= _target_columns(part) | _train_columns(part)
        if dataset in baseline_wins and loss != baseline:
            diff, low, high = paired_difference_interval(win, baseline_wins[dataset])
            row |= {f"win_rate_minus_{baseline}": diff, "difference_low": low, "difference_high": high}
        row |= {
            "reference_approval": part["reference_approval"].mean(),
            "length": part["length"].mean(),
            "seeds": ",".join(str(s) for s in sorted(part["seed"].unique())),
            "prompts": len(win),
            "samples_per_prompt": int(part.get("samples_per_prompt", pd.Series([1])).min()),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _target_columns(part: pd.DataFrame) -> dict[str, float]:
    """``kl_to_target``, the reference's, and the gain (reference minus policy), each prompt's value averaged over
    the method's seeds, with intervals; empty for runs evaluated without ``target_samples_per_prompt``."""
    if "target_prompts" not in part or part["target_prompts"].isna().any():
        return {}
    kl, reference = (per_prompt_values(part, c).dropna() for c in ("kl_to_target", "reference_kl_to_target"))
    kept = kl.index.intersection(reference.index)
    if kept.empty:  # no prompt had an approved reference sample in every seed
        return {"target_prompts": 0}
    kl, reference = kl.loc[kept].mean(axis=1).to_numpy(), reference.loc[kept].mean(axis=1).to_numpy()
    out = _with_interval("kl_to_target", kl) | _with_interval("reference_kl_to_target", reference)
    return out | _with_interval("kl_to_target_gain", reference - kl) | {"target_prompts": len(kept)}


def _train_columns(part: pd.DataFrame) -> dict[str, float]:
    """Approval on training prompts (and its gain over the reference's), each prompt's value averaged over the
    method's seeds, with intervals; empty for runs evaluated without ``train_eval_prompts``."""
    if "train_per_prompt" not in part or part["train_per_prompt"].isna().any():
        return {}
    tables = [pd.DataFrame(values) for values in part["train_per_prompt"]]
    approval = np.mean([t["approval"].to_numpy() for t in tables], axis=0)
    reference = np.mean([t["reference_approval"].to_numpy() for t in tables], axis=0)
    return _with_interval("train_approval", approval) | _with_interval("train_approval_gain", approval - reference)


def beats_reference(table: pd.DataFrame) -> str:
    """The sentence the table supports about beating the reference, from the intervals alone."""
    above = table[table["win_rate_low"] > 0.5]["method"].tolist()
    below = table[table["win_rate_high"] < 0.5]["method"].tolist()
    parts = [
        f"interval above 0.5 (beats the reference): {', '.join(above) or 'none'}",
        f"interval below 0.5 (loses to it): {', '.join(below) or 'none'}",
        f"interval contains 0.5: {', '.join(sorted(set(table['method']) - set(above) - set(below))) or 'none'}",
    ]
    sentence = "Win rate against the reference, by its 95% interval: " + "; ".join(parts) + "."
    if "approval_gain_low" in table:
        gained = table[table["approval_gain_low"] > 0]["method"].tolist()
        sentence += (
            " Approval gain over the reference's samples, interval above 0 (the policy's samples are approved more "
            f"often): {', '.join(gained) or 'none'}."
        )
    return sentence


def plot_frontier(table: pd.DataFrame):
    """Win rate against KL(pi || pi_ref), one point per method with both 95% intervals: the trade-off each method
    makes between moving away from the reference and being preferred to it."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for _, row in table.iterrows():
        look = style(row["method"])
        ax.errorbar(
            row["kl"],
            row["win_rate"],
            xerr=[[row["kl"] - row["kl_low"]], [row["kl_high"] - row["kl"]]],
            yerr=[[row["win_rate"] - row["win_rate_low"]], [row["win_rate_high"] - row["win_rate"]]],
            fmt=look["marker"],
            ms=7,
            capsize=3,
            color=look["color"],
            label=row["method"],
        )
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="tie with the reference")
    positive = (table["kl_low"] > 0).all()
    ax.set_xscale("log" if positive else "symlog", **({} if positive else {"linthresh": 0.1}))
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(
        xlabel=f"KL(policy || reference), nats per completion ({'log' if positive else 'symlog'} scale)",
        ylabel="win rate against the reference",
        title="Win rate against KL(policy || reference): how far each policy moved from the reference\n(not its "
        f"distance to the target p+: lm_kl_to_target.png); 95% bootstrap intervals over {int(table['prompts'].max())} "
        "prompts",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _with_error(ax, x: float, values: pd.Series | dict, name: str, **kwargs) -> None:
    """A point at ``values[name]`` with its interval ``values[name + "_low"]`` to ``values[name + "_high"]``."""
    value, low, high = (values[f"{name}{k}"] for k in ("", "_low", "_high"))
    ax.errorbar(x, value, yerr=[[value - low], [high - value]], **kwargs)


def plot_kl_to_target(table: pd.DataFrame, runs: pd.DataFrame | None = None):
    """The sampled LM's main result across methods: each method's ``KL(p+ || pi)`` in nats (lower: closer to the
    target), its seed mean with the 95% bootstrap interval over prompts (``method_table``) and, from ``runs``, each
    seed's own value and interval; the reference's ``KL(p+ || pi_ref)`` with its interval as a horizontal band. A
    table without it (runs evaluated without target samples, e.g. on a hub data set) gives a figure that says so."""
    table = table[table["kl_to_target"].notna()].reset_index(drop=True) if "kl_to_target" in table else table.iloc[:0]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if table.empty:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "No run of this report measured KL(p+ || pi)\n(evaluated without target samples)",
                ha="center", va="center")  # fmt: skip
        return fig
    main = _main_runs(runs) if runs is not None and "kl_to_target" in runs else None
    for i, row in table.iterrows():
        look = style(row["method"])
        first = i == 0  # one legend entry per kind of mark
        low, high = row["reference_kl_to_target_low"], row["reference_kl_to_target_high"]
        band, line = ("its interval", "reference: KL(p+ || pi_ref)") if first else (None, None)
        ax.hlines(row["reference_kl_to_target"], i - 0.5, i + 0.5, color="black", lw=1, label=line)
        ax.fill_between([i - 0.5, i + 0.5], low, high, color="grey", alpha=0.25, lw=0, label=band)
        mean = "mean over seeds" if first else None
        _with_error(ax, i, row, "kl_to_target", fmt=look["marker"], ms=9, capsize=4, color=look["color"], label=mean)
        if main is None:
            continue
        seeds = main[(main["dataset"] == row["dataset"]) & (main["loss"] == row["method"])].sort_values("seed")
        for j, (_, run) in enumerate(seeds.iterrows()):
            each = f"seeds {row['seeds']}, left to right" if i + j == 0 else None
            _with_error(ax, i + 0.25 + 0.1 * j, run, "kl_to_target", fmt=look["marker"], ms=5, capsize=2,
                        mfc="white", color=look["color"], lw=0.8, label=each)  # fmt: skip
    several = table["dataset"].nunique() > 1
    ax.set_xticks(range(len(table)), [f"{r.method} ({r.dataset})" if several else r.method for r in table.itertuples()])
    ax.set_xlim(-0.6, len(table) - 0.4)
    positive = bool((table["kl_to_target_low"] > 0).all() and (table["reference_kl_to_target_low"] > 0).all())
    ax.set_yscale("log" if positive else "symlog", **({} if positive else {"linthresh": 0.1}))
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    closer = table.loc[table["kl_to_target_gain_low"] > 0, "method"].tolist()
    further = table.loc[table["kl_to_target_gain_high"] < 0, "method"].tolist()
    ax.set(
        xlabel="method",
        ylabel=f"KL(p+ || policy), nats ({'log' if positive else 'symlog'} scale; lower: closer)",
        title="Distance to the target p+, against the reference's (every interval: 95% bootstrap over prompts)\n"
        f"closer than the reference (paired gain): {_names(closer)}; further: {_names(further)}",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def alpha_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """RDRO's win rate and KL against alpha (runs whose loss has an ``alpha`` knob), with 95% bootstrap intervals
    over prompts (each prompt averaged over the alpha's seeds), on the seeds every alpha has; the seeds listed."""
    rdro = runs[runs["alpha"].notna()].copy()
    rdro["alpha"] = rdro["alpha"].astype(float)
    # every alpha with the same seeds: those all of its alphas ran (the "auto" run may have more, for the main table)
    common = set.intersection(*(set(part["seed"]) for _, part in rdro.groupby(["dataset", "alpha"])))
    rdro = rdro[rdro["seed"].isin(common)]
    rows = []
    for (dataset, alpha), part in rdro.groupby(["dataset", "alpha"]):
        rows.append(
            {"dataset": dataset, "alpha": alpha}
            | _with_interval("win_rate", _seed_mean(part, "win"))
            | _with_interval("kl", _seed_mean(part, "logratio"))
            | {"seeds": ",".join(str(s) for s in sorted(part["seed"].unique()))}
        )
    return pd.DataFrame(rows)


def plot_alpha_sweep(sweep: pd.DataFrame, preferred_fraction: float | None = None):
    """Win rate against alpha per data set (RDRO Figures 2-3, with our judge), with 95% intervals over prompts."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for dataset, part in sweep.groupby("dataset"):
        ax.errorbar(
            part["alpha"],
            part["win_rate"],
            yerr=[part["win_rate"] - part["win_rate_low"], part["win_rate_high"] - part["win_rate"]],
            capsize=3,
            label=f"{dataset} (95% interval over prompts)",
            **style("rdro"),
        )
    if preferred_fraction is not None:
        ax.axvline(preferred_fraction, color="grey", ls="--", label=f"preferred fraction {preferred_fraction:.2f}")
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="tie with reference")
    seeds = sorted(set(sweep["seeds"]))
    title = f"RDRO: win rate against alpha (seeds {' / '.join(seeds)} at every alpha)"
    ax.set(xlabel="alpha (RDRO)", ylabel="win rate vs reference (annotator pool)", title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def power_note(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Why an interval is as wide as it is, on the data set with the most runs: the per-prompt sd of the win rate
    (median over methods), the effect the evaluation detects with 80% power, and the prompts a 0.02 effect would
    need (``studylib.lm.stats``)."""
    part = _main_runs(runs)
    dataset = part["dataset"].value_counts().idxmax()
    values = [_seed_mean(g, "win") for _, g in part[part["dataset"] == dataset].groupby("loss")]
    sds = [float(np.std(v, ddof=1)) for v in values if len(v) >= 2]
    if not sds:
        return f"{dataset}: fewer than 2 prompts per method, no power calculation."
    sd, n = float(np.median(sds)), int(max(len(v) for v in values))
    return (
        f"{dataset}: per-prompt sd of the win rate (median over methods) {sd:.3f}; with {n} prompts a two-sided 95% "
        f"test detects a true win-rate change of {detectable_effect(sd, n):.3f} with 80% power; a change of 0.02 "
        f"would need {prompts_needed(sd, 0.02)} prompts."
    )


def ratio_findings(runs: pd.DataFrame) -> str:
    """The largest ``exp(T)`` each method's training logged (over steps and seeds, main runs), with RDRO's
    ``1/alpha`` beside it: the LM counterpart of notebook 03's ratio column."""
    lines = []
    main = _main_runs(runs)
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
        ("loss", "training loss minus its first step's (symlog)"),
        ("grad_norm", "gradient norm (log)"),
        ("ratio/max", "max exp(T) in batch (log)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    chosen = runs if seed is None else runs[runs["seed"] == seed]
    chosen = _main_runs(chosen)
    several = chosen["dataset"].nunique() > 1
    unlogged = []
    for _, run in chosen.drop_duplicates(["dataset", "loss"]).iterrows():
        curves_path = Path(run["run_dir"]) / "curves.csv"
        if not curves_path.exists():
            continue
        curves = pd.read_csv(curves_path)
        look = style(run["loss"])
        trainer = (run.get("training") or {}).get("trainer", "offline")
        label = f"{run['loss']} ({'on-policy' if trainer == 'online' else 'offline'} trainer"
        label += f", {run['dataset']} data)" if several else ")"
        for ax, (column, _) in zip(axes, panels, strict=True):
            if column in curves and curves[column].notna().any():
                values = curves[column] - curves[column].iloc[0] if column == "loss" else curves[column]
                ax.plot(curves["step"], values, ms=4, label=label, **look)
            elif column == "ratio/max":
                unlogged.append(run["loss"])
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set(xlabel="optimizer step", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=0.1)  # losses of different objectives: each from its own start
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    if unlogged:
        axes[2].set_title(f"not logged by {', '.join(sorted(set(unlogged)))} (no exp T in their loss)", fontsize=8)
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
        peaks[line.get_label().split(" (")[0]] = max(line.get_ydata())
    top = max(peaks, key=peaks.get) if peaks else None
    finding = f": largest gradient norm {top} ({peaks[top]:.3g})" if top else ""
    data = "" if several else f", {chosen['dataset'].iloc[0]} data"
    fig.suptitle("Training curves per method" + data + ("" if seed is None else f", seed {seed}") + finding)
    fig.tight_layout()
    return fig


def published_beside_ours(
    table: pd.DataFrame, runs: pd.DataFrame | None = None, tuned_on: Collection[str] = ()
) -> pd.DataFrame:
    """Published win rates beside ours, both in percent, each with its judge and its baseline (what the win rate is
    against): theirs a GPT-4 judge against GPT-4 Turbo's outputs (AlpacaEval 2 LC) or human reference summaries
    (TL;DR); ours the annotator pool against our own reference model's samples, with the 95% interval. ``our_note``
    (``training_note``): the learning rate each of our methods ran at and how far it moved from the reference, and
    where that confounds its ordering against DPO."""
    ours = table[["method", "dataset", "win_rate", "win_rate_low", "win_rate_high"]].copy()
    for column in ("win_rate", "win_rate_low", "win_rate_high"):
        ours[f"our_{column}_pct"] = (100 * ours.pop(column)).round(1)
    merged = PUBLISHED.merge(ours, on="method", how="left")
    merged["published_judge_and_baseline"] = merged["benchmark"].map(
        {
            "AlpacaEval-2 LC": "GPT-4 Turbo judge, length-controlled, against GPT-4 Turbo's outputs",
            "TL;DR GPT-4 win rate": "GPT-4 judge, against the human-written reference summaries",
        }
    )
    merged["our_judge_and_baseline"] = (
        "annotator pool, against the samples of our reference (the model before training)"
    )
    notes = training_note(table, runs, tuned_on)
    keys = zip(merged["method"], merged["dataset"], strict=True)
    merged["our_note"] = [notes.get(key, "") for key in keys]
    return merged


def training_note(
    table: pd.DataFrame, runs: pd.DataFrame | None = None, tuned_on: Collection[str] = ()
) -> dict[tuple[str, str], str]:
    """Per (method, data set) of ``table``: the learning rate its runs used (from ``runs``), whether every method
    shared it and whether it was chosen on the method (``tuned_on``: the methods the pilot chose the rate on), and its
    ``KL(pi || pi_ref)`` with the interval. A method not tuned on whose KL interval lies above DPO's (same data set)
    drifted at a rate not its own: its ordering against DPO is confounded by the rate, and the note says so."""
    main = _main_runs(runs) if runs is not None else pd.DataFrame({"dataset": [], "loss": [], "learning_rate": []})
    pilot = ", ".join(sorted(tuned_on))
    notes = {}
    for _, row in table.iterrows():
        method, dataset = row["method"], row["dataset"]
        part = main[main["dataset"] == dataset]
        rates = sorted(set(part.loc[part["loss"] == method, "learning_rate"]))
        rate = f"learning rate {', '.join(f'{r:g}' for r in rates)}" if rates else "learning rate not recorded"
        if method in tuned_on:
            rate += f", chosen by the pilot on {pilot}"
        elif rates and part["learning_rate"].nunique() == 1:
            rate += ", shared by every method" + (f", not chosen on {method} (the pilot chose it on {pilot})"
                                                   if tuned_on else "")  # fmt: skip
        kl = f"KL(pi || pi_ref) {row['kl']:.2f} [{row['kl_low']:.2f}, {row['kl_high']:.2f}] nats"
        dpo = table[(table["method"] == "dpo") & (table["dataset"] == dataset)]
        if method not in tuned_on and method != "dpo" and len(dpo) and row["kl_low"] > dpo["kl_high"].iloc[0]:
            dpo = dpo.iloc[0]
            kl = (f"it drifted: {kl}, beyond our DPO's {dpo['kl']:.2f} [{dpo['kl_low']:.2f}, {dpo['kl_high']:.2f}], "
                  "so its ordering against DPO is confounded by the rate")  # fmt: skip
        notes[(method, dataset)] = f"{rate}; {kl}"
    return notes


def reward_model_note(runs: pd.DataFrame, bench_record: str | Path | None = None) -> str:
    """The reward model behind distillation and reverse KL: its held-out accuracy with the interval over held-out
    prompts (one reward model per data set, shared by every run that uses it). Where no run of the report fitted
    one, the measurement in ``bench_record`` (``bench/reward_fit.py``'s JSON, on the same training data) if given,
    else a line saying no run used one."""
    fitted = [info for info in runs["training"] if isinstance(info, dict) and "reward_accuracy_held_out" in info]
    if not fitted and bench_record is not None and Path(bench_record).is_file():
        info = json.loads(Path(bench_record).read_text())
        at_chance = info["reward_accuracy_held_out_low"] <= 0.5 <= info["reward_accuracy_held_out_high"]
        why = "is at chance (its interval holds 0.5)" if at_chance else "was measured apart (its interval excludes 0.5)"
        return (
            f"No run of this report fits a reward model (distillation and reverse KL are not among its sampled-LM "
            f"runs); fit on the same training data by bench/reward_fit.py, that reward model {why}. "
            f"{_reward_accuracy(info)}"
        )
    if not fitted:
        return "No run of this report fitted a reward model."
    info = fitted[0]
    if "reward_accuracy_held_out_low" not in info:
        return f"Reward model, held-out pair accuracy: {info['reward_accuracy_held_out']:.2f} (no interval recorded)."
    return _reward_accuracy(info)


def _reward_accuracy(info: dict) -> str:
    return (
        f"Reward model (Bradley-Terry, every pair of each training prompt's completions, the pool's majority winner): "
        f"held-out accuracy {info['reward_accuracy_held_out']:.3f}, 95% interval over its "
        f"{info['reward_held_out_prompts']} held-out prompts [{info['reward_accuracy_held_out_low']:.3f}, "
        f"{info['reward_accuracy_held_out_high']:.3f}] ({info['reward_held_out_pairs']} pairs; fit on "
        f"{info['reward_pairs']}); chance is 0.5."
    )


def _names(methods: list[str]) -> str:
    return ", ".join(methods) or "none"


def conclusion(
    ledger: pd.DataFrame | None,
    table: pd.DataFrame,
    falls: pd.DataFrame | None = None,
    memorisation: str | None = None,
) -> str:
    """Notebook 05's conclusion, in Markdown, from its tables only: each claim's verdict (``ledger``, with the why
    where it is not "supported"); whether the exact LM's runs converged and which seed-0 fall crosses 3x with twice
    the steps (``falls``); where each sampled-LM method ended against the reference on ``KL(p+ || pi)``, approval
    and win rate (``table``, ``method_table``); the memorisation study's verdict and where each of its runs ended
    against the reference (``memorisation``, written by ``pilot.memorisation_conclusion``). A part whose table is
    None is left out."""
    parts = []
    if ledger is not None:
        claims = [f"- {r.claim}: **{r.verdict}**" + ("" if r.verdict == "supported" else f" ({r.why})")
                  for r in ledger.itertuples()]  # fmt: skip
        parts.append("\n".join(["**The claims** (the ledger above):", *claims]))
    if falls is not None:
        held = falls[falls["split"] == "heldout"]
        flips = held[(held["fall_seed0"] >= 3) != (held["fall_seed0_doubled"] >= 3)]
        crossing = [f"{r.setting} {r.method} ({r.fall_seed0:.3g}x -> {r.fall_seed0_doubled:.3g}x)"
                    for r in flips.itertuples()]  # fmt: skip
        converged = int(held["converged"].sum())
        parts.append(
            f"**The exact LM's runs** (notebook 06): every size converged by rule 5 for {converged} of {len(held)} "
            f"methods (the others are early-stopped estimates); data seed 0's held-out fall crosses 3x between the "
            f"steps and twice the steps for: {_names(crossing)}."
        )
    if "kl_to_target" in table and table["kl_to_target"].notna().any():
        measured = table[table["kl_to_target"].notna()]
        closer = measured.loc[measured["kl_to_target_gain_low"] > 0, "method"].tolist()
        further = measured.loc[measured["kl_to_target_gain_high"] < 0, "method"].tolist()
        least = measured.loc[measured["kl_to_target"].idxmin()]
        parts.append(
            f"**The sampled LM**, distance to the target `KL(p+ ‖ π)` against the reference's (the paired gain's 95% "
            f"interval): closer than the reference: {_names(closer)}; further: {_names(further)}; not told apart: "
            f"{_names(sorted(set(measured['method']) - set(closer) - set(further)))}. Least far: {least['method']} "
            f"({least['kl_to_target']:.2f} [{least['kl_to_target_low']:.2f}, {least['kl_to_target_high']:.2f}] "
            f"nats against the reference's {least['reference_kl_to_target']:.2f}). Approval gain over the reference's "
            f"above 0: {_names(table.loc[table['approval_gain_low'] > 0, 'method'].tolist())}; win rate above 0.5: "
            f"{_names(table.loc[table['win_rate_low'] > 0.5, 'method'].tolist())}."
        )
    if memorisation is not None:
        parts.append(memorisation)
    return "\n\n".join(parts)
