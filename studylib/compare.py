"""What moved: a rerun's tables against the committed ones, printed by the study runner at its end.

Tables are matched row by row on their text columns (method, setting, ...); every numeric column, and every
``mean ± sd`` column by its mean, is compared, and the largest change per column is reported.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pandas as pd

from studylib.results import repo_root


def _numbers(column: pd.Series) -> pd.Series | None:
    """The column as floats (``"0.48 ± 0.07"`` as 0.48), or None if it holds text."""
    if pd.api.types.is_numeric_dtype(column):
        return column.astype(float)
    try:
        return column.map(lambda v: float(str(v).split(" ± ")[0]) if pd.notna(v) and v != "-" else float("nan"))
    except ValueError:
        return None


def compare_tables(
    new: pd.DataFrame, old: pd.DataFrame, keys: list[str] | None = None, tolerance: float = 1e-9
) -> list[str]:
    """Lines saying, per numeric column, the largest absolute change between ``old`` and ``new`` (rows matched on
    ``keys``, by default the text columns), and which rows appear on one side only."""
    if keys is None:
        keys = [c for c in new.columns if c in old.columns and _numbers(new[c]) is None]
    missing = [k for k in keys if k not in new.columns or k not in old.columns]
    if missing:
        return [f"key column(s) {missing} missing from the new or the committed table"]
    if keys and (new.duplicated(keys).any() or old.duplicated(keys).any()):
        return [f"rows are not identified by {keys}: name the key columns (compare: {{path, keys}})"]
    values = [c for c in new.columns if c in old.columns and c not in keys]
    merged = new.merge(old, on=keys, how="outer", suffixes=("", " (committed)"), indicator=True) if keys else None
    if merged is None:
        if len(new) != len(old):
            return [f"rows: {len(old)} committed, {len(new)} now (no text column to match them on)"]
        merged = new.join(old, rsuffix=" (committed)").assign(_merge="both")
    lines = []
    for side, label in (("left_only", "new rows"), ("right_only", "rows gone")):
        rows = merged[merged["_merge"] == side]
        if len(rows):
            lines.append(f"{label}: " + "; ".join(", ".join(str(r[k]) for k in keys) for _, r in rows.iterrows()))
    both = merged[merged["_merge"] == "both"]
    for column in values:
        now, then = _numbers(both[column]), _numbers(both[f"{column} (committed)"])
        if now is None or then is None:
            continue
        change = (now - then).abs().where(now.isna() == then.isna(), float("inf"))  # a value appeared or vanished
        if change.notna().any() and change.max() > tolerance:
            i = change.idxmax()
            row = ", ".join(map(str, both.loc[i, keys].tolist())) if keys else f"row {i}"
            lines.append(f"{column}: max change {change[i]:.4g} ({then[i]:.4g} -> {now[i]:.4g} at {row})")
    return lines or ["unchanged"]


def committed_table(path: Path, revision: str = "HEAD") -> pd.DataFrame | None:
    """The CSV at ``path`` as committed in ``revision``, or None (not in git, or not committed)."""
    root = repo_root()
    try:
        relative = path.resolve().relative_to(root)
        text = subprocess.run(
            ["git", "show", f"{revision}:{relative.as_posix()}"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (ValueError, OSError, subprocess.CalledProcessError):
        return None
    return pd.read_csv(io.StringIO(text))


def what_moved(tables: list[tuple[Path, list[str] | None]]) -> list[str]:
    """For each CSV (with its key columns, or None for its text columns): what moved against its committed version."""
    report = []
    for path, keys in tables:
        if not path.is_file():
            report.append(f"{path}: not written by this run")
            continue
        old = committed_table(path)
        if old is None:
            report.append(f"{path}: no committed version to compare with")
            continue
        report += [f"{path}: {line}" for line in compare_tables(pd.read_csv(path), old, keys)]
    return report
