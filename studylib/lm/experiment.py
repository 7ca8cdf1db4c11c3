"""One language-model run, step by step: load, data, loss, train, evaluate, save (notebook 04 calls these).

One path from a ``RunConfig`` to a result, each step a plain function so a notebook can tell the story between
them and ``run_experiment`` can do the whole thing (``python -m studylib train --params run.json``, which
``accelerate launch`` can start on several GPUs)::

    runtime = make_runtime(config.train.bf16)      # the one owner: device, processes, precision (bf16: auto)
    model, tokenizer = load_policy(config, runtime)  # on runtime.device
    data = load_preferences(config, model, tokenizer, pool, runtime)
    loss_fn = build_run_loss(config, data)          # built once; alpha="auto" resolved here
    plan = plan_training(loss_fn, config.online)    # which trainer and rows, from what the loss declares
    claim_run(config)                               # refused if the folder holds other knobs, or is in use
    reference = separate_reference(config, model)  # None under LoRA: the adapters are disabled instead
    policy, history, info = train_policy(config, loss_fn, plan, model, tokenizer, data, reference, runtime)
    summary, samples = evaluate_policy(config, policy, tokenizer, data, pool, reference, runtime)
    save_run(config, run_record(...), curves_frame(history), samples, policy, tokenizer)
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from torch import nn

from studylib.checks import UserError
from studylib.families import family_of
from studylib.lm.annotators import AnnotatorPool
from studylib.lm.config import RunConfig
from studylib.lm.data import (
    count_duplicates,
    encode_prompt,
    load_named,
    paired_to_unpaired,
    prompt_key,
    split_by_prompt,
    tokenize_paired,
    tokenize_unpaired,
)
from studylib.lm.evaluate import evaluate, write_alpaca_eval_outputs
from studylib.lm.export import save_trained_model
from studylib.lm.models import cache_root, load_model
from studylib.lm.online import train_online
from studylib.lm.reference import autocast_context, frozen_copy
from studylib.lm.reward import attach_reward_margins, load_reward_model, reward_accuracy, train_reward_model
from studylib.lm.runs import claim_run, release_run, run_flags
from studylib.lm.runtime import Runtime, make_runtime
from studylib.lm.synth import build_offline_preferences
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm.trainer import train
from studylib.losses import Loss, build_loss
from studylib.report import plot_run_curves, run_title
from studylib.results import save_figure, save_json, save_table

PAIRED_DATASETS = ("ufb",)


@dataclass
class PreferenceData:
    """Training data in canonical form, evaluation prompts, and what to report about them."""

    unpaired: Any  # datasets.Dataset
    paired: Any  # datasets.Dataset or None (unpaired-only data sets)
    eval_prompts: list
    preferred_fraction: float
    description: dict


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


def load_policy(config: RunConfig, runtime: Runtime) -> tuple[nn.Module, Any]:
    """The starting model, on the run's device, and its tokenizer (the reference is this model, frozen)."""
    if config.model == "tiny":
        tokenizer = tiny_tokenizer()
        return runtime.place(tiny_model(tokenizer, seed=config.train.seed)), tokenizer
    return load_model(config.model, device=runtime.device)


def load_preferences(
    config: RunConfig, model, tokenizer, pool: AnnotatorPool, runtime: Runtime | None = None
) -> PreferenceData:
    """The run's preference data: the offline set (sampled from ``model`` on the runtime's device, by the main
    process first: the others read its cache) or a hub / local data set."""
    data = config.data
    if data.dataset == "offline":
        runtime = runtime if runtime is not None else make_runtime(config.train.bf16)
        with runtime.main_process_first():
            offline = _offline_set(config, model, tokenizer, pool, runtime)
        split = offline.eval_prompts if config.eval.eval_split == "test" else offline.validation_prompts
        if not split:
            raise ValueError(f"eval_split {config.eval.eval_split!r}: the offline set has no such prompts")
        eval_prompts = split[: config.eval.eval_prompts]
        description = {
            "source": "offline",
            **offline.stats,
            "preferred_fraction": offline.preferred_fraction,
            "eval_split": config.eval.eval_split,
        }
        return PreferenceData(
            offline.unpaired_train, offline.paired_train, eval_prompts, offline.preferred_fraction, description
        )
    train_set, test, split = _hub_splits(config)
    if data.dataset in PAIRED_DATASETS:
        paired, unpaired = train_set, paired_to_unpaired(train_set)
    else:
        paired, unpaired = None, train_set
    if len(unpaired) == 0:
        raise ValueError(f"data set {data.dataset!r} ({data.dataset_path or 'hub'}) has no training rows")
    eval_prompts = list(dict.fromkeys(prompt_key(p) for p in test["prompt"]))[: config.eval.eval_prompts]
    if not eval_prompts:
        raise ValueError(f"data set {data.dataset!r}: no evaluation prompts (eval_prompts={config.eval.eval_prompts})")
    train_keys = {prompt_key(p) for p in train_set["prompt"]}
    fraction = sum(unpaired["label"]) / len(unpaired)
    description = {
        "source": data.dataset_path or data.dataset,
        "rows": len(train_set),
        "preferred_fraction": fraction,
        "duplicate_rows": count_duplicates(train_set),
        "eval_prompts_seen_in_training": sum(k in train_keys for k in eval_prompts),
        **split,
    }
    if description["duplicate_rows"]:
        warnings.warn(f"{description['source']}: {description['duplicate_rows']} duplicate training rows", stacklevel=2)
    return PreferenceData(unpaired, paired, [json.loads(k) for k in eval_prompts], fraction, description)


