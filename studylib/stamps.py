"""What a notebook stamps on its results, and what the report reads of the runner's record.

The executed notebooks import these (never the study runner, ``studylib.study``): every module a notebook imports
is one of its results' sources (``studylib.provenance``), so a change to how studies are run leaves results
current that it does not change.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from studylib.results import resolve

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def parameter_defaults(path: Path) -> dict[str, Any]:
    """The names a notebook's ``parameters`` cell assigns, in order, each with its literal default (None where the
    value is not a literal), as papermill reads them (``papermill.inspect_notebook``: the cell is parsed, not run).
    ``LookupError`` when the notebook has no cell tagged ``parameters``."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    if not found and not any("parameters" in c.get("metadata", {}).get("tags", []) for c in _cells(path)):
        raise LookupError(f"{path} has no cell tagged 'parameters'")  # papermill says {} for that too
    defaults: dict[str, Any] = {}
    for name, parameter in found.items():
        try:
            defaults[name] = ast.literal_eval(parameter["default"])
        except (ValueError, SyntaxError):
            defaults[name] = None
    return defaults


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def notebook_parameters(path: Path) -> tuple[str, ...]:
    """The names a notebook's ``parameters`` cell assigns, in order."""
    return tuple(parameter_defaults(path))


def notebook_stamp(notebook: str, namespace: Mapping[str, Any], seed: Any = None) -> dict[str, Any]:
    """A notebook's stamp for ``studylib.results``: its name, the values its parameters cell defines (read from
    ``namespace``, the notebook's globals; ``out_dir`` left out), and the seed."""
    names = notebook_parameters(NOTEBOOKS / f"{notebook}.ipynb")
    params = {name: namespace[name] for name in names if name != "out_dir"}
    return {"notebook": notebook, "params": params, "seed": seed}


def recorded_run_folders(record: str | Path, notebook: str = "04_lm_alignment") -> list[str]:
    """The names of the run folders that ``notebook``'s runs of a study wrote, as the runner recorded them in its
    ``study-<profile>.json`` (``record``): what a profile's report reads, so that runs of other configs left in the
    same results folder (an earlier config's, committed or not) are never mixed into its tables."""
    path = resolve(record)
    if not path.is_file():
        raise FileNotFoundError(
            f"{record}: no record of the study's runs (the runner writes it: python -m studylib study)"
        )
    runs = [r for r in json.loads(path.read_text()).get("runs", {}).values() if r.get("notebook") == notebook]
    return sorted(Path(folder).name for r in runs for folder in r.get("run_folders", []))
