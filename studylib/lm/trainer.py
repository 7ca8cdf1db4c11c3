"""Train a causal LM with any registered loss, on transformers' ``Trainer``.

- Paired losses get batches of (prompt, chosen, rejected); unpaired losses batches of
  (prompt, completion, label); KTO's mismatched pairs are built inside the micro-batch by shifting
  completions by one, as TRL does.
- Reference log-probs of the training rows are computed once, before training, and cached in
  ``output_dir``; or, for runs shorter than an epoch, on the fly for each batch (under LoRA the reference
  is the base model with its adapters disabled).
- Per-class reductions take the preferred fraction of the whole training set.
- Logs carry TRL's metric names plus ``grad_norm``, ``ratio/max`` and ``guard/activations``.
- Checkpoints every ``save_steps``; a run in an ``output_dir`` that has one resumes from it.

Multi-GPU: the same code under ``accelerate launch`` (see ``configs/accelerate/``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from studylib.lm.batching import model_logps, pad_sequences, reference_context, score_sequences
from studylib.losses import Loss, get_loss

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved beside its results)."""

    output_dir: str
    loss: str = "rdro"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 5e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 10.0
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    average_logps: bool = False
    logging_steps: int = 1
    save_steps: int = 50
    seed: int = 0
    bf16: bool = False
    reference_batch_size: int = 16
    # reference log-probs: True = once for every training row before training (pays off when the run sees every
    # row), False = on the fly for each batch (the adapter-disabled base under LoRA; cheaper for short runs),
    # None = decide: precompute when the run covers at least one epoch
    precompute_reference: bool | None = None

    def training_arguments(self) -> TrainingArguments:
        """transformers' arguments for this run (``warmup_ratio`` as a fraction of the total steps)."""
        return TrainingArguments(
            output_dir=self.output_dir,
            learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_ratio,
            max_grad_norm=self.max_grad_norm,
            logging_steps=self.logging_steps,
            save_steps=self.save_steps,
            save_total_limit=2,
            seed=self.seed,
            data_seed=self.seed,
            bf16=self.bf16,
            remove_unused_columns=False,
            report_to=[],
            disable_tqdm=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
        )


class RowsDataset(Dataset):
    """A list of token rows as a map-style dataset."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class AlignmentCollator:
    """Pads a list of token rows into the batch the loss's kind needs."""

    pad_id: int
    kind: str
    mismatched_pairs: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_ids"] for r in rows]
        if self.kind == "paired":
            batch = pad_sequences(
                prompts + prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], self.pad_id
            )
            if "ref_chosen_logps" in rows[0]:
                batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows])
                batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows])
            if "reward_margin" in rows[0]:
                batch["reward_margins"] = torch.tensor([float(r["reward_margin"]) for r in rows])
            return batch
        completions = [r["completion_ids"] for r in rows]
        batch = pad_sequences(prompts, completions, self.pad_id)
        batch["labels_preferred"] = torch.tensor([bool(r["label"]) for r in rows])
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows])
        if self.mismatched_pairs:
            if len(rows) < 2:
                raise ValueError("KTO's mismatched pairs need a micro-batch of at least 2 rows")
            shifted = completions[-1:] + completions[:-1]
            kl = pad_sequences(prompts, shifted, self.pad_id)
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch


