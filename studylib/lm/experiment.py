"""One language-model run, step by step: load, data, train, evaluate, save (notebook 04 calls these).

The steps are plain functions so a notebook can tell the story between them and a script can call
``run_experiment`` for the whole thing (``python -m studylib train --params run.json``, which
``accelerate launch`` can start on several GPUs).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from studylib.lm.annotators import AnnotatorPool
from studylib.lm.data import load_named, paired_to_unpaired, tokenize_paired, tokenize_unpaired
from studylib.losses import get_loss

PAIRED_DATASETS = ("ufb",)
UNPAIRED_DATASETS = ("ufg", "mix14k")


@dataclass
class ExperimentConfig:
    """Every knob of one run; notebook 04's parameters cell mirrors these."""

    model: str = "smollm2-135m-instruct"  # embedded default, "tiny" (tests), a hub id or a local path
    dataset: str = "offline"  # offline | ufg | mix14k | ufb
    dataset_path: str | None = None  # local files in the hub schema instead of the hub
    loss: str = "rdro"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 5e-4
    max_steps: int = 20
    num_train_epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    use_lora: bool = True
    lora_r: int = 16
    seed: int = 0
    max_length: int = 192
    max_prompt_length: int = 96
    max_train_rows: int | None = None
    # offline preference data
    n_prompts: int = 200
    completions_per_prompt: int = 4
    data_max_new_tokens: int = 48
    data_seed: int = 0
    # online objectives (reverse_kl, rlhf, online distill) and the reward model they need
    online: bool = False
    samples_per_prompt: int = 4
    prompts_per_step: int = 4
    reward_epochs: float = 1.0
    # evaluation
    eval_prompts: int = 32
    eval_max_new_tokens: int = 48
    results_dir: str = "results/lm"
    keep_checkpoints: bool = False  # training checkpoints (for resuming) are deleted once the run is saved
    run_name: str | None = None
    sweep: bool = False  # part of a sweep (e.g. RDRO's alpha): kept out of the main table

    def name(self) -> str:
        """The run's directory name: data set, loss, its knobs and seed."""
        if self.run_name:
            return self.run_name
        knobs = "".join(f"-{k}={v}" for k, v in sorted(self.loss_kwargs.items()))
        return f"{self.dataset}-{self.loss}{knobs}{'-online' if self.online else ''}-seed={self.seed}"

    def run_dir(self) -> Path:
        """Where the run's results go (relative paths: from the repository root)."""
        from studylib.results import resolve

        return resolve(self.results_dir) / self.name()

    def checkpoint_dir(self) -> Path:
        """Where training checkpoints go: an interrupted run resumes from them."""
        return self.run_dir() / "checkpoints"


@dataclass
class PreferenceData:
    """Training data in canonical form, evaluation prompts, and what to report about them."""

    unpaired: Any  # datasets.Dataset or None
    paired: Any  # datasets.Dataset or None
    eval_prompts: list
    preferred_fraction: float | None
    description: dict


def load_policy(config: ExperimentConfig):
    """The starting model and its tokenizer (the reference is this model, frozen)."""
    if config.model == "tiny":
        from studylib.lm.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_model(tokenizer, seed=config.seed), tokenizer
    from studylib.lm.models import load_model

    return load_model(config.model)


def load_preferences(config: ExperimentConfig, model, tokenizer, pool: AnnotatorPool) -> PreferenceData:
    """The run's preference data: the offline set (sampled from ``model``) or a hub / local data set."""
    if config.dataset == "offline":
        from studylib.lm.synth import build_offline_preferences

        data = build_offline_preferences(
            model,
            tokenizer,
            model_name=config.model,
            n_prompts=config.n_prompts,
            completions_per_prompt=config.completions_per_prompt,
            max_new_tokens=config.data_max_new_tokens,
            seed=config.data_seed,
            pool=pool,
        )
        eval_prompts = data.eval_prompts[: config.eval_prompts]
        description = {"source": "offline", **data.stats, "preferred_fraction": data.preferred_fraction}
        return PreferenceData(
            data.unpaired_train, data.paired_train, eval_prompts, data.preferred_fraction, description
        )
    limit = config.max_train_rows
    train = load_named(config.dataset, "train", path=config.dataset_path, limit=limit, drop_empty=True)
    test = load_named(config.dataset, "test", path=config.dataset_path, limit=config.eval_prompts, drop_empty=True)
    eval_prompts = list(test["prompt"])
    if config.dataset in PAIRED_DATASETS:
        paired, unpaired = train, paired_to_unpaired(train)
    else:
        paired, unpaired = None, train
    fraction = sum(unpaired["label"]) / len(unpaired)
    description = {"source": config.dataset_path or config.dataset, "rows": len(train), "preferred_fraction": fraction}
    return PreferenceData(unpaired, paired, eval_prompts, fraction, description)


