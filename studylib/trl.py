"""TRL interop (``pip install studylib[trl]``): DDRO, RDRO and PMLE as TRL trainers, one import away for a TRL user.

>>> from studylib.trl import RDROConfig, RDROTrainer  # was: from trl import KTOConfig, KTOTrainer
>>> trainer = RDROTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=RDROConfig("out", alpha="auto"), train_dataset=ds)
>>> trainer.train()

Each trainer subclasses TRL's trainer for its data shape, so TRL's dataset formats (standard or conversational),
tokenization (EOS appended to standard-format completions), reference strategies (a ``ref_model``, the policy with
its PEFT adapter disabled, or ``precompute_ref_log_probs``), PEFT, distributed launch and model cards stay TRL's.
Only the loss changes, and it is the one registered in ``studylib.losses`` (``build_loss``), not a rewrite:

- ``DDROTrainer`` / ``RDROTrainer`` on ``KTOTrainer``: unpaired ``prompt/completion/label`` rows (paired rows are
  unpaired by TRL). No mismatched KL pairs are built (KTO's ``z0``): neither loss declares ``mismatched_pairs``.
  The loss's ``preferred_fraction`` (and ``alpha="auto"``) is the prepared training set's fraction of preferred rows.
- ``PMLETrainer`` on ``DPOTrainer``: paired ``prompt/chosen/rejected`` rows. PMLE is reference-free: no reference
  model is loaded and no reference forward runs.

Sequence log-probs are TRL's: the sum of the completion tokens' log-probs from TRL's fused LM head, the convention of
``studylib.lm.trainer``. Logs carry the loss's metrics under TRL's names (``rewards/*``, ``logps/*``, with
``ratio/max`` and ``guard/activations``), computed on the batch gathered from every process.

These classes override TRL's private ``_compute_loss``; they are tested with trl 1.16, the extra's pin.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import PreTrainedModel

try:
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.trainer.utils import get_config_model_id
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"studylib.trl needs TRL ({err}): pip install studylib[trl]") from err

from studylib.families import family_of
from studylib.losses import LOSSES, Loss, Metrics, build_loss

if not trl.__version__.startswith("1.16."):
    warnings.warn(f"studylib.trl is tested with trl 1.16.x, found {trl.__version__}", stacklevel=2)

_NOT_MODEL_INPUTS = {"completion_mask", "label", "ref_logps", "ref_KL_logps", "ref_chosen_logps", "ref_rejected_logps"}


def _model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a batch from TRL's collators that the model takes (vision inputs included)."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS and not k.startswith("KL_")}


class _LossConfig:
    """What our configs add to TRL's: a registered loss and its knobs, checked when the config is built."""

    loss_name: ClassVar[str]
    loss_fields: ClassVar[tuple[str, ...]]  # config fields passed to the loss as knobs
    trl_loss_fields: ClassVar[tuple[str, ...]]  # the TRL loss's knobs: this loss reads none of them

    def loss_knobs(self) -> dict[str, Any]:
        """The loss's knobs, as ``studylib.losses.build_loss`` takes them."""
        return {name: getattr(self, name) for name in self.loss_fields}

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        defaults = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(self)
        }
        changed = [knob for knob in self.trl_loss_fields if getattr(self, knob) != defaults[knob]]
        if changed:
            raise ValueError(
                f"{name}: {changed} configure TRL's own loss, which {self.loss_name} does not read; "
                f"its knobs are {list(self.loss_fields)}"
            )
        # a placeholder class fraction, so that alpha="auto" and per-class reductions build (the trainer sets its own)
        placeholder = 0.5 if LOSSES[self.loss_name].takes_class_fraction else None
        loss = build_loss(self.loss_name, self.loss_knobs(), placeholder)
        if loss.samples_policy or loss.needs_reward_model or family_of(loss).mismatched_pairs or loss.length_normalized:
            raise ValueError(f"{name}: {loss!r} needs what these trainers do not give (samples, rewards, KL pairs)")
        if not loss.needs_reference and self.sync_ref_model:
            raise ValueError(f"{name}: {self.loss_name} is reference-free, so there is no reference to sync")


