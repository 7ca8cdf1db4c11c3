"""The toy notebooks' findings, written from their own tables, so a rerun with other parameters cannot leave the
prose wrong. Each function takes the table a notebook just computed and returns Markdown.

Consistency is read from the numbers: a method is called consistent here when its log-log slope of KL against n
is below ``CONSISTENT_SLOPE`` and its infinite-data limit is zero to solver precision.
"""

from __future__ import annotations

import math

import pandas as pd

CONSISTENT_SLOPE = -0.5
ZERO_LIMIT = 1e-8


def t1_findings(t1: pd.DataFrame) -> str:
    """Notebook 01, T1: how far each ratio goes along the two sweeps."""
    sweep_p = t1[t1["sweep"] == "p_plus"]
    sweep_m = t1[t1["sweep"] == "p_minus"]
    g_end, g_tail = sweep_p["g_max"].iloc[0], sweep_m["g_max"].iloc[0]
    p_minus = sweep_m["p_minus_min"].iloc[0]
    lines = [
        f"- Along the $p^+$ sweep, $g^*$ grows linearly up to {g_end:.3g} $= 1/p^-$ at $p^+ = 1$; as $p^- \\to$ "
        f"{p_minus:.0e} it reaches {g_tail:.3g}: nothing bounds it but $p^-$ itself.",
    ]
    for alpha, part in t1.groupby("alpha"):
        r_max, bound = part["r_max"].max(), 1 / alpha
        lines.append(
            f"- $\\alpha = {alpha:g}$: the largest $r^*_\\alpha$ on either sweep is {r_max:.4g}, not above its bound "
            f"$1/\\alpha = {bound:.4g}$ ({'holds' if r_max <= bound * (1 + 1e-12) else 'VIOLATED'})."
        )
    return "\n".join(lines)


def loss_shape_table(shapes: pd.DataFrame) -> pd.DataFrame:
    """Notebook 01, T2: per method and row, the T of the smallest loss on the grid and the slope's range."""
    rows = []
    for (method, row), part in shapes.groupby(["method", "row"], sort=False):
        rows.append(
            {
                "method": method,
                "row": row,
                "argmin_T": part["T"].iloc[part["loss"].argmin()],
                "argmin_at_grid_edge": part["loss"].argmin() in (0, len(part) - 1),
                "slope_min": part["slope"].min(),
                "slope_max": part["slope"].max(),
            }
        )
    return pd.DataFrame(rows)


def t2_findings(t2: pd.DataFrame, alpha: float, guard_eps: float) -> str:
    """Notebook 01, T2: RDRO's minimum and bounded slopes, DDRO's missing minimum and steep guard."""
    rdro = t2[t2["method"].str.startswith("RDRO")].set_index("row")
    ddro = t2[t2["method"].str.startswith("DDRO")].set_index("row")
    return "\n".join(
        [
            f"- RDRO's + loss is smallest at $T = {rdro.loc['+', 'argmin_T']:.3f}$ on the grid, against "
            f"$\\log(1/\\alpha) = {math.log(1 / alpha):.3f}$; its slopes lie in "
            f"[{rdro.loc['+', 'slope_min']:.3f}, {rdro.loc['+', 'slope_max']:.3f}] (+ rows) and "
            f"[{rdro.loc['-', 'slope_min']:.3f}, {rdro.loc['-', 'slope_max']:.3f}] (- rows), inside "
            f"$(-1, \\alpha)$ and $(0, 1 - \\alpha)$ with $\\alpha = {alpha:g}$.",
            "- DDRO's + loss has no minimum on the grid (smallest at its edge, "
            f"$T = {ddro.loc['+', 'argmin_T']:.2f}$), "
            f"and its - loss's slope reaches {ddro.loc['-', 'slope_max']:.4g} past the guard, "
            f"$(2 - \\epsilon)/\\epsilon = {(2 - guard_eps) / guard_eps:.4g}$ for $\\epsilon = {guard_eps:g}$.",
        ]
    )


