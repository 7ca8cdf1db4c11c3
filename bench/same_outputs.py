"""Whether two result folders hold the same outputs, timings aside: every run record (``metrics.json``), every CSV
table and every Markdown table, compared exactly (numbers to the last digit, text to the character).

A refactor that changes no behaviour leaves a profile's outputs the same; run the profile before and after into two
folders and compare them::

    python -m studylib study --profile smoke --results-dir scratch/before --no-html   # on the old commit
    python -m studylib study --profile smoke --results-dir scratch/after --no-html    # on the new one
    python bench/same_outputs.py scratch/before scratch/after

Left out: stamps (``*.json`` beside a table or figure, and a Markdown table's ``created``, ``git_commit`` and
``sources`` lines), the runner's own record and executed notebooks, timing tables, the keys and columns that are
wall-clock times (``seconds``, ``steps_per_second``) and the speeds of the bf16 probe (``GFLOP/s``); each folder's
own path is read as the same placeholder.
Exit status 0 when every compared file is the same and both folders hold the same files; 1 otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TIMING = ("seconds", "per_second")
SKIPPED_FILES = ("timing.csv", "timing.md")
STAMP_LINES = ("- created:", "- git_commit:", "- sources:")
SPEED = re.compile(r"bf16 [0-9.]+ against float32 [0-9.]+ GFLOP/s")


def _normalised(text: str, root: Path) -> str:
    """``text`` with the folder's own path (absolute, or as given) and the probe's measured speeds replaced."""
    for form in (str(root.resolve()), str(root)):
        text = text.replace(form, "<results>")
    return SPEED.sub("<probe speeds>", text)


def _is_timing(name: str) -> bool:
    return any(word in name for word in TIMING)


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if not _is_timing(k)}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _csv_without_timing(text: str) -> list[list[str]]:
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return rows
    keep = [i for i, name in enumerate(rows[0]) if not _is_timing(name)]
    return [[row[i] for i in keep if i < len(row)] for row in rows]


def _markdown_lines(text: str) -> list[str]:
    """The lines of a Markdown file, stamps left out; in a table, the columns named as timings left out."""
    lines, timing_columns = [], []
    for line in text.splitlines():
        if line.startswith(STAMP_LINES):
            continue
        if not line.startswith("|"):
            lines.append(line)
            timing_columns = []
            continue
        cells = line.split("|")
        if not timing_columns and not set(line) <= set("|-: "):  # a table's header row
            timing_columns = [i for i, cell in enumerate(cells) if _is_timing(cell)] or [-1]
        lines.append("|".join(c for i, c in enumerate(cells) if i not in timing_columns))
    return lines


def compared_files(root: Path) -> set[str]:
    """The files compared under ``root``, relative to it."""
    found = set()
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if not path.is_file() or relative.parts[0] == "notebooks" or path.name in SKIPPED_FILES:
            continue
        if path.name == "metrics.json" or path.suffix in (".csv", ".md"):
            found.add(str(relative))
    return found


def differences(before: Path, after: Path) -> list[str]:
    """One line per file that differs, or is in one folder only."""
    old, new = compared_files(before), compared_files(after)
    lines = [f"only in {before}: {name}" for name in sorted(old - new)]
    lines += [f"only in {after}: {name}" for name in sorted(new - old)]
    for name in sorted(old & new):
        a, b = _normalised((before / name).read_text(), before), _normalised((after / name).read_text(), after)
        if name.endswith(".json"):
            same = json.dumps(_without_timing(json.loads(a)), sort_keys=True) == json.dumps(
                _without_timing(json.loads(b)), sort_keys=True
            )  # as text: NaN equals NaN
        elif name.endswith(".csv"):
            same = _csv_without_timing(a) == _csv_without_timing(b)
        else:
            same = _markdown_lines(a) == _markdown_lines(b)
        if not same:
            lines.append(f"differs: {name}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python bench/same_outputs.py BEFORE_DIR AFTER_DIR", file=sys.stderr)
        return 2
    before, after = Path(argv[0]), Path(argv[1])
    for folder in (before, after):
        if not folder.is_dir():
            print(f"{folder}: no such folder", file=sys.stderr)
            return 2
    lines = differences(before, after)
    print(f"{len(compared_files(before))} files compared (metrics.json, CSV, Markdown; timings aside)")
    print("\n".join(lines) if lines else "the same")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
