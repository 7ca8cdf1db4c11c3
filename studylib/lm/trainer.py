"""Train a causal LM offline with a registered loss (paired or unpaired rows), on transformers' ``Trainer``.

The loss is built once by the caller (``studylib.losses.build_loss``) and passed in; what a step does with a batch
is its family's (``studylib.families``: the rows, their batches, the forward passes and the loss's inputs), and the
rest is read from the loss's declarations, never from its name:

- the family: paired rows (prompt, chosen, rejected), unpaired rows (prompt, completion, label), and KTO's unpaired
  rows with mismatched pairs (each given once, before training, another row's completion, so the reference's
  log-probs of the mismatched pairs are precomputed with the rest). ``needs_reward_model`` (distillation): rows
  carry ``reward_margin``.
- ``uses_reference``: reference log-probs (``studylib.lm.reference``) computed once before training and
  cached in ``output_dir``, or, for runs shorter than an epoch, on the fly for each batch. A reference-free
  loss (SimPO, PMLE) never runs a reference forward.
- ``length_normalized``: log-probs averaged over completion tokens (SimPO).
- Logs carry TRL's metric names plus ``grad_norm``, ``ratio/max`` and ``guard/activations``.
- Checkpoints every ``save_steps``; a run in an ``output_dir`` that has one resumes from it.

Several processes: the same code under ``accelerate launch`` (see ``configs/accelerate/``). A micro-batch is the
rows of every process together; each process gathers the whole micro-batch's log-probs (``batching.gather_rows``)
and computes the loss of all of it, so KTO's ``z0``, BCO's running mean, a batch's class fraction and every
metric are those of one process given the same rows; the gradient is scaled so that the wrapper's average of the
processes' gradients is their sum, the whole micro-batch's gradient (``batching.scale_for_averaged_gradients``).
``tests/test_lm_distributed.py`` checks it against one process, on 2 CPU processes.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from studylib.families import Family, family_of
from studylib.lm.batching import (
    BATCH_KEYS,
    model_logps,
    pad_token_id,
    scale_for_averaged_gradients,
    score_sequences,
)
from studylib.lm.checkpoints import disk_full_guard, latest_complete, trainer_checkpoint_complete
from studylib.lm.config import TrainConfig, check_training_args, record_training_config
from studylib.lm.curves import CurveCallback, CurveProbe
from studylib.lm.reference import Reference, adapter_input_casting_off, autocast_context, policy_and_reference
from studylib.lm.runtime import Runtime, make_runtime
from studylib.losses import Loss
from studylib.results import write_atomic


def training_arguments(config: TrainConfig, output_dir: str | Path, runtime: Runtime) -> TrainingArguments:
    """transformers' arguments for a run (``warmup_ratio`` as a fraction of the total steps), then
    ``config.training_args`` (any other field: ``report_to``, ``gradient_checkpointing``, ``push_to_hub``, ...).
    ``bf16`` is the runtime's decision (``config.bf16`` may say "auto"); ``use_cpu`` when the run's device is a CPU."""
    check_training_args(config.training_args)
    defaults = {
        "save_total_limit": 2,
        "report_to": "none",
        "disable_tqdm": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": runtime.device.type == "cuda",
        "use_cpu": runtime.device.type == "cpu",
    }
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_steps=config.checkpoint_every(),
        seed=config.seed,
        data_seed=config.seed,
        bf16=runtime.bf16,  # autocast; the frozen weights are bf16 themselves (reference.policy_and_reference)
        remove_unused_columns=False,
        **(defaults | config.training_args),
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
    """Pads token rows into the batch a loss needs: its family's (``studylib.families``) ``collate``."""

    pad_id: int
    family: Family

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self.family.collate(rows, self.pad_id)


LOSS_STATE = "loss_state.json"


class LossStateCallback(TrainerCallback):
    """Writes the loss's state (BCO's running mean: ``Loss.state_dict``) into each checkpoint the ``Trainer`` saves;
    ``train`` reads it back when it resumes from that checkpoint."""

    def __init__(self, loss_fn: Loss) -> None:
        self.loss_fn = loss_fn

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_atomic(folder / LOSS_STATE, json.dumps(self.loss_fn.state_dict()))


