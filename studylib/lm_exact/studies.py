"""Notebook 06's steps: run the answer-set study's protocol (``protocol.py``) and write its tables and figures through
``studylib.results`` (atomic, stamped), so the notebook holds only the story.

Written to ``out_dir``: ``consistency.csv`` (``setting, method, n, seed, split, kl, floor_kl``), ``excess`` (seed
means per n), ``falls`` (the claims' table, with bootstrap intervals), ``limits`` (each method's infinite-data
limit), ``lr_grid`` (every rate of every method), ``convergence`` (doubled steps), ``guard_eps`` (DDRO's guard),
``runs`` (one row per training run: KLs, objective, rate, seconds, largest gradient norm and ratio, guard
activations), ``floors``, ``floor_lr`` (every floor fit at every rate), ``curves`` (every step of data seed 0's
runs at the chosen rates), ``alpha_sweep``, ``timing``, ``reference`` (per setting and split: the reference's
entropy, ``KL(target || pi_ref)``, the largest target ratio); figures ``consistency_<setting>.png``,
``training_curves.png``, ``alpha_sweep.png``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from studylib.lm_exact import experiment, plots, protocol, story
from studylib.lm_exact.train import TrainSettings
from studylib.results import save_figure, save_table


@dataclass
class StudyResult:
    """The tables of one execution of the study."""

    floor_lr: pd.DataFrame
    floors: pd.DataFrame
    lr_grid: pd.DataFrame
    runs: pd.DataFrame
    curves: pd.DataFrame
    consistency: pd.DataFrame
    excess: pd.DataFrame
    limits: pd.DataFrame
    convergence: pd.DataFrame
    falls: pd.DataFrame
    guard: pd.DataFrame
    sweep: pd.DataFrame
    timing: pd.DataFrame
    one_over_alpha: dict[str, float]
    reference: pd.DataFrame


def run_study(
    prepared: experiment.Prepared,
    *,
    sizes: Sequence[int],
    seeds: int,
    lr_grid: Sequence[float],
    floor_lr_grid: Sequence[float],
    steps: int,
    floor_steps: int,
    lora_r: int,
    guard_eps: float,
    guard_eps_grid: Sequence[float],
    alphas: Sequence[float],
    alpha_settings: Sequence[str],
    alpha_n: int,
    init_seed_base: int,
) -> StudyResult:
    """The protocol's seven steps, in order (``protocol``'s docstring), and the tables of findings."""
    clock, start = dict(prepared.seconds), time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        clock[name], start = time.perf_counter() - start, time.perf_counter()

    train, floor_train = TrainSettings(steps=steps, rank=lora_r), TrainSettings(steps=floor_steps, rank=lora_r)
    seed_list, base = list(range(seeds)), init_seed_base
    floor_lr = protocol.floor_fits(prepared, seed_list, floor_lr_grid, floor_train, base)
    floors = protocol.floors(floor_lr)
    lap("floors")
    grid, curves = protocol.lr_grid_runs(prepared, sizes, lr_grid, train, guard_eps, base)
    lrs = protocol.chosen_lrs(grid)
    lap("lr_grid")
    runs = protocol.method_runs(prepared, sizes, seed_list, train, lrs, guard_eps, base, grid[grid["chosen"]])
    lap("sizes_x_seeds")
    doubled = protocol.doubled_runs(prepared, sizes, train, lrs, guard_eps, base)
    doubled_floors = protocol.doubled_floors(prepared, floor_train, floors, base)
    lap("doubled_steps")
    guard = protocol.guard_sensitivity(prepared, sizes, guard_eps_grid, train, lrs, base)
    lap("guard_eps")
    sweeps = [
        protocol.alpha_sweep(prepared, s, alphas, alpha_n, seed_list, _rdro_train(train, lrs, s), base)
        for s in alpha_settings
        if s in prepared.settings
    ]
    lap("alpha_sweep")
    long = story.excess_long(runs, floors)
    convergence = story.convergence_table(runs, doubled, floors, doubled_floors)
    limits = story.limits(long, convergence, lrs)
    consistency = story.consistency_table(runs, floors)
    excess = story.excess_summary(consistency)
    falls = story.falls(long, limits, convergence, lrs)
    lap("intervals")
    one_over_alpha = {
        name: 1 / m.knobs["alpha"]
        for name, setting in prepared.settings.items()
        for m in experiment.lm_methods(setting)
        if "alpha" in m.knobs and m.knobs.get("reduction", "per_class") == "per_class"  # RDRO: its target <= 1/alpha
    }
    return StudyResult(
        floor_lr,
        floors,
        story.lr_table(grid, floors),
        runs,
        curves,
        consistency,
        excess,
        limits,
        convergence,
        falls,
        story.guard_table(guard, floors),
        pd.concat(sweeps, ignore_index=True) if sweeps else pd.DataFrame(),
        pd.DataFrame({"step": list(clock), "seconds": list(clock.values())}),
        one_over_alpha,
        experiment.reference_summary(prepared),
    )


def _rdro_train(train: TrainSettings, lrs: dict[tuple[str, str], float], setting: str) -> TrainSettings:
    """The alpha sweep's optimiser: per-class RDRO's chosen rate in ``setting``."""
    rate = next(lr for (s, m), lr in lrs.items() if s == setting and m.startswith("RDRO") and "flat" not in m)
    return TrainSettings(lr=rate, steps=train.steps, warmup=train.warmup, rank=train.rank)


def save_study(result: StudyResult, out: Path, stamp: dict, curve_n: int, model: str) -> None:
    """Write every table and figure of ``result`` under ``out`` (``model`` names the LM in the figures' titles)."""
    tables = {
        "excess": result.excess,
        "falls": result.falls,
        "limits": result.limits,
        "lr_grid": result.lr_grid,
        "convergence": result.convergence,
        "guard_eps": result.guard,
        "runs": result.runs,
        "floors": result.floors,
        "floor_lr": result.floor_lr,
        "alpha_sweep": result.sweep,
        "timing": result.timing,
        "reference": result.reference,
    }
    save_table(result.consistency, out / "consistency", stamp, markdown=False)
    save_table(result.curves, out / "curves", stamp, markdown=False)
    for name, table in tables.items():
        save_table(table, out / name, stamp)
    for setting in result.excess["setting"].unique():
        figure = plots.plot_consistency(result.excess, result.falls, result.limits, setting, model)
        setting_stamp = stamp | {"params": stamp["params"] | {"setting": setting}}
        save_figure(figure, out / f"consistency_{setting}.png", setting_stamp)
    curves = plots.plot_training_curves(result.curves, curve_n, result.one_over_alpha)
    save_figure(curves, out / "training_curves.png", stamp)
    if not result.sweep.empty:
        save_figure(plots.plot_alpha_sweep(result.sweep), out / "alpha_sweep.png", stamp)