class AlignmentTrainer(Trainer):
    """``Trainer`` whose loss is a registered alignment loss on sequence log-probs."""

    def __init__(self, *args, loss_fn: Loss, average_logps: bool = False, reference_model=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.average_logps = average_logps
        self.reference_model = reference_model
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: let Trainer divide by GA
        self._window: dict[str, list[float]] = {}

    @torch.no_grad()
    def _reference_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference_model is not None:
            return model_logps(self.reference_model, batch, self.average_logps)
        with reference_context(model):
            return model_logps(model, batch, self.average_logps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kind = self.loss_fn.kind
        tensors = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        logps = model_logps(model, tensors, self.average_logps)
        if kind == "paired":
            chosen, rejected = logps.chunk(2)
            if "ref_chosen_logps" in inputs:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self._reference_logps(model, tensors).chunk(2)
            loss, metrics = self.loss_fn(
                chosen,
                rejected,
                ref_chosen.to(chosen),
                ref_rejected.to(chosen),
                reward_margins=inputs.get("reward_margins"),
            )
        elif kind == "unpaired":
            extra = {}
            if "kl_input_ids" in inputs:
                kl_batch = {k: inputs[f"kl_{k}"] for k in tensors}
                with torch.no_grad():
                    extra["policy_kl_logps"] = model_logps(model, kl_batch, self.average_logps)
                extra["reference_kl_logps"] = self._reference_logps(model, kl_batch)
            reference = inputs["ref_logps"] if "ref_logps" in inputs else self._reference_logps(model, tensors)
            loss, metrics = self.loss_fn(logps, reference.to(logps), inputs["labels_preferred"], **extra)
        else:
            raise ValueError(
                f"the trainer does not handle loss kind {kind!r} ({self.loss_fn.name}); see studylib.lm.online"
            )
        self._record(metrics)
        return (loss, {"logps": logps}) if return_outputs else loss

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self._window.setdefault(name, []).append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._window and "loss" in logs:
            for name, values in self._window.items():
                finite = [v for v in values if v == v]
                if not finite:
                    continue
                if name == "guard/activations":
                    logs[name] = sum(finite)
                elif name == "ratio/max":
                    logs[name] = max(finite)
                else:
                    logs[name] = sum(finite) / len(finite)
            self._window = {}
        super().log(logs, start_time)


def wrap_lora(model: PreTrainedModel, config: TrainConfig) -> PreTrainedModel:
    """The model with fresh LoRA adapters on ``config.lora_target_modules`` (peft)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in config.lora_target_modules if m in present]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {config.lora_target_modules} exist in the model")
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _rows_key(rows: list[dict], kind: str, average: bool) -> str:
    digest = hashlib.sha256(json.dumps([kind, average]).encode())
    for r in rows:
        for key in ("prompt_ids", "completion_ids", "chosen_ids", "rejected_ids"):
            if key in r:
                digest.update(str(r[key]).encode())
    return digest.hexdigest()[:16]


def attach_reference_logps(model, rows: list[dict], kind: str, pad_id: int, config: TrainConfig) -> list[dict]:
    """Copies of ``rows`` with the reference's log-probs, computed once and cached in ``output_dir``."""
    cache = Path(config.output_dir) / f"reference_logps-{_rows_key(rows, kind, config.average_logps)}.pt"
    prompts = [r["prompt_ids"] for r in rows]
    if cache.exists():
        cached = torch.load(cache)
    else:
        with reference_context(model):
            score = lambda completions: score_sequences(  # noqa: E731
                model,
                prompts,
                completions,
                pad_id,
                config.reference_batch_size,
                config.average_logps,
                "reference log-probs",
            )
            if kind == "paired":
                cached = {
                    "chosen": score([r["chosen_ids"] for r in rows]),
                    "rejected": score([r["rejected_ids"] for r in rows]),
                }
            else:
                cached = {"logps": score([r["completion_ids"] for r in rows])}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(cached, tmp)
        tmp.replace(cache)
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        if kind == "paired":
            r["ref_chosen_logps"], r["ref_rejected_logps"] = float(cached["chosen"][i]), float(cached["rejected"][i])
        else:
            r["ref_logps"] = float(cached["logps"][i])
        out.append(r)
    return out


def build_loss(config: TrainConfig, rows: list[dict]) -> Loss:
    """The configured loss; per-class reductions get the training set's preferred fraction.

    ``alpha="auto"`` (RDRO) is replaced by that fraction, as the RDRO paper prescribes.
    """
    knobs = dict(config.loss_kwargs)
    probe = get_loss(config.loss, **{k: v for k, v in knobs.items() if v != "auto"})
    if probe.kind == "unpaired":
        fraction = sum(bool(r["label"]) for r in rows) / len(rows)
        if not 0.0 < fraction < 1.0:
            which = "preferred" if fraction == 1.0 else "non-preferred"
            raise ValueError(f"{config.loss} needs both classes, but every one of the {len(rows)} rows is {which}")
        if knobs.get("alpha") == "auto":
            knobs["alpha"] = fraction
        if hasattr(probe, "preferred_fraction") and knobs.get("preferred_fraction") is None:
            knobs["preferred_fraction"] = fraction
    return get_loss(config.loss, **knobs)


def uses_precomputed_reference(config: TrainConfig, n_rows: int) -> bool:
    """Whether reference log-probs are computed once before training (see ``TrainConfig.precompute_reference``)."""
    if config.precompute_reference is not None:
        return config.precompute_reference
    if config.max_steps <= 0:
        return True
    return config.max_steps * config.batch_size * config.gradient_accumulation_steps >= n_rows


def build_trainer(model: PreTrainedModel, tokenizer, rows: list[dict], config: TrainConfig) -> AlignmentTrainer:
    """An ``AlignmentTrainer`` ready to train ``model`` on token rows with ``config`` (reference log-probs attached).

    ``rows``: paired rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optional ``reward_margin``) or
    unpaired rows (``prompt_ids``, ``completion_ids``, ``label``), as ``studylib.lm.data`` tokenises them.
    """
    if not rows:
        raise ValueError("no training rows")
    loss_fn = build_loss(config, rows)
    if loss_fn.kind not in ("paired", "unpaired"):
        raise ValueError(f"{config.loss!r} is an on-policy objective: train it with studylib.lm.online")
    needed = {
        "paired": ("prompt_ids", "chosen_ids", "rejected_ids"),
        "unpaired": ("prompt_ids", "completion_ids", "label"),
    }
    missing = [k for k in needed[loss_fn.kind] if k not in rows[0]]
    if missing:
        raise ValueError(f"loss {config.loss!r} needs {loss_fn.kind} rows; the rows lack {missing}")
    if config.loss == "distill" and "reward_margin" not in rows[0]:
        raise ValueError("distill needs rows with reward_margin (from a reward model or the annotator pool)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(config.seed)
    policy = wrap_lora(model, config) if config.use_lora else model
    reference_model = None
    if not config.use_lora:
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    if uses_precomputed_reference(config, len(rows)):
        rows = attach_reference_logps(reference_model or policy, rows, loss_fn.kind, pad_id, config)
    return AlignmentTrainer(
        model=policy,
        args=config.training_arguments(),
        train_dataset=RowsDataset(rows),
        data_collator=AlignmentCollator(pad_id, loss_fn.kind, mismatched_pairs=loss_fn.name == "kto"),
        loss_fn=loss_fn,
        average_logps=config.average_logps,
        reference_model=reference_model,
    )


def train(model: PreTrainedModel, tokenizer, rows: list[dict], config: TrainConfig) -> AlignmentTrainer:
    """Build the trainer and train, resuming from the last checkpoint in ``output_dir`` if there is one.

    Returns the trainer: ``trainer.model`` is the trained policy, ``trainer.state.log_history`` the curves.
    """
    trainer = build_trainer(model, tokenizer, rows, config)
    trainer.train(resume_from_checkpoint=get_last_checkpoint(config.output_dir))
    return trainer