def training_rows(config: ExperimentConfig, data: PreferenceData, tokenizer) -> tuple[list, dict]:
    """Token rows for the loss's kind, and the tokenisation counts (truncations) to report."""
    kind = get_loss(config.loss, **{k: v for k, v in config.loss_kwargs.items() if v != "auto"}).kind
    if kind == "paired":
        if data.paired is None:
            raise ValueError(f"{config.loss} needs paired data; {config.dataset!r} is unpaired (use offline or ufb)")
        rows, counts = tokenize_paired(data.paired, tokenizer, config.max_length, config.max_prompt_length)
    else:
        rows, counts = tokenize_unpaired(data.unpaired, tokenizer, config.max_length, config.max_prompt_length)
    return rows, counts


def train_offline(config: ExperimentConfig, model, tokenizer, rows: list[dict]):
    """Train with the offline trainer; returns (trained policy, per-step log history)."""
    from studylib.lm.trainer import TrainConfig, train

    train_config = TrainConfig(
        output_dir=str(config.checkpoint_dir()),
        loss=config.loss,
        loss_kwargs=dict(config.loss_kwargs),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_ratio=config.warmup_ratio,
        use_lora=config.use_lora,
        lora_r=config.lora_r,
        lora_alpha=2 * config.lora_r,
        seed=config.seed,
        save_steps=max(10, config.max_steps // 2) if config.max_steps > 0 else 200,
    )
    trainer = train(model, tokenizer, rows, train_config)
    return trainer.model, [entry for entry in trainer.state.log_history if "loss" in entry]


ONLINE_ONLY = ("reverse_kl", "rlhf")
NEEDS_REWARD_MODEL = ("reverse_kl", "rlhf", "distill")


def _loss_knobs(config: ExperimentConfig) -> dict:
    return {k: v for k, v in config.loss_kwargs.items() if v != "auto"}


def uses_online_trainer(config: ExperimentConfig) -> bool:
    """On-policy objectives, online distillation, and PMLE / distillation with a KL term (it needs policy samples)."""
    loss_fn = get_loss(config.loss, **_loss_knobs(config))
    kl_term = config.loss in ("pmle", "distill") and loss_fn.beta > 0
    return config.loss in ONLINE_ONLY or config.online or kl_term


def reward_model_for(config: ExperimentConfig, model, tokenizer, pair_rows: list[dict]):
    """A Bradley-Terry reward model fit on the pairs (90% train, 10% held out), cached on disk.

    It belongs to the data, not to the run: it is keyed by the pairs and the model, and fit with
    ``data_seed``, so every method and seed of a study shares one reward model.
    """
    import hashlib
    import random

    from studylib.lm.models import cache_root
    from studylib.lm.reward import load_reward_model, reward_accuracy, train_reward_model

    order = list(range(len(pair_rows)))
    random.Random(config.data_seed).shuffle(order)
    n_eval = max(1, len(order) // 10)
    held_out = [pair_rows[i] for i in order[:n_eval]]
    train_pairs = [pair_rows[i] for i in order[n_eval:]]
    key = hashlib.sha256(
        json.dumps([config.model, config.data_seed, config.reward_epochs, config.use_lora, str(pair_rows)]).encode()
    ).hexdigest()[:16]
    cache = cache_root() / "reward_models" / f"{config.model.replace('/', '--')}-{key}"
    if (cache / "reward_model.pt").is_file():
        reward_model = load_reward_model(model, tokenizer, cache)
    else:
        reward_model, _ = train_reward_model(
            model,
            tokenizer,
            train_pairs,
            epochs=max(1, round(config.reward_epochs)),
            lr=1e-4 if config.use_lora else 2e-5,
            batch_size=config.batch_size,
            use_lora=config.use_lora,
            lora_r=config.lora_r,
            lora_alpha=2 * config.lora_r,
            seed=config.data_seed,
            output_dir=cache,
        )
    info = {"reward_accuracy_held_out": reward_accuracy(reward_model, held_out), "reward_pairs": len(train_pairs)}
    return reward_model, info


def unique_prompt_ids(data: PreferenceData, tokenizer) -> list[list[int]]:
    """Chat-templated token ids of the distinct training prompts, in first-seen order."""
    from studylib.lm.data import encode_prompt

    source = data.paired if data.paired is not None else data.unpaired
    seen: dict[str, list] = {}
    for messages in source["prompt"]:
        seen.setdefault(json.dumps(messages), messages)
    return [encode_prompt(tokenizer, m) for m in seen.values()]


def train_policy(config: ExperimentConfig, model, tokenizer, data: PreferenceData, pool: AnnotatorPool):
    """Train with the method's own procedure; returns (policy, per-step history, what to report).

    - offline methods (dpo, kto, bco, ddro, rdro, pmle without KL): ``studylib.lm.trainer`` on the data set;
    - distillation: a reward model's soft labels on data-set pairs (or, ``online``, on fresh policy samples);
    - reverse KL and RLHF: on-policy RLOO against the reward model (``studylib.lm.online``).
    """
    info: dict[str, Any] = {"trainer": "online" if uses_online_trainer(config) else "offline"}
    reward_model = None
    pair_rows = None
    if config.loss in NEEDS_REWARD_MODEL or (uses_online_trainer(config) and config.loss == "pmle"):
        if data.paired is None:
            raise ValueError(f"{config.loss} needs paired data for its reward model; {config.dataset!r} is unpaired")
        pair_rows, counts = tokenize_paired(data.paired, tokenizer, config.max_length, config.max_prompt_length)
        info.update({f"pairs/{k}": v for k, v in counts.items()})
    if config.loss in NEEDS_REWARD_MODEL:
        reward_model, reward_info = reward_model_for(config, model, tokenizer, pair_rows)
        info.update(reward_info)
    if not uses_online_trainer(config):
        rows, counts = training_rows(config, data, tokenizer)
        info.update({f"rows/{k}": v for k, v in counts.items()})
        if config.loss == "distill":  # no KL term: soft labels from the reward model on the data-set pairs
            from studylib.lm.reward import attach_reward_margins

            rows = attach_reward_margins(reward_model, rows)
        policy, history = train_offline(config, model, tokenizer, rows)
        return policy, history, info
    from studylib.lm.online import OnlineConfig, train_online
    from studylib.lm.reward import attach_reward_margins

    if config.loss == "distill" and not config.online:
        pair_rows = attach_reward_margins(reward_model, pair_rows)
    online_config = OnlineConfig(
        loss=config.loss,
        loss_kwargs=_loss_knobs(config),
        steps=config.max_steps,
        prompts_per_step=config.prompts_per_step,
        samples_per_prompt=config.samples_per_prompt,
        max_new_tokens=config.data_max_new_tokens,
        learning_rate=config.learning_rate,
        use_lora=config.use_lora,
        lora_r=config.lora_r,
        lora_alpha=2 * config.lora_r,
        seed=config.seed,
        output_dir=str(config.checkpoint_dir()),
        save_steps=max(10, config.max_steps // 2),
    )
    offline_pairs = config.loss == "pmle" or (config.loss == "distill" and not config.online)
    policy, history = train_online(
        model,
        tokenizer,
        unique_prompt_ids(data, tokenizer),
        reward_model.score if reward_model is not None else None,
        online_config,
        pair_rows=pair_rows if offline_pairs else None,
    )
    return policy, history, info


def curves_frame(history: list[dict]) -> pd.DataFrame:
    """The per-step log as a table (one row per logged step)."""
    frame = pd.DataFrame(history)
    return frame.sort_values("step").reset_index(drop=True) if "step" in frame else frame


def save_run(config: ExperimentConfig, summary: dict, curves: pd.DataFrame, samples: pd.DataFrame, extra: dict) -> Path:
    """Write ``metrics.json``, ``curves.csv`` and ``samples.csv`` into the run's directory (atomically)."""
    from studylib.results import write_atomic

    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**summary, **extra, "params": {**asdict(config), "run": config.name()}}
    write_atomic(run_dir / "curves.csv", curves.to_csv(index=False))
    write_atomic(run_dir / "samples.csv", samples.to_csv(index=False))
    write_atomic(run_dir / "metrics.json", json.dumps(record, indent=2, default=str))
    if config.dataset != "offline":  # hub runs: AlpacaEval's format, to score with the official judge
        from studylib.lm.evaluate import write_alpaca_eval_outputs

        write_alpaca_eval_outputs(
            run_dir / "model_outputs.json", samples["prompt"].tolist(), samples["completion"].tolist(), config.name()
        )
    if not config.keep_checkpoints:
        shutil.rmtree(config.checkpoint_dir(), ignore_errors=True)
    return run_dir


def timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the seconds it took."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def run_experiment(config: ExperimentConfig) -> dict:
    """The whole run, as notebook 04 does it step by step; returns the saved metrics.

    Under ``accelerate launch`` (several GPUs) every process trains; only the main process evaluates and saves.
    """
    from accelerate import PartialState

    from studylib.lm.evaluate import evaluate

    model, tokenizer = load_policy(config)
    pool = AnnotatorPool(seed=0)
    data = load_preferences(config, model, tokenizer, pool)
    (policy, history, info), train_seconds = timed(train_policy, config, model, tokenizer, data, pool)
    if not PartialState().is_main_process:
        return {}
    (summary, samples), eval_seconds = timed(
        evaluate,
        policy,
        tokenizer,
        data.eval_prompts,
        pool,
        max_new_tokens=config.eval_max_new_tokens,
        seed=config.seed,
    )
    curves = curves_frame(history)
    steps = int(curves["step"].max()) if len(curves) else 0
    extra = {
        "loss": config.loss,
        "dataset": config.dataset,
        "seed": config.seed,
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "steps_per_second": steps / max(train_seconds, 1e-9),
        "data": data.description,
        "training": info,
    }
    save_run(config, summary, curves, samples, extra)
    return {**summary, **extra}
