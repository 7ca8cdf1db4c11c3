"""One colour and one marker per method, for every figure of the study (toy and language model alike).

Figures look methods up by their label (``"RDRO (alpha=0.2)"``, ``"rdro"``, ``"KTO (beta=1)"`` ...):
``method_key`` reduces a label to the method it names, and an unknown method is an error, so a new method
gets a style here before it can appear in a figure. Colours follow families: density-ratio methods in blues
and red, distribution learning in purples and browns, baselines in greens, orange and greys.
"""

from __future__ import annotations

from typing import NamedTuple


class Style(NamedTuple):
    color: str
    marker: str


STYLES: dict[str, Style] = {
    "rdro": Style("#1f77b4", "o"),  # density ratio
    "rdro_flat": Style("#17becf", "v"),
    "ddro": Style("#d62728", "s"),
    "pmle": Style("#9467bd", "p"),  # distribution learning
    "distill": Style("#8c564b", "h"),
    "reverse_kl": Style("#e377c2", "*"),
    "dpo": Style("#2ca02c", "D"),  # baselines
    "simpo": Style("#98df8a", "d"),
    "kto": Style("#ff7f0e", "^"),
    "bco": Style("#bcbd22", "P"),
    "rlhf": Style("#7f7f7f", "X"),
}

_ALIASES = {"distillation": "distill", "reverse kl": "reverse_kl", "reverse_kl": "reverse_kl"}


def method_key(label: str) -> str:
    """The method a figure label names: ``"RDRO flat (alpha=0.20)"`` -> ``rdro_flat``, ``"reverse KL"`` ->
    ``reverse_kl``, ``"dpo"`` -> ``dpo``. Raises ``KeyError`` for a method the palette does not know."""
    text = label.lower().split(" (")[0].strip()
    if text in _ALIASES:
        return _ALIASES[text]
    words = text.replace("-", " ").split()
    key = words[0] if words else text
    if key == "rdro" and "flat" in words:
        key = "rdro_flat"
    if key not in STYLES:
        raise KeyError(f"no palette style for method {label!r} (studylib.palette.STYLES)")
    return key


def style(label: str) -> dict[str, str]:
    """``color`` and ``marker`` of the method ``label`` names, as matplotlib keyword arguments."""
    color, marker = STYLES[method_key(label)]
    return {"color": color, "marker": marker}
