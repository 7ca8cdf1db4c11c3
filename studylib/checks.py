"""Checks shared by run configs, study configs and the command line: a value must be like its default
(``check_like_default``), a name joined to a folder stays inside it (``plain_name``), and a key is given once
(``unique_keys``, for JSON; the study runner's YAML loader does the same)."""

from __future__ import annotations

from collections.abc import Callable
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


def plain_name(name: Any) -> bool:
    """Whether ``name`` stays one level inside the folder it is joined to: a non-empty string without a path
    separator, not ``.`` or ``..`` (so neither absolute nor climbing out)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(s in name for s in ("/", "\\", "\0"))


def unique_keys(where: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """An ``object_pairs_hook`` for ``json.loads``: every object (at any depth) as a dict, and a key given twice in
    one object a ``UserError`` naming the key and ``where`` (the file), instead of the later value silently winning."""

    def to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key, value in pairs:
            if key in found:
                raise UserError(f"{where}: key {key!r} is given twice (a later value would win)")
            found[key] = value
        return found

    return to_dict
