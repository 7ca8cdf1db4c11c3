"""Checkpoints that cannot lie: resume from the latest complete one, set incomplete ones aside, name a full disk.

transformers' ``Trainer`` writes a checkpoint file by file (weights, optimiser, scheduler, RNG state) and
``trainer_state.json`` last, not atomically: a kill or a full disk in the middle leaves a ``checkpoint-N`` that
``get_last_checkpoint`` would pick and every rerun would crash on. ``latest_complete`` picks the latest checkpoint
whose files all read back (``is_complete``: its ``trainer_state.json`` parses, it holds weights, every weights or
``torch.save`` file in it is whole by ``reads_back``, and the files its ``required`` names exist and are not empty),
and moves any later, incomplete one aside to ``incomplete-checkpoint-N`` (kept for inspection, never deleted;
neither transformers nor the on-policy trainer reads that name), with a warning naming it. A weights file cut
short under a whole ``trainer_state.json`` (a copy stopped half way, a file system that lost its tail) is caught so.
The on-policy trainer's checkpoints are written whole into a temporary folder and renamed
(``results.atomic_directory``); it uses the same selection with its own ``is_complete``.

``disk_full_guard``: an error raised while training into a folder whose file system has (almost) no space left is
raised again as ``OSError(ENOSPC)`` naming the folder and saying that the disk is full (torch's own write error
says "file write failed").
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_BELOW_BYTES = 64 * 2**20  # a file system with less free space than this is full for a checkpoint


def numbered(output_dir: str | Path, prefix: str = "checkpoint") -> list[Path]:
    """``<prefix>-<N>`` folders of ``output_dir``, by ``N``."""
    found = [p for p in Path(output_dir).glob(f"{prefix}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


TORCH_SUFFIXES = (".pt", ".pth", ".bin")
"""Files written by ``torch.save`` (zip archives): the optimiser, the scheduler, the random state, old weights."""


def reads_back(path: Path) -> bool:
    """Whether a weights file is whole, without loading a tensor: a ``.safetensors`` file's header parses and its
    last tensor ends where the file ends; a ``torch.save`` file (a zip archive) ends with its central directory.
    A file cut short by a kill or a full disk fails either way."""
    try:
        if path.suffix == ".safetensors":
            return _safetensors_whole(path)
        return zipfile.is_zipfile(path)
    except (OSError, ValueError):
        return False


def _safetensors_whole(path: Path) -> bool:
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8:
            return False
        header = json.loads(handle.read(length))
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    return size == 8 + length + max(ends, default=0)


def trainer_checkpoint_complete(folder: Path, required: tuple[str, ...] = ()) -> bool:
    """A ``Trainer`` checkpoint is complete when ``trainer_state.json`` (written last) parses, the folder holds
    weights (``*.safetensors`` or ``*.bin``), every weights and ``torch.save`` file in it reads back whole
    (``reads_back``), and every file of ``required`` (e.g. the loss's state) is there and not empty."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", *TORCH_SUFFIXES)]
    weights = [p for p in files if p.suffix == ".safetensors" or p.name.endswith("model.bin")]
    if not weights or not all(reads_back(p) for p in files):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in required)


def latest_complete(output_dir: str | Path, is_complete: Callable[[Path], bool]) -> Path | None:
    """The latest complete checkpoint of ``output_dir`` (None if there is none); later incomplete ones are set
    aside as ``incomplete-checkpoint-N``, with a warning."""
    for folder in reversed(numbered(output_dir)):
        if is_complete(folder):
            return folder
        aside = folder.with_name(f"incomplete-{folder.name}")
        suffix = 1
        while aside.exists():
            aside, suffix = folder.with_name(f"incomplete-{folder.name}.{suffix}"), suffix + 1
        folder.rename(aside)
        warnings.warn(f"{folder} is incomplete (a run stopped while writing it): set aside as {aside.name}, resuming "
                      "from the checkpoint before it", stacklevel=2)  # fmt: skip
    return None


@contextmanager
def disk_full_guard(output_dir: str | Path) -> Iterator[None]:
    """Re-raise an error of a full disk as one that says so, naming ``output_dir``."""
    try:
        yield
    except Exception as err:
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        try:
            full = full or shutil.disk_usage(output_dir).free < FULL_BELOW_BYTES
        except OSError:
            pass
        if not full:
            raise
        raise OSError(
            errno.ENOSPC,
            f"the disk is full: training could not write into {output_dir} ({type(err).__name__}: {err}). Free some "
            "space and run again: it resumes from the last complete checkpoint",
        ) from err
