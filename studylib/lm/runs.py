"""A run's identity on disk: one folder per configuration, one process at a time, and flags for a run gone wrong.

- ``claim_run``: before anything is written, refuse knob values the run's model cannot hold
  (``check_model_fits``), a folder that holds a run with other knobs (it would resume that run's checkpoints) and
  a run that another live process holds (``RunInUseError``); then save the resolved
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
import torch
from filelock import FileLock, Timeout
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from studylib.checks import UserError
from studylib.lm.config import RunConfig, TrainConfig, check_resumable
from studylib.lm.models import EMBEDDED_MODELS, cache_root
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.results import write_atomic

LOCK_NAME = ".lock"
KL_BOUND = 20.0
"""Nats per completion: a policy this far from its reference has drifted, whatever its win rate (flagged)."""


LORA_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
"""The layers peft's LoRA adapts."""

_HELD: dict[Path, FileLock] = {}


class RunInUseError(UserError, RuntimeError):
    """Another live process holds the run's lock: the command line prints it as one line (exit status 2)."""


def _acquire(lock: Path) -> None:
    """Hold ``lock`` (an OS file lock, ``filelock``) for this process, or refuse at once while another holds it.
    The OS drops the lock when its holder ends, however it ends (a SIGKILLed run leaves nothing stuck)."""
    if lock in _HELD:
        return
    held = FileLock(lock, timeout=0)
    try:
        held.acquire()
    except Timeout:
        raise RunInUseError(
            f"run {lock.parent.name} is in progress in another process (lock {lock}): wait for it to finish, or stop it"
        ) from None
    _HELD[lock] = held


def claim_run(config: RunConfig) -> Path:
    """Check, lock and describe the run's folder before anything else is written there; returns the folder."""
    check_model_fits(config)
    run_dir = config.run_dir()
    check_resumable(run_dir / "run_config.json", config.identity())
    run_dir.mkdir(parents=True, exist_ok=True)
    _acquire(run_dir / LOCK_NAME)
    write_atomic(run_dir / "run_config.json", json.dumps(config.identity(), indent=2, sort_keys=True, default=str))
    return run_dir


def model_skeleton(name: str) -> nn.Module | None:
    """The run's model without its weights (on PyTorch's meta device; the tiny model itself), from its configuration
    on this machine (a run has loaded its model before it claims its folder); None where that is not here."""
    if name == "tiny":
        return tiny_model(tiny_tokenizer())
    local = Path(name).expanduser()
    if name in EMBEDDED_MODELS or local.suffix == ".gguf":  # converted once into the cache (studylib.lm.models)
        local = cache_root() / "models" / (name if name in EMBEDDED_MODELS else local.stem)
    try:
        settings = AutoConfig.from_pretrained(str(local) if local.is_dir() else name, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(settings)
    except (OSError, ValueError):
        return None


def check_model_fits(config: RunConfig) -> None:
    """Refuse knob values the run's model cannot hold, before its folder is written (``UserError`` naming the knob and
    the model's limit): a ``max_length`` past its positions, a number of new tokens that with ``max_prompt_length``
    is past them, and under LoRA a ``lora_r`` past its hidden size or targets it lacks or cannot adapt."""
    model = model_skeleton(config.model)
    if model is None:
        return
    name, settings, knobs = f"model {config.model!r}", model.config, config.to_flat()
    positions = getattr(settings, "max_position_embeddings", None) or getattr(settings, "n_positions", None)
    if positions and knobs["max_length"] > positions:
        raise UserError(f"max_length {knobs['max_length']} is more than the {positions} positions of {name}")
    for knob in ("max_new_tokens", "eval_max_new_tokens", "data_max_new_tokens"):  # sampled after a prompt
        if positions and knobs["max_prompt_length"] + knobs[knob] > positions:
            raise UserError(
                f"{knob} {knobs[knob]} and max_prompt_length {knobs['max_prompt_length']} are more than the "
                f"{positions} positions of {name}"
            )
    if config.train.use_lora:
        _check_lora_fits(config.train, model, name)


def _check_lora_fits(train: TrainConfig, model: nn.Module, name: str) -> None:
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    if hidden and train.lora_r > hidden:
        raise UserError(
            f"lora_r {train.lora_r} is larger than the hidden size of {name} ({hidden}): an adapter's rank cannot "
            "exceed the width of the layers it adapts"
        )
    kinds: dict[str, type] = {}
    for module_name, module in model.named_modules():
        kinds.setdefault(module_name.rsplit(".", 1)[-1], type(module))
    targets = [m for m in train.lora_target_modules if m in kinds]  # names absent from a model are skipped
    if not targets:
        linear = sorted(k for k, kind in kinds.items() if issubclass(kind, nn.Linear))
        raise UserError(
            f"lora_target_modules: none of {train.lora_target_modules} is a module of {name} (its linear layers: "
            f"{', '.join(linear)})"
        )
    for target in targets:
        if not issubclass(kinds[target], LORA_LAYERS):
            raise UserError(
                f"lora_target_modules: {target!r} is a {kinds[target].__name__} in {name}; LoRA adapts linear and "
                "embedding layers"
            )


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
