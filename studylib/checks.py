"""One rule for a knob's type, shared by run configs and study configs: a value must be like its default."""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """A mistake in what the user gave (a knob, a file, a row of it), with a message naming it: the command line
    prints it as one line and exits with status 2; a traceback is kept for bugs (and for ``--debug``)."""


KINDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
    list: "a list",
}


ALSO_ACCEPTED: dict[str, tuple[Any, ...]] = {"bf16": ("auto",)}
"""Values a knob takes besides those of its default's type (``bf16: auto``: the device decides)."""


def check_like_default(name: str, value: Any, default: Any, also: tuple[Any, ...] = ()) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` has the type of ``default``.

    A default of None accepts anything (its type is not known here); None is accepted only where the default is
    None; an int passes for a float. A YAML ``1e-3`` read as text, ``2.5`` for a step count or ``null`` for
    ``use_lora`` fails here, not deep inside a run. ``also``: other values the knob accepts (``ALSO_ACCEPTED``).
    """
    if default is None or type(default) not in KINDS or (isinstance(value, str) and value in also):
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{name} must be {KINDS[type(default)]} (its default is {default!r}), got {value!r}")
