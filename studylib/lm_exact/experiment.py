"""The answer-set study's runs: prepare the model's features once, then the pilot, the floors, every method at every
size and seed, and RDRO's alpha sweep. Each function returns tables; ``studies.py`` saves them.

A run trains a fresh adapter (drawn with the run's seed) on the first ``n`` rows of seed ``seed``'s data stream,
with the registry loss built by ``build_loss`` for that data set, and measures ``KL(target || pi_theta)`` exactly
on the training and the held-out prompts. The floor of (setting, seed) is the same adapter, same seed, fitted to
the exact target of the training prompts (``floor_objective``); a method's excess KL is its KL minus the floor's on
the same prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from torch import Tensor

from studylib.lm_exact.candidates import category_ids
from studylib.lm_exact.features import AnswerFeatures, load_answer_model, prompt_features
from studylib.lm_exact.objectives import Objective, floor_objective, loss_objective
from studylib.lm_exact.policy import reference_log_probs
from studylib.lm_exact.prompts import load_candidates, load_prompts
from studylib.lm_exact.targets import LMSetting, lm_setting
from studylib.lm_exact.train import TrainSettings, policy_log_probs, train_policy
from studylib.losses import LOSSES, build_loss
from studylib.toy.problems import forward_kl
from studylib.toy.sweeps import Method, default_methods


@dataclass
class Prepared:
    """Everything computed once: prompts, features and reference log-probs per split, and the settings."""

    prompts: pd.DataFrame
    features: dict[str, AnswerFeatures]
    log_ref: dict[str, Tensor]
    settings: dict[str, LMSetting]
    seconds: dict[str, float]


def prepare(
    model_name: str,
    prompts_path: str,
    candidates_path: str,
    settings: Sequence[str],
    bf16: bool = False,
    problem_seed: int = 0,
) -> Prepared:
    """Load the model, check the candidates are single tokens, cache the frozen features, build the settings."""
    start = time.perf_counter()
    model, tokenizer = load_answer_model(model_name)
    prompts, candidates = load_prompts(prompts_path), load_candidates(candidates_path)
    ids = category_ids(tokenizer, candidates, prompts.groupby("category")["prompt"].apply(list).to_dict())
    loaded = time.perf_counter()
    features = prompt_features(model, tokenizer, prompts["prompt"].tolist(), prompts["category"].tolist(), ids, bf16)
    cached = time.perf_counter()
    groups = prompts["category"].map({c: i for i, c in enumerate(candidates)}).to_numpy()
    split = {s: np.flatnonzero(prompts["split"].to_numpy() == s) for s in ("train", "heldout")}
    feats = {s: features.subset(index) for s, index in split.items()}
    log_ref = {s: reference_log_probs(f) for s, f in feats.items()}
    built = {
        name: lm_setting(
            name,
            log_ref["train"].numpy(),
            groups[split["train"]],
            log_ref["heldout"].numpy(),
            groups[split["heldout"]],
            problem_seed,
        )
        for name in settings
    }
    seconds = {"load_model": loaded - start, "cache_features": cached - loaded}
    return Prepared(prompts, feats, log_ref, built, seconds)


def lm_methods(setting: LMSetting) -> list[Method]:
    """The toy's methods of the setting (``default_methods``), less those that tune a knob per n by an oracle
    (RLHF and DPO in S3: eight runs per point), plus DPO at the toy's beta = 1 in S3 as its inconsistent baseline."""
    methods = [m for m in default_methods(setting.categories) if m.tune is None]
    if setting.name == "S3":
        methods.append(Method("DPO (beta=1)", "dpo", {"beta": 1.0}))
    return methods


def data_fraction(setting: LMSetting, rows: dict[str, np.ndarray]) -> float:
    """Preferred fraction of a data set's unpaired view (1/2 for pairs)."""
    return 0.5 if setting.train.kind == "paired" else float(np.mean(rows["label"]))


