"""A run's preference data: the offline set (sampled from the run's model, judged by the annotator pool) or a hub /
local data set, split into training rows and held-out evaluation prompts, and the rows a trainer takes from it."""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studylib.checks import UserError
from studylib.families import Family
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
)
from studylib.lm.runtime import Runtime, make_runtime
from studylib.lm.synth import build_offline_preferences
from studylib.losses import Loss

PAIRED_DATASETS = ("ufb",)


@dataclass
class PreferenceData:
    """Training data in canonical form, evaluation prompts, and what to report about them."""

    unpaired: Any  # datasets.Dataset
    paired: Any  # datasets.Dataset or None (unpaired-only data sets)
    eval_prompts: list
    preferred_fraction: float
    description: dict
    # fixed prompts for the training curves and the training-prompt approval (studylib.lm.curves): the offline set's
    # validation prompts (a hub set has none: its evaluation prompts), and the distinct training prompts in order
    validation_prompts: list = field(default_factory=list)
    train_prompts: list = field(default_factory=list)
    # what a reward model is fit on: the offline set's every pair of each prompt's completions (``every_pair``), a
    # hub set's own pairs (None: ``paired``)
    reward_pairs: Any = None


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
            offline.unpaired_train, offline.paired_train, eval_prompts, offline.preferred_fraction, description,
            validation_prompts=offline.validation_prompts or eval_prompts,
            train_prompts=distinct_prompts(offline.unpaired_train["prompt"]),
            reward_pairs=every_pair(offline.unpaired_train, pool),
        )  # fmt: skip
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
    eval_messages = [json.loads(k) for k in eval_prompts]
    return PreferenceData(
        unpaired, paired, eval_messages, fraction, description,
        validation_prompts=eval_messages, train_prompts=distinct_prompts(train_set["prompt"]),
    )  # fmt: skip


def every_pair(unpaired, pool: AnnotatorPool):
    """Every pair of each prompt's distinct completions in an unpaired set (``k`` completions: ``k (k - 1) / 2``
    pairs), the winner the one the pool's majority prefers (``P(a > b) > 1/2``; an even split is dropped): the
    reward model's training and held-out pairs on the offline set (more pairs than the one-per-two that DPO trains
    on, and labels without the draw's noise)."""
    from datasets import Dataset

    from studylib.lm.evaluate import prompt_text

    groups: dict[str, list[dict]] = {}
    for row in unpaired:
        groups.setdefault(prompt_key(row["prompt"]), []).append(row)
    pairs = []
    for rows in groups.values():
        text = prompt_text(rows[0]["prompt"])
        for a, b in itertools.combinations(rows, 2):
            if a["completion_ids"] == b["completion_ids"]:
                continue
            p = pool.prefer(text, a["completion"], b["completion"])
            if p == 0.5:
                continue
            win, lose = (a, b) if p > 0.5 else (b, a)
            pairs.append(
                {"prompt": a["prompt"], "chosen": win["completion"], "rejected": lose["completion"],
                 "chosen_ids": win["completion_ids"], "rejected_ids": lose["completion_ids"]}
            )  # fmt: skip
    return Dataset.from_list(pairs)


def tokenized_reward_pairs(config: RunConfig, data: PreferenceData, tokenizer) -> tuple[list[dict], dict]:
    """The pairs a reward model is fit on (``PreferenceData.reward_pairs``, else the data set's pairs), tokenised."""
    pairs = data.reward_pairs if data.reward_pairs is not None else data.paired
    if pairs is None or len(pairs) == 0:
        raise ValueError(f"a reward model needs pairs; {config.data.dataset!r} has none (use offline or ufb)")
    return tokenize_paired(pairs, tokenizer, config.data.max_length, config.data.max_prompt_length)


def distinct_prompts(prompts) -> list:
    """The distinct prompts (chat messages) of a column, in first-seen order."""
    return [json.loads(k) for k in dict.fromkeys(prompt_key(p) for p in prompts)]


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


def tokenized_pairs(config: RunConfig, data: PreferenceData, tokenizer, loss_fn: Loss) -> tuple[list[dict], dict]:
    """The data set's pairs, tokenised (and what tokenising dropped); an unpaired data set is an error naming it."""
    if data.paired is None:
        raise ValueError(f"{loss_fn.name} needs paired data; {config.data.dataset!r} is unpaired (use offline or ufb)")
    return tokenize_paired(data.paired, tokenizer, config.data.max_length, config.data.max_prompt_length)


def check_batches_fit(config: RunConfig, data: PreferenceData, plan, family: Family) -> None:
    """Refuse an offline step larger than the training set (each step would silently repeat an epoch); ``family``:
    the loss's (``studylib.families``), which says how many training rows the data set holds for it."""
    if plan.trainer != "offline":
        return
    rows = family.data_size(data)
    per_step = config.train.batch_size * config.train.gradient_accumulation_steps
    if per_step > rows:
        raise UserError(
            f"batch_size x gradient_accumulation_steps = {per_step} rows a step, but the training set has {rows} "
            f"{plan.rows} rows: lower one of them"
        )


def unique_prompt_ids(data: PreferenceData, tokenizer) -> list[list[int]]:
    """Chat-templated token ids of the distinct training prompts, in first-seen order."""
    source = data.paired if data.paired is not None else data.unpaired
    seen: dict[str, list] = {}
    for messages in source["prompt"]:
        seen.setdefault(json.dumps(messages), messages)
    return [encode_prompt(tokenizer, m) for m in seen.values()]
