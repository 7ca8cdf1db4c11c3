"""The loss families: one class per family owns the rows its losses train on, their batches, the forward passes a
step runs and the inputs the loss receives (``studylib.families.base.Family``).

>>> from studylib.families import family_of
>>> from studylib.losses import get_loss
>>> family_of(get_loss("kto")).name
'unpaired_mismatched'

``family_of`` picks a loss's family from its declarations (``Loss.kind``, ``Loss.mismatched_pairs``, compared by
``Family.serves``); everything outside ``studylib/losses`` and this package asks the family object. Adding a family:
a ``Family`` subclass and one entry in ``FAMILIES`` (docs/DESIGN.md).
"""

from __future__ import annotations

from studylib.families.base import Family
from studylib.families.on_policy import OnPolicyFamily
from studylib.families.paired import PairedFamily
from studylib.families.unpaired import UnpairedFamily, UnpairedMismatchedFamily

FAMILIES: tuple[Family, ...] = (PairedFamily(), UnpairedFamily(), UnpairedMismatchedFamily(), OnPolicyFamily())


def family_of(loss) -> Family:
    """The family of ``loss`` (an instance or a registered class): the one whose declarations it matches."""
    for family in FAMILIES:
        if family.serves(loss):
            return family
    raise ValueError(
        f"loss {loss.name!r} declares kind={loss.kind!r}, mismatched_pairs={loss.mismatched_pairs!r}: no family "
        f"serves it (known: {', '.join(f.name for f in FAMILIES)}; add one in studylib.families)"
    )


__all__ = ["FAMILIES", "Family", "family_of"]
