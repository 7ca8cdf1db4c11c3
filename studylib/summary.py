"""The study in one table: each method's target and assumption (the theory, docs/STUDY.md), beside what the toy
study measured (slopes, gradient norms) and what the language-model runs measured (win rate, KL from the reference
and the distance to the target ``p+``, each with an interval), grouped as density-ratio methods, distribution
learning and baselines. Notebook 05 shows it.
"""

from __future__ import annotations

import pandas as pd

from studylib.palette import method_key

# (family, target, assumption): the theory of each method, as docs/STUDY.md states it.
THEORY: dict[str, tuple[str, str, str]] = {
    "rdro": (
        "density ratio",
        "p+ (exp T = relative ratio, bounded by 1/alpha)",
        "alpha = preferred fraction; per-class mean",
    ),
    "rdro_flat": ("density ratio", "moves with the class imbalance", "the authors' flat batch mean"),
    "ddro": ("density ratio", "p+ (exp T = 2 p+/(p+ + p-))", "pi_ref = (p+ + p-)/2 (balanced classes)"),
    "pmle": ("distribution learning", "pi*", "P(a > b) = sigmoid(gamma log pi*(a)/pi*(b))"),
    "distill": ("distribution learning", "pi*", "paper 3's model; a Bradley-Terry reward model"),
    "reverse_kl": ("distribution learning", "pi*", "paper 3's model; a Bradley-Terry reward model"),
    "dpo": ("baseline", "pi_ref exp(r/beta)", "Bradley-Terry preferences"),
    "simpo": ("baseline", "a length-normalised Bradley-Terry fit", "Bradley-Terry preferences"),
    "kto": ("baseline", "a prospect-theory utility optimum", "none toward p+"),
    "bco": ("baseline", "a classifier of the labels", "none toward p+"),
    "rlhf": ("baseline", "pi_ref exp(R/beta)", "a Bradley-Terry reward model"),
}
ORDER = list(THEORY)


def _toy_columns(slopes: pd.DataFrame, spread: pd.DataFrame | None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for _, row in slopes.iterrows():
        key = method_key(row["method"])
        converges = row["slope"] < -0.5 and row["kl_limit"] < 1e-8
        verdict = f"{row['slope']:+.2f} ({'converges' if converges else f'limit {row.kl_limit:.2g}'})"
        out.setdefault(key, {})[f"{row['setting']} slope"] = verdict
    if spread is not None:
        for key, part in spread.groupby(spread["method"].map(method_key)):
            norms = ", ".join(f"{v:.2g}" for v in part["median_of_max_grad_norm"])
            out.setdefault(key, {})["T4 largest gradient norm (median over runs, S1, S2)"] = norms
    return out


def lm_columns(table: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Per method, from the sampled LM's method table (``report.method_table``) on the data set with the most runs
    (named in the column): the win rate, ``KL(pi || pi_ref)`` and, where measured, the distance to the target
    ``KL(p+ || pi)`` beside the reference's, each with its 95% bootstrap interval over prompts."""
    dataset = table["dataset"].value_counts().idxmax()
    out = {}
    for _, row in table[table["dataset"] == dataset].iterrows():
        seeds = len(str(row["seeds"]).split(","))
        columns = {
            f"LM win rate [95% interval], {dataset}": (
                f"{row['win_rate']:.2f} [{row['win_rate_low']:.2f}, {row['win_rate_high']:.2f}] ({seeds} seeds)"
            ),
            f"LM KL(pi || pi_ref) (nats) [95% interval], {dataset}": (
                f"{row['kl']:.2f} [{row['kl_low']:.2f}, {row['kl_high']:.2f}]"
            ),
        }
        if "kl_to_target" in row and pd.notna(row["kl_to_target"]):
            low, high = row["kl_to_target_gain_low"], row["kl_to_target_gain_high"]
            moved = "closer to p+" if low > 0 else "further from p+" if high < 0 else "not told from the reference"
            columns[f"LM KL(p+ || pi) (nats) [95% interval], {dataset}"] = (
                f"{row['kl_to_target']:.2f} [{row['kl_to_target_low']:.2f}, {row['kl_to_target_high']:.2f}] against "
                f"the reference's {row['reference_kl_to_target']:.2f}: {moved}"
            )
        out[method_key(row["method"])] = columns
    return out


def _exact_columns(falls: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Notebook 06: each method's held-out excess-KL fall per setting (the language model, exactly)."""
    out: dict[str, dict[str, str]] = {}
    for _, row in falls[falls["split"] == "heldout"].iterrows():
        verdict = {"holds": "falls", "fails": "does not fall"}.get(row["verdict"], "undecided")
        out.setdefault(method_key(row["method"]), {})[f"{row['setting']} LM exact fall [95% interval]"] = (
            f"{row['fall']:.1f}x [{row['fall_low']:.1f}, {row['fall_high']:.1f}] ({verdict})"
        )
    return out


def summary_table(
    slopes: pd.DataFrame,
    spread: pd.DataFrame | None = None,
    runs: pd.DataFrame | None = None,
    falls: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per method: family, target, assumption, the toy's slopes per setting, T4's gradient norms, the
    language model's exact falls per setting (notebook 06's ``falls.csv``), the sampled LM runs' win rate,
    ``KL(pi || pi_ref)`` and ``KL(p+ || pi)`` (``lm_columns``). Empty cells: the method is not part of that
    experiment."""
    from studylib.report import method_table

    toy = _toy_columns(slopes, spread)
    exact = _exact_columns(falls) if falls is not None else {}
    lm = lm_columns(method_table(runs)) if runs is not None and len(runs) else {}
    rows = []
    for key in ORDER:
        if key not in toy and key not in lm and key not in exact:
            continue
        family, target, assumption = THEORY[key]
        rows.append(
            {"family": family, "method": key, "target": target, "assumption": assumption}
            | toy.get(key, {})
            | exact.get(key, {})
            | lm.get(key, {})
        )
    table = pd.DataFrame(rows).fillna("")
    first = ["family", "method", "target", "assumption", "S1 slope", "S2 slope", "S3 slope"]
    first += [f"{s} LM exact fall [95% interval]" for s in ("S1", "S2", "S3")]
    return table[[c for c in first if c in table] + [c for c in table if c not in first]]
