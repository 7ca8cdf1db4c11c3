"""What a result was made from: a content hash of every source file a process used.

Each stamp (``studylib.results.complete_stamp``) carries ``sources``: ``{path: sha256}`` for the files this
process used, paths relative to the repository root:

- every ``studylib`` module imported so far (read off ``sys.modules``, so a module imported lazily counts once
  it is imported);
- every file of the repository this process opened for reading (``data/``, ``results/`` tables a report reads,
  ``studies/``, ``notebooks/``), seen by an audit hook on ``open`` (PEP 578) that ``studylib/__init__.py``
  installs on the first import of the package; folders named in ``IGNORED_PARTS`` (checkpoints, caches of the
  interpreter and of git) and files outside the checkout never count;
- the notebook the stamp names (``notebooks/<name>.ipynb``), hashed by its cells' sources only, so that a
  notebook saved with other outputs is the same source.

The study runner gathers the sources of every stamp a run wrote into the run's entry of
``study-<profile>.json``; ``changed_sources`` compares such a record with the files as they are now, which is how
``python -m studylib study --stale`` tells a result whose code or data changed after it was made.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORED_PARTS = frozenset({"__pycache__", ".git", ".venv", ".venv-min", "checkpoints", ".ipynb_checkpoints"})
"""A path with one of these folders in it is never a source (interpreter caches, a run's own checkpoints); nor is
an installed package's metadata (``*.egg-info``)."""

_opened: set[str] = set()
_lock = threading.Lock()
_installed = False


def _relative(path: str | Path) -> str | None:
    """``path`` relative to the repository root when it is a source there, else None."""
    try:
        full = Path(path).resolve() if not isinstance(path, int) else None
    except (OSError, ValueError, RuntimeError):
        return None
    if full is None or not full.is_relative_to(ROOT):
        return None
    relative = full.relative_to(ROOT)
    if not relative.parts or IGNORED_PARTS.intersection(relative.parts) or relative.parts[0].endswith(".egg-info"):
        return None
    return relative.as_posix()


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not args or not isinstance(args[0], str | Path):
        return
    mode = args[1] if len(args) > 1 else "r"
    if isinstance(mode, str) and any(flag in mode for flag in "wax+"):
        return
    flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
    if mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):  # os.open: no mode, its flags say
        return
    path = str(args[0])
    if path.endswith((".pyc", ".tmp")) or not path.startswith(str(ROOT)) and Path(path).is_absolute():
        return
    relative = _relative(path)
    if relative is not None:
        with _lock:
            _opened.add(relative)


def install() -> None:
    """Start recording the repository files this process opens for reading (once per process; an audit hook
    cannot be removed, and a process that never stamps a result pays one cheap check per ``open``)."""
    global _installed
    if not _installed:
        sys.addaudithook(_audit)
        _installed = True


def _code(source: bytes) -> bytes:
    """A Python module's code without its docstrings, comments and layout (``ast.dump``): what runs."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False).encode()


def content_hash(name: str, data: bytes) -> str:
    """The sha256 of what a file holds that can change a result: a Python module's code (``_code``: an edited
    comment or docstring changes nothing), a notebook's cells' types and sources (not its outputs), else its bytes."""
    try:
        if name.endswith(".py"):
            data = _code(data)
        elif name.endswith(".ipynb"):
            cells = json.loads(data)["cells"]
            data = json.dumps([[c["cell_type"], "".join(c["source"])] for c in cells]).encode()
    except (SyntaxError, ValueError, KeyError, TypeError):
        pass  # not a module or notebook we can read: its bytes
    return hashlib.sha256(data).hexdigest()


def file_hash(path: str | Path) -> str | None:
    """``content_hash`` of a file; None where it is missing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return content_hash(path.name, data)


def used_modules() -> list[str]:
    """The ``studylib`` modules this process has imported, as paths relative to the repository root."""
    found = []
    for name, module in list(sys.modules.items()):
        if name == "studylib" or name.startswith("studylib."):
            relative = _relative(getattr(module, "__file__", None) or "")
            if relative is not None:
                found.append(relative)
    return found


def current_sources(notebook: str | None = None) -> dict[str, str]:
    """``{path: sha256}`` of what this process has used so far: its ``studylib`` modules, the repository files it
    opened for reading, and ``notebooks/<notebook>.ipynb`` when a notebook is named."""
    with _lock:
        paths = set(_opened)
    paths.update(used_modules())
    if notebook:
        paths.add(f"notebooks/{notebook}.ipynb")
    hashes = {path: file_hash(ROOT / path) for path in sorted(paths)}
    return {path: digest for path, digest in hashes.items() if digest is not None}


