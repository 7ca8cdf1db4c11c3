"""Notebook 06's steps: run the answer-set study and write its tables and figures through ``studylib.results``
(atomic, stamped), so the notebook holds only the story.

Written to ``out_dir``: ``consistency.csv`` (``setting, method, n, seed, split, kl, floor_kl``), ``excess`` (seed
means per n), ``falls`` (the claims' table), ``runs`` (one row per training run: KLs, seconds, largest gradient norm
and ratio, guard activations, convergence), ``floors``, ``pilot``, ``curves`` (every step of the ``curve_seed``
runs), ``alpha_sweep``, ``timing``; figures ``consistency_<setting>.png``, ``training_curves.png``,
``alpha_sweep.png``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from studylib.lm_exact import experiment, plots, story
from studylib.lm_exact.train import TrainSettings
from studylib.results import save_figure, save_table


@dataclass
class StudyResult:
    """The tables of one execution of the study."""

    lr: float
    pilot: pd.DataFrame
    floors: pd.DataFrame
    runs: pd.DataFrame
    curves: pd.DataFrame
    consistency: pd.DataFrame
    excess: pd.DataFrame
    falls: pd.DataFrame
    sweep: pd.DataFrame
    timing: pd.DataFrame
    one_over_alpha: dict[str, float]
    slower: pd.DataFrame


def run_study(
    prepared: experiment.Prepared,
    *,
    sizes: Sequence[int],
    seeds: int,
    lr_grid: Sequence[float],
    steps: int,
    floor_steps: int,
    lora_r: int,
    alphas: Sequence[float],
    alpha_settings: Sequence[str],
    alpha_n: int,
    slower: tuple[str, str, float] | None = None,
) -> StudyResult:
    """The pilot (choosing the one learning rate), the floors, every method x size x seed, the alpha sweep, and
    ``slower = (setting, method prefix, factor)``: that method rerun at the rate / factor for factor x the steps, at
    the smallest and largest n, seed 0."""
    clock = dict(prepared.seconds)
    start = time.perf_counter()
    pilot = experiment.pilot(prepared, lr_grid, TrainSettings(steps=steps, rank=lora_r))
    lr = experiment.choose_lr(pilot)
    train = TrainSettings(lr=lr, steps=steps, rank=lora_r)
    clock["pilot"], start = time.perf_counter() - start, time.perf_counter()
    seed_list = list(range(seeds))
    floors = experiment.floors(prepared, seed_list, TrainSettings(lr=lr, steps=floor_steps, rank=lora_r))
    clock["floors"], start = time.perf_counter() - start, time.perf_counter()
    runs, curves = experiment.method_runs(prepared, sizes, seed_list, train)
    clock["method_runs"], start = time.perf_counter() - start, time.perf_counter()
    sweeps = [
        experiment.alpha_sweep(prepared, s, alphas, alpha_n, seed_list, train)
        for s in alpha_settings
        if s in prepared.settings
    ]
    clock["alpha_sweep"], start = time.perf_counter() - start, time.perf_counter()
    slow = pd.DataFrame()
    if slower is not None:
        setting, prefix, factor = slower
        slow = experiment.slower_runs(prepared, setting, prefix, [min(sizes), max(sizes)], [0], train, factor)
        clock["slower_runs"] = time.perf_counter() - start
    consistency = experiment.consistency_table(runs, floors)
    excess = story.excess_summary(consistency)
    timing = pd.DataFrame({"step": list(clock), "seconds": list(clock.values())})
    one_over_alpha = {
        name: 1 / m.knobs["alpha"]
        for name, setting in prepared.settings.items()
        for m in experiment.lm_methods(setting)
        if "alpha" in m.knobs and m.knobs.get("reduction", "per_class") == "per_class"  # RDRO: its target <= 1/alpha
    }
    sweep = pd.concat(sweeps, ignore_index=True) if sweeps else pd.DataFrame()
    falls = story.falls(excess)
    return StudyResult(lr, pilot, floors, runs, curves, consistency, excess, falls, sweep, timing, one_over_alpha, slow)


def save_study(result: StudyResult, out: Path, stamp: dict, curve_n: int, model: str) -> None:
    """Write every table and figure of ``result`` under ``out`` (``model`` names the LM in the figures' titles)."""
    tables = {
        "excess": result.excess,
        "falls": result.falls,
        "runs": result.runs,
        "floors": result.floors,
        "pilot": result.pilot,
        "alpha_sweep": result.sweep,
        "timing": result.timing,
        "slower_runs": result.slower,
    }
    save_table(result.consistency, out / "consistency", stamp, markdown=False)
    save_table(result.curves, out / "curves", stamp, markdown=False)
    for name, table in tables.items():
        save_table(table, out / name, stamp)
    for setting in result.excess["setting"].unique():
        slower = story.slower_excess(result.slower, result.floors)
        figure = plots.plot_consistency(result.excess, result.falls, setting, model, slower)
        setting_stamp = stamp | {"params": stamp["params"] | {"setting": setting}}
        save_figure(figure, out / f"consistency_{setting}.png", setting_stamp)
    curves = plots.plot_training_curves(result.curves, curve_n, result.one_over_alpha)
    save_figure(curves, out / "training_curves.png", stamp)
    if not result.sweep.empty:
        save_figure(plots.plot_alpha_sweep(result.sweep), out / "alpha_sweep.png", stamp)