_KTO_LOSS_FIELDS = ("loss_type", "beta", "desirable_weight", "undesirable_weight")
_DPO_LOSS_FIELDS = ("loss_type", "loss_weights", "beta", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef")
_DPO_LOSS_FIELDS += ("label_smoothing", "use_weighting", "discopop_tau")
_SAMPLING = {
    "default": "random",
    "metadata": {
        "help": "Sampler of the training rows (no KL pairs tie a row to its neighbours here).",
        "choices": ["random", "sequential", "group_by_length"],
    },
}
_REDUCTION_HELP = "per_class: mean over D+ plus mean over D- (the empirical risk); flat: one mean over all rows."


@dataclasses.dataclass
class DDROConfig(_LossConfig, KTOConfig):
    """``KTOConfig`` for DDRO: its knobs (``studylib.losses.DDRO``) instead of KTO's ``beta`` and weights."""

    loss_name: ClassVar[str] = "ddro"
    loss_fields: ClassVar[tuple[str, ...]] = ("reduction", "guard_eps")
    trl_loss_fields: ClassVar[tuple[str, ...]] = _KTO_LOSS_FIELDS

    reduction: str = dataclasses.field(default="per_class", metadata={"help": _REDUCTION_HELP})
    guard_eps: float = dataclasses.field(
        default=1e-2, metadata={"help": "The - loss is continued linearly beyond exp T = 2 - guard_eps."}
    )
    train_sampling_strategy: str = dataclasses.field(**_SAMPLING)


@dataclasses.dataclass
class RDROConfig(_LossConfig, KTOConfig):
    """``KTOConfig`` for RDRO: its knobs (``studylib.losses.RDRO``) instead of KTO's ``beta`` and weights."""

    loss_name: ClassVar[str] = "rdro"
    loss_fields: ClassVar[tuple[str, ...]] = ("alpha", "f", "reduction")
    trl_loss_fields: ClassVar[tuple[str, ...]] = _KTO_LOSS_FIELDS

    alpha: str = dataclasses.field(  # typed str for the command line ('auto' or a number); floats are fine
        default="auto", metadata={"help": "In (0, 1), or 'auto': the training set's fraction of preferred rows."}
    )
    f: str = dataclasses.field(default="logistic", metadata={"help": "Bregman f: logistic, squared or kliep."})
    reduction: str = dataclasses.field(default="per_class", metadata={"help": _REDUCTION_HELP})
    train_sampling_strategy: str = dataclasses.field(**_SAMPLING)

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str) and self.alpha != "auto":  # from the command line
            self.alpha = float(self.alpha)
        super().__post_init__()


@dataclasses.dataclass
class PMLEConfig(_LossConfig, DPOConfig):
    """``DPOConfig`` for PMLE: ``gamma`` (``studylib.losses.PMLE``) instead of DPO's ``beta`` and loss types.

    PMLE's optional ``beta KL(pi || pi_0)`` term needs samples from the policy (``studylib.lm.online``); this
    offline trainer has none, so it is not offered.
    """

    loss_name: ClassVar[str] = "pmle"
    loss_fields: ClassVar[tuple[str, ...]] = ("gamma",)
    trl_loss_fields: ClassVar[tuple[str, ...]] = _DPO_LOSS_FIELDS

    gamma: float = dataclasses.field(
        default=5e-3, metadata={"help": "Scale of the log-prob margin inside the sigmoid (the paper's 5e-3)."}
    )


