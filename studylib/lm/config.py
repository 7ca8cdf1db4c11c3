"""The configuration of a language-model run: one ``RunConfig`` made of three parts, passed down whole or by part.

- ``DataConfig``: where the preference data come from and how they are tokenised;
- ``TrainConfig``: optimisation, LoRA, reference and on-policy sampling (what both trainers read);
- ``EvalConfig``: the held-out evaluation.

Notebook 04's parameters cell, a study YAML and ``python -m studylib train --params run.json`` are flat: a flat
mapping is placed into the parts by field name (``RunConfig.from_flat``), each name living in exactly one part,
and a name that no part has is an error naming it (with the accepted names). Nothing is copied field by field.

Relative paths: every path knob (``results_dir``, ``dataset_path``, ``eval_dataset_path``, a local ``model``) is
relative to the working directory of the process that runs the config, as a path given to any command-line tool is:
``python -m studylib train --params run.json`` run from a folder reads its data from there and writes its results
there, never into the library's checkout. The study runner runs its notebooks with the repository root as working
directory, so a study YAML's paths are relative to the root (``studylib.study.load_study``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studylib.checks import ALSO_ACCEPTED, UserError, check_like_default, plain_name
from studylib.families import family_of
from studylib.lm.lora import LORA_TARGETS
from studylib.losses import LOSSES, Loss, build_loss


@dataclass
class DataConfig:
    """The preference data: the offline set (sampled from the model, labelled by the annotator pool) or a hub set."""

    dataset: str = "offline"  # offline | ufg | mix14k | ufb
    dataset_path: str | None = None  # local files in the hub schema instead of the hub (a folder: its splits)
    eval_dataset_path: str | None = None  # evaluation prompts from this file; None and a single-file dataset_path:
    eval_fraction: float = 0.25  # ... this fraction of its distinct prompts is held out (drawn with data_seed);
    # the offline set: the last eval_fraction of its prompts are the test prompts, the validation_fraction before
    # them the validation prompts (the pilot's: studies/pilot.yaml), the rest the training prompts
    validation_fraction: float = 0.125
    max_length: int = 192
    max_prompt_length: int = 96
    max_train_rows: int | None = None  # cap on hub data-set rows
    n_prompts: int = 256  # offline set: prompts of data/prompts.jsonl (test and validation held out)
    completions_per_prompt: int = 4
    data_max_new_tokens: int = 32
    data_seed: int = 0  # sampling and labels of the offline set, and the reward model's fit


@dataclass
class TrainConfig:
    """What the offline trainer (``studylib.lm.trainer``) and the on-policy one (``studylib.lm.online``) read."""

    learning_rate: float = 5e-4
    max_steps: int = 20  # -1: num_train_epochs over the data (offline trainer only)
    num_train_epochs: float = 1.0
    batch_size: int = 8  # rows per micro-batch (offline)
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"  # both trainers (transformers' schedules), warmup_ratio of the steps first
    warmup_ratio: float = 0.1
    max_grad_norm: float = 10.0
    seed: int = 0
    # frozen weights in bf16 (LoRA base, reference), trained ones fp32 + autocast; "auto": bf16 where the device runs
    # it natively, float32 elsewhere (studylib.lm.runtime decides, and the run records which and why)
    bf16: bool | str = False
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
    max_new_tokens: int = 32  # length cap of the policy's samples in training (a reward model: the data's cap)
    generation_batch_size: int = 16
    reward_epochs: float = 1.0  # the reward model's training epochs (losses that need one)
    # any other transformers.TrainingArguments field for the offline trainer (report_to, gradient_checkpointing,
    # push_to_hub, ...); report_to defaults to "none". A field with a knob of its own above is set by that knob.
    training_args: dict[str, Any] = field(default_factory=dict)

    def checkpoint_every(self) -> int:
        """Steps between checkpoints: ``save_steps`` or ``max(10, max_steps // 2)`` (200 for epoch-based runs)."""
        if self.save_steps is not None:
            return self.save_steps
        return max(10, self.max_steps // 2) if self.max_steps > 0 else 200


@dataclass
class EvalConfig:
    """Held-out evaluation: samples from policy and reference, judged by the annotator pool."""

    eval_prompts: int = 64  # at most this many held-out prompts
    eval_samples_per_prompt: int = 2  # samples from the policy and from the reference per prompt
    eval_max_new_tokens: int = 32
    eval_split: str = "test"  # offline set: "test", or "validation" (choosing knobs: studies/pilot.yaml)
    # KL(p+ || pi) on the evaluation prompts, from this many reference samples per prompt (studylib.lm.target; 0: off)
    target_samples_per_prompt: int = 8
    train_eval_prompts: int = 32  # the final approval is also measured on this many training prompts (0: off)
    # training curves: every curve_every steps (0: never), approval and KL to the target on curve_prompts validation
    # prompts and curve_prompts training prompts (the same prompts at every point: studylib.lm.curves)
    curve_every: int = 0
    curve_prompts: int = 16


# TrainingArguments fields set by a knob of TrainConfig (knob named), or fixed by the trainer (None)
MANAGED_TRAINING_ARGS: dict[str, str | None] = {
    "output_dir": None,
    "remove_unused_columns": None,
    "learning_rate": "learning_rate",
    "num_train_epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "lr_scheduler_type": "lr_scheduler_type",
    "warmup_steps": "warmup_ratio",
    "warmup_ratio": "warmup_ratio",
    "max_grad_norm": "max_grad_norm",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "seed": "seed",
    "data_seed": "seed",
    "bf16": "bf16",
}


def check_training_args(training_args: dict[str, Any]) -> None:
    """Raise, naming the key, if ``training_args`` holds a key ``TrainingArguments`` lacks or one set elsewhere."""
    from transformers import TrainingArguments

    if not isinstance(training_args, dict):
        raise UserError(f"training_args must be a mapping of TrainingArguments fields, got {training_args!r}")
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(training_args) - fields)
    if unknown:
        raise UserError(f"training_args: {unknown} are not fields of transformers.TrainingArguments")
    for key in sorted(set(training_args) & set(MANAGED_TRAINING_ARGS)):
        knob = MANAGED_TRAINING_ARGS[key]
        where = f"set it with the run knob {knob!r}" if knob else "the trainer sets it"
        raise UserError(f"training_args: {key!r} cannot be given here ({where})")


PARTS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
DATASETS = ("offline", "ufg", "mix14k", "ufb")
NOT_IDENTITY = ("results_dir", "run_name", "sweep", "keep_checkpoints", "logging_steps", "save_steps")
"""Knobs that do not change a run's result, and so are not part of its identity (``RunConfig.identity``)."""
NOT_IDENTITY_TRAINING_ARGS = (
    "report_to", "logging_dir", "run_name", "disable_tqdm", "save_total_limit", "dataloader_num_workers",
    "dataloader_pin_memory", "gradient_checkpointing", "gradient_checkpointing_kwargs", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
)  # fmt: skip


@dataclass
class RunConfig:
    """Every knob of one run: model, loss, the three parts, and where results go."""

    model: str = "smollm2-135m-instruct"  # embedded default, "tiny" (tests), a hub id or a local path
    loss: str = "rdro"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # alpha "auto": the preferred fraction
    online: bool = False  # distill on pairs sampled from the current policy (on-policy losses always are)
    results_dir: str = "scratch/lm"  # by hand: a scratch folder; the study runner passes results/lm
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
        """A checked run config from flat knobs; unknown names and bad values raise, naming the knob."""
        unknown = sorted(set(knobs) - set(cls.flat_names()))
        if unknown:
            raise UserError(f"unknown run knob(s) {unknown}; accepted: {', '.join(sorted(cls.flat_names()))}")
        defaults = cls().to_flat()
        _check_types(knobs, defaults)
        # a float knob given as an int (learning_rate: 1) is the same run as 1.0: one identity, one folder
        knobs = {k: float(v) if isinstance(defaults[k], float) and isinstance(v, int) else v for k, v in knobs.items()}
        parts = {
            name: part(**{f.name: knobs[f.name] for f in dataclasses.fields(part) if f.name in knobs})
            for name, part in PARTS.items()
        }
        own = {k: v for k, v in knobs.items() if k in {f.name for f in dataclasses.fields(cls)}}
        config = cls(**own, **parts)
        config.check()
        return config

    def check(self) -> None:
        """Every check that can be made before loading anything; raises ``ValueError`` naming the knob and value."""
        if self.loss not in LOSSES:
            raise UserError(f"loss: unknown loss {self.loss!r}; available: {', '.join(sorted(LOSSES))}")
        loss_fn = build_loss(self.loss, self.loss_kwargs, preferred_fraction=0.5)  # knobs checked; "auto" a stand-in
        if self.data.dataset not in DATASETS:
            raise UserError(f"dataset: {self.data.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.data.dataset == "offline" and (self.data.dataset_path or self.data.eval_dataset_path):
            given = "dataset_path" if self.data.dataset_path else "eval_dataset_path"
            raise UserError(
                f"{given} is given but dataset is 'offline' (the project's synthetic set), so the file would not be "
                f"used: set dataset to the file's schema ({', '.join(d for d in DATASETS if d != 'offline')})"
            )
        if self.run_name is not None and not plain_name(self.run_name):
            raise UserError(
                f"run_name must be one plain folder name inside results_dir (no '/', '\\', '..' or absolute path), "
                f"got {self.run_name!r}"
            )
        knobs = self.to_flat()
        at_least_1, at_least_2 = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 2, ">= 2")
        rules = {
            "max_steps": (lambda v: v >= 1 or v == -1, ">= 1, or -1 for epochs"),
            "learning_rate": (lambda v: math.isfinite(v) and v > 0, "> 0"),
            "num_train_epochs": (lambda v: v > 0, "> 0"),
            "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "max_grad_norm": (lambda v: v > 0, "> 0"),
            "eval_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
            "validation_fraction": (
                lambda v: knobs["dataset"] != "offline" or 0 <= v < 1 - knobs["eval_fraction"],
                "in [0, 1 - eval_fraction) (the offline set)",
            ),
            "eval_split": (lambda v: v in ("test", "validation"), "'test' or 'validation'"),
            "bf16": (lambda v: v in (True, False, "auto"), "true, false or auto"),
            "max_prompt_length": (lambda v: 1 <= v < knobs["max_length"], "in [1, max_length)"),
            "eval_prompts": (lambda v: v >= 1, ">= 1 (the run is evaluated on them)"),
            "target_samples_per_prompt": (lambda v: v >= 0, ">= 0 (0: no KL to the target)"),
            "train_eval_prompts": (lambda v: v >= 0, ">= 0 (0: no approval on training prompts)"),
            "curve_every": (lambda v: v >= 0, ">= 0 (0: no evaluation during training)"),
            "curve_prompts": (lambda v: v >= 1, ">= 1"),
            "n_prompts": at_least_2,
            "completions_per_prompt": at_least_2,
        }
        for knob in (
            "batch_size",
            "gradient_accumulation_steps",
            "lora_r",
            "prompts_per_step",
            "samples_per_prompt",
            "eval_samples_per_prompt",
        ):
            rules[knob] = at_least_1
        for knob in ("max_new_tokens", "eval_max_new_tokens", "data_max_new_tokens"):
            rules[knob] = at_least_1
        extra = []  # what this loss needs beyond the general rules
        family = family_of(loss_fn)
        least = family.min_samples_per_prompt if family.samples_prompts else 1
        if least > 1:
            extra.append(("samples_per_prompt", lambda v: v >= least, f">= {least} (leave-one-out)"))
        if loss_fn.samples_policy or self.online:
            extra.append(("max_steps", lambda v: v >= 1, ">= 1 (on-policy training counts steps)"))
        for knob, ok, need in [(k, *rule) for k, rule in rules.items()] + extra:
            if not ok(knobs[knob]):
                raise UserError(f"{knob} must be {need}, got {knobs[knob]!r}")
        check_training_args(self.train.training_args)
        if self.data.dataset != "offline" and self.eval.eval_split != "test":
            raise UserError(f"eval_split: {self.eval.eval_split!r} exists for the offline set only")
        reward_scores_samples = loss_fn.needs_reward_model and (family.samples_prompts or self.online)
        if reward_scores_samples and self.data.dataset == "offline":
            if self.train.max_new_tokens != self.data.data_max_new_tokens:
                raise UserError(
                    f"max_new_tokens ({self.train.max_new_tokens}) must equal data_max_new_tokens "
                    f"({self.data.data_max_new_tokens}): the reward model is fit on the data's samples and scores the "
                    "policy's, so both need the same length cap"
                )
        if self.online and not loss_fn.needs_reward_model:
            raise UserError(f"online: {self.loss} uses no reward model to label sampled pairs (set online: false)")
        self._check_meaning(loss_fn, knobs)

    def _check_meaning(self, loss_fn: Loss, knobs: dict[str, Any]) -> None:
        """Values that pass the type and range rules above but would fail inside training, after the run folder
        is written, or run to a result that means nothing (probed knob by knob: docs/RELIABILITY.md)."""
        from transformers import SchedulerType

        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        schedules = sorted(s.value for s in SchedulerType if s.value != "reduce_lr_on_plateau")
        needs_kwargs = (
            "min_lr" in self.train.lr_scheduler_type and "lr_scheduler_kwargs" not in self.train.training_args
        )
        rules = [
            ("lr_scheduler_type", knobs["lr_scheduler_type"] in schedules and not needs_kwargs,
             f"one of {', '.join(schedules)} (a *_min_lr schedule with lr_scheduler_kwargs in training_args)"),
            ("lora_target_modules", isinstance(knobs["lora_target_modules"], list) and len(knobs["lora_target_modules"])
             > 0 and all(isinstance(m, str) and m for m in knobs["lora_target_modules"]), "a non-empty list of names"),
            ("lora_dropout", finite(knobs["lora_dropout"]) and 0 <= knobs["lora_dropout"] < 1, "in [0, 1)"),
            ("lora_alpha", knobs["lora_alpha"] is None or (finite(knobs["lora_alpha"]) and knobs["lora_alpha"] > 0),
             "> 0 (or None: 2 * lora_r); 0 scales the adapters away"),
            ("logging_steps", knobs["logging_steps"] >= 1 and (knobs["max_steps"] < 0 or knobs["logging_steps"]
             <= knobs["max_steps"]), ">= 1 and at most max_steps (else no step is logged)"),
            ("save_steps", knobs["save_steps"] is None or knobs["save_steps"] >= 1, ">= 1 (or None)"),
            ("reference_batch_size", knobs["reference_batch_size"] >= 1, ">= 1"),
            ("generation_batch_size", knobs["generation_batch_size"] >= 1, ">= 1"),
            ("reward_epochs", finite(knobs["reward_epochs"]) and knobs["reward_epochs"] > 0, "a finite number > 0"),
            ("num_train_epochs", finite(knobs["num_train_epochs"]), "finite"),
            ("seed", 0 <= knobs["seed"] < 2**32, "in [0, 2**32)"),
            ("data_seed", 0 <= knobs["data_seed"] < 2**32, "in [0, 2**32)"),
            ("max_train_rows", knobs["max_train_rows"] is None or knobs["max_train_rows"] >= 1, ">= 1 (or None)"),
            ("results_dir", bool(str(knobs["results_dir"]).strip()), "a folder (empty is the working directory)"),
            ("warmup_ratio", knobs["max_steps"] < 1 or math.ceil(knobs["warmup_ratio"] * knobs["max_steps"])
             < knobs["max_steps"], f"small enough that some of the {knobs['max_steps']} steps leave warm-up "
             "(a step in warm-up from 0 has learning rate 0)"),
        ]  # fmt: skip
        for knob, ok, need in rules:
            if not ok:
                raise UserError(f"{knob} must be {need}, got {knobs[knob]!r}")
        family = family_of(loss_fn)
        pairs_needed = family.uses_pairs or loss_fn.needs_reward_model
        if pairs_needed and self.data.dataset not in ("offline", "ufb"):
            why = "a reward model fit on pairs" if loss_fn.needs_reward_model else "paired rows"
            raise UserError(
                f"loss {self.loss} needs pairs ({why}), and dataset {self.data.dataset!r} has labelled rows only: "
                "use ufb or offline"
            )
        on_policy = loss_fn.samples_policy or self.online
        if self.data.dataset != "offline" and self.data.validation_fraction != DataConfig.validation_fraction:
            raise UserError(f"validation_fraction applies to the offline set only, not to {self.data.dataset!r}")
        if self.online and family.samples_prompts:
            raise UserError(f"online: {self.loss} samples from the policy anyway; online applies to distillation")
        if self.train.training_args and on_policy:
            raise UserError(
                f"training_args {sorted(self.train.training_args)} configure transformers' Trainer, which {self.loss} "
                "(trained on-policy) does not use: they would only change the run's identity"
            )
        _check_training_args_values(self.train.training_args)

    def identity(self) -> dict[str, Any]:
        """The knobs that change the run's result (all but ``NOT_IDENTITY``, and of ``training_args`` all but
        ``NOT_IDENTITY_TRAINING_ARGS``; none left: not listed), as saved beside it."""
        identity = {k: v for k, v in self.to_flat().items() if k not in NOT_IDENTITY}
        if identity["bf16"] == "auto":  # the precision this machine resolves it to: that is what changes a result
            from studylib.lm.runtime import resolve_bf16

            identity["bf16"] = resolve_bf16("auto")
        training_args = {k: v for k, v in identity.pop("training_args").items() if k not in NOT_IDENTITY_TRAINING_ARGS}
        return identity | ({"training_args": training_args} if training_args else {})

    def identity_hash(self) -> str:
        """A short hash of ``identity()``: two runs share it only if every knob that changes a result agrees."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:8]

    def to_flat(self) -> dict[str, Any]:
        """The flat knobs (the inverse of ``from_flat``), as saved beside a run's results."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in PARTS}
        for name in PARTS:
            flat |= dataclasses.asdict(getattr(self, name))
        return flat

    def name(self) -> str:
        """The run's directory name: ``run_name`` if given, else a readable prefix (data set, loss, its knobs,
        seed) and the identity hash, so runs that differ in any knob that changes a result never share a folder."""
        if self.run_name:
            return self.run_name
        knobs = "".join(f"-{k}={v}" for k, v in sorted(self.loss_kwargs.items()))
        online = "-online" if self.online else ""
        return f"{self.data.dataset}-{self.loss}{knobs}{online}-seed={self.train.seed}-{self.identity_hash()}"

    def run_dir(self) -> Path:
        """Where the run's results go: ``results_dir`` (relative: to the working directory, as every path knob; see
        the module's docstring) and the run's name."""
        return Path(os.path.abspath(Path(self.results_dir).expanduser())) / self.name()

    def checkpoint_dir(self) -> Path:
        """Where training checkpoints go: an interrupted run resumes from them."""
        return self.run_dir() / "checkpoints"


def _check_training_args_values(training_args: dict[str, Any]) -> None:
    """``training_args`` that ``TrainingArguments`` itself refuses, or that the Trainer would refuse later (an
    evaluation strategy with no evaluation set, a reporting integration that is not installed)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.trainer_utils import HubStrategy, SaveStrategy
    from transformers.training_args import OptimizerNames

    if training_args.get("eval_strategy", "no") != "no" or training_args.get("do_eval"):
        raise UserError("training_args: eval_strategy / do_eval need an evaluation set, which runs do not pass")
    if training_args.get("logging_strategy", "steps") != "steps":
        raise UserError("training_args: logging_strategy must stay 'steps': a run's curves are its logged steps")
    reports = training_args.get("report_to", [])
    reports = [reports] if isinstance(reports, str) else list(reports)
    missing = [r for r in reports if r not in ("none", "all") and r not in get_available_reporting_integrations()]
    if missing:
        raise UserError(f"training_args: report_to {missing} is not installed (pip install it, or report_to: none)")
    # enum-valued fields, checked by their enums (building TrainingArguments here would set up accelerate's process
    # state, on the CPU, before the run's own runtime: a run's device must have one owner)
    enums = {"optim": OptimizerNames, "save_strategy": SaveStrategy, "hub_strategy": HubStrategy}
    for field_name, enum in enums.items():
        if field_name in training_args and training_args[field_name] not in {e.value for e in enum}:
            allowed = ", ".join(sorted(e.value for e in enum))
            raise UserError(f"training_args: {field_name} {training_args[field_name]!r} is not one of {allowed}")


def _check_types(knobs: dict[str, Any], defaults: dict[str, Any]) -> None:
    for name, value in knobs.items():
        check_like_default(name, value, defaults[name], ALSO_ACCEPTED.get(name, ()))


def record_training_config(output_dir: str | Path, loss_fn: Loss, config: TrainConfig) -> None:
    """Before a trainer touches ``output_dir``: refuse to resume checkpoints made with other knobs
    (``check_resumable``), then save this run's loss and knobs as ``train_config.json``."""
    from studylib.results import write_atomic

    described = {"loss": repr(loss_fn), **dataclasses.asdict(config)}
    path = Path(output_dir) / "train_config.json"
    check_resumable(path, described)
    write_atomic(path, json.dumps(described, indent=2))


def differing_knobs(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{knob: (saved, current)}`` for every knob that differs (JSON round trip first, so tuples equal lists)."""
    current = json.loads(json.dumps(current, default=str))
    return {
        k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)
    }


def _identity_only(knobs: dict[str, Any]) -> dict[str, Any]:
    """``knobs`` without those that change no result: ``NOT_IDENTITY``, and ``NOT_IDENTITY_TRAINING_ARGS`` inside
    ``training_args`` (``report_to`` added to a run does not stop it resuming)."""
    kept = {k: v for k, v in knobs.items() if k not in NOT_IDENTITY}
    if isinstance(kept.get("training_args"), dict):
        kept["training_args"] = {k: v for k, v in kept["training_args"].items() if k not in NOT_IDENTITY_TRAINING_ARGS}
    return kept


def check_resumable(path: Path, current: dict[str, Any]) -> None:
    """Refuse to resume the run whose configuration ``path`` holds unless it equals ``current``, naming what differs
    (knobs that change no result, ``NOT_IDENTITY``, may differ)."""
    if not path.is_file():
        return
    saved = _identity_only(json.loads(path.read_text()))
    differ = differing_knobs(saved, _identity_only(current))
    if differ:
        shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise UserError(
            f"{path.parent} holds a run with other knobs ({shown}); it would resume that run's checkpoints. "
            "Delete the folder to start over, or use another output folder."
        )
