"""The answer-set study's tables of findings and its Markdown, computed from the run tables, so a rerun with other
parameters cannot leave the prose wrong.

A method's **excess KL** on a split is ``kl - floor_kl``: its exact ``KL(target || pi_theta)`` minus that of the same
parameterisation fitted directly to the target (same seed). A method **falls** when its seed-mean held-out excess
at the largest n is at most a third of that at the smallest n (``FALL``, the issue's criterion); an excess at or
below 0 at the largest n means the method reached the floor.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

FALL = 3.0

EXPECTED_TO_FALL = {
    "S1": {"DDRO": True, "RDRO": True, "DPO": False, "KTO": False},
    "S2": {"RDRO per-class": True, "RDRO flat": False, "DDRO": False, "KTO": False},
    "S3": {"PMLE": True, "distillation": True, "reverse KL": True, "DPO": False, "RLHF": False},
}
"""What the theory says of each method's excess KL as n grows (docs/STUDY.md section 2), by label prefix."""


def expected(setting: str, method: str) -> bool | None:
    """Whether the theory expects ``method``'s excess KL to fall in ``setting`` (None: it says nothing)."""
    for prefix, falls in EXPECTED_TO_FALL.get(setting, {}).items():
        if method.startswith(prefix):
            return falls
    return None


def excess_summary(consistency: pd.DataFrame) -> pd.DataFrame:
    """Per setting, method, split and n: mean and sd over seeds of the KL, the floor and the excess KL."""
    table = consistency.assign(excess=consistency["kl"] - consistency["floor_kl"])
    grouped = table.groupby(["setting", "method", "split", "n"], sort=False)
    return grouped.agg(
        kl_mean=("kl", "mean"),
        floor_mean=("floor_kl", "mean"),
        excess_mean=("excess", "mean"),
        excess_sd=("excess", "std"),
        seeds=("kl", "size"),
    ).reset_index()


def falls(summary: pd.DataFrame) -> pd.DataFrame:
    """Per setting, method and split: excess at the smallest and largest n, their ratio (``fall``), the log-log
    slope of the excess against n (positive excesses only), what the theory expects and the verdict."""
    rows = []
    for (setting, method, split), part in summary.groupby(["setting", "method", "split"], sort=False):
        part = part.sort_values("n")
        first, last = part["excess_mean"].iloc[0], part["excess_mean"].iloc[-1]
        fall = math.inf if last <= 0 else first / last
        positive = part[part["excess_mean"] > 0]
        slope = (
            np.polyfit(np.log(positive["n"]), np.log(positive["excess_mean"]), 1)[0] if len(positive) > 1 else np.nan
        )
        want = expected(setting, method)
        fell = bool(fall >= FALL)
        rows.append(
            {
                "setting": setting,
                "method": method,
                "split": split,
                "n_min": int(part["n"].iloc[0]),
                "n_max": int(part["n"].iloc[-1]),
                "excess_at_n_min": first,
                "excess_at_n_max": last,
                "fall": fall,
                "slope": slope,
                "falls": fell,
                "expected_to_fall": want,
                "as_expected": None if want is None else fell == want,
            }
        )
    return pd.DataFrame(rows)


def _fall_text(row: pd.Series) -> str:
    fall = "reaches the floor" if math.isinf(row["fall"]) else f"falls {row['fall']:.3g}x"
    return (
        f"{row['method']} {fall} ({row['excess_at_n_min']:.3g} at n = {row['n_min']} to "
        f"{row['excess_at_n_max']:.3g} at n = {row['n_max']}, slope {row['slope']:+.2f})"
    )


def claims(fall_table: pd.DataFrame, split: str = "heldout") -> str:
    """The conclusion: per setting, which methods' excess KL fell at least ``FALL``x and whether the theory agrees."""
    lines = []
    for setting, part in fall_table[fall_table["split"] == split].groupby("setting", sort=False):
        held = part[part["as_expected"].eq(True)]
        broken = part[part["as_expected"].eq(False)]
        text = f"- **{setting}**: " + "; ".join(_fall_text(r) for _, r in part.iterrows()) + "."
        if len(broken):
            names = ", ".join(broken["method"])
            text += f" **Not as the theory says: {names}.**"
        elif len(held):
            text += " As the theory says."
        lines.append(text)
    return "\n".join(lines)


def pilot_findings(pilot: pd.DataFrame, lr: float) -> str:
    """The pilot's choice and what the floors reached at that rate."""
    at = pilot[pilot["lr"] == lr]
    fits = ", ".join(f"{s} {k:.2g}" for s, k in zip(at["setting"], at["kl_train"], strict=True))
    tried = ", ".join(f"{x:g}" for x in sorted(pilot["lr"].unique()))
    return (
        f"Learning rates tried: {tried}. Chosen: **{lr:g}** (smallest mean log KL of the floors on the training "
        f"prompts); the floors' training KL at that rate: {fits} nats."
    )


