"""The answer-set study's protocol: which runs are made, in order, each returning a table (``studies.py`` saves
them). The rules are written here before any result is seen, and are the same for every method:

1. **Floors.** The floor of each setting and data seed (its own init seed) is fitted at every rate of
   ``floor_lr_grid``; the fit that ends at the lowest training KL (the floor's own objective) is the floor.
2. **Each method's own learning rate.** Per setting and method, every rate of ``lr_grid`` trains on data seed 0 at
   the smallest and the largest n and on the population; the rate used is the one whose run ends at the lowest
   value of **the method's own training objective on the largest data set** (what a practitioner has: never the
   target). The whole grid is kept (``lr_grid`` table), so a reader sees how each verdict depends on the rate.
3. **Every size and seed** at the chosen rate: data seeds ``0 .. seeds-1``, each with its own adapter
   initialisation (``init_seed = init_seed_base + seed``).
4. **The infinite-data limit**: each method trained on its population risk with the same optimiser and rate.
5. **Convergence by doubling the steps**: data seed 0 at every size, the limit and the floors rerun with twice the
   steps; a run counts as converged when its excess KL (floors: their KL) moves by at most
   ``CONVERGED_REL`` of itself plus ``CONVERGED_ABS`` nats, on both splits.
6. **DDRO's guard**: DDRO rerun with each ``guard_eps`` of a grid at the smallest and largest n and in the limit.
7. **RDRO's alpha sweep** at the chosen rate of per-class RDRO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from studylib.lm_exact.experiment import Prepared, floor_run, has_guard, lm_methods, method_run
from studylib.lm_exact.train import TrainSettings
from studylib.toy.sweeps import Method

CONVERGED_REL = 0.1
CONVERGED_ABS = 1e-4


def init_seed(seed: int, base: int) -> int:
    """The adapter's initialisation seed of data seed ``seed``: its own stream, apart from the data's."""
    return base + seed


def floor_fits(
    prepared: Prepared, seeds: Sequence[int], grid: Sequence[float], train: TrainSettings, base: int
) -> pd.DataFrame:
    """Rule 1: every (setting, data seed)'s floor at every rate of ``grid`` (``floor_run``'s rows), with ``chosen``
    marking the rate whose fit ends at the lowest training KL, per setting and seed."""
    rows = [
        floor_run(prepared, setting, seed, replace(train, lr=lr), init_seed(seed, base))
        for setting in prepared.settings.values()
        for seed in seeds
        for lr in grid
    ]
    table = pd.DataFrame(rows)
    best = table.groupby(["setting", "seed"])["kl_train"].transform("min")
    return table.assign(chosen=table["kl_train"] == best)


def floors(fits: pd.DataFrame) -> pd.DataFrame:
    """Each (setting, seed)'s floor: its chosen fit (setting, seed, init_seed, lr, steps, kl_train, kl_heldout,
    seconds)."""
    chosen = fits[fits["chosen"]].drop_duplicates(["setting", "seed"])
    return chosen.drop(columns=["chosen"]).reset_index(drop=True)


def _progress(total: int, what: str) -> tqdm:
    return tqdm(total=total, desc=what, unit="run", mininterval=5)


def lr_grid_runs(
    prepared: Prepared, sizes: Sequence[int], grid: Sequence[float], train: TrainSettings, guard_eps: float, base: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rule 2: every method at every rate of ``grid`` on data seed 0 at the smallest and largest n and in the
    limit (``n`` empty); returns the runs (with a ``chosen`` column) and the per-step logs of the chosen rate."""
    points = [min(sizes), max(sizes), None]
    methods = [(s, m) for s in prepared.settings.values() for m in lm_methods(s, guard_eps)]
    runs, curves = [], []
    with _progress(len(methods) * len(grid) * len(points), "learning-rate grid") as bar:
        for setting, method in methods:
            for lr in grid:
                for n in points:
                    row, curve = method_run(prepared, setting, method, n, 0, replace(train, lr=lr), init_seed(0, base))
                    runs.append(row)
                    curves.append(curve.assign(setting=setting.name, method=method.label, n=n, seed=0, lr=lr))
                    bar.update()
    table = pd.DataFrame(runs)
    table["n"] = table["n"].astype("Int64")
    at_max = table[table["n"] == max(sizes)]
    best = at_max.loc[
        at_max.groupby(["setting", "method"], sort=False)["objective"].idxmin(), ["setting", "method", "lr"]
    ]
    chosen = set(map(tuple, best.to_numpy()))
    table["chosen"] = [
        (s, m, lr) in chosen for s, m, lr in zip(table["setting"], table["method"], table["lr"], strict=True)
    ]
    logs = pd.concat(curves, ignore_index=True)
    logs["n"] = logs["n"].astype("Int64")
    keep = [(s, m, lr) in chosen for s, m, lr in zip(logs["setting"], logs["method"], logs["lr"], strict=True)]
    return table, logs[keep].reset_index(drop=True)


