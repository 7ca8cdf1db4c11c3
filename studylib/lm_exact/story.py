"""The answer-set study's tables of findings and its Markdown, computed from the run tables, so a rerun with other
parameters cannot leave the prose wrong.

A method's **excess KL** on a split is ``kl - floor_kl``: its exact ``KL(target || pi_theta)`` minus that of the same
parameterisation fitted directly to the target (same data seed's init seed). The floor is fitted on the training
prompts, so on held-out prompts it is not a minimum: a method's held-out excess can be below 0.

Verdicts, written before the runs (``protocol.py`` holds the rules that make the runs):

- a method's **fall** is its seed-mean excess at the smallest n over that at the largest n; its 95% interval comes
  from a percentile bootstrap over data seeds (``bootstrap_falls``). The fall **holds** when the whole interval lies
  at or above ``FALL`` (3x over 8x the data; a 1/n rate gives 8x, a 1/sqrt(n) rate 2.8x), **fails** when it lies
  below, and is **undecided** otherwise. The log-log slope gets an interval the same way.
- the **reading** sets the largest-n excess against the method's infinite-data limit (``limits``): a method whose
  fall does not hold and whose limit's excess is at least ``LIMIT_SHARE`` of its largest-n excess *sits at its
  infinite-data limit* (more data cannot help: the population's minimiser, as the optimiser reaches it, is there);
  otherwise it lies *above its limit* (more data would lower it).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from studylib.lm_exact import protocol

FALL = 3.0
LIMIT_SHARE = 0.5
N_RESAMPLES = 4000

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


def excess_long(runs: pd.DataFrame, floor_table: pd.DataFrame) -> pd.DataFrame:
    """``setting, method, n, seed, split, kl, floor_kl, excess`` for every run on each split (``n`` empty: the
    limit), the floor being that of the run's data seed."""
    long = runs.melt(
        id_vars=["setting", "method", "n", "seed"],
        value_vars=["kl_train", "kl_heldout"],
        var_name="split",
        value_name="kl",
    )
    floor = floor_table.melt(
        id_vars=["setting", "seed"], value_vars=["kl_train", "kl_heldout"], var_name="split", value_name="floor_kl"
    )
    table = long.merge(floor, on=["setting", "seed", "split"])
    table["split"] = table["split"].str.removeprefix("kl_")
    table["excess"] = table["kl"] - table["floor_kl"]
    return table.sort_values(["setting", "method", "split", "n", "seed"], kind="stable").reset_index(drop=True)


def consistency_table(runs: pd.DataFrame, floor_table: pd.DataFrame) -> pd.DataFrame:
    """``setting, method, n, seed, split, kl, floor_kl``: every finite-n run's exact KL on each split beside its
    floor's."""
    table = excess_long(runs[runs["n"].notna()], floor_table)
    return table.assign(n=table["n"].astype(int)).drop(columns=["excess"])


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


