"""Train a causal LM offline with a registered loss (paired or unpaired rows), on transformers' ``Trainer``.

The loss is built once by the caller (``studylib.losses.build_loss``) and passed in; what it needs is read
from its declarations, never from its name:

- ``kind`` paired: batches of (prompt, chosen, rejected); unpaired: (prompt, completion, label).
  ``mismatched_pairs`` (KTO's ``z0``): each row is given once, before training, another row's completion
  (``kl_completion_ids``, a seeded cycle through the rows, as TRL fixes its KL pairs), so the reference's
  log-probs of the mismatched pairs are precomputed with the rest. ``needs_reward_model`` (distillation):
  rows carry ``reward_margin``.
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

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from studylib.lm.batching import (
    BATCH_KEYS,
    gather_rows,
    model_logps,
    pad_sequences,
    pad_token_id,
    scale_for_averaged_gradients,
    score_sequences,
)
from studylib.lm.checkpoints import disk_full_guard, latest_complete, trainer_checkpoint_complete
from studylib.lm.config import TrainConfig, check_training_args, record_training_config
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
    """Pads token rows into the batch a loss needs (``kind`` and ``mismatched_pairs``: the loss's declarations)."""

    pad_id: int
    kind: str
    mismatched_pairs: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_ids"] for r in rows]
        if self.kind == "paired":
            batch = pad_sequences(
                prompts + prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], self.pad_id
            )
            if "ref_chosen_logps" in rows[0]:  # in the batch's row order: chosen, then rejected
                batch["ref_logps"] = torch.tensor(
                    [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows]
                )
            if "reward_margin" in rows[0]:
                batch["reward_margins"] = torch.tensor([float(r["reward_margin"]) for r in rows])
            return batch
        completions = [r["completion_ids"] for r in rows]
        batch = pad_sequences(prompts, completions, self.pad_id)
        batch["labels_preferred"] = torch.tensor([bool(r["label"]) for r in rows])
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows])
        if self.mismatched_pairs:
            kl = pad_sequences(prompts, [r["kl_completion_ids"] for r in rows], self.pad_id)
            batch.update({f"kl_{k}": v for k, v in kl.items()})
            if "ref_kl_logps" in rows[0]:
                batch["ref_kl_logps"] = torch.tensor([r["ref_kl_logps"] for r in rows])
        return batch


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


def attach_mismatched_completions(rows: list[dict], seed: int) -> list[dict]:
    """Copies of ``rows``, each with ``kl_completion_ids``: the completion of the next row in a seeded cycle.

    KTO's ``z0`` estimates ``KL(pi || pi_ref)`` on prompts paired with unrelated completions; fixing the
    pairs once (as TRL does) lets their reference log-probs be computed once with the rest.
    """
    if len(rows) < 2:
        raise ValueError("mismatched pairs (KTO's z0) need at least 2 training rows")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
    return [{**r, "kl_completion_ids": rows[partner[i]]["completion_ids"]} for i, r in enumerate(rows)]


