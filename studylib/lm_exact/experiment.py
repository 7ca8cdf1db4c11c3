"""The answer-set study's building blocks: prepare the model's features once, then single runs (a method on a data
set, or on its population) and the floors. ``protocol.py`` strings them into the study.

A run trains a fresh adapter (drawn with its own ``init_seed``) on the first ``n`` rows of data seed ``seed``'s
stream, or on the population risk (``n = None``: the method's infinite-data limit), with the registry loss built by
``build_loss`` for that data set, and measures ``KL(target || pi_theta)`` exactly on the training and the held-out
prompts. The floor of (setting, seed) is the same adapter, same init seed, fitted to the exact target of the
training prompts (``floor_objective``); a method's excess KL is its KL minus the floor's on the same prompts.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from studylib.lm_exact.candidates import category_ids
from studylib.lm_exact.features import AnswerFeatures, load_answer_model, prompt_features
from studylib.lm_exact.objectives import (
    DataCells,
    Objective,
    floor_objective,
    loss_objective,
    population_cells,
    sample_cells,
)
from studylib.lm_exact.policy import AnswerSetPolicy, reference_log_probs
from studylib.lm_exact.prompts import load_candidates, load_prompts
from studylib.lm_exact.targets import LMSetting, lm_setting
from studylib.lm_exact.train import TrainSettings, objective_value, policy_log_probs, train_policy
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


def frozen_pass_precision(bf16: bool | str) -> tuple[bool, str]:
    """Whether the one frozen forward pass (on the CPU: ``features.answer_features``) runs under bf16 autocast, and
    why: True or False as given; "auto" bf16 only where this CPU runs it natively, the rule of the LM runs'
    ``bf16: auto`` (``studylib.lm.runtime.choose_precision``)."""
    from studylib.lm.runtime import choose_precision

    return choose_precision(bf16, torch.device("cpu"))


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


def lm_methods(setting: LMSetting, guard_eps: float = 1e-2) -> list[Method]:
    """The toy's methods of the setting (``default_methods``), less those that tune a knob per n by an oracle
    (RLHF and DPO in S3: eight runs per point), plus DPO at the toy's beta = 1 in S3 as its inconsistent baseline.
    A loss with a guard at a pole (DDRO) gets ``guard_eps``, the guard's knob (this repository's, not the paper's:
    ``studylib.losses.DDRO``)."""
    methods = []
    for m in default_methods(setting.categories):
        if m.tune is None:
            methods.append(Method(m.label, m.loss, dict(m.knobs) | {"guard_eps": guard_eps}) if has_guard(m) else m)
    if setting.name == "S3":
        methods.append(Method("DPO (beta=1)", "dpo", {"beta": 1.0}))
    return methods


def has_guard(method: Method) -> bool:
    """Whether ``method``'s loss takes a guard at a pole (``guard_eps``: DDRO's)."""
    return "guard_eps" in inspect.signature(LOSSES[method.loss]).parameters


def data_cells(setting: LMSetting, n: int | None, seed: int) -> DataCells:
    """The first ``n`` rows of data seed ``seed``'s stream on the training prompts (nested in ``n``), as counts; the
    population's expected counts when ``n`` is None."""
    return population_cells(setting.train) if n is None else sample_cells(setting.train, setting.rows(n, seed))


def method_objective(prepared: Prepared, setting: LMSetting, method: Method, data: DataCells) -> Objective:
    """The registry loss of ``method`` on ``data``, built for that data set (its preferred fraction, its reward
    model fitted on its pairs)."""
    loss = build_loss(method.loss, dict(method.knobs), data.preferred_fraction)
    rewards = setting.reward_table(data.counts) if loss.needs_reward_model else None
    return loss_objective(loss, setting.train, data, prepared.log_ref["train"], rewards)


def evaluate(prepared: Prepared, setting: LMSetting, policy) -> dict[str, float]:
    """Exact ``KL(target || pi_theta)`` on the training and the held-out prompts."""
    problems = {"train": setting.train, "heldout": setting.heldout}
    return {
        split: float(forward_kl(problems[split].target, policy_log_probs(policy, prepared.features[split]).numpy()))
        for split in problems
    }


