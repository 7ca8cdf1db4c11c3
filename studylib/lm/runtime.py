"""The one owner of a run's device, processes and precision: decided once in a run's setup and handed down.

``make_runtime`` is the only place in ``studylib`` that creates accelerate's process state (``PartialState``: one
process, or the process group under ``accelerate launch``), picks the device every model and batch of the run lives
on, and decides the precision (``bf16``). Everything below it (the trainers, sampling, evaluation, the offline data,
the reward model) reads ``runtime.device`` and ``runtime.bf16``; nothing guesses a device from a model's parameters.
Read as torchtune's recipes do it (device and rank set once in setup, then passed down).

**Precision** (``bf16: auto``, the cpu and smoke profiles' setting): bf16 where the hardware runs it natively, float32
elsewhere, with the reason recorded beside the run (``Runtime.record``):

- a CUDA GPU: ``torch.cuda.is_bf16_supported()``;
- a CPU: native bf16 instructions (the ``avx512_bf16`` or ``amx_bf16`` flag in ``/proc/cpuinfo``), else a matmul
  probe of well under a second: bf16 is used only if a bf16 ``torch.mm`` runs at least as fast as float32's.
  Measured on two machines of this project's kind: with AVX-512 BF16, bf16 matmuls ran at 438 GFLOP/s against
  188 in float32; with AVX2 only, 0.9 against 62.5, and one DPO step 26 times slower in bf16 than in float32.

``bf16: true`` or ``false`` is obeyed as given (a warning when bf16 is forced on a CPU without native support).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

BF16_SETTINGS = (True, False, "auto")
TrainConfigT = TypeVar("TrainConfigT")


def processor_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows: named beside every timing."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def process_state():
    """accelerate's ``PartialState``: the process group under ``accelerate launch`` (one process: none). Created
    here only; accelerate keeps one shared instance per process, so later calls return the same state."""
    from accelerate import PartialState

    return PartialState()


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU runs bf16 natively, and how that was decided (flags, else a matmul probe; cached)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return bf16_support_from(flags, _matmul_gflops)


PROBE_ROUNDS = 5
"""Rounds of the matmul probe, float32 and bf16 alternating; each precision's best round counts."""


def bf16_support_from(flags: set[str], gflops, rounds: int = PROBE_ROUNDS) -> tuple[bool, str]:
    """The decision of ``cpu_bf16_support`` from the CPU's flags, else from ``gflops(dtype)`` of a matmul probe:
    ``rounds`` rounds, float32 and bf16 alternating, each precision's best. Other work on the machine only slows a
    round down, so the best of several alternating rounds is what each precision can do: a single round measured
    under a burst of other work once read float32 8.8 against bf16 17.7 GFLOP/s on a processor whose float32 runs
    at 306 and bf16 at 59, and trained a run in bf16, five times slower, on data sampled in bf16."""
    native = sorted(flags & set(NATIVE_BF16_FLAGS))
    if native:
        return True, f"CPU flag {native[0]}: native bf16"
    measured: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for _ in range(rounds):
        for dtype in measured:
            measured[dtype].append(gflops(dtype))
    fp32, bf16 = max(measured[torch.float32]), max(measured[torch.bfloat16])
    ok = bf16 >= fp32
    verdict = "as fast or faster: bf16" if ok else "slower: float32"
    return ok, f"CPU matmul probe: bf16 {bf16:.1f} against float32 {fp32:.1f} GFLOP/s (best of {rounds}), {verdict}"


def _matmul_gflops(dtype: torch.dtype, size: int = 256, budget_seconds: float = 0.05) -> float:
    """GFLOP/s of a ``size`` x ``size`` ``torch.mm`` in ``dtype``, timed for at most about ``budget_seconds``."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.mm(a, a)  # warm-up
    runs, start = 0, time.perf_counter()
    while runs < 50 and (runs == 0 or time.perf_counter() - start < budget_seconds):
        torch.mm(a, a)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e9


def choose_precision(setting: bool | str, device: torch.device) -> tuple[bool, str]:
    """``(bf16, why)`` for a ``bf16`` knob (True, False or "auto") on ``device``."""
    if setting not in BF16_SETTINGS:
        raise ValueError(f"bf16 must be true, false or auto, got {setting!r}")
    if setting is False:
        return False, "bf16: false in the config"
    if device.type == "cuda":
        native, why = torch.cuda.is_bf16_supported(), f"GPU {torch.cuda.get_device_name(device)}"
        why += " supports bf16" if native else " has no native bf16"
    elif device.type == "cpu":
        native, why = cpu_bf16_support()
    else:
        native, why = False, f"device {device.type}: no bf16 check"
    if setting is True:
        if not native:
            warnings.warn(f"bf16: true, but {why}: it runs, possibly far slower than float32", stacklevel=3)
        return True, f"bf16: true in the config ({why})"
    return native, f"bf16: auto, {why}"


@dataclass(frozen=True)
class Runtime:
    """Where a run computes: its device, its precision (and why), and its place among the processes."""

    device: torch.device
    bf16: bool
    precision: str  # why bf16 is on or off
    process_index: int = 0
    num_processes: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def place(self, module: nn.Module) -> nn.Module:
        """``module`` moved to the run's device (parameters and buffers)."""
        return module.to(self.device)

    def main_process_first(self):
        """A context in which the main process runs first and the others wait, then run (and find its caches)."""
        return process_state().main_process_first() if self.num_processes > 1 else nullcontext()

    def wait_for_everyone(self) -> None:
        """A barrier over the processes (nothing with one)."""
        if self.num_processes > 1:
            process_state().wait_for_everyone()

    def resolve(self, config: TrainConfigT) -> TrainConfigT:
        """``config`` (a ``TrainConfig``) with ``bf16`` as this runtime decided it (a config may say "auto")."""
        return dataclasses.replace(config, bf16=self.bf16)

    def record(self) -> dict[str, Any]:
        """What ``metrics.json`` says about where and how the run computed."""
        return {
            "device": str(self.device),
            "bf16": self.bf16,
            "precision": self.precision,
            "processes": self.num_processes,
        }


def resolve_bf16(setting: bool | str) -> bool:
    """What ``bf16`` (True, False or "auto") comes to on this machine's default device (a run's identity uses it)."""
    return choose_precision(setting, _default_device())[0]


def _default_device() -> torch.device:
    """The process state's device; one CPU whatever index a launcher gave it (``torch.load`` refuses "cpu:0")."""
    where = torch.device(process_state().device)
    return torch.device("cpu") if where.type == "cpu" else where


def make_runtime(bf16: bool | str = "auto", device: str | torch.device | None = None) -> Runtime:
    """The run's ``Runtime``: the process state's device (``device`` overrides it: tests use ``meta``) and the
    precision ``bf16`` asks for (``choose_precision``)."""
    state = process_state()
    where = torch.device(device) if device is not None else _default_device()
    use_bf16, why = choose_precision(bf16, where)
    return Runtime(where, use_bf16, why, state.process_index, state.num_processes)


def describe_precision(runtime: Runtime) -> str:
    """One line: the precision the run computes in, and why (``Runtime.precision``)."""
    return f"{'bf16' if runtime.bf16 else 'float32'} ({runtime.precision})"