def _offline_set(config: RunConfig, model, tokenizer, pool: AnnotatorPool, runtime: Runtime):
    data = config.data
    return build_offline_preferences(
        model,
        tokenizer,
        model_name=config.model,
        n_prompts=data.n_prompts,
        completions_per_prompt=data.completions_per_prompt,
        max_new_tokens=data.data_max_new_tokens,
        seed=data.data_seed,
        eval_fraction=data.eval_fraction,
        validation_fraction=data.validation_fraction,
        pool=pool,
        # a LoRA run in bf16 holds its frozen base, pi_ref, in bf16: sample the data from that model
        sample_dtype="bfloat16" if runtime.bf16 and config.train.use_lora else None,
        device=runtime.device,
    )


def _hub_splits(config: RunConfig):
    """Training and evaluation rows of a hub data set, and how they were split.

    A folder or the hub: its own train and test splits. One file: the test rows come from ``eval_dataset_path``
    if given, else ``eval_fraction`` of the file's distinct prompts is held out (drawn with ``data_seed``), so
    the evaluation never scores training prompts.
    """
    data = config.data

    def load(split: str, path: str | None, limit: int | None = None):
        return load_named(data.dataset, split, path=path, limit=limit, drop_empty=True)

    if data.eval_dataset_path is None and data.dataset_path is not None and Path(data.dataset_path).is_file():
        train_set, test = split_by_prompt(load("train", data.dataset_path), data.eval_fraction, data.data_seed)
        if data.max_train_rows is not None:
            train_set = train_set.select(range(min(data.max_train_rows, len(train_set))))
        split = {"split": "one file, held out by prompt", "split_seed": data.data_seed}
        return train_set, test, split | {"eval_fraction": data.eval_fraction}
    train_set = load("train", data.dataset_path, data.max_train_rows)
    if data.eval_dataset_path is not None:
        return train_set, load("test", data.eval_dataset_path), {"split": "eval file"}
    return train_set, load("test", data.dataset_path), {"split": "the data set's own"}


def build_run_loss(config: RunConfig, data: PreferenceData) -> Loss:
    """The run's loss, built once: ``alpha="auto"`` and per-class reductions take the training set's preferred
    fraction (a loss on labelled rows needs both classes)."""
    return build_loss(config.loss, config.loss_kwargs, data.preferred_fraction)


def _pairs(config: RunConfig, data: PreferenceData, tokenizer, loss_fn: Loss) -> tuple[list[dict], dict]:
    if data.paired is None:
        raise ValueError(f"{loss_fn.name} needs paired data; {config.data.dataset!r} is unpaired (use offline or ufb)")
    return tokenize_paired(data.paired, tokenizer, config.data.max_length, config.data.max_prompt_length)


def check_batches_fit(config: RunConfig, data: PreferenceData, plan: TrainingPlan) -> None:
    """Refuse an offline step larger than the training set (each step would silently repeat an epoch)."""
    if plan.trainer != "offline":
        return
    rows = len(data.paired) if plan.rows == "paired" and data.paired is not None else len(data.unpaired)
    per_step = config.train.batch_size * config.train.gradient_accumulation_steps
    if per_step > rows:
        raise UserError(
            f"batch_size x gradient_accumulation_steps = {per_step} rows a step, but the training set has {rows} "
            f"{plan.rows} rows: lower one of them"
        )