def gather(stamps: Iterable[Mapping], written: Iterable[str] = ()) -> dict[str, str]:
    """The union of the ``sources`` of ``stamps`` (later stamps win: a notebook's sources only grow), less the
    files in ``written`` (what the run itself wrote: reading back its own output is not a source)."""
    merged: dict[str, str] = {}
    for stamp in stamps:
        merged.update(stamp.get("sources") or {})
    for path in written:
        merged.pop(path, None)
    return dict(sorted(merged.items()))


def changed_sources(sources: Mapping[str, str], root: Path = ROOT) -> list[str]:
    """Which recorded ``sources`` differ from the files under ``root`` now: ``"<path> changed"`` or
    ``"<path> is gone"``, in path order; empty when every source is as it was."""
    changed = []
    for path, digest in sorted(sources.items()):
        now = file_hash(root / path)
        if now is None:
            changed.append(f"{path} is gone")
        elif now != digest:
            changed.append(f"{path} changed")
    return changed


def run_sources(notebook: str, outputs: Iterable[str], root: Path = ROOT) -> dict[str, str]:
    """A study run's sources, as the study runner records them: the ``sources`` of every stamp among the run's
    ``outputs`` (paths relative to ``root``; a stamp is a JSON file holding ``sources``), less the outputs
    themselves, plus ``notebooks/<notebook>.ipynb``."""
    outputs = list(outputs)
    stamps = []
    for output in outputs:
        if output.endswith(".json"):
            try:
                data = json.loads((root / output).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("sources"), dict):
                stamps.append(data)
    sources = gather(stamps, written=outputs)
    notebook_path = f"notebooks/{notebook}.ipynb"
    digest = file_hash(root / notebook_path)
    if digest is not None:
        sources[notebook_path] = digest
    return dict(sorted(sources.items()))


def stale_reasons(parameters: Mapping, entry: Mapping | None, root: Path = ROOT) -> list[str]:
    """Why a study run's committed result no longer matches the code, data and parameters it would be made from
    now: its ``entry`` in ``study-<profile>.json`` (None: never recorded) against the run's ``parameters`` and the
    files under ``root``. Empty when it is current."""
    if not entry:
        return ["never run"]
    if entry.get("status") not in ("executed", "complete, skipped"):
        return [f"its last run {entry.get('status', 'has no status')}"]
    if not isinstance(entry.get("sources"), dict):
        commit = str(entry.get("commit") or "an unknown commit")[:12]
        return [f"its sources were not recorded (made at {commit}, before results knew their sources)"]
    reasons = []
    if "parameters" in entry and dict(entry["parameters"]) != dict(parameters):
        reasons.append("its parameters in the study config changed")
    reasons += changed_sources(entry["sources"], root)
    reasons += [f"{output} is missing" for output in entry.get("outputs", []) if not (root / output).is_file()]
    return reasons


def sources_at(commit: str, paths: Iterable[str], root: Path = ROOT) -> dict[str, str]:
    """``{path: content_hash}`` of ``paths`` as they were at git ``commit`` (paths missing there left out): the
    sources of a result made before results recorded them, rebuilt from the commit its record names."""
    import subprocess

    found = {}
    for path in sorted(set(paths)):
        shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, check=False)
        if shown.returncode == 0:
            found[path] = content_hash(path, shown.stdout)
    return found


BACKFILLED = (
    "rebuilt from git at the commit that made it: the studylib modules a run of the same notebook imports today "
    "(measured) and the notebook; the data files it read are not known"
)
"""What ``backfill`` writes under ``sources_backfilled`` in a study record's entry."""


def backfill(entry: dict, modules: Iterable[str], notebook: str, root: Path = ROOT) -> bool:
    """Give a study record's ``entry`` made before results knew their sources the ``sources`` it had, rebuilt by
    ``sources_at`` from the clean commit it names, and say so (``sources_backfilled``); False (nothing written)
    where its commit is unknown or was dirty, so its sources cannot be known."""
    commit = str(entry.get("commit") or "")
    if not commit or commit.endswith("-dirty") or "sources" in entry:
        return False
    entry["sources"] = sources_at(commit, [*modules, f"notebooks/{notebook}.ipynb"], root)
    entry["sources_backfilled"] = BACKFILLED
    return True