class AlignmentTrainer(Trainer):
    """``Trainer`` whose loss is a registered alignment loss on sequence log-probs.

    ``reference``: where reference log-probs come from when a batch does not carry precomputed ones (None for
    a reference-free loss: asking for one is then an error, not a silent extra forward).
    """

    def __init__(self, *args, loss_fn: Loss, reference: Reference | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
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
        loss_fn = self.loss_fn
        logps = self._logps(model, inputs)
        reference = None
        if loss_fn.uses_reference:
            reference = inputs["ref_logps"] if "ref_logps" in inputs else self._reference_logps(inputs)
            reference = reference.to(logps)
        if loss_fn.kind == "paired":
            chosen, rejected = logps.chunk(2)
            ref_chosen, ref_rejected = (None, None) if reference is None else reference.chunk(2)
            margins = inputs.get("reward_margins")
            chosen, rejected, ref_chosen, ref_rejected, margins = gather_rows(
                chosen, rejected, ref_chosen, ref_rejected, margins
            )
            self._stop_if_not_finite("the policy's log-probs", torch.cat([chosen, rejected]))
            extra = {} if margins is None else {"reward_margins": margins}
            loss, metrics = loss_fn(chosen, rejected, ref_chosen, ref_rejected, **extra)
        else:
            kl_policy = kl_reference = None
            if loss_fn.mismatched_pairs:
                with torch.no_grad():
                    kl_policy = self._logps(model, inputs, "kl_")
                if "ref_kl_logps" in inputs:
                    kl_reference = inputs["ref_kl_logps"].to(logps)
                else:
                    kl_reference = self._reference_logps(inputs, "kl_")
            policy, reference, labels, kl_policy, kl_reference = gather_rows(
                logps, reference, inputs["labels_preferred"], kl_policy, kl_reference
            )
            self._stop_if_not_finite("the policy's log-probs", policy)
            extra = {}
            if loss_fn.mismatched_pairs:
                extra = {"policy_kl_logps": kl_policy, "reference_kl_logps": kl_reference}
            loss, metrics = loss_fn(policy, reference, labels, **extra)
        self._stop_if_not_finite("the loss", loss)
        self._record(metrics)
        loss = scale_for_averaged_gradients(loss)
        return (loss, {"logps": logps}) if return_outputs else loss

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


def _rows_key(rows: list[dict], kind: str, average: bool) -> str:
    digest = hashlib.sha256(json.dumps([kind, average]).encode())
    for r in rows:
        for key in ("prompt_ids", "completion_ids", "chosen_ids", "rejected_ids", "kl_completion_ids"):
            if key in r:
                digest.update(str(r[key]).encode())
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
    """Copies of ``rows`` with the reference's log-probs (``ref_logps``; paired rows: chosen then rejected,
    as ``ref_logps`` of the collated batch), computed once on ``device`` (where the reference is: the run's) and
    cached in ``output_dir``."""
    average = loss_fn.length_normalized
    cache = Path(output_dir) / f"reference_logps-{_rows_key(rows, loss_fn.kind, average)}.pt"
    prompts = [r["prompt_ids"] for r in rows]
    if cache.exists():
        cached = torch.load(cache, weights_only=True)
    else:
        with reference.active() as model:

            def score(completions: list) -> torch.Tensor:
                return score_sequences(
                    model, prompts, completions, pad_id, batch_size, average, "reference log-probs", device
                )

            if loss_fn.kind == "paired":
                cached = {
                    "chosen": score([r["chosen_ids"] for r in rows]),
                    "rejected": score([r["rejected_ids"] for r in rows]),
                }
            else:
                cached = {"logps": score([r["completion_ids"] for r in rows])}
                if "kl_completion_ids" in rows[0]:
                    cached["kl_logps"] = score([r["kl_completion_ids"] for r in rows])
        buffer = io.BytesIO()
        torch.save(cached, buffer)
        write_atomic(cache, buffer.getvalue())
    if loss_fn.kind == "paired":
        return [
            {**r, "ref_chosen_logps": float(cached["chosen"][i]), "ref_rejected_logps": float(cached["rejected"][i])}
            for i, r in enumerate(rows)
        ]
    kl = {"ref_kl_logps": cached["kl_logps"]} if "kl_logps" in cached else {}
    return [
        {**r, "ref_logps": float(cached["logps"][i])} | {k: float(v[i]) for k, v in kl.items()}
        for i, r in enumerate(rows)
    ]


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


ROW_KEYS = {
    "paired": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "unpaired": ("prompt_ids", "completion_ids", "label"),
}


def check_rows(rows: list[dict], loss_fn: Loss) -> None:
    """Raise, naming what is missing, unless ``rows`` are what the offline trainer needs for ``loss_fn``."""
    if not rows:
        raise ValueError("no training rows")
    if loss_fn.kind not in ROW_KEYS or loss_fn.kl_coefficient > 0:
        raise ValueError(f"{loss_fn!r} samples from the policy: train it with studylib.lm.online")
    missing = [k for k in ROW_KEYS[loss_fn.kind] if k not in rows[0]]
    if missing:
        raise ValueError(f"loss {loss_fn.name!r} needs {loss_fn.kind} rows; the rows lack {missing}")
    if loss_fn.needs_reward_model and "reward_margin" not in rows[0]:
        raise ValueError(f"{loss_fn.name} needs rows with reward_margin (studylib.lm.reward.attach_reward_margins)")


def build_trainer(
    model: PreTrainedModel,
    tokenizer,
    rows: list[dict],
    loss_fn: Loss,
    config: TrainConfig,
    output_dir: str | Path,
    reference_model: nn.Module | None = None,
    runtime: Runtime | None = None,
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
    """
    check_rows(rows, loss_fn)
    runtime = runtime if runtime is not None else make_runtime(config.bf16)
    config = runtime.resolve(config)
    pad_id = pad_token_id(tokenizer)
    model, reference = policy_and_reference(model, config, loss_fn.needs_reference, reference_model, runtime.device)
    record_training_config(output_dir, loss_fn, config)  # never resume another run's checkpoints
    if loss_fn.mismatched_pairs:
        rows = attach_mismatched_completions(rows, config.seed)
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
        data_collator=AlignmentCollator(pad_id, loss_fn.kind, mismatched_pairs=loss_fn.mismatched_pairs),
        loss_fn=loss_fn,
        reference=reference,
        callbacks=[LossStateCallback(loss_fn)],
    )


def train(
    model: PreTrainedModel,
    tokenizer,
    rows: list[dict],
    loss_fn: Loss,
    config: TrainConfig,
    output_dir: str | Path,
    reference_model: nn.Module | None = None,
    runtime: Runtime | None = None,
) -> AlignmentTrainer:
    """Build the trainer and train, resuming from the last complete checkpoint in ``output_dir`` if there is one
    (``checkpoints.latest_complete``: a later, incomplete one is set aside); a full disk is reported as such.

    Returns the trainer: ``trainer.model`` is the trained policy, ``trainer.state.log_history`` the curves.
    """
    trainer = build_trainer(model, tokenizer, rows, loss_fn, config, output_dir, reference_model, runtime)
    required = (LOSS_STATE,) if loss_fn.state_dict() else ()  # a loss with state needs it back to resume
    last = latest_complete(output_dir, lambda folder: trainer_checkpoint_complete(folder, required))
    if last is not None and (last / LOSS_STATE).is_file():
        loss_fn.load_state_dict(json.loads((last / LOSS_STATE).read_text()))
    with disk_full_guard(output_dir):
        trainer.train(resume_from_checkpoint=None if last is None else str(last))
    return trainer