def reward_model_for(config: RunConfig, model, tokenizer, pair_rows: list[dict], runtime: Runtime):
    """A Bradley-Terry reward model fit on the pairs (90% train, 10% held out) on the run's device, cached on disk.

    It belongs to the data, not to the run: it is keyed by the model, the pairs and every knob of its fit (and a
    device other than the CPU), and fit with ``data_seed``, so every method and seed of a study shares one reward
    model. Several processes: the main process fits it first, the others load it.
    """
    train_cfg, data_seed = config.train, config.data.data_seed
    order = list(range(len(pair_rows)))
    random.Random(data_seed).shuffle(order)
    n_eval = max(1, len(order) // 10)
    held_out = [pair_rows[i] for i in order[:n_eval]]
    train_pairs = [pair_rows[i] for i in order[n_eval:]]
    fit = {
        "epochs": max(1, round(train_cfg.reward_epochs)),
        "lr": 1e-4 if train_cfg.use_lora else 2e-5,
        "batch_size": train_cfg.batch_size,
        "use_lora": train_cfg.use_lora,
        "lora_r": train_cfg.lora_r,
        "lora_alpha": train_cfg.lora_alpha,
        "seed": data_seed,
    }
    device = runtime.device
    inputs = [config.model, fit, str(pair_rows)] + ([device.type] if device.type != "cpu" else [])
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    cache = cache_root() / "reward_models" / f"{config.model.replace('/', '--')}-{key}"
    with runtime.main_process_first():
        if (cache / "reward_model.pt").is_file():
            reward_model = load_reward_model(model, tokenizer, cache, device=device)
        else:
            reward_model, _ = train_reward_model(model, tokenizer, train_pairs, output_dir=cache, device=device, **fit)
    info = {"reward_accuracy_held_out": reward_accuracy(reward_model, held_out), "reward_pairs": len(train_pairs)}
    return reward_model, info


def unique_prompt_ids(data: PreferenceData, tokenizer) -> list[list[int]]:
    """Chat-templated token ids of the distinct training prompts, in first-seen order."""
    source = data.paired if data.paired is not None else data.unpaired
    seen: dict[str, list] = {}
    for messages in source["prompt"]:
        seen.setdefault(json.dumps(messages), messages)
    return [encode_prompt(tokenizer, m) for m in seen.values()]


def train_policy(
    config: RunConfig,
    loss_fn: Loss,
    plan: TrainingPlan,
    model,
    tokenizer,
    data: PreferenceData,
    reference_model: nn.Module | None = None,
    runtime: Runtime | None = None,
):
    """Train with the trainer ``plan`` names; returns (policy, per-step history, what to report).

    ``reference_model``: the separate frozen reference of a full fine-tuning run (``separate_reference``; the
    trainers copy ``model`` if None); LoRA runs use the policy's disabled adapters. ``runtime``: the run's device,
    processes and precision (``studylib.lm.runtime``; made from the config if None), handed to every step.
    """
    runtime = runtime if runtime is not None else make_runtime(config.train.bf16)
    info: dict[str, Any] = {"trainer": plan.trainer}
    pair_rows = None
    if plan.rows == "paired" or plan.reward_model:
        pair_rows, counts = _pairs(config, data, tokenizer, loss_fn)
        info.update({f"pairs/{k}": v for k, v in counts.items()})
    reward_model = None
    if plan.reward_model:
        reward_model, reward_info = reward_model_for(config, model, tokenizer, pair_rows, runtime)
        info.update(reward_info)
        if plan.rows == "paired":  # soft labels from the reward model on the data set's pairs
            pair_rows = attach_reward_margins(reward_model, pair_rows)
    out = config.checkpoint_dir()
    if plan.trainer == "offline":
        if plan.rows == "unpaired":
            rows, counts = tokenize_unpaired(
                data.unpaired, tokenizer, config.data.max_length, config.data.max_prompt_length
            )
            info.update({f"rows/{k}": v for k, v in counts.items()})
        else:
            rows = pair_rows
        trainer = train(model, tokenizer, rows, loss_fn, config.train, out, reference_model, runtime)
        return trainer.model, [entry for entry in trainer.state.log_history if "loss" in entry], info
    policy, history = train_online(
        model,
        tokenizer,
        loss_fn,
        config.train,
        prompt_ids=unique_prompt_ids(data, tokenizer) if plan.rows == "prompts" else None,
        reward_fn=reward_model.score if reward_model is not None and plan.rows == "prompts" else None,
        pair_rows=pair_rows if plan.pair_rows else None,
        output_dir=out,
        reference_model=reference_model,
        runtime=runtime,
    )
    return policy, history, info


def separate_reference(config: RunConfig, model: nn.Module) -> nn.Module | None:
    """The frozen reference a full fine-tuning run trains and evaluates against (None under LoRA, whose reference is
    the policy with its adapters disabled). Made before training, which changes ``model`` in place."""
    return None if config.train.use_lora else frozen_copy(model)


def evaluate_policy(
    config: RunConfig,
    policy,
    tokenizer,
    data: PreferenceData,
    pool: AnnotatorPool,
    reference: nn.Module | None,
    runtime: Runtime,
) -> tuple[dict, pd.DataFrame]:
    """``studylib.lm.evaluate.evaluate`` on the run's held-out prompts, seeded by the run's seed, on the runtime's
    device (where training left the policy and its reference).

    A bf16 run is evaluated as it was trained: under ``autocast_context`` (bf16 autocast, peft's adapter input
    casting off), the numerics its loss and its on-policy samples saw. (Without it the adapters would run in
    float32: the same policy up to rounding, per-sequence log-probs differing by 0.37 nats sd on the 135M model,
    and the evaluation about a tenth slower: ``bench/eval_cost.py``.)
    """
    with autocast_context(policy, runtime.resolve(config.train), runtime.device):
        return evaluate(
            policy,
            tokenizer,
            data.eval_prompts,
            pool,
            reference=reference,
            max_new_tokens=config.eval.eval_max_new_tokens,
            seed=config.train.seed,
            samples_per_prompt=config.eval.eval_samples_per_prompt,
            batch_size=config.train.generation_batch_size,
            device=runtime.device,
        )


def curves_frame(history: list[dict]) -> pd.DataFrame:
    """The per-step log as a table (one row per logged step)."""
    frame = pd.DataFrame(history)
    return frame.sort_values("step").reset_index(drop=True) if "step" in frame else frame


def run_record(
    config: RunConfig,
    loss_fn: Loss,
    data: PreferenceData,
    curves: pd.DataFrame,
    info: dict,
    summary: dict,
    seconds: dict[str, float],
    runtime: Runtime,
) -> dict:
    """What ``metrics.json`` holds: the evaluation summary, the run's facts, its flags (``runs.run_flags``: a
    collapsed or drifted run is warned about and marked), where and in what precision it ran (``runtime``: bf16
    and why, the device, the processes) and its flat parameters."""
    steps = int(curves["step"].max()) if len(curves) else 0
    return {
        **summary,
        "flags": run_flags(curves, summary),
        "loss": config.loss,
        "loss_built": repr(loss_fn),
        "dataset": config.data.dataset,
        "seed": config.train.seed,
        "steps": steps,
        "train_seconds": round(seconds["train"], 1),
        "eval_seconds": round(seconds["eval"], 1),
        "steps_per_second": steps / max(seconds["train"], 1e-9),
        "data": data.description,
        "training": info,
        "runtime": runtime.record(),
        "params": {**config.to_flat(), "run": config.name()},
    }


def save_run(
    config: RunConfig, record: dict, curves: pd.DataFrame, samples: pd.DataFrame, policy: nn.Module, tokenizer
) -> Path:
    """Write the run's results through ``studylib.results`` (atomic, stamped): ``metrics.json``, ``curves.csv``,
    ``samples.csv``, ``training_curves.png``, for hub data sets AlpacaEval's ``model_outputs.json``, and the
    trained policy in ``model/`` (adapter or weights, tokenizer, model card: ``studylib.lm.export``)."""
    run_dir = config.run_dir()
    save_trained_model(policy, tokenizer, record, run_dir / "model")
    stamp = {"params": record["params"], "seed": config.train.seed, "run": config.name()}
    save_json(record, run_dir / "metrics.json", stamp)
    save_table(curves, run_dir / "curves", stamp, markdown=False)
    save_table(samples, run_dir / "samples", stamp, markdown=False)
    fig = plot_run_curves(curves, run_title(record["params"]), config.loss)
    save_figure(fig, run_dir / "training_curves.png", stamp)
    plt.close(fig)
    if config.data.dataset != "offline":  # hub runs: AlpacaEval's format (one output per instruction: sample 0)
        first = samples[samples["sample"] == 0]
        write_alpaca_eval_outputs(
            run_dir / "model_outputs.json",
            first["prompt"].tolist(),
            first["completion"].tolist(),
            config.name(),
            stamp,
        )
    if not config.keep_checkpoints:
        shutil.rmtree(config.checkpoint_dir(), ignore_errors=True)
    release_run(config)
    return run_dir


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
    check_batches_fit(config, data, plan)
    if main_process:
        claim_run(config)
    runtime.wait_for_everyone()  # no process writes into the folder before the main process has claimed it
    try:
        reference = separate_reference(config, model)
        (policy, history, info), train_seconds = timed(
            train_policy, config, loss_fn, plan, model, tokenizer, data, reference, runtime
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


def describe_precision(runtime: Runtime) -> str:
    """One line: the precision the run computes in, and why (``Runtime.precision``)."""
    return f"{'bf16' if runtime.bf16 else 'float32'} ({runtime.precision})"
