"""The alignment losses and their registry.

>>> from studylib.losses import get_loss, available_losses
>>> loss_fn = get_loss("rdro", alpha=0.39)
>>> loss, metrics = loss_fn(policy_logps, reference_logps, labels)

Families: paired (DPO, SimPO, PMLE, preference distillation), unpaired baselines (KTO, BCO), unpaired
density-ratio (DDRO, RDRO), on-policy (reverse KL, RLHF). Adding a method is one class (declaring what it
needs, see ``Loss``) and one line in ``LOSSES``.

``build_loss`` builds a loss for a training set once per run: it resolves ``alpha="auto"`` and gives
per-class reductions the set's preferred fraction.
"""

from __future__ import annotations

from studylib.losses.base import Loss, LossOutput, Metrics
from studylib.losses.density_ratio import DDRO, RDRO
from studylib.losses.on_policy import RLHF, ReverseKL
from studylib.losses.paired import DPO, PMLE, PreferenceDistillation, SimPO
from studylib.losses.unpaired import BCO, KTO

LOSSES: dict[str, type[Loss]] = {
    cls.name: cls for cls in (DPO, SimPO, KTO, BCO, DDRO, RDRO, PMLE, PreferenceDistillation, ReverseKL, RLHF)
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


def build_loss(name: str, knobs: dict[str, object] | None = None, preferred_fraction: float | None = None) -> Loss:
    """The loss for one training set, built once: ``alpha="auto"`` becomes ``preferred_fraction`` (RDRO's
    prescription), and a loss that ``takes_class_fraction`` gets it unless its knobs set one.

    ``preferred_fraction`` is the whole training set's fraction of preferred rows (None where the data have
    no labels); a knob set to ``"auto"`` without it is an error that names the knob.
    """
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    cls = LOSSES[name]
    if cls.kind == "unpaired" and preferred_fraction is not None and not 0.0 < preferred_fraction < 1.0:
        which = "preferred" if preferred_fraction >= 1.0 else "non-preferred"
        raise ValueError(f"loss {name!r} trains on labelled rows and needs both classes, but every row is {which}")
    knobs = dict(knobs or {})
    for key, value in knobs.items():
        if value == "auto":
            if key != "alpha":
                raise ValueError(f"loss {name!r}: only alpha may be 'auto' (the preferred fraction), not {key!r}")
            if preferred_fraction is None:
                raise ValueError(f"loss {name!r}: alpha='auto' needs labelled data (the preferred fraction)")
            knobs[key] = preferred_fraction
    if cls.takes_class_fraction and knobs.get("preferred_fraction") is None:
        knobs["preferred_fraction"] = preferred_fraction
    return get_loss(name, **knobs)


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
    "SimPO",
    "LossOutput",
    "Metrics",
    "PreferenceDistillation",
    "ReverseKL",
    "available_losses",
    "build_loss",
    "get_loss",
]