class _RegistryLossTrainer:
    """What both trainers share: the config check, the loss built once, no reference for a reference-free loss,
    policy log-probs, metrics."""

    config_class: ClassVar[type]
    _paper: ClassVar[dict] = {}
    loss_fn: Loss

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: _LossConfig | None = None,
        *more: Any,
        **kwargs: Any,
    ) -> None:
        """TRL's trainer's arguments, in its order; ``args`` must be this trainer's config (built if None)."""
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self.config_class(f"{name.split('/')[-1]}-{self.config_class.loss_name.upper()}")
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}")
        if self._reference_free and ref_model is not None:
            raise ValueError(f"{args.loss_name} is reference-free: pass no ref_model")
        # TRL loads a reference copy unless the policy is a PEFT model or reference log-probs are precomputed. For a
        # reference-free loss the flag is set while TRL builds itself (it loads no reference, hashes the weights once,
        # and our _precompute_ref_logps computes nothing), then restored; with precompute_ref_logps cleared,
        # evaluate() neither precomputes nor refuses a new dataset.
        precompute = args.precompute_ref_log_probs
        if self._reference_free:
            args.precompute_ref_log_probs = True
        try:
            super().__init__(model, ref_model, args, *more, **kwargs)
        finally:
            args.precompute_ref_log_probs = precompute
        if self._reference_free:
            self.precompute_ref_logps = False
        self.loss_fn = build_loss(args.loss_name, args.loss_knobs(), self._preferred_fraction())

    @property
    def _reference_free(self) -> bool:
        return not LOSSES[self.config_class.loss_name].uses_reference  # the config rules out a KL term

    def _preferred_fraction(self) -> float | None:
        return None

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        return dataset if self._reference_free else super()._precompute_ref_logps(dataset, name, batch_size)

    def _reference(self, batch: dict[str, Tensor]) -> Any:
        """TRL's reference log-probs for the batch (its ``ref_model``, or the policy with the adapter disabled)."""
        return self.compute_ref_log_probs(self.model if self.ref_model is None else self.ref_model, batch)

    def _completion_logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Any]:
        """Sum of the completion tokens' log-probs per row, from TRL's fused LM head, and the model's output."""
        inputs = _model_inputs(batch)
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        outputs = model(**inputs, labels=labels, use_cache=False, fused_lm_head=True)
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        return outputs.log_probs[:, -(batch["input_ids"].size(1) - 1) :].sum(-1), outputs

    def _finish(
        self,
        loss: Tensor,
        loss_inputs: tuple[Tensor | None, ...],
        metrics: Metrics,
        outputs: Any,
        model: torch.nn.Module,
        batch: dict[str, Tensor],
        return_outputs: bool,
    ) -> Tensor | tuple[Tensor, Any]:
        """The loss (plus TRL's MoE auxiliary loss), with the loss's metrics recorded for ``log``."""
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        if self.accelerator.num_processes > 1:  # metrics of the global batch, not a mean of per-process means
            gathered = [None if t is None else self.accelerator.gather_for_metrics(t.detach()) for t in loss_inputs]
            with torch.no_grad():
                _, metrics = self.loss_fn(*gathered)
        window = self._metrics["train" if self.model.training else "eval"]
        for name, value in metrics.items():
            value = float(value)
            if value == value:  # a batch without one class has no mean for it
                window[name].append(value)
        if not return_outputs:
            return loss
        with torch.no_grad():  # as TRL: logits for compute_metrics need a plain forward
            return loss, model(**_model_inputs(batch))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log (the mean over the logging window), but ``guard/activations`` summed and ``ratio/max`` a max."""
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        window = self._metrics[mode]
        for name, reduce in (("guard/activations", sum), ("ratio/max", max)):
            if window.get(name):
                logs[prefix + name] = reduce(window.pop(name))
        super().log(logs, start_time)


class _UnpairedTrainer(_RegistryLossTrainer, KTOTrainer):
    """``KTOTrainer`` whose loss is a registered unpaired loss of ``(policy_logps, reference_logps, labels)``."""

    @property
    def calculate_KL(self) -> bool:
        """KTO's mismatched KL pairs: never built, as no loss here declares ``mismatched_pairs`` (TRL's set ignored)."""
        return False

    @calculate_KL.setter
    def calculate_KL(self, value: bool) -> None:
        pass

    def _prepare_dataset(self, *args: Any, **kwargs: Any) -> Dataset:
        """TRL's, without its advice on KTO's class weights (a per-class reduction already balances the classes)."""
        kto_logger = logging.getLogger(KTOTrainer.__module__)
        quiet = logging.Filter()
        quiet.filter = lambda record: "desirable_weight" not in record.getMessage()
        kto_logger.addFilter(quiet)
        try:
            return super()._prepare_dataset(*args, **kwargs)
        finally:
            kto_logger.removeFilter(quiet)

    def _preferred_fraction(self) -> float | None:
        if not isinstance(self.train_dataset, Dataset) or len(self.train_dataset) == 0:
            return None  # streamed rows: per-class weights use each batch's own fraction
        labels = self.train_dataset["label"]
        return sum(bool(label) for label in labels) / len(labels)

    def _compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool
    ) -> Tensor | tuple[Tensor, Any]:
        batch = {k: v.to(self.accelerator.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        policy, outputs = self._completion_logps(model, batch)
        reference = batch["ref_logps"] if self.precompute_ref_logps else self._reference(batch)[0]
        loss_inputs = (policy, reference.to(policy), batch["label"].bool())
        loss, metrics = self.loss_fn(*loss_inputs)
        return self._finish(loss, loss_inputs, metrics, outputs, model, batch, return_outputs)


class _PairedTrainer(_RegistryLossTrainer, DPOTrainer):
    """``DPOTrainer`` whose loss is a registered paired loss of ``(chosen, rejected, ref_chosen, ref_rejected)``."""

    def _compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool
    ) -> Tensor | tuple[Tensor, Any]:
        batch = {k: v.to(self.accelerator.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        logps, outputs = self._completion_logps(model, batch)
        chosen, rejected = logps.chunk(2)  # TRL's collator: chosen rows, then rejected rows
        reference = (None, None)
        if self.loss_fn.uses_reference:
            if self.precompute_ref_logps:
                reference = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
            else:
                reference = self._reference(batch)
            reference = tuple(r.to(chosen) for r in reference)
        loss_inputs = (chosen, rejected, *reference)
        loss, metrics = self.loss_fn(*loss_inputs)
        return self._finish(loss, loss_inputs, metrics, outputs, model, batch, return_outputs)


class DDROTrainer(_UnpairedTrainer):
    """DDRO (Higuchi et al., 2025; reconstructed, see ``studylib.losses.DDRO``) as a drop-in for ``KTOTrainer``."""

    config_class = DDROConfig
    _name = "DDRO"
    _tag_names = ["trl", "studylib", "ddro"]


class RDROTrainer(_UnpairedTrainer):
    """RDRO (Takahashi et al., 2025; ``studylib.losses.RDRO``) as a drop-in for ``KTOTrainer``."""

    config_class = RDROConfig
    _name = "RDRO"
    _tag_names = ["trl", "studylib", "rdro"]


class PMLETrainer(_PairedTrainer):
    """Preference MLE (Yun et al., "Alignment as Distribution Learning"; ``studylib.losses.PMLE``) as a drop-in for
    ``DPOTrainer``. Reference-free: pass no ``ref_model``; none is loaded and no reference forward runs."""

    config_class = PMLEConfig
    _name = "PMLE"
    _tag_names = ["trl", "studylib", "pmle"]


__all__ = ["DDROConfig", "DDROTrainer", "PMLEConfig", "PMLETrainer", "RDROConfig", "RDROTrainer"]
