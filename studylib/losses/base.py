"""What every loss shares: the return type, input validation, reductions and TRL-style metrics.

A loss is a callable object: its knobs are validated in ``__init__``, and ``__call__`` maps sequence
log-probabilities (from a logit table in the toy, from a causal LM in training) to
``(scalar loss, metrics)``. Metrics use TRL's names (``rewards/chosen``, ``logps/chosen``, ...) and are
detached 0-dim tensors, so logging them costs no device sync until a caller asks for a number.

A loss computes every statistic of a batch (KTO's ``z0``, BCO's running mean, a batch's class fraction,
RLOO's group means, the metrics) from the rows it is given, and never talks to other processes: under
several processes the trainers give each process the whole batch, its own rows with gradients
(``studylib.lm.batching.gather_rows``), so a loss is the same function on one process or many.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

Metrics = dict[str, Tensor]
LossOutput = tuple[Tensor, Metrics]

REDUCTIONS = ("per_class", "flat")


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise naming the knob."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a finite number >= 0, else raise naming the knob."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: float) -> float:
    """Return ``value`` if it lies strictly inside (0, 1), else raise naming the knob."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value < 1.0):
        raise ValueError(f"{name} must lie strictly inside (0, 1), got {value!r}")
    return float(value)


def check_tensors(**tensors: Tensor | None) -> None:
    """Check that the given tensors are 1-D, of one length, and free of NaN; name any offender."""
    present = {name: t for name, t in tensors.items() if t is not None}
    length = None
    for name, t in present.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one value per sequence), got shape {tuple(t.shape)}")
        if length is None:
            length, first = t.shape[0], name
        elif t.shape[0] != length:
            raise ValueError(f"{name} has {t.shape[0]} values but {first} has {length}: shapes must match")
        if t.is_floating_point() and torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN")
    if length == 0:
        raise ValueError(f"empty batch: {first} has no values")


def as_bool_labels(labels: Tensor) -> Tensor:
    """Labels as a bool tensor (True = preferred); accepts bool or 0/1 values."""
    if labels.dtype == torch.bool:
        return labels
    if not torch.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be bool or 0/1 (1 = preferred, 0 = non-preferred)")
    return labels.bool()


def class_weights(labels: Tensor, reduction: str, preferred_fraction: float | None) -> Tensor:
    """Per-row weights whose mean is the requested reduction of per-row losses.

    ``flat``: every row weighs 1, so the mean is the authors' one flat batch mean, which weights the
    classes by their frequency. ``per_class``: a preferred row weighs ``1 / pi_hat+`` and a
    non-preferred row ``1 / pi_hat-``, so the mean estimates ``E+[loss+] + E-[loss-]``, the empirical
    risk of density-ratio estimation. ``pi_hat+`` should be the preferred fraction of the whole
    training set (pass it); if None, the batch's own fraction is used (exact for full-batch fits).
    """
    if reduction == "flat":
        return torch.ones_like(labels, dtype=torch.get_default_dtype())
    if preferred_fraction is None:
        preferred_fraction = labels.float().mean().item()
        if not 0.0 < preferred_fraction < 1.0:
            raise ValueError("per_class reduction needs both classes in the batch, or an explicit preferred_fraction")
    w_pos, w_neg = 1.0 / preferred_fraction, 1.0 / (1.0 - preferred_fraction)
    return torch.where(labels, torch.as_tensor(w_pos), torch.as_tensor(w_neg))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds; NaN if the mask is empty (TRL logs NaN then too)."""
    if mask.any():
        return values[mask].mean()
    return torch.full((), float("nan"), dtype=values.dtype, device=values.device)


def paired_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen: Tensor, policy_rejected: Tensor
) -> Metrics:
    """TRL's DPO metric names for one batch of pairs."""
    return {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


def unpaired_metrics(rewards: Tensor, policy_logps: Tensor, labels: Tensor) -> Metrics:
    """TRL's KTO metric names for one batch of labelled rows.

    ``rewards/accuracies`` for unpaired rows is the fraction whose implied reward has the label's sign
    (> 0 for preferred, < 0 for non-preferred); TRL's KTO logs no accuracy.
    """
    rewards = rewards.detach()
    chosen = _masked_mean(rewards, labels)
    rejected = _masked_mean(rewards, ~labels)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": torch.where(labels, rewards > 0, rewards < 0).float().mean(),
        "logps/chosen": _masked_mean(policy_logps.detach(), labels),
        "logps/rejected": _masked_mean(policy_logps.detach(), ~labels),
    }


