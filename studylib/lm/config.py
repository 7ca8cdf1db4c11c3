"""The configuration of a language-model run: one ``RunConfig`` made of three parts, passed down whole or by part.

- ``DataConfig``: where the preference data come from and how they are tokenised;
- ``TrainConfig``: optimisation, LoRA, reference and on-policy sampling (what both trainers read);
- ``EvalConfig``: the held-out evaluation.

Notebook 04's parameters cell, a study YAML and ``python -m studylib train --params run.json`` are flat: a flat
mapping is placed into the parts by field name (``RunConfig.from_flat``), each name living in exactly one part,
and a name that no part has is an error naming it (with the accepted names). Nothing is copied field by field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studylib.lm.lora import LORA_TARGETS


@dataclass
class DataConfig:
    """The preference data: the offline set (sampled from the model, labelled by the annotator pool) or a hub set."""

    dataset: str = "offline"  # offline | ufg | mix14k | ufb
    dataset_path: str | None = None  # local files in the hub schema instead of the hub
    max_length: int = 192
    max_prompt_length: int = 96
    max_train_rows: int | None = None  # cap on hub data-set rows
    n_prompts: int = 200  # offline set: prompts of data/prompts.jsonl (20% held out for evaluation)
    completions_per_prompt: int = 4
    data_max_new_tokens: int = 48
    data_seed: int = 0  # sampling and labels of the offline set, and the reward model's fit


@dataclass
class TrainConfig:
    """What the offline trainer (``studylib.lm.trainer``) and the on-policy one (``studylib.lm.online``) read."""

    learning_rate: float = 5e-4
    max_steps: int = 20  # -1: num_train_epochs over the data (offline trainer only)
    num_train_epochs: float = 1.0
    batch_size: int = 8  # rows per micro-batch (offline)
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"  # offline trainer; the on-policy trainer keeps the rate constant
    warmup_ratio: float = 0.1
    max_grad_norm: float = 10.0
    seed: int = 0
    bf16: bool = False
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    logging_steps: int = 1
    save_steps: int | None = None  # None: max(10, max_steps // 2)
    # reference log-probs (offline): True = once for every row before training, False = on the fly per batch,
    # None = precompute when the run covers at least one epoch
    precompute_reference: bool | None = None
    reference_batch_size: int = 16
    # on-policy sampling (reverse_kl, rlhf, online distill, the KL term of pmle / distill)
    prompts_per_step: int = 4  # prompts (or data-set pairs) per on-policy step
    samples_per_prompt: int = 4  # k for reverse_kl / rlhf (>= 2); KL samples per pair's prompt
    max_new_tokens: int = 48  # length cap of the policy's samples during training
    generation_batch_size: int = 16
    reward_epochs: float = 1.0  # the reward model's training epochs (losses that need one)

    def checkpoint_every(self) -> int:
        """Steps between checkpoints: ``save_steps`` or ``max(10, max_steps // 2)`` (200 for epoch-based runs)."""
        if self.save_steps is not None:
            return self.save_steps
        return max(10, self.max_steps // 2) if self.max_steps > 0 else 200


@dataclass
class EvalConfig:
    """Held-out evaluation: samples from policy and reference, judged by the annotator pool."""

    eval_prompts: int = 32
    eval_max_new_tokens: int = 48


PARTS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


@dataclass
class RunConfig:
    """Every knob of one run: model, loss, the three parts, and where results go."""

    model: str = "smollm2-135m-instruct"  # embedded default, "tiny" (tests), a hub id or a local path
    loss: str = "rdro"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # alpha "auto": the preferred fraction
    online: bool = False  # distill on pairs sampled from the current policy (on-policy losses always are)
    results_dir: str = "results/lm"
    run_name: str | None = None
    sweep: bool = False  # part of a sweep (e.g. RDRO's alpha): kept out of the main table
    keep_checkpoints: bool = False  # training checkpoints (for resuming) are deleted once the run is saved
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def flat_names(cls) -> list[str]:
        """Every knob's flat name: the run's own fields and each part's (notebook 04's parameters)."""
        own = [f.name for f in dataclasses.fields(cls) if f.name not in PARTS]
        return own + [f.name for part in PARTS.values() for f in dataclasses.fields(part)]

    @classmethod
    def from_flat(cls, knobs: dict[str, Any]) -> RunConfig:
        """A run config from flat knobs; unknown names raise, naming them and the accepted ones."""
        unknown = sorted(set(knobs) - set(cls.flat_names()))
        if unknown:
            raise ValueError(f"unknown run knob(s) {unknown}; accepted: {', '.join(sorted(cls.flat_names()))}")
        parts = {
            name: part(**{f.name: knobs[f.name] for f in dataclasses.fields(part) if f.name in knobs})
            for name, part in PARTS.items()
        }
        own = {k: v for k, v in knobs.items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(**own, **parts)

    def to_flat(self) -> dict[str, Any]:
        """The flat knobs (the inverse of ``from_flat``), as saved beside a run's results."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in PARTS}
        for name in PARTS:
            flat |= dataclasses.asdict(getattr(self, name))
        return flat

    def name(self) -> str:
        """The run's directory name: data set, loss, its knobs and seed (or ``run_name``)."""
        if self.run_name:
            return self.run_name
        knobs = "".join(f"-{k}={v}" for k, v in sorted(self.loss_kwargs.items()))
        online = "-online" if self.online else ""
        return f"{self.data.dataset}-{self.loss}{knobs}{online}-seed={self.train.seed}"

    def run_dir(self) -> Path:
        """Where the run's results go (relative paths: from the repository root)."""
        from studylib.results import resolve

        return resolve(self.results_dir) / self.name()

    def checkpoint_dir(self) -> Path:
        """Where training checkpoints go: an interrupted run resumes from them."""
        return self.run_dir() / "checkpoints"