def fit(
    prepared: Prepared, setting: LMSetting, objective: Objective, train: TrainSettings, init_seed: int
) -> tuple[dict[str, float], pd.DataFrame]:
    """Train on ``objective``; the exact KLs, the final training objective and a summary of the run's log, and the
    log itself."""
    features = prepared.features["train"]
    policy, curve, seconds = train_policy(features, prepared.log_ref["train"], objective, train, init_seed)
    kls = evaluate(prepared, setting, policy)
    summary = {
        "kl_train": kls["train"],
        "kl_heldout": kls["heldout"],
        "objective": objective_value(objective, policy, features),
        "seconds": seconds,
        "grad_norm_max": curve["grad_norm"].max(),
        "ratio_max": curve["ratio_max"].max(),
        "guard_total": int(curve["guard"].sum()),
    }
    return summary, curve


def method_run(
    prepared: Prepared,
    setting: LMSetting,
    method: Method,
    n: int | None,
    seed: int,
    train: TrainSettings,
    init_seed: int,
) -> tuple[dict, pd.DataFrame]:
    """One method on one data set (``n`` rows of data seed ``seed``; ``n = None``: the population): the run's row
    (setting, method, n, seed, init_seed, lr, steps and ``fit``'s summary) and its per-step log."""
    objective = method_objective(prepared, setting, method, data_cells(setting, n, seed))
    summary, curve = fit(prepared, setting, objective, train, init_seed)
    key = {"setting": setting.name, "method": method.label, "n": n, "seed": seed, "init_seed": init_seed}
    return key | {"lr": train.lr, "steps": train.steps} | summary, curve


def floor_run(prepared: Prepared, setting: LMSetting, seed: int, train: TrainSettings, init_seed: int) -> dict:
    """The floor of (setting, seed): the adapter fitted to the exact target; setting, seed, init_seed, lr, steps,
    kl_train, kl_heldout, seconds."""
    summary, _ = fit(prepared, setting, floor_objective(setting.train.target), train, init_seed)
    key = {"setting": setting.name, "seed": seed, "init_seed": init_seed, "lr": train.lr, "steps": train.steps}
    return key | {k: summary[k] for k in ("kl_train", "kl_heldout", "seconds")}


def loss_kinds(prepared: Prepared, guard_eps: float = 1e-2) -> pd.DataFrame:
    """What each method of each setting trains on, read from its loss's declarations."""
    rows = []
    for name, setting in prepared.settings.items():
        for method in lm_methods(setting, guard_eps):
            cls = LOSSES[method.loss]
            knobs = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in method.knobs.items())
            rows.append(
                {"setting": name, "method": method.label, "loss": method.loss, "kind": cls.kind, "knobs": knobs}
            )
    return pd.DataFrame(rows)


def adapter_size(prepared: Prepared, lora_r: int) -> str:
    """One sentence: the adapter's trainable parameters (``AnswerSetPolicy`` of rank ``lora_r``) against the
    (prompt, candidate) cells of the training prompts, the data's degrees of freedom."""
    policy = AnswerSetPolicy.for_features(prepared.features["train"], r=lora_r)
    parameters = sum(p.numel() for p in policy.parameters())
    prompts, candidates = prepared.features["train"].head.shape[:2]
    return (
        f"The adapter (rank {lora_r}) has {parameters:,} trainable parameters for {prompts * candidates:,} training "
        f"cells ({prompts} prompts x {candidates} candidates)."
    )


def reference_summary(prepared: Prepared) -> pd.DataFrame:
    """Per setting and split: prompts, the reference's mean entropy over the candidates, how far the target is
    from the reference, ``KL(target || pi_ref)`` (what training has to cover), and the largest target ratio
    ``target / pi_ref`` (DDRO's - loss has its pole at 2)."""
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
                    "target_ratio_max": float((problem.target / np.exp(ref)).max()),
                    "preferred_fraction": problem.preferred_fraction,
                }
            )
    return pd.DataFrame(rows)
