"""A run's identity on disk: one folder per configuration, one process at a time, and flags for a run gone wrong.

- ``claim_run``: before anything is written, refuse a folder that holds a run with other knobs (it would
  resume that run's checkpoints) and a run that another live process holds; then save the resolved
  configuration (``run_config.json``) and take the lock. A killed run leaves its lock behind, but with a dead
  process id, so the next claim takes it over: nothing stays stuck. (Two processes that find the same dead
  lock at the same instant can both take it over, and a dead holder's id reused by a new process keeps the
  lock held: both rare; delete ``.lock`` by hand in the second case.)
- ``release_run``: drop the lock once the run is saved.
- ``run_flags``: what a finished run's numbers say went wrong (gradients collapsed to zero, a KL past a bound).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pandas as pd

from studylib.lm.config import RunConfig, check_resumable
from studylib.results import write_atomic

LOCK_NAME = ".lock"
KL_BOUND = 20.0
"""Nats per completion: a policy this far from its reference has drifted, whatever its win rate (flagged)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


CLAIM_SECONDS = 30.0
"""A lock file without a readable process id this young is another process's claim being written: held."""


def _acquire(lock: Path) -> None:
    """Create ``lock`` holding this process's id, atomically (written beside it, then hard-linked into place, so
    a reader never sees it empty); refuse while its holder lives, take it over once its holder is gone."""
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")
    mine.write_text(str(os.getpid()))
    try:
        while True:
            try:
                os.link(mine, lock)
                return
            except FileExistsError:
                pass
            try:
                text, age = lock.read_text().strip(), time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            pid = int(text) if text.isdigit() else 0
            if (pid and pid != os.getpid() and _alive(pid)) or (not pid and age < CLAIM_SECONDS):
                raise RuntimeError(
                    f"run {lock.parent.name} is in progress in process {pid or 'unknown'} (lock {lock}): "
                    "wait for it to finish, or stop it"
                ) from None
            lock.unlink(missing_ok=True)  # left by a killed run (or by this process): take it over
    finally:
        mine.unlink(missing_ok=True)


def claim_run(config: RunConfig) -> Path:
    """Check, lock and describe the run's folder before anything else is written there; returns the folder."""
    config.check_machine()
    run_dir = config.run_dir()
    check_resumable(run_dir / "run_config.json", config.identity())
    run_dir.mkdir(parents=True, exist_ok=True)
    _acquire(run_dir / LOCK_NAME)
    write_atomic(run_dir / "run_config.json", json.dumps(config.identity(), indent=2, sort_keys=True, default=str))
    return run_dir


def release_run(config: RunConfig) -> None:
    """Drop the run's lock (after it is saved, or when it stops)."""
    (config.run_dir() / LOCK_NAME).unlink(missing_ok=True)


def run_flags(curves: pd.DataFrame, summary: dict, min_steps: int = 3) -> list[str]:
    """Warnings about a finished run, also returned to be saved with its metrics.

    - ``collapsed``: the gradient norm is exactly 0 from some step to the end, for ``min_steps`` steps or more
      (training stopped moving the policy, e.g. a learning rate so large that the logits saturated);
    - ``drifted``: the evaluated ``KL(pi || pi_ref)`` exceeds ``KL_BOUND`` nats per completion.
    """
    flags = []
    if "grad_norm" in curves:
        norms = curves["grad_norm"].tolist()
        trailing = 0
        while trailing < len(norms) and norms[len(norms) - 1 - trailing] == 0:
            trailing += 1
        if trailing >= min_steps:
            first = int(curves["step"].iloc[len(norms) - trailing])
            flags.append(f"collapsed: gradient norm 0 from step {first} to the end")
    if summary.get("kl", 0.0) > KL_BOUND:
        flags.append(f"drifted: KL(pi || pi_ref) = {summary['kl']:.1f} nats per completion > {KL_BOUND:g}")
    for flag in flags:
        warnings.warn(flag, stacklevel=2)
    return flags
