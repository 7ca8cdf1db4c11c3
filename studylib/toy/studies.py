"""The toy notebooks' steps (02 consistency, 03 stability): each computes a notebook's tables and saves its figures
and tables through ``studylib.results``, so the notebooks hold only the story."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from studylib.results import save_figure, save_table
from studylib.toy.plots import plot_consistency, plot_stability
from studylib.toy.problems import TabularProblem, make_problem
from studylib.toy.stability import (
    seed_spread,
    stability_methods,
    stability_over_seeds,
    stability_run,
    stability_summary,
)
from studylib.toy.sweeps import consistency_sweep, fit_slopes, population_limits, summarise


@dataclass
class SettingResult:
    """One setting of the consistency sweep: every fit, their per-n summary, slopes and infinite-data limits."""

    problem: TabularProblem
    fits: pd.DataFrame
    summary: pd.DataFrame
    slopes: pd.DataFrame
    limits: pd.DataFrame


def consistency_study(
    settings: Sequence[str],
    min_log2n: Mapping[str, int],
    max_log2n: int,
    seeds: int,
    slope_min_n: int,
    ridge: float,
    problem_seed: int,
) -> dict[str, SettingResult]:
    """T3 for each setting: the sweep over n = 2^min .. 2^max and ``seeds`` data sets, slopes and limits."""
    results = {}
    for setting in settings:
        problem = make_problem(setting, seed=problem_seed)
        sizes = [2**k for k in range(min_log2n[setting], max_log2n + 1)]
        fits = consistency_sweep(problem, sizes=sizes, seeds=range(seeds), ridge=ridge)
        results[setting] = SettingResult(
            problem, fits, summarise(fits), fit_slopes(fits, slope_min_n), population_limits(problem)
        )
    return results


def slopes_table(results: Mapping[str, SettingResult]) -> pd.DataFrame:
    """Every setting's slopes beside each method's infinite-data limit."""
    slopes = pd.concat([r.slopes for r in results.values()], ignore_index=True)
    limits = pd.concat([r.limits for r in results.values()], ignore_index=True)
    return slopes.merge(limits[["setting", "method", "kl_limit"]], on=["setting", "method"])


def save_consistency(results: Mapping[str, SettingResult], out: Path, stamp: dict) -> pd.DataFrame:
    """Write each setting's figure and KL table and the slopes table; returns the slopes table."""
    for setting, result in results.items():
        setting_stamp = stamp | {
            "params": stamp.get("params", {}) | {"setting": setting, "problem": result.problem.params}
        }
        save_figure(
            plot_consistency(result.summary, result.slopes, result.limits), out / f"t3_{setting}.png", setting_stamp
        )
        save_table(result.summary, out / f"t3_{setting}_kl", setting_stamp)
    table = slopes_table(results)
    save_table(table, out / "t3_slopes", stamp)
    return table


def kl_by_n(result: SettingResult) -> pd.DataFrame:
    """The seed-mean KL of each method (columns) at each n (rows)."""
    return result.summary.pivot(index="n", columns="method", values="kl_mean")


def stability_study(
    settings: Sequence[str],
    *,
    contexts: int,
    items: int,
    problem_seed: int,
    seed: int,
    spread_seeds: int,
    kto_beta: float,
    out: Path,
    stamp: dict,
    **run: object,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """T4: for each setting, one drawn run (figure ``t4_<setting>.png``) and the same run over ``spread_seeds``
    data sets and batch orders. Writes ``t4_summary``, ``t4_seeds`` and ``t4_seed_spread``; returns the summary
    of the drawn runs and the spread over seeds. ``run``: n, steps, batch_size, lr, optimizer."""
    summaries, per_seed, spreads = [], [], []
    for setting in settings:
        problem = make_problem(setting, contexts=contexts, items=items, seed=problem_seed)
        alpha, methods = problem.preferred_fraction, stability_methods(problem, beta=kto_beta)
        log = stability_run(problem, methods, seed=seed, **run)
        summary = stability_summary(log).assign(one_over_alpha=1 / alpha)
        summaries.append(summary.assign(setting=setting))
        runs = stability_over_seeds(problem, range(spread_seeds), methods, **run).assign(setting=setting)
        per_seed.append(runs)
        spreads.append(seed_spread(runs, alpha).assign(setting=setting))
        ddro = summary.set_index("method").loc["DDRO"]
        title = (
            f"{setting}, seed {seed}: DDRO's largest gradient norm {ddro['grad_norm_max']:.3g} "
            f"(guard activations: {int(ddro['guard_total'])}); alpha = {alpha:.2f}"
        )
        figure_stamp = stamp | {
            "params": stamp["params"] | {"setting": setting, "problem": problem.params},
            "seed": seed,
        }
        save_figure(plot_stability(log, alpha, title), out / f"t4_{setting}.png", figure_stamp)
    first = ["setting", "method"]
    summary, spread = (pd.concat(frames, ignore_index=True) for frames in (summaries, spreads))
    summary, spread = (
        summary[first + [c for c in summary if c not in first]],
        spread[first + [c for c in spread if c not in first]],
    )
    seeds_stamp = stamp | {"seed": list(range(spread_seeds))}
    save_table(summary, out / "t4_summary", stamp | {"seed": seed})
    save_table(pd.concat(per_seed, ignore_index=True), out / "t4_seeds", seeds_stamp)
    save_table(spread, out / "t4_seed_spread", seeds_stamp)
    return summary, spread