def _fall_and_slope(means: np.ndarray, log_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of seed-mean excesses (..., sizes): the fall first / last (inf when the last is <= 0, NaN when the first
    is) and the least-squares log-log slope over the sizes whose mean is > 0 (NaN with fewer than two)."""
    first, last = means[..., 0], means[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        fall = np.where(first <= 0, np.nan, np.where(last <= 0, np.inf, first / last))
        w = (means > 0).astype(float)
        y = np.log(np.where(means > 0, means, 1.0))
        count = w.sum(-1, keepdims=True)
        x_bar, y_bar = (w * log_n).sum(-1, keepdims=True) / count, (w * y).sum(-1, keepdims=True) / count
        slope = (w * (log_n - x_bar) * (y - y_bar)).sum(-1) / (w * (log_n - x_bar) ** 2).sum(-1)
    return fall, np.where(count[..., 0] >= 2, slope, np.nan)


def bootstrap_falls(
    excess: np.ndarray, sizes: np.ndarray, n_resamples: int = N_RESAMPLES, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Percentile bootstrap over seeds of the fall and the slope of the seed-mean excess: ``excess`` (seeds, sizes),
    seeds resampled with replacement ``n_resamples`` times (a seeded generator). Percentiles are read off the
    resamples themselves (a fall that reaches the floor is inf); resamples without a fall or a slope are left out.

    Hand-written, not ``scipy.stats.bootstrap``: with the same resamples scipy's percentile interval is the same
    until a resample has no fall (its first seed-mean excess <= 0, NaN); then scipy's is NaN (measured: 5 seeds, one
    with a negative first excess: scipy NaN, this (5.43, 8.06)), where this one reads the resamples that have one."""
    excess = np.asarray(excess, float)
    rng = np.random.default_rng([seed, *excess.shape])
    means = excess[rng.integers(0, len(excess), size=(n_resamples, len(excess)))].mean(1)
    fall, slope = _fall_and_slope(means, np.log(np.asarray(sizes, float)))
    tails = [(1 - level) / 2, (1 + level) / 2]

    def interval(values: np.ndarray) -> list[float]:
        values = values[~np.isnan(values)]
        return list(np.quantile(values, tails, method="inverted_cdf")) if len(values) else [np.nan, np.nan]

    (fall_low, fall_high), (slope_low, slope_high) = interval(fall), interval(slope)
    return {"fall_low": fall_low, "fall_high": fall_high, "slope_low": slope_low, "slope_high": slope_high}


def verdict(fall_low: float, fall_high: float) -> str:
    """From the fall's interval: ``holds`` (all of it at or above ``FALL``), ``fails`` (all below), ``undecided``."""
    if fall_low >= FALL:
        return "holds"
    if fall_high < FALL:
        return "fails"
    return "undecided"


def reading(row: dict) -> str:
    """What the limit says of a method's excess at the largest n (held-out split): rule written before the runs."""
    if row["verdict"] == "holds":
        return "falls with n"
    if row["limit_excess"] >= LIMIT_SHARE * row["excess_at_n_max"]:
        return "sits at its infinite-data limit"
    return "above its infinite-data limit"


def falls(
    excess: pd.DataFrame, limits: pd.DataFrame, convergence: pd.DataFrame, lrs: dict[tuple[str, str], float]
) -> pd.DataFrame:
    """Per setting, method and split (``excess`` as ``excess_long``, finite n): the seed-mean excess at the smallest
    and largest n, their ratio ``fall`` and the log-log ``slope`` with bootstrap intervals over seeds, the rate, the
    seeds, the limit's excess, whether every size converged (``convergence``), data seed 0's fall at the steps and
    at twice the steps (does the verdict depend on the run length?), the verdict and its reading."""
    rows = []
    finite = excess[excess["n"].notna()]
    for (setting, method, split), part in finite.groupby(["setting", "method", "split"], sort=False):
        table = part.pivot_table(index="seed", columns="n", values="excess")
        sizes = np.asarray(table.columns, float)
        means = table.to_numpy().mean(0)
        fall, slope = _fall_and_slope(means, np.log(sizes))
        limit = limits[(limits["setting"] == setting) & (limits["method"] == method)]
        conv = convergence[(convergence["setting"] == setting) & (convergence["method"] == method)]
        row = {
            "setting": setting,
            "method": method,
            "split": split,
            "lr": lrs[(setting, method)],
            "seeds": len(table),
            "n_min": int(sizes[0]),
            "n_max": int(sizes[-1]),
            "excess_at_n_min": means[0],
            "excess_at_n_max": means[-1],
            "fall": float(fall),
            "slope": float(slope),
        } | bootstrap_falls(table.to_numpy(), sizes)
        row["limit_excess"] = float(limit[f"limit_excess_{split}"].iloc[0]) if len(limit) else np.nan
        finite_conv = conv[conv["n"].notna()].sort_values("n")
        row["converged"] = bool(finite_conv["converged"].all()) if len(finite_conv) else None
        for label, column in (("fall_seed0", f"{split}_steps"), ("fall_seed0_doubled", f"{split}_doubled")):
            values = finite_conv[column].to_numpy() if len(finite_conv) else np.full(2, np.nan)
            row[label] = float(_fall_and_slope(values[None], np.log(sizes[: len(values)]))[0][0])
        row["verdict"] = verdict(row["fall_low"], row["fall_high"])
        row["falls"] = row["verdict"] == "holds"
        row["reading"] = reading(row)
        row["expected_to_fall"] = want = expected(setting, method)
        row["as_expected"] = None if want is None or row["verdict"] == "undecided" else row["falls"] == want
        rows.append(row)
    return pd.DataFrame(rows)


def limits(excess: pd.DataFrame, convergence: pd.DataFrame, lrs: dict[tuple[str, str], float]) -> pd.DataFrame:
    """Per setting and method: the infinite-data limit's excess on both splits beside the floor's KL (data seed 0),
    the rate, and whether doubling the steps left it in place."""
    limit = excess[excess["n"].isna()]
    wide = limit.pivot_table(index=["setting", "method"], columns="split", values=["excess", "floor_kl"], sort=False)
    wide.columns = [f"{'limit_excess' if v == 'excess' else 'floor'}_{split}" for v, split in wide.columns]
    table = wide.reset_index()
    table.insert(2, "lr", [lrs[(s, m)] for s, m in zip(table["setting"], table["method"], strict=True)])
    conv = convergence[convergence["n"].isna()].set_index(["setting", "method"])["converged"]
    table["converged"] = [bool(conv.get((s, m), False)) for s, m in zip(table["setting"], table["method"], strict=True)]
    columns = ["setting", "method", "lr", "limit_excess_heldout", "limit_excess_train", "floor_heldout", "floor_train"]
    return table[[*columns, "converged"]]


def convergence_table(
    runs: pd.DataFrame, doubled: pd.DataFrame, floor_table: pd.DataFrame, doubled_floors: pd.DataFrame
) -> pd.DataFrame:
    """Data seed 0's runs (every size, the limit: ``n`` empty) and floors (``method`` "floor") at their steps and at
    twice the steps: the excess (floors: KL) on each split before and after, and rule 5's verdict."""
    floor0 = floor_table[floor_table["seed"] == 0]
    keys = ["setting", "method", "n", "seed"]
    before = excess_long(runs[runs["seed"] == 0], floor0).set_index([*keys, "split"])["excess"]
    after = excess_long(doubled, floor0).set_index([*keys, "split"])["excess"]
    both = pd.DataFrame({"before": before, "after": after}).dropna(subset=["after"]).reset_index()
    floors_both = floor0.merge(doubled_floors, on=["setting", "seed"], suffixes=("", "_doubled"))
    for split in ("train", "heldout"):
        extra = floors_both.assign(
            method="floor",
            n=pd.NA,
            split=split,
            before=floors_both[f"kl_{split}"],
            after=floors_both[f"kl_{split}_doubled"],
        )
        both = pd.concat([both, extra[[*keys, "split", "before", "after"]]], ignore_index=True)
    both["ok"] = protocol.converged(both["before"], both["after"])
    rows = []
    for (setting, method, n), part in both.groupby(["setting", "method", "n"], sort=False, dropna=False):
        entry = {"setting": setting, "method": method, "n": n}
        for r in part.itertuples():
            entry |= {f"{r.split}_steps": r.before, f"{r.split}_doubled": r.after}
        rows.append(entry | {"converged": bool(part["ok"].all())})
    table = pd.DataFrame(rows)
    return table.assign(n=table["n"].astype("Int64"))


def lr_table(grid_runs: pd.DataFrame, floor_table: pd.DataFrame) -> pd.DataFrame:
    """The learning-rate grid, one row per setting, method and rate: the training objective at the largest n (the
    rule's score), the held-out excess at the smallest and largest n and in the limit (data seed 0), seed 0's fall,
    DDRO's guard activations at the largest n, and whether the rule chose it."""
    n_min, n_max = grid_runs["n"].min(), grid_runs["n"].max()
    rows = []
    for (setting, method, lr), part in grid_runs.groupby(["setting", "method", "lr"], sort=False):
        at = excess_long(part, floor_table[floor_table["seed"] == 0]).query("split == 'heldout'")
        first = float(at.loc[at["n"] == n_min, "excess"].iloc[0])
        last = float(at.loc[at["n"] == n_max, "excess"].iloc[0])
        largest = part[part["n"] == n_max].iloc[0]
        rows.append(
            {
                "setting": setting,
                "method": method,
                "lr": lr,
                "objective_at_n_max": largest["objective"],
                "excess_at_n_min": first,
                "excess_at_n_max": last,
                "limit_excess": float(at.loc[at["n"].isna(), "excess"].iloc[0]),
                "fall_seed0": first / last if last > 0 else np.inf,
                "guard_at_n_max": int(largest["guard_total"]),
                "chosen": bool(largest["chosen"]),
            }
        )
    return pd.DataFrame(rows)


def guard_table(guard_runs: pd.DataFrame, floor_table: pd.DataFrame) -> pd.DataFrame:
    """DDRO's guard sensitivity: per setting, guard eps and n (empty: the limit), the excess on both splits, the
    guard's cell activations summed over the steps, and the largest ratio."""
    if guard_runs.empty:
        return guard_runs
    long = excess_long(
        guard_runs.drop(columns=["guard_eps"]).assign(method=guard_runs["guard_eps"].map(str)), floor_table
    )
    wide = long.pivot_table(
        index=["setting", "method", "n"], columns="split", values="excess", dropna=False, sort=False
    )
    wide = wide.reset_index().rename(
        columns={"method": "guard_eps", "heldout": "excess_heldout", "train": "excess_train"}
    )
    wide["guard_eps"] = wide["guard_eps"].astype(float)
    extra = guard_runs.set_index(["setting", "guard_eps", "n"])[["lr", "guard_total", "ratio_max"]]
    return wide.merge(extra.reset_index(), on=["setting", "guard_eps", "n"])


def _fall_text(row: pd.Series) -> str:
    fall = "reaches the floor" if math.isinf(row["fall"]) else f"falls {row['fall']:.3g}x"
    interval = f"[{row['fall_low']:.3g}, {row['fall_high']:.3g}]"
    return (
        f"{row['method']} {fall} {interval} ({row['excess_at_n_min']:.3g} at n = {row['n_min']} to "
        f"{row['excess_at_n_max']:.3g} at n = {row['n_max']}; limit {row['limit_excess']:.3g}; slope "
        f"{row['slope']:+.2f} [{row['slope_low']:+.2f}, {row['slope_high']:+.2f}]): **{row['verdict']}**, "
        f"{row['reading']}" + ("" if row["converged"] else " (not converged by rule 5)")
    )


def claims(fall_table: pd.DataFrame, split: str = "heldout") -> str:
    """The conclusion: per setting, each method's fall with its interval, verdict and reading against its limit,
    and whether the theory agrees."""
    lines = []
    for setting, part in fall_table[fall_table["split"] == split].groupby("setting", sort=False):
        held = part[part["as_expected"].eq(True)]
        broken = part[part["as_expected"].eq(False)]
        open_ = part[part["verdict"].eq("undecided") & part["expected_to_fall"].notna()]
        text = f"- **{setting}**: " + "; ".join(_fall_text(r) for _, r in part.iterrows()) + "."
        if len(broken):
            text += f" **Not as the theory says: {', '.join(broken['method'])}.**"
        if len(open_):
            text += f" Undecided at {part['seeds'].iloc[0]} seeds: {', '.join(open_['method'])}."
        if len(held) and not len(broken) and not len(open_):
            text += " As the theory says."
        lines.append(text)
    return "\n".join(lines)


def floor_lr_findings(floor_fits: pd.DataFrame) -> str:
    """Rule 1's choices: per setting, the rate each seed's floor took and the training KLs it reached."""
    parts = []
    for setting, part in floor_fits.groupby("setting", sort=False):
        chosen = part[part["chosen"]]
        rates = ", ".join(f"{lr:g} x {count}" for lr, count in chosen["lr"].value_counts().sort_index().items())
        parts.append(
            f"{setting} {rates} (training KL {chosen['kl_train'].min():.2g} to {chosen['kl_train'].max():.2g}; the "
            f"worst fit at any rate {part['kl_train'].max():.2g})"
        )
    return "Floors (rule 1: each seed's best fit over the rates): " + "; ".join(parts) + " nats."


def lr_findings(table: pd.DataFrame) -> str:
    """Rule 2's choices, and where another rate of the grid would change seed 0's fall across the bar."""
    lines = []
    for setting, part in table.groupby("setting", sort=False):
        chosen = part[part["chosen"]]
        text = ", ".join(f"{m} {lr:g}" for m, lr in zip(chosen["method"], chosen["lr"], strict=True))
        line = f"- **{setting}**: {text}."
        flips = []
        for method, rates in part.groupby("method", sort=False):
            pick = rates[rates["chosen"]].iloc[0]
            other = rates[(rates["fall_seed0"] >= FALL) != (pick["fall_seed0"] >= FALL)]
            if len(other):
                flips.append(f"{method} (at {', '.join(f'{lr:g}' for lr in other['lr'])})")
        if flips:
            line += " Seed 0's fall crosses the 3x bar at another rate for: " + "; ".join(flips) + "."
        lines.append(line)
    return "\n".join(lines)


def convergence_findings(table: pd.DataFrame, fall_table: pd.DataFrame) -> str:
    """Rule 5's outcome for the finite-n runs, the limits and the floors, and whether each verdict depends on the run
    length (data seed 0's held-out fall at the steps and at twice the steps, against the bar)."""
    finite = table[table["n"].notna() & (table["method"] != "floor")]
    change = (finite["heldout_doubled"] - finite["heldout_steps"]) / finite["heldout_steps"].abs()
    rule = f"at most {protocol.CONVERGED_REL:.0%} of itself plus {protocol.CONVERGED_ABS:g} nats on both splits"
    lines = [
        f"- Finite-n runs (data seed 0): {int(finite['converged'].sum())} of {len(finite)} converged (doubling the "
        f"steps moved the excess by {rule}); the held-out excess rose in {int((change > 0).sum())} of the "
        f"{len(finite)} (median change over all {len(finite)}: {change.median():+.0%})."
    ]
    for what, part in (("Limits", table[table["n"].isna() & (table["method"] != "floor")]),
                       ("Floors", table[table["method"] == "floor"])):  # fmt: skip
        bad = part[~part["converged"]]
        moved = "; ".join(
            f"{r.setting}{'' if r.method == 'floor' else ' ' + r.method} "
            f"{r.heldout_steps:.3g} -> {r.heldout_doubled:.3g}"
            for r in bad.itertuples()
        )
        lines.append(
            f"- {what}: {len(part) - len(bad)} of {len(part)} converged"
            + (f"; moved (held-out): {moved}." if moved else ".")
        )
    held = fall_table[fall_table["split"] == "heldout"]
    flips = held[(held["fall_seed0"] >= FALL) != (held["fall_seed0_doubled"] >= FALL)]
    kept = len(held) - len(flips)
    text = (
        f"- Verdicts and run length: data seed 0's held-out fall lies on the same side of {FALL:g}x at both lengths "
        f"for {kept} of {len(held)} methods"
    )
    if len(flips):
        text += "; not for " + "; ".join(
            f"{r.setting} {r.method} ({r.fall_seed0:.3g}x -> {r.fall_seed0_doubled:.3g}x)" for r in flips.itertuples()
        )
    lines.append(text + ".")
    return "\n".join(lines)


def guard_findings(table: pd.DataFrame) -> str:
    """DDRO's held-out excess per guard eps at the smallest and largest n and in the limit."""
    if table.empty:
        return "No DDRO run in this execution."
    lines = []
    for (setting, eps), part in table.groupby(["setting", "guard_eps"], sort=False):
        cells = ", ".join(
            f"{'limit' if pd.isna(n) else f'n = {n}'} {x:.3g}"
            for n, x in zip(part["n"], part["excess_heldout"], strict=True)
        )
        fired = int(part["guard_total"].sum())
        lines.append(f"- **{setting}, eps = {eps:g}**: held-out excess {cells}; guard activations {fired}.")
    return "\n".join(lines)


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
                f"({int(by.loc[method, 'guard'])} cell activations, summed over steps)."
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
