"""Writing results: every file lands atomically and carries a stamp saying what made it.

>>> from studylib.results import save_table, save_figure
>>> stamp = {"params": {"alpha": 0.3}, "seed": 0}
>>> save_table(df, "results/toy/t3_slopes", stamp)      # t3_slopes.csv, .md, .json
>>> save_figure(fig, "results/toy/t3_s1.png", stamp)    # t3_s1.png, t3_s1.png.json

A stamp is a JSON-able mapping; callers should give ``params`` and ``seed`` (not enforced). The helpers add
``studylib_version``, ``git_commit`` (None outside a git checkout), ``created`` (UTC) and ``sources`` (the hash
of every file the process used, ``studylib.provenance``). Tables get the stamp in
a ``.json`` sidecar and as a header of the Markdown file; figures in a ``<name>.json`` sidecar (and in the PNG's
``Description`` metadata). Relative paths resolve against the repository root (``resolve``), so notebooks write to
the same place from any working directory.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import studylib
from studylib import provenance

PACKAGE_PARENT = Path(studylib.__file__).resolve().parent.parent


def repo_root() -> Path:
    """The checkout holding ``studylib/`` (found by its ``pyproject.toml``); the working directory otherwise."""
    return PACKAGE_PARENT if (PACKAGE_PARENT / "pyproject.toml").exists() else Path.cwd()


def resolve(path: str | os.PathLike[str]) -> Path:
    """``path`` as is if absolute, else relative to ``repo_root()``."""
    path = Path(path)
    return path if path.is_absolute() else repo_root() / path


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` via a temporary file in the same folder and ``os.replace``:
    a reader sees the old file or the new one, never half of one. Creates parent folders. Returns the path."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


RENAME_EXCHANGE = 2  # renameat2's flag (Linux >= 3.15): swap two paths in one step


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step (Linux ``renameat2``); False where it is not offered."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # not offered by this kernel or file system
    raise OSError(error, os.strerror(error), str(b))


@contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; fill it, and on success it takes ``target``'s place in one
    step: a reader (another process too) sees the old folder or the new one, never half of one and never none.

    A new ``target`` is one ``rename``; an existing one is swapped with the new folder in one ``renameat2`` exchange
    (Linux), then the old one, now at the temporary name, is deleted. Where the exchange is not offered, the old
    folder is renamed aside first: a moment with no ``target``, but never a half one. On an error the temporary
    folder is removed and ``target`` is left as it was.
    """
    target = resolve(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        try:
            os.rename(tmp, target)  # no target yet (an empty one is replaced too)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not _exchange(tmp, target):
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, aside / target.name)
                os.rename(tmp, target)
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def git_commit() -> str | None:
    """The repository's HEAD commit, with ``-dirty`` if tracked files outside ``results/`` changed; None if unknown.

    Results being rewritten by a run do not make it dirty: only a change to the code or configs does.
    """
    try:
        commit = _git("rev-parse", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        return commit + ("-dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def complete_stamp(stamp: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's stamp plus ``studylib_version``, ``git_commit``, ``created`` and ``sources`` (kept if already
    given): ``sources`` maps every file this process used so far (its ``studylib`` modules, the repository files it
    read, the notebook the stamp names) to its sha256 (``studylib.provenance``)."""
    full = {
        "studylib_version": studylib.__version__,
        "git_commit": git_commit(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sources": provenance.current_sources(stamp.get("notebook")),
    }
    full.update(stamp)
    return full


def _json(stamp: Mapping[str, Any]) -> str:
    return json.dumps(stamp, indent=2, sort_keys=True, default=str) + "\n"


def save_table(
    df: Any, path_stem: str | os.PathLike[str], stamp: Mapping[str, Any], markdown: bool = True
) -> dict[str, Path]:
    """Write a pandas DataFrame as ``<stem>.csv``, ``<stem>.md`` (the stamp as a header list, then the table; skipped
    with ``markdown=False``) and ``<stem>.json`` (the stamp). Returns the paths by suffix."""
    stem = resolve(path_stem)
    full = complete_stamp(stamp)
    paths = {"csv": write_atomic(stem.with_name(stem.name + ".csv"), df.to_csv(index=False))}
    if markdown:
        shown = {k: v for k, v in full.items() if k != "sources"} | {"sources": f"{len(full['sources'])} files"}
        header = "\n".join(f"- {k}: `{json.dumps(v, default=str)}`" for k, v in sorted(shown.items()))
        table = df.to_markdown(index=False, floatfmt=".4g")
        text = f"Stamp (also in `{stem.name}.json`):\n\n{header}\n\n{table}\n"
        paths["md"] = write_atomic(stem.with_name(stem.name + ".md"), text)
    paths["json"] = write_atomic(stem.with_name(stem.name + ".json"), _json(full))
    return paths


def save_json(data: Any, path: str | os.PathLike[str], stamp: Mapping[str, Any]) -> dict[str, Path]:
    """Write JSON-able ``data`` at ``path`` as it is (a format another tool reads stays untouched) and its stamp as
    ``<stem>.stamp.json``. Returns both paths."""
    path = resolve(path)
    return {
        "json": write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"),
        "stamp": write_atomic(path.with_name(path.stem + ".stamp.json"), _json(complete_stamp(stamp))),
    }


def save_figure(fig: Any, path: str | os.PathLike[str], stamp: Mapping[str, Any], dpi: int = 120) -> dict[str, Path]:
    """Save a matplotlib figure as PNG at ``path`` and its stamp as ``<path>.json``. Returns both paths."""
    import io

    path = resolve(path)
    buffer = io.BytesIO()
    full = complete_stamp(stamp)
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Description": json.dumps(full)})
    return {
        "png": write_atomic(path, buffer.getvalue()),
        "json": write_atomic(path.with_name(path.name + ".json"), _json(full)),
    }
