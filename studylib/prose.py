"""Prose rendered from the tables: the README's findings and ``docs/RESULTS.md`` are Jinja2 templates over the
committed results, so a number in the text is the number in its table.

Each ``docs/templates/<path>.j2`` renders to ``<path>`` (``docs/templates/README.md.j2`` -> ``README.md``);
files whose name starts with ``_`` are parts for ``{% include %}``. ``make docs`` writes them
(``python -m studylib docs``); ``python -m studylib docs --check`` and the tests render them afresh and fail on any
difference, so a number edited by hand, or a table rerun without ``make docs``, is caught.

What a template sees (``context``):

- ``table("lm_exact/falls")``: a committed table (``results/<name>.csv``); ``.row(setting="S1", method="DDRO")``
  is its one row matching those values (an error naming the table and the filter when none or several match),
  ``.rows(...)`` every match, ``.col("slope")`` a column; a row's values are ``Num`` where they are numbers.
- ``record("lm/<run>/metrics.json")``: a committed JSON file, numbers as ``Num``; ``glob("memorisation/*")``
  the names under ``results/`` that match, sorted.
- ``ci(row, "approval_gain")``: a value with its 95% interval, read from ``<col>``, ``<col>_low`` and
  ``<col>_high`` (``low=``/``high=`` name other columns): ``+0.102 [+0.016, +0.188]`` with ``signed=True``.
- ``machine_label(entry.machine)``: a recorded machine named as ``seconds_by_machine`` names it.
- ``profile_runs("cpu")``: the names of a profile's runs; ``stale("cpu")``: those whose results are older than
  their code, data or config, with why.
- ``hand("1 h 57 min", "what it is and where it comes from")``: a number that comes from no table. It is shown
  with a footnote mark, and ``footnotes()`` lists every such number with its origin.

**Rounding, stated once**: a ``Num`` prints with 3 significant figures (``{{ x }}``); ``{{ x.f(2) }}`` gives 2
decimals, ``{{ x.g(2) }}`` 2 significant figures, ``{{ x.signed(3) }}`` a sign always, ``{{ x.sci(1) }}``
scientific notation (``3.6e-4``), ``{{ x.pct(1) }}`` a percentage, ``{{ x.int }}`` an integer; every one
rounds half to even (Python's ``format``). An interval's ends are rounded like its value.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "docs" / "templates"


class Num:
    """A number from a table, printed by the one rounding rule above (3 significant figures by default)."""

    def __init__(self, value: float, source: str = "") -> None:
        self.value = float(value)
        self.source = source

    def _check(self) -> None:
        if not math.isfinite(self.value):
            raise ValueError(f"{self.source or 'a number'} is {self.value}: a template cannot print it as a number")

    def g(self, digits: int = 3) -> str:
        """``digits`` significant figures, without scientific notation for magnitudes 1e-4 .. 1e6."""
        self._check()
        if self.value == 0:
            return "0"
        text = f"{self.value:#.{digits}g}"
        if "e" in text:
            exponent = int(text.split("e")[1])
            if -5 <= exponent < 6:
                decimals = max(digits - 1 - exponent, 0)
                text = f"{self.value:.{decimals}f}"
        return text.rstrip(".") if "e" not in text else text

    def f(self, decimals: int = 2) -> str:
        """``decimals`` digits after the point."""
        self._check()
        return f"{self.value:.{decimals}f}"

    def signed(self, decimals: int = 2) -> str:
        """``decimals`` digits after the point, with ``+`` before a positive number (and 0)."""
        self._check()
        return f"{self.value:+.{decimals}f}"

    def sci(self, digits: int = 2) -> str:
        """Scientific notation with ``digits`` significant figures and a short exponent: ``3.6e-4``."""
        self._check()
        mantissa, exponent = f"{self.value:.{digits - 1}e}".split("e")
        return f"{mantissa}e{int(exponent)}"

    def pct(self, decimals: int = 0) -> str:
        """As a percentage: ``0.474`` -> ``47%`` (``decimals`` after the point)."""
        self._check()
        return f"{100 * self.value:.{decimals}f}%"

    @property
    def int(self) -> str:
        self._check()
        return str(int(round(self.value)))

    def __str__(self) -> str:
        return self.g(3)

    def __float__(self) -> float:
        return self.value

    def _other(self, other: Any) -> float:
        return float(other.value if isinstance(other, Num) else other)

    def __lt__(self, other: Any) -> bool:
        return self.value < self._other(other)

    def __le__(self, other: Any) -> bool:
        return self.value <= self._other(other)

    def __gt__(self, other: Any) -> bool:
        return self.value > self._other(other)

    def __ge__(self, other: Any) -> bool:
        return self.value >= self._other(other)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Num | int | float) and self.value == self._other(other)

    def __hash__(self) -> int:
        return hash(self.value)

    def __neg__(self) -> Num:
        return Num(-self.value, self.source)

    def __abs__(self) -> Num:
        return Num(abs(self.value), self.source)

    def __radd__(self, other: Any) -> Num:
        return Num(self._other(other) + self.value, self.source)

    def __rmul__(self, other: Any) -> Num:
        return Num(self._other(other) * self.value, self.source)

    def __round__(self, digits: int | None = None) -> float:
        return round(self.value, digits)

    def __sub__(self, other: Any) -> Num:
        return Num(self.value - self._other(other), self.source)

    def __add__(self, other: Any) -> Num:
        return Num(self.value + self._other(other), self.source)

    def __mul__(self, other: Any) -> Num:
        return Num(self.value * self._other(other), self.source)

    def __truediv__(self, other: Any) -> Num:
        return Num(self.value / self._other(other), self.source)


def _wrap(value: Any, source: str) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return Num(value, source)
    if isinstance(value, dict):
        return {k: _wrap(v, f"{source}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list):
        return [_wrap(v, f"{source}[{i}]") for i, v in enumerate(value)]
    return value


class Row(dict):
    """One row of a table: its values by column, numbers as ``Num``; ``row.col`` works as ``row["col"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{self.get('_where', 'a row')} has no column {name!r}") from None


class Table:
    """A committed table (``results/<name>.csv``) for a template."""

    def __init__(self, name: str, results: Path) -> None:
        import pandas as pd

        self.name = name
        path = results / f"{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"no table {path}")
        self.frame = pd.read_csv(path)

    def _matches(self, where: dict[str, Any]) -> Any:
        frame = self.frame
        for column, value in where.items():
            if column not in frame:
                raise KeyError(f"table {self.name} has no column {column!r}; it has {', '.join(frame.columns)}")
            value = float(value) if isinstance(value, Num) else value
            frame = frame[frame[column] == value]
        return frame

    def _row(self, values: dict[str, Any], where: str) -> Row:
        row = Row({k: _wrap(v.item() if hasattr(v, "item") else v, f"{where}.{k}") for k, v in values.items()})
        row["_where"] = where
        return row

    def row(self, **where: Any) -> Row:
        """The one row whose columns equal ``where``; an error when none or several do."""
        found = self._matches(where)
        label = f"{self.name}[{', '.join(f'{k}={v}' for k, v in where.items())}]"
        if len(found) != 1:
            raise LookupError(f"{label}: {len(found)} rows match, not 1")
        return self._row(found.iloc[0].to_dict(), label)

    def rows(self, **where: Any) -> list[Row]:
        """Every row whose columns equal ``where``, in the table's order."""
        found = self._matches(where)
        return [self._row(r, f"{self.name}[{i}]") for i, r in zip(found.index, found.to_dict("records"), strict=True)]

    def col(self, column: str) -> list[Any]:
        """A column's values (numbers as ``Num``)."""
        return [_wrap(v.item() if hasattr(v, "item") else v, f"{self.name}.{column}") for v in self.frame[column]]

    def __len__(self) -> int:
        return len(self.frame)


def ci(
    row: dict,
    column: str,
    digits: int = 2,
    signed: bool = False,
    low: str | None = None,
    high: str | None = None,
    x: bool = False,
) -> str:
    """``value [low, high]`` from a row's ``column`` and its interval columns (``<column>_low``/``_high`` unless
    named), each with ``digits`` decimals (a sign always with ``signed``; ``x`` after the value for a ratio)."""
    ends = [row[column], row[low or f"{column}_low"], row[high or f"{column}_high"]]
    text = [v.signed(digits) if signed else v.f(digits) for v in ends]
    return f"{text[0]}{'x' if x else ''} [{text[1]}, {text[2]}]"


class Context(dict):
    """What a template sees; ``hand`` numbers are collected for ``footnotes()``."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.results = root / "results"
        self.notes: list[tuple[str, str]] = []
        self._profiles: dict[str, tuple[list, dict]] = {}
        self.update(
            table=self.table,
            record=self.record,
            glob=self.glob,
            ci=ci,
            hand=self.hand,
            footnotes=self.footnotes,
            Num=Num,
            stale=self.stale,
            profile_runs=self.profile_runs,
            machine_label=machine_label,
        )

    def table(self, name: str) -> Table:
        return Table(name, self.results)

    def record(self, name: str) -> Any:
        path = self.results / name
        return _wrap(json.loads(path.read_text()), name)

    def glob(self, pattern: str) -> list[str]:
        return sorted(str(p.relative_to(self.results)) for p in self.results.glob(pattern))

    def stale(self, profile: str) -> dict[str, list[str]]:
        """The runs of ``profile`` whose committed results are older than their sources, with the reasons
        (``studylib.study.stale_runs``): a page that prints this count is rendered afresh by the docs check, so
        it can never claim results current that are not."""
        from studylib.study import stale_runs

        return stale_runs(*self._recorded(profile))

    def profile_runs(self, profile: str) -> list[str]:
        """The names of a profile's runs, as its study config lists them now."""
        return [run.name for run in self._recorded(profile)[0]]

    def _recorded(self, profile: str) -> tuple[list, dict]:
        """A profile's runs and their recorded entries, read once per rendering (``study.recorded_runs``)."""
        if profile not in self._profiles:
            from studylib.study import recorded_runs

            self._profiles[profile] = recorded_runs(profile, self.results)
        return self._profiles[profile]

    def hand(self, text: str, origin: str) -> str:
        """A number from no committed table: shown with a footnote mark; ``footnotes()`` says where it is from."""
        for i, (shown, said) in enumerate(self.notes, start=1):
            if (shown, said) == (text, origin):
                return f"{text}[^h{i}]"
        self.notes.append((text, origin))
        return f"{text}[^h{len(self.notes)}]"

    def footnotes(self) -> str:
        lines = [f"[^h{i}]: Not from a committed table: {origin}" for i, (_, origin) in enumerate(self.notes, 1)]
        return "\n".join(lines)


def machine_label(recorded: dict | None) -> str:
    """A recorded machine named as ``study-<profile>.json``'s ``seconds_by_machine`` names it."""
    from studylib.study import machine_label as label

    def plain(value: Any) -> Any:  # a number as JSON held it: 2, not 2.0
        if not isinstance(value, Num):
            return value
        return int(value.value) if value.value.is_integer() else value.value

    plain_record = {k: plain(v) for k, v in (recorded or {}).items()}
    return label(plain_record or None)


def templates(root: Path = ROOT) -> Iterator[tuple[Path, Path]]:
    """Each template under ``<root>/docs/templates`` and the file it renders to (parts, ``_*``, left out)."""
    base = root / "docs" / "templates"
    for template in sorted(base.rglob("*.j2")):
        if not template.name.startswith("_"):
            yield template, root / template.relative_to(base).with_suffix("")


def render(template: Path, root: Path = ROOT, results_root: Path | None = None) -> str:
    """One template rendered over the committed tables (``<results_root or root>/results``)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root / "docs" / "templates")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 (Markdown, not HTML)
        trim_blocks=True,
        lstrip_blocks=True,
    )
    template = template if template.is_absolute() else root / template
    name = template.relative_to(root / "docs" / "templates").as_posix()
    return env.get_template(name).render(Context(results_root or root))


def differences(root: Path = ROOT, results_root: Path | None = None) -> dict[Path, str]:
    """The rendered files under ``root`` that differ from their templates rendered afresh, each with a unified
    diff (committed -> rendered); empty when all agree."""
    found = {}
    for template, target in templates(root):
        fresh = render(template, root, results_root)
        now = target.read_text() if target.is_file() else ""
        if fresh != now:
            diff = difflib.unified_diff(
                now.splitlines(),
                fresh.splitlines(),
                str(target.relative_to(root)),
                "rendered from the tables",
                lineterm="",
                n=0,
            )
            found[target] = "\n".join(diff)
    return found


def write_all(root: Path = ROOT) -> list[Path]:
    """Render every template to its file (atomically); returns the files that changed."""
    from studylib.results import write_atomic

    changed = []
    for template, target in templates(root):
        fresh = render(template, root)
        if not target.is_file() or target.read_text() != fresh:
            write_atomic(target, fresh)
            changed.append(target)
    return changed