def method_objective(prepared: Prepared, setting: LMSetting, method: Method, n: int, seed: int) -> Objective:
    """The registry loss of ``method`` on the first ``n`` rows of seed ``seed``, built for that data set."""
    rows = setting.rows(n, seed)
    loss = build_loss(method.loss, dict(method.knobs), data_fraction(setting, rows))
    rewards = setting.reward_table(rows) if loss.needs_reward_model else None
    return loss_objective(loss, setting.train, rows, prepared.log_ref["train"], rewards)


def evaluate(prepared: Prepared, setting: LMSetting, policy) -> dict[str, float]:
    """Exact ``KL(target || pi_theta)`` on the training and the held-out prompts."""
    problems = {"train": setting.train, "heldout": setting.heldout}
    return {
        split: float(forward_kl(problems[split].target, policy_log_probs(policy, prepared.features[split]).numpy()))
        for split in problems
    }


def fit(
    prepared: Prepared, setting: LMSetting, objective: Objective, train: TrainSettings, seed: int
) -> tuple[dict[str, float], pd.DataFrame]:
    """Train on ``objective``; the exact KLs with a summary of the run's log, and the log itself."""
    policy, curve, seconds = train_policy(prepared.features["train"], prepared.log_ref["train"], objective, train, seed)
    kls = evaluate(prepared, setting, policy)
    tail = curve["loss"].iloc[-max(2, len(curve) // 10) :]
    summary = {
        "kl_train": kls["train"],
        "kl_heldout": kls["heldout"],
        "seconds": seconds,
        "grad_norm_max": curve["grad_norm"].max(),
        "ratio_max": curve["ratio_max"].max(),
        "guard_total": int(curve["guard"].sum()),
        "loss_final": tail.iloc[-1],
        "loss_change_last_tenth": tail.iloc[-1] - tail.iloc[0],
    }
    return summary, curve


def pilot(prepared: Prepared, lr_grid: Sequence[float], train: TrainSettings, seed: int = 0) -> pd.DataFrame:
    """The learning-rate pilot: at each rate, the floor of every setting (the exact target fitted directly, no
    method involved); columns setting, lr, kl_train, kl_heldout, seconds."""
    rows = []
    for name, setting in prepared.settings.items():
        for lr in lr_grid:
            summary, _ = fit(prepared, setting, floor_objective(setting.train.target), replace(train, lr=lr), seed)
            rows.append({"setting": name, "lr": lr} | {k: summary[k] for k in ("kl_train", "kl_heldout", "seconds")})
    return pd.DataFrame(rows)


def choose_lr(pilot_table: pd.DataFrame) -> float:
    """The rate whose floors fit best: the smallest mean over settings of log KL on the training prompts."""
    score = np.log(pilot_table["kl_train"].clip(lower=1e-12)).groupby(pilot_table["lr"]).mean()
    return float(score.idxmin())


def floors(prepared: Prepared, seeds: Sequence[int], train: TrainSettings) -> pd.DataFrame:
    """Each (setting, seed)'s floor: columns setting, seed, kl_train, kl_heldout, seconds."""
    rows = []
    for name, setting in prepared.settings.items():
        for seed in seeds:
            summary, _ = fit(prepared, setting, floor_objective(setting.train.target), train, seed)
            rows.append(
                {"setting": name, "seed": seed} | {k: summary[k] for k in ("kl_train", "kl_heldout", "seconds")}
            )
    return pd.DataFrame(rows)


def method_runs(
    prepared: Prepared, sizes: Sequence[int], seeds: Sequence[int], train: TrainSettings, curve_seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method of every setting at every size and seed: one row per run (``fit``'s summary), and the per-step
    logs of the runs with seed ``curve_seed``."""
    runs, curves = [], []
    for name, setting in prepared.settings.items():
        for method in lm_methods(setting):
            for seed in seeds:
                for n in sizes:
                    objective = method_objective(prepared, setting, method, n, seed)
                    summary, curve = fit(prepared, setting, objective, train, seed)
                    key = {"setting": name, "method": method.label, "n": n, "seed": seed}
                    runs.append(key | summary)
                    if seed == curve_seed:
                        curves.append(curve.assign(**key))
    return pd.DataFrame(runs), pd.concat(curves, ignore_index=True)


def consistency_table(runs: pd.DataFrame, floor_table: pd.DataFrame) -> pd.DataFrame:
    """``setting, method, n, seed, split, kl, floor_kl``: every run's exact KL on each split beside its floor's."""
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
    return table.sort_values(["setting", "method", "split", "n", "seed"], kind="stable").reset_index(drop=True)


def alpha_sweep(
    prepared: Prepared, setting_name: str, alphas: Sequence[float], n: int, seeds: Sequence[int], train: TrainSettings
) -> pd.DataFrame:
    """Per-class RDRO at each alpha on ``setting_name`` (n rows, every seed): columns setting, alpha, n, seed,
    preferred_fraction (of the data), kl_train, kl_heldout, ratio_max."""
    setting, rows = prepared.settings[setting_name], []
    for alpha in alphas:
        method = Method(f"RDRO (alpha={alpha:g})", "rdro", {"alpha": alpha, "reduction": "per_class"})
        for seed in seeds:
            summary, _ = fit(prepared, setting, method_objective(prepared, setting, method, n, seed), train, seed)
            fraction = data_fraction(setting, setting.rows(n, seed))
            rows.append(
                {"setting": setting_name, "alpha": alpha, "n": n, "seed": seed, "preferred_fraction": fraction}
                | {k: summary[k] for k in ("kl_train", "kl_heldout", "ratio_max")}
            )
    return pd.DataFrame(rows)


def loss_kinds(prepared: Prepared) -> pd.DataFrame:
    """What each method of each setting trains on, read from its loss's declarations."""
    rows = []
    for name, setting in prepared.settings.items():
        for method in lm_methods(setting):
            cls = LOSSES[method.loss]
            knobs = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in method.knobs.items())
            rows.append(
                {"setting": name, "method": method.label, "loss": method.loss, "kind": cls.kind, "knobs": knobs}
            )
    return pd.DataFrame(rows)


def slower_runs(
    prepared: Prepared,
    setting_name: str,
    method_prefix: str,
    sizes: Sequence[int],
    seeds: Sequence[int],
    train: TrainSettings,
    factor: float,
) -> pd.DataFrame:
    """A method rerun at the learning rate divided by ``factor`` for ``factor`` times the steps (is its result the
    optimiser's or the estimator's?); columns setting, method, n, seed, lr, steps and ``fit``'s summary."""
    setting = prepared.settings[setting_name]
    slow = replace(train, lr=train.lr / factor, steps=int(round(train.steps * factor)))
    rows = []
    for method in (m for m in lm_methods(setting) if m.label.startswith(method_prefix)):
        for seed in seeds:
            for n in sizes:
                summary, _ = fit(prepared, setting, method_objective(prepared, setting, method, n, seed), slow, seed)
                key = {"setting": setting_name, "method": method.label, "n": n, "seed": seed}
                rows.append(key | {"lr": slow.lr, "steps": slow.steps} | summary)
    return pd.DataFrame(rows)


def reference_summary(prepared: Prepared) -> pd.DataFrame:
    """Per setting and split: prompts, the reference's mean entropy over the candidates, and how far the target is
    from the reference, ``KL(target || pi_ref)`` (what training has to cover)."""
    rows = []
    for name, setting in prepared.settings.items():
        for split, problem in (("train", setting.train), ("heldout", setting.heldout)):
            ref = prepared.log_ref[split].numpy()
            rows.append(
                {
                    "setting": name,
                    "split": split,
                    "prompts": problem.contexts,
                    "candidates": problem.items,
                    "entropy_ref": float(-(np.exp(ref) * ref).sum(1).mean()),
                    "kl_target_ref": float(forward_kl(problem.target, ref)),
                    "preferred_fraction": problem.preferred_fraction,
                }
            )
    return pd.DataFrame(rows)