class Loss:
    """Base of every loss. Subclasses set ``name`` and ``kind``, declare what they need, and implement ``__call__``.

    What a loss needs is declared here, as class attributes, and read by one routing function
    (``studylib.lm.experiment.plan_training``) and the trainers; nothing outside ``studylib.losses`` tests a
    loss's name.

    - ``kind``: the rows a step needs: ``paired`` (chosen/rejected log-probs), ``unpaired`` (log-probs with
      labels), ``on_policy`` (log-probs of samples from the current policy, with their rewards).
    - ``uses_reference``: the loss reads reference log-probs (a reference-free loss never runs a reference
      forward; a KL term, see ``kl_coefficient``, still needs the reference).
    - ``needs_reward_model``: the loss needs rewards ``R(x, y)`` (on-policy rewards, distillation's soft labels).
    - ``mismatched_pairs``: the loss needs log-probs of prompts paired with other rows' completions (KTO's z0).
    - ``length_normalized``: log-probs are averaged over completion tokens instead of summed (SimPO).
    - ``takes_class_fraction``: the loss takes ``preferred_fraction``, the whole training set's preferred
      fraction (per-class reductions), and ``alpha="auto"`` means that fraction.
    - ``kl_coefficient``: the coefficient of an added ``beta KL(pi || pi_0)`` term (0 for none); a positive one
      needs samples from the policy and a reference.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    uses_reference: ClassVar[bool] = True
    needs_reward_model: ClassVar[bool] = False
    mismatched_pairs: ClassVar[bool] = False
    length_normalized: ClassVar[bool] = False
    takes_class_fraction: ClassVar[bool] = False

    @property
    def kl_coefficient(self) -> float:
        """``beta`` of an added ``beta KL(pi || pi_0)`` term estimated from policy samples (0: none)."""
        return 0.0

    @property
    def needs_reference(self) -> bool:
        """Whether a run of this loss computes reference log-probs at all."""
        return self.uses_reference or self.kl_coefficient > 0

    @property
    def samples_policy(self) -> bool:
        """Whether a step needs fresh samples from the current policy (a family that samples prompts, or a KL term)."""
        from studylib.families import family_of  # the families import nothing of the losses at run time

        return family_of(self).samples_prompts or self.kl_coefficient > 0

    def state_dict(self) -> dict[str, float]:
        """What the loss carries from batch to batch (BCO's running mean), for a checkpoint; ``{}``: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore ``state_dict()``'s values (a resumed run continues where the checkpoint stopped)."""
        if state:
            raise ValueError(f"{self.name} keeps no state between batches, got {sorted(state)}")

    def hparams(self) -> dict[str, object]:
        """The knobs this loss was built with (for stamping results)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({knobs})"


class UnpairedDensityRatioLoss(Loss):
    """Shared plumbing of DDRO and RDRO: per-row losses for + and - rows, then a class reduction."""

    kind = "unpaired"
    takes_class_fraction = True

    def __init__(self, reduction: str = "per_class", preferred_fraction: float | None = None) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.preferred_fraction = (
            None if preferred_fraction is None else check_fraction("preferred_fraction", preferred_fraction)
        )

    def row_losses(self, logratios: Tensor, labels: Tensor) -> tuple[Tensor, Metrics]:
        """Loss of each row given ``T = log pi - log pi_ref`` and its label, and any extra metrics."""
        raise NotImplementedError

    def __call__(self, policy_logps: Tensor, reference_logps: Tensor, labels: Tensor, **unused: Tensor) -> LossOutput:
        check_tensors(policy_logps=policy_logps, reference_logps=reference_logps, labels=labels)
        labels = as_bool_labels(labels)
        logratios = policy_logps - reference_logps
        losses, extra_metrics = self.row_losses(logratios, labels)
        weights = class_weights(labels, self.reduction, self.preferred_fraction).to(losses)
        loss = (weights * losses).mean()
        metrics = unpaired_metrics(logratios, policy_logps, labels)
        metrics["ratio/max"] = logratios.detach().max().exp()
        return loss, metrics | extra_metrics