def stability_findings(runs: pd.DataFrame) -> str:
    """Gradient norms, largest ratios and DDRO's guard, per setting, over every run."""
    lines = []
    for setting, part in runs.groupby("setting", sort=False):
        by = part.groupby("method", sort=False).agg(
            grad=("grad_norm_max", "max"), ratio=("ratio_max", "max"), guard=("guard_total", "sum"), runs=("n", "size")
        )
        fired = part[part["guard_total"] > 0].groupby("method").size()
        text = ", ".join(f"{m} {r.grad:.3g} (max exp T {r.ratio:.3g})" for m, r in by.iterrows())
        lines.append(f"- **{setting}**: largest gradient norm per method: {text}.")
        for method, count in fired.items():
            lines.append(
                f"  {method}'s guard fired in {count} of {int(by.loc[method, 'runs'])} runs "
                f"({int(by.loc[method, 'guard'])} row activations in all)."
            )
    return "\n".join(lines)


def alpha_findings(sweep: pd.DataFrame) -> str:
    """Where RDRO's held-out KL is least along alpha, against the data's preferred fraction."""
    lines = []
    for setting, part in sweep.groupby("setting", sort=False):
        mean = part.groupby("alpha")["kl_heldout"].mean()
        fraction = part["preferred_fraction"].mean()
        best = float(mean.idxmin())
        nearest = mean.index[np.abs(mean.index - fraction).argmin()]
        lines.append(
            f"- **{setting}** (n = {int(part['n'].iloc[0])}, preferred fraction {fraction:.3f}): held-out KL least at "
            f"alpha = {best:g} ({mean.min():.3g} nats); at the alpha nearest the preferred fraction ({nearest:g}) "
            f"{mean.loc[nearest]:.3g}; largest {mean.max():.3g} (alpha = {float(mean.idxmax()):g})."
        )
    return "\n".join(lines)


def slower_findings(slower: pd.DataFrame, runs: pd.DataFrame, floors: pd.DataFrame) -> str:
    """The slower rerun against the shared-rate runs of the same seed: held-out excess at the smallest and largest n."""
    if slower.empty:
        return "No slower rerun in this execution."
    lines = []
    floor = floors.set_index(["setting", "seed"])["kl_heldout"]
    for (setting, method, seed), part in slower.groupby(["setting", "method", "seed"], sort=False):
        shared = runs[(runs["setting"] == setting) & (runs["method"] == method) & (runs["seed"] == seed)]
        texts = []
        for label, table in (
            ("shared rate", shared),
            (f"rate {part['lr'].iloc[0]:.3g}, {part['steps'].iloc[0]} steps", part),
        ):
            table = table[table["n"].isin(part["n"])].sort_values("n")
            excess = table["kl_heldout"].to_numpy() - floor.loc[(setting, seed)]
            fall = "reaches the floor" if excess[-1] <= 0 else f"falls {excess[0] / excess[-1]:.3g}x"
            texts.append(
                f"{label}: {excess[0]:.3g} at n = {table['n'].iloc[0]} to {excess[-1]:.3g} at "
                f"n = {table['n'].iloc[-1]} ({fall}; guard activations {int(table['guard_total'].sum())})"
            )
        lines.append(f"- **{setting}, {method}, seed {seed}**, held-out excess KL: " + "; ".join(texts) + ".")
    return "\n".join(lines)


def beside_toy(fall_table: pd.DataFrame, toy_slopes: pd.DataFrame) -> pd.DataFrame:
    """The toy's verdict (notebook 02: log-log slope and infinite-data limit) beside the language model's (held-out
    excess KL: its fall from the smallest to the largest n and its slope), per setting and method; a method run in
    one study only has empty cells for the other."""
    held = fall_table[fall_table["split"] == "heldout"].rename(
        columns={"slope": "lm_slope", "fall": "lm_fall", "excess_at_n_max": "lm_excess_at_n_max", "n_max": "lm_n_max"}
    )
    toy = toy_slopes.rename(
        columns={"slope": "toy_slope", "kl_limit": "toy_kl_limit", "kl_at_max_n": "toy_kl_at_max_n"}
    )
    columns = ["toy_slope", "toy_kl_at_max_n", "toy_kl_limit", "lm_fall", "lm_slope", "lm_excess_at_n_max", "lm_n_max"]
    merged = toy[["setting", "method", "toy_slope", "toy_kl_at_max_n", "toy_kl_limit"]].merge(
        held[["setting", "method", "lm_fall", "lm_slope", "lm_excess_at_n_max", "lm_n_max", "expected_to_fall"]],
        on=["setting", "method"],
        how="outer",
    )
    merged["expected_to_fall"] = [expected(s, m) for s, m in zip(merged["setting"], merged["method"], strict=True)]
    merged["lm_n_max"] = merged["lm_n_max"].astype("Int64")
    return merged[["setting", "method", "expected_to_fall", *columns]].sort_values(["setting", "method"])


def slower_excess(slower: pd.DataFrame, floors: pd.DataFrame) -> pd.DataFrame:
    """The slower reruns' excess KL per split (setting, method, split, n, seed, lr, steps, excess)."""
    if slower.empty:
        return pd.DataFrame(columns=["setting", "method", "split", "n", "seed", "lr", "steps", "excess"])
    rows = []
    floor = floors.set_index(["setting", "seed"])
    for _, run in slower.iterrows():
        for split in ("train", "heldout"):
            excess = run[f"kl_{split}"] - floor.loc[(run["setting"], run["seed"]), f"kl_{split}"]
            keys = ("setting", "method", "n", "seed", "lr", "steps")
            rows.append({k: run[k] for k in keys} | {"split": split, "excess": excess})
    return pd.DataFrame(rows)