def chosen_lrs(grid_runs: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(setting, method) -> the rate rule 2 chose."""
    chosen = grid_runs[grid_runs["chosen"]].drop_duplicates(["setting", "method"])
    return {(s, m): float(lr) for s, m, lr in zip(chosen["setting"], chosen["method"], chosen["lr"], strict=True)}


def method_runs(
    prepared: Prepared,
    sizes: Sequence[int],
    seeds: Sequence[int],
    train: TrainSettings,
    lrs: dict[tuple[str, str], float],
    guard_eps: float,
    base: int,
    done: pd.DataFrame,
) -> pd.DataFrame:
    """Rule 3: every method at every size and seed at its own rate; runs already in ``done`` (the grid's chosen
    rows) are reused, not rerun. One row per run (``method_run``'s), the limits (``n`` empty) included."""
    have = {(r.setting, r.method, r.n, r.seed) for r in done.itertuples()}
    todo = [
        (s, m, n, seed)
        for s in prepared.settings.values()
        for m in lm_methods(s, guard_eps)
        for seed in seeds
        for n in sizes
        if (s.name, m.label, n, seed) not in have
    ]
    rows = []
    for setting, method, n, seed in tqdm(todo, desc="sizes x seeds", unit="run", mininterval=5):
        lr = lrs[(setting.name, method.label)]
        rows.append(method_run(prepared, setting, method, n, seed, replace(train, lr=lr), init_seed(seed, base))[0])
    table = pd.concat([done.drop(columns=["chosen"], errors="ignore"), pd.DataFrame(rows)], ignore_index=True)
    table["n"] = table["n"].astype("Int64")
    return table.sort_values(["setting", "method", "seed", "n"], kind="stable", na_position="last").reset_index(
        drop=True
    )


def doubled_runs(
    prepared: Prepared,
    sizes: Sequence[int],
    train: TrainSettings,
    lrs: dict[tuple[str, str], float],
    guard_eps: float,
    base: int,
) -> pd.DataFrame:
    """Rule 5: data seed 0 at every size and in the limit with twice the steps (rows as ``method_run``'s)."""
    points = [*sizes, None]
    methods = [(s, m) for s in prepared.settings.values() for m in lm_methods(s, guard_eps)]
    rows = []
    with _progress(len(methods) * len(points), "doubled steps") as bar:
        for setting, method in methods:
            double = replace(train, lr=lrs[(setting.name, method.label)], steps=2 * train.steps)
            for n in points:
                rows.append(method_run(prepared, setting, method, n, 0, double, init_seed(0, base))[0])
                bar.update()
    table = pd.DataFrame(rows)
    return table.assign(n=table["n"].astype("Int64"))


def doubled_floors(prepared: Prepared, train: TrainSettings, floor_table: pd.DataFrame, base: int) -> pd.DataFrame:
    """Rule 5 for the floors: data seed 0's floor at its rate with twice the steps."""
    rate = floor_table[floor_table["seed"] == 0].set_index("setting")["lr"]
    return pd.DataFrame(
        [
            floor_run(prepared, s, 0, replace(train, lr=rate[name], steps=2 * train.steps), init_seed(0, base))
            for name, s in prepared.settings.items()
        ]
    )


def converged(before: pd.Series, after: pd.Series) -> pd.Series:
    """Rule 5's test on matched values (excess or floor KL) at the steps and at twice the steps."""
    return (after - before).abs() <= CONVERGED_REL * before.abs() + CONVERGED_ABS


def guard_sensitivity(
    prepared: Prepared,
    sizes: Sequence[int],
    eps_grid: Sequence[float],
    train: TrainSettings,
    lrs: dict[tuple[str, str], float],
    base: int,
) -> pd.DataFrame:
    """Rule 6: DDRO with each guard ``eps`` at the smallest and largest n and in the limit, data seed 0, at DDRO's
    chosen rate; rows as ``method_run``'s with a ``guard_eps`` column."""
    rows = []
    for name, setting in prepared.settings.items():
        for eps in eps_grid:
            method = next((m for m in lm_methods(setting, eps) if has_guard(m)), None)
            if method is None:
                continue
            lr = lrs[(name, method.label)]
            for n in (min(sizes), max(sizes), None):
                row, _ = method_run(prepared, setting, method, n, 0, replace(train, lr=lr), init_seed(0, base))
                rows.append(row | {"guard_eps": eps})
    table = pd.DataFrame(rows)
    return table.assign(n=table["n"].astype("Int64")) if len(table) else table


def alpha_sweep(
    prepared: Prepared,
    setting_name: str,
    alphas: Sequence[float],
    n: int,
    seeds: Sequence[int],
    train: TrainSettings,
    base: int,
) -> pd.DataFrame:
    """Per-class RDRO at each alpha on ``setting_name`` (n rows, every seed): columns setting, alpha, n, seed, lr,
    preferred_fraction (of the data), kl_train, kl_heldout, ratio_max."""
    setting, rows = prepared.settings[setting_name], []
    for alpha in alphas:
        method = Method(f"RDRO (alpha={alpha:g})", "rdro", {"alpha": alpha, "reduction": "per_class"})
        for seed in seeds:
            row, _ = method_run(prepared, setting, method, n, seed, train, init_seed(seed, base))
            fraction = float(np.mean(setting.rows(n, seed)["label"]))
            keep = {k: row[k] for k in ("setting", "n", "seed", "lr", "kl_train", "kl_heldout", "ratio_max")}
            rows.append(keep | {"alpha": alpha, "preferred_fraction": fraction})
    return pd.DataFrame(rows)
