"""One language-model run, step by step: load, data, loss, train, evaluate, save (notebook 04 calls these).

This module says the steps and routes the training; each step lives with what it is about (the model in
``models``, the data in ``preferences``, the reference in ``reference``, the reward model and its cache in
``reward``, evaluation in ``evaluate``, the record and the saved run in ``export``) and is named here, so a notebook
can tell the story between them and ``run_experiment`` can do the whole thing (``python -m studylib train --params
run.json``, which ``accelerate launch`` can start on several GPUs)::

    runtime = make_runtime(config.train.bf16)      # the one owner: device, processes, precision (bf16: auto)
    model, tokenizer = load_policy(config, runtime)  # on runtime.device
    data = load_preferences(config, model, tokenizer, pool, runtime)
    loss_fn = build_run_loss(config, data)          # built once; alpha="auto" resolved here
    plan = plan_training(loss_fn, config.online)    # which trainer and rows: the loss's family and declarations
    claim_run(config)                               # refused if the folder holds other knobs, or is in use
    reference = separate_reference(config, model)  # None under LoRA: the adapters are disabled instead
    curve = curve_probe_for(config, model, tokenizer, data, pool, reference, runtime)  # None: curve_every 0
    policy, history, info = train_policy(config, loss_fn, plan, model, tokenizer, data, reference, runtime, curve)
    summary, samples = evaluate_policy(config, policy, tokenizer, data, pool, reference, runtime)
    save_run(config, run_record(...), curves_frame(history), samples, policy, tokenizer)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from studylib.families import family_of
from studylib.lm.annotators import AnnotatorPool
from studylib.lm.config import RunConfig, TrainConfig
from studylib.lm.curves import PREFIX, CurveProbe, curve_probe_for
from studylib.lm.evaluate import evaluate_policy
from studylib.lm.export import curves_frame, run_record, save_run
from studylib.lm.models import load_policy
from studylib.lm.online import train_online
from studylib.lm.preferences import (
    PreferenceData,
    check_batches_fit,
    load_preferences,
    tokenized_pairs,
    tokenized_reward_pairs,
    unique_prompt_ids,
)
from studylib.lm.reference import separate_reference
from studylib.lm.reward import attach_reward_margins, reward_model_for
from studylib.lm.runs import claim_run, release_run
from studylib.lm.runtime import Runtime, describe_precision, make_runtime
from studylib.lm.trainer import train
from studylib.losses import Loss, build_loss


@dataclass(frozen=True)
class TrainingPlan:
    """How a loss is trained, read from what it declares (``plan_training``)."""

    trainer: str  # "offline" (transformers' Trainer on the data set) | "online" (studylib.lm.online)
    rows: str  # "paired" | "unpaired" | "prompts": what the data set gives the trainer
    reward_model: bool  # fit a Bradley-Terry reward model on the data set's pairs first
    pair_rows: bool  # the online trainer steps over data-set pairs (a KL term samples the policy)


def plan_training(loss_fn: Loss, online: bool = False) -> TrainingPlan:
    """The routing of a run, from the loss's family (``studylib.families``) and declarations alone.

    - a family that samples prompts (on-policy), or ``online`` (pairs sampled from the policy, labelled by the
      reward model): the on-policy trainer on prompts;
    - a KL term (``kl_coefficient > 0``, as PMLE's and distillation's ``beta``): the on-policy trainer on the
      data set's pairs, sampling the policy for the KL estimate;
    - otherwise the offline trainer on the rows of the loss's family.
    """
    if online and not loss_fn.needs_reward_model:
        raise ValueError(
            f"online=True samples pairs from the policy and labels them with a reward model; {loss_fn.name} "
            "uses no reward model (set online: false)"
        )
    family = family_of(loss_fn)
    sampled = family.samples_prompts or online
    trainer = "online" if sampled or loss_fn.kl_coefficient > 0 else "offline"
    return TrainingPlan(
        trainer=trainer,
        rows="prompts" if sampled else family.kind,
        reward_model=loss_fn.needs_reward_model,
        pair_rows=trainer == "online" and not sampled,
    )


def build_run_loss(config: RunConfig, data: PreferenceData) -> Loss:
    """The run's loss, built once: ``alpha="auto"`` and per-class reductions take the training set's preferred
    fraction (a loss on labelled rows needs both classes)."""
    return build_loss(config.loss, config.loss_kwargs, data.preferred_fraction)


def train_policy(
    config: RunConfig,
    loss_fn: Loss,
    plan: TrainingPlan,
    model,
    tokenizer,
    data: PreferenceData,
    reference_model: nn.Module | None = None,
    runtime: Runtime | None = None,
    curve: CurveProbe | None = None,
):
    """Train with the trainer ``plan`` names; returns (policy, per-step history, what to report).

    ``reference_model``: the separate frozen reference of a full fine-tuning run (``separate_reference``; the
    trainers copy ``model`` if None); LoRA runs use the policy's disabled adapters. ``runtime``: the run's device,
    processes and precision (``studylib.lm.runtime``; made from the config if None), handed to every step.
    ``curve``: the run's evaluation during training (``studylib.lm.curves.curve_probe_for``), or None.
    """
    runtime = runtime if runtime is not None else make_runtime(config.train.bf16)
    info: dict[str, Any] = {"trainer": plan.trainer}
    family = family_of(loss_fn)
    on_data_pairs = plan.rows != "prompts" and family.uses_pairs  # trains on the data set's pairs
    pair_rows = None
    if on_data_pairs:
        pair_rows, counts = tokenized_pairs(config, data, tokenizer, loss_fn)
        info.update({f"pairs/{k}": v for k, v in counts.items()})
    reward_model = None
    if plan.reward_model:
        reward_rows, _ = tokenized_reward_pairs(config, data, tokenizer)
        reward_model, reward_info = reward_model_for(config, model, tokenizer, reward_rows, runtime)
        info.update(reward_info)
        if on_data_pairs:  # soft labels from the reward model on the data set's pairs
            pair_rows = attach_reward_margins(reward_model, pair_rows)
    out = config.checkpoint_dir()
    if plan.trainer == "offline":
        rows, counts = family.data_rows(data, tokenizer, config.data, pair_rows)
        info.update(counts)
        per_step = config.train.batch_size * config.train.gradient_accumulation_steps * runtime.num_processes
        info.update(epochs_covered(config.train, len(rows), per_step))
        trainer = train(model, tokenizer, rows, loss_fn, config.train, out, reference_model, runtime, curve)
        logged = [e for e in trainer.state.log_history if "loss" in e or any(k.startswith(PREFIX) for k in e)]
        return trainer.model, logged, info
    prompt_ids = unique_prompt_ids(data, tokenizer) if plan.rows == "prompts" else None
    steps_over = prompt_ids if prompt_ids is not None else pair_rows
    info.update(epochs_covered(config.train, len(steps_over), config.train.prompts_per_step * runtime.num_processes))
    policy, history = train_online(
        model,
        tokenizer,
        loss_fn,
        config.train,
        prompt_ids=prompt_ids,
        reward_fn=reward_model.score if reward_model is not None and plan.rows == "prompts" else None,
        pair_rows=pair_rows if plan.pair_rows else None,
        output_dir=out,
        reference_model=reference_model,
        runtime=runtime,
        curve=curve,
    )
    return policy, history, info


def epochs_covered(config: TrainConfig, training_rows: int, rows_per_step: int) -> dict[str, float]:
    """How many times the run's steps cover its training rows (prompts, for on-policy training): ``epochs``."""
    steps = (
        config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * training_rows / rows_per_step)
    )
    return {
        "training_rows": training_rows,
        "rows_per_step": rows_per_step,
        "epochs": steps * rows_per_step / training_rows,
    }


def timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the seconds it took."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def run_experiment(config: RunConfig) -> dict:
    """The whole run, as notebook 04 tells it step by step; returns the saved record.

    Everything that can be checked is checked before the run's folder is touched: the config
    (``RunConfig.from_flat``), the data (not empty, evaluation prompts held out) and the loss's knobs; then
    the main process claims the folder (``runs.claim_run``: refused if it holds other knobs or another live
    process holds it). Under ``accelerate launch`` (several GPUs) every process trains; only the main process
    evaluates and saves.
    """
    runtime = make_runtime(config.train.bf16)
    main_process = runtime.is_main_process
    if main_process:
        print(f"device {runtime.device}, {runtime.num_processes} process(es); {describe_precision(runtime)}")
    model, tokenizer = load_policy(config, runtime)
    pool = AnnotatorPool(seed=0)
    data = load_preferences(config, model, tokenizer, pool, runtime)
    loss_fn = build_run_loss(config, data)
    plan = plan_training(loss_fn, config.online)
    check_batches_fit(config, data, plan, family_of(loss_fn))
    if main_process:
        claim_run(config)
    runtime.wait_for_everyone()  # no process writes into the folder before the main process has claimed it
    try:
        reference = separate_reference(config, model)
        curve = curve_probe_for(config, model, tokenizer, data, pool, reference, runtime)
        (policy, history, info), train_seconds = timed(
            train_policy, config, loss_fn, plan, model, tokenizer, data, reference, runtime, curve
        )
        if not main_process:
            return {}
        (summary, samples), eval_seconds = timed(
            evaluate_policy, config, policy, tokenizer, data, pool, reference, runtime
        )
        curves = curves_frame(history)
        seconds = {"train": train_seconds, "eval": eval_seconds}
        record = run_record(config, loss_fn, data, curves, info, summary, seconds, runtime)
        save_run(config, record, curves, samples, policy, tokenizer)
        return record
    finally:
        if main_process:
            release_run(config)
