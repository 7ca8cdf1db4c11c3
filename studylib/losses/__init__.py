"""The alignment losses and their registry.

>>> from studylib.losses import get_loss, available_losses
>>> loss_fn = get_loss("rdro", alpha=0.39)
>>> loss, metrics = loss_fn(policy_logps, reference_logps, labels)

Families: paired (DPO, PMLE, preference distillation), unpaired baselines (KTO, BCO), unpaired
density-ratio (DDRO, RDRO), on-policy (reverse KL, RLHF). Adding a method is one class and one line in
``LOSSES``.
"""

from __future__ import annotations

from studylib.losses.base import Loss, LossOutput, Metrics
from studylib.losses.density_ratio import DDRO, RDRO
from studylib.losses.on_policy import RLHF, ReverseKL
from studylib.losses.paired import DPO, PMLE, PreferenceDistillation
from studylib.losses.unpaired import BCO, KTO

LOSSES: dict[str, type[Loss]] = {
    cls.name: cls for cls in (DPO, KTO, BCO, DDRO, RDRO, PMLE, PreferenceDistillation, ReverseKL, RLHF)
}


def available_losses() -> list[str]:
    """The registered loss names."""
    return sorted(LOSSES)


def get_loss(name: str, **hparams: object) -> Loss:
    """Build the loss registered as ``name`` with its knobs; unknown names and knobs raise clearly."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    cls = LOSSES[name]
    try:
        return cls(**hparams)
    except TypeError as err:
        raise TypeError(f"bad knobs for loss {name!r} ({cls.__name__}): {err}") from None


__all__ = [
    "BCO",
    "DDRO",
    "DPO",
    "KTO",
    "LOSSES",
    "PMLE",
    "RDRO",
    "RLHF",
    "Loss",
    "LossOutput",
    "Metrics",
    "PreferenceDistillation",
    "ReverseKL",
    "available_losses",
    "get_loss",
]