class AlignmentTrainer(Trainer):
    """``Trainer`` whose loss is a registered alignment loss on sequence log-probs.

    ``reference``: where reference log-probs come from when a batch does not carry precomputed ones (None for
    a reference-free loss: asking for one is then an error, not a silent extra forward).
    """

    def __init__(self, *args, loss_fn: Loss, reference: Reference | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.family = family_of(loss_fn)
        self.reference = reference
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: let Trainer divide by GA
        self._window: dict[str, list[float]] = {}

    def compute_loss_context_manager(self):
        """The Trainer's (bf16 autocast), plus, in bf16, ``reference.adapter_input_casting_off``."""
        stack = super().compute_loss_context_manager()
        if self.args.bf16:
            stack.enter_context(adapter_input_casting_off(self.model))
        return stack

    def _logps(self, model, inputs: dict, prefix: str = "") -> torch.Tensor:
        batch = {k: inputs[prefix + k] for k in BATCH_KEYS}
        return model_logps(model, batch, self.loss_fn.length_normalized)

    def _reference_logps(self, inputs: dict, prefix: str = "") -> torch.Tensor:
        """The batch's precomputed reference log-probs (``ref_<prefix>logps``), else a reference forward pass."""
        if f"ref_{prefix}logps" in inputs:
            return inputs[f"ref_{prefix}logps"]
        if self.reference is None:
            raise RuntimeError(f"{self.loss_fn.name} asked for reference log-probs but the trainer has no reference")
        batch = {k: inputs[prefix + k] for k in BATCH_KEYS}
        return self.reference.logps(batch, self.loss_fn.length_normalized)

    def _stop_if_not_finite(self, what: str, value: torch.Tensor, step: int | None = None) -> None:
        """Raise, naming the optimizer step (default: the one being computed) and the quantity, if not finite."""
        if not torch.isfinite(value).all():
            step = self.state.global_step + 1 if step is None else step
            raise FloatingPointError(
                f"training diverged at step {step}: {what} is not finite "
                f"({value.detach().flatten()[:4].tolist()}); the last good checkpoint stays in {self.args.output_dir}"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The family's forward passes and loss inputs (``Family.loss_inputs``), then the loss."""
        family = self.family
        loss_inputs = family.loss_inputs(
            self.loss_fn, inputs, lambda prefix: self._logps(model, inputs, prefix),
            lambda prefix: self._reference_logps(inputs, prefix),
        )  # fmt: skip
        policy = torch.cat([loss_inputs[k] for k in family.policy_keys])
        self._stop_if_not_finite("the policy's log-probs", policy)
        loss, metrics = self.loss_fn(**loss_inputs)
        self._stop_if_not_finite("the loss", loss)
        self._record(metrics)
        loss = scale_for_averaged_gradients(loss)
        return (loss, loss_inputs) if return_outputs else loss

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self._window.setdefault(name, []).append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "grad_norm" in logs:  # logged before the step's checkpoint is saved: a bad step saves nothing
            grad_norm = torch.tensor(float(logs["grad_norm"]))
            self._stop_if_not_finite("the gradient norm", grad_norm, step=self.state.global_step)
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


def _scored_key(prompts: list, completions: dict[str, list], average: bool) -> str:
    """The cache key of reference log-probs: exactly what is scored (prompts, each named list of completions, and
    whether log-probs are averaged), so another family's or another data set's rows never hit this cache."""
    digest = hashlib.sha256(json.dumps([sorted(completions), average]).encode())
    digest.update(str(prompts).encode())
    for name in sorted(completions):
        digest.update(str(completions[name]).encode())
    return digest.hexdigest()[:16]


def attach_reference_logps(
    reference: Reference,
    rows: list[dict],
    loss_fn: Loss,
    pad_id: int,
    batch_size: int,
    output_dir: str | Path,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Copies of ``rows`` with the reference's log-probs of the completions the loss's family names
    (``Family.reference_completions``: paired rows' chosen and rejected, unpaired rows' completion and KTO's
    mismatched one), computed once on ``device`` (where the reference is: the run's) and cached in ``output_dir``."""
    family, average = family_of(loss_fn), loss_fn.length_normalized
    prompts, scored = [r["prompt_ids"] for r in rows], family.reference_completions(rows)
    cache = Path(output_dir) / f"reference_logps-{_scored_key(prompts, scored, average)}.pt"
    if cache.exists():
        cached = torch.load(cache, weights_only=True)
    else:
        with reference.active() as model:
            cached = {
                name: score_sequences(
                    model, prompts, completions, pad_id, batch_size, average, "reference log-probs", device
                )
                for name, completions in scored.items()
            }
        buffer = io.BytesIO()
        torch.save(cached, buffer)
        write_atomic(cache, buffer.getvalue())
    return family.attach_reference(rows, cached)


def preferred_fraction(rows: list[dict]) -> float:
    """The fraction of preferred rows of an unpaired training set; both classes must be present."""
    if not rows:
        raise ValueError("no training rows")
    fraction = sum(bool(r["label"]) for r in rows) / len(rows)
    if not 0.0 < fraction < 1.0:
        which = "preferred" if fraction == 1.0 else "non-preferred"
        raise ValueError(f"unpaired training needs both classes, but every one of the {len(rows)} rows is {which}")
    return fraction


def uses_precomputed_reference(config: TrainConfig, n_rows: int, processes: int = 1) -> bool:
    """Whether reference log-probs are computed once before training (see ``TrainConfig.precompute_reference``):
    by default when the run's steps see at least ``n_rows`` rows (``batch_size`` rows per process)."""
    if config.precompute_reference is not None:
        return config.precompute_reference
    if config.max_steps <= 0:
        return True
    return config.max_steps * config.batch_size * config.gradient_accumulation_steps * processes >= n_rows


def check_rows(rows: list[dict], loss_fn: Loss) -> None:
    """Raise, naming what is missing, unless ``rows`` are what the offline trainer needs for ``loss_fn``."""
    if loss_fn.samples_policy:
        raise ValueError(f"{loss_fn!r} samples from the policy: train it with studylib.lm.online")
    family_of(loss_fn).check_rows(rows, loss_fn)


def build_trainer(
    model: PreTrainedModel,
    tokenizer,
    rows: list[dict],
    loss_fn: Loss,
    config: TrainConfig,
    output_dir: str | Path,
    reference_model: nn.Module | None = None,
    runtime: Runtime | None = None,
    curve: CurveProbe | None = None,
) -> AlignmentTrainer:
    """An ``AlignmentTrainer`` ready to train ``model`` on token rows (reference log-probs attached if precomputed).

    ``rows``: paired rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optional ``reward_margin``) or
    unpaired rows (``prompt_ids``, ``completion_ids``, ``label``), as ``studylib.lm.data`` tokenises them.
    ``loss_fn``: built once for these rows (``studylib.losses.build_loss``, with ``preferred_fraction(rows)``
    for unpaired rows). Checkpoints and the cached reference log-probs go to ``output_dir``.
    ``reference_model``: the frozen reference under full fine-tuning (a copy of ``model`` is made if None and
    the loss needs one); LoRA runs use the policy with its adapters disabled.
    ``runtime``: the run's device, processes and precision (``studylib.lm.runtime``; made from ``config.bf16`` if
    None). The policy and the reference are placed on its device before anything runs, so the reference log-probs
    are computed there, under the training's autocast, by the main process first (the others then read its cache).
    ``curve``: measured every ``curve.every`` steps into the log history (``studylib.lm.curves``), or None.
    """
    check_rows(rows, loss_fn)
    runtime = runtime if runtime is not None else make_runtime(config.bf16)
    config = runtime.resolve(config)
    pad_id = pad_token_id(tokenizer)
    model, reference = policy_and_reference(model, config, loss_fn.needs_reference, reference_model, runtime.device)
    record_training_config(output_dir, loss_fn, config)  # never resume another run's checkpoints
    family = family_of(loss_fn)
    rows = family.prepare_rows(rows, config.seed)
    args = training_arguments(config, output_dir, runtime)
    if loss_fn.uses_reference and uses_precomputed_reference(config, len(rows), args.world_size):
        batch_size = config.reference_batch_size
        # as the policy computes its log-probs in training; the main process fills the cache, the others read it
        with runtime.main_process_first(), autocast_context(model, config, runtime.device):
            rows = attach_reference_logps(reference, rows, loss_fn, pad_id, batch_size, output_dir, runtime.device)
    return AlignmentTrainer(
        model=model,
        args=args,
        train_dataset=RowsDataset(rows),
        data_collator=AlignmentCollator(pad_id, family),
        loss_fn=loss_fn,
        reference=reference,
        callbacks=[LossStateCallback(loss_fn)] + ([CurveCallback(curve)] if curve is not None else []),
    )


def train(*args: Any, **kwargs: Any) -> AlignmentTrainer:
    """Build the trainer (``build_trainer``: the same arguments) and train, resuming from the last complete checkpoint
    in its ``output_dir`` if there is one (``checkpoints.latest_complete``: a later, incomplete one is set aside); a
    full disk is reported as such.

    Returns the trainer: ``trainer.model`` is the trained policy, ``trainer.state.log_history`` the curves (the
    per-step log, and the curve points if ``curve`` was given).
    """
    trainer = build_trainer(*args, **kwargs)
    loss_fn, output_dir = trainer.loss_fn, Path(trainer.args.output_dir)
    required = (LOSS_STATE,) if loss_fn.state_dict() else ()  # a loss with state needs it back to resume
    last = latest_complete(output_dir, lambda folder: trainer_checkpoint_complete(folder, required))
    if last is not None and (last / LOSS_STATE).is_file():
        loss_fn.load_state_dict(json.loads((last / LOSS_STATE).read_text()))
    with disk_full_guard(output_dir):
        trainer.train(resume_from_checkpoint=None if last is None else str(last))
    return trainer