def t3_findings(table: pd.DataFrame) -> str:
    """Notebook 02: per setting, which methods converge (slope and zero limit) and where the others stall."""
    lines = []
    for setting, part in table.groupby("setting", sort=False):
        good = part[(part["slope"] < CONSISTENT_SLOPE) & (part["kl_limit"] < ZERO_LIMIT)]
        bad = part.drop(good.index)
        converging = ", ".join(f"{m} (slope {s:+.2f})" for m, s in zip(good["method"], good["slope"], strict=True))
        stalling = ", ".join(
            f"{m} (slope {s:+.2f}, KL {k:.3g} at n = {n}, limit {lim:.3g})"
            for m, s, k, n, lim in zip(
                bad["method"], bad["slope"], bad["kl_at_max_n"], bad["n_max"], bad["kl_limit"], strict=True
            )
        )
        lines.append(
            f"- **{setting}**: converging like $1/n$: {converging or 'none'}. Not converging: {stalling or 'none'}."
        )
    shallow = table[(table["slope"] < CONSISTENT_SLOPE) & (table["slope"] > -0.9)]
    if len(shallow):
        lines.append(
            "- Slopes between -0.5 and -0.9 ("
            + ", ".join(f"{m} in {s}" for m, s in zip(shallow["method"], shallow["setting"], strict=True))
            + ") belong to methods whose infinite-data limit is 0: their KL still falls, more slowly than 1/n at these "
            "sizes (pre-asymptotic)."
        )
    return "\n".join(lines)


def t4_findings(spread: pd.DataFrame) -> str:
    """Notebook 03: gradient norms, guard activations and ratios against 1/alpha, over seeds."""
    lines = []
    for setting, part in spread.groupby("setting", sort=False):
        by = part.set_index(part["method"].str.split(" ").str[0])
        ddro, rdro, kto = by.loc["DDRO"], by.loc["RDRO"], by.loc["KTO"]
        lines.append(
            f"- **{setting}** ({int(rdro['runs'])} runs): median of each run's largest gradient norm "
            f"DDRO {ddro['median_of_max_grad_norm']:.3g}, RDRO {rdro['median_of_max_grad_norm']:.3g}, "
            f"KTO {kto['median_of_max_grad_norm']:.3g}; DDRO's guard fired in "
            f"{int(ddro['runs_with_guard_activations'])} runs. Largest batch ratio in units of $1/\\alpha$: "
            f"RDRO {rdro['largest_ratio_times_alpha']:.2f} "
            f"(past the bound in {int(rdro['runs_ratio_above_1_over_alpha'])} runs), DDRO "
            f"{ddro['largest_ratio_times_alpha']:.2f}, KTO {kto['largest_ratio_times_alpha']:.2f}."
        )
    return "\n".join(lines)


EXPECTED_CONSISTENT = {"S1": ("DDRO", "RDRO"), "S2": ("RDRO per-class",), "S3": ("PMLE", "distillation", "reverse KL")}
"""What the theory says converges in each setting (method labels by prefix; docs/STUDY.md section 3)."""


def t3_conclusion(table: pd.DataFrame) -> str:
    """Whether each setting's measured consistent methods (slope and zero limit) are the ones the theory names."""
    lines = []
    for setting, part in table.groupby("setting", sort=False):
        measured = set(part.loc[(part["slope"] < CONSISTENT_SLOPE) & (part["kl_limit"] < ZERO_LIMIT), "method"])
        expected = {m for m in part["method"] if m.startswith(EXPECTED_CONSISTENT.get(setting, ()))}
        if measured == expected:
            lines.append(f"- {setting}: as the theory says, exactly {', '.join(sorted(measured))} converge.")
        else:
            lines.append(
                f"- {setting}: **differs from the theory**: converging {sorted(measured)}, expected {sorted(expected)}."
            )
    return "\n".join(lines)


def t4_claims(spread: pd.DataFrame) -> str:
    """Notebook 03's conclusion, each claim checked against the spread table (True/False per setting)."""
    checks = {
        "DDRO's largest gradient norms are at least 10x RDRO's": lambda d, r, k: (
            d.median_of_max_grad_norm >= 10 * r.median_of_max_grad_norm
        ),
        "DDRO's guard fires in most runs": lambda d, r, k: d.runs_with_guard_activations > d.runs / 2,
        "RDRO's batch ratio passes 1/alpha in most runs, by under half of it": lambda d, r, k: (
            r.runs_ratio_above_1_over_alpha > r.runs / 2 and r.largest_ratio_times_alpha < 1.5
        ),
        "DDRO's and KTO's ratios reach over twice 1/alpha": lambda d, r, k: (
            min(d.largest_ratio_times_alpha, k.largest_ratio_times_alpha) > 2
        ),
    }
    lines = []
    for claim, check in checks.items():
        verdicts = []
        for setting, part in spread.groupby("setting", sort=False):
            by = part.set_index(part["method"].str.split(" ").str[0])
            verdicts.append(f"{setting} {'holds' if check(by.loc['DDRO'], by.loc['RDRO'], by.loc['KTO']) else 'FAILS'}")
        lines.append(f"- {claim}: {', '.join(verdicts)}.")
    return "\n".join(lines)
