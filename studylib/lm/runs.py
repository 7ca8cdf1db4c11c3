"""A run's identity on disk: one folder per configuration, one process at a time, and flags for a run gone wrong.

- ``claim_run``: before anything is written, refuse a folder that holds a run with other knobs (it would
  resume that run's checkpoints) and a run that another live process holds; then save the resolved
  configuration (``run_config.json``) and take the lock (``filelock``: an OS lock, which the OS drops when its
  holder ends, so a killed run leaves nothing stuck).
- ``release_run``: drop the lock once the run is saved.
- ``run_flags``: what a finished run's numbers say went wrong (gradients collapsed to zero, a KL past a bound).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from studylib.lm.config import RunConfig, check_resumable
from studylib.results import write_atomic

LOCK_NAME = ".lock"
KL_BOUND = 20.0
"""Nats per completion: a policy this far from its reference has drifted, whatever its win rate (flagged)."""


_HELD: dict[Path, FileLock] = {}


def _acquire(lock: Path) -> None:
    """Hold ``lock`` (an OS file lock, ``filelock``) for this process, or refuse at once while another holds it.
    The OS drops the lock when its holder ends, however it ends (a SIGKILLed run leaves nothing stuck)."""
    if lock in _HELD:
        return
    held = FileLock(lock, timeout=0)
    try:
        held.acquire()
    except Timeout:
        raise RuntimeError(
            f"run {lock.parent.name} is in progress in another process (lock {lock}): wait for it to finish, or stop it"
        ) from None
    _HELD[lock] = held


def claim_run(config: RunConfig) -> Path:
    """Check, lock and describe the run's folder before anything else is written there; returns the folder."""
    run_dir = config.run_dir()
    check_resumable(run_dir / "run_config.json", config.identity())
    run_dir.mkdir(parents=True, exist_ok=True)
    _acquire(run_dir / LOCK_NAME)
    write_atomic(run_dir / "run_config.json", json.dumps(config.identity(), indent=2, sort_keys=True, default=str))
    return run_dir


def release_run(config: RunConfig) -> None:
    """Drop the run's lock (after it is saved, or when it stops); the empty lock file stays (deleting it would let
    two later claims lock two different files)."""
    held = _HELD.pop(config.run_dir() / LOCK_NAME, None)
    if held is not None:
        held.release(force=True)


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
