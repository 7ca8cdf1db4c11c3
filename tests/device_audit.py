"""A second device on a CPU-only machine, for tests: tensors that say they are on ``meta`` but hold real CPU values.

A run whose ``Runtime.device`` is ``meta`` moves its models and batches there. Under ``DeviceAudit`` every such move
makes an ``OnDevice`` tensor: it reports ``device='meta'`` (as a tensor on a GPU reports ``cuda``) while its values
live in a CPU tensor inside it, so the run computes for real (sampling, ``.item()``, early stopping all work). The
audit sees every operation (a ``TorchDispatchMode``) and records the ones that mix a tensor on the run's device with
one left on the CPU, which on a GPU would raise; it computes them anyway, so one test lists every such place.
(A plain ``meta`` run cannot do this: meta tensors have no values, and torch lets some meta/CPU mixes pass, such as
``torch.mm`` or an embedding lookup with CPU indices.)

Scalars (0-dimensional CPU tensors) may meet device tensors, as torch allows on every device.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class OnDevice(torch.Tensor):
    """A CPU tensor (``value``) that reports the fake device."""

    @staticmethod
    def __new__(cls, value: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, value.shape, strides=value.stride(), dtype=value.dtype, device=FAKE, requires_grad=value.requires_grad
        )

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"OnDevice({self.value!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an OnDevice tensor outside DeviceAudit")


def _unwrap(x):
    return x.value if isinstance(x, OnDevice) else x


def _wrap(x):
    return OnDevice(x) if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) else x


class _TensorsFromData(TorchFunctionMode):
    """``torch.tensor(data, device=meta)`` and its kind build their tensor below the dispatcher: build it on the CPU
    and wrap it, so the value survives; ``.tolist()`` (refused for subclasses) reads the value, as it copies a GPU
    tensor to the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device).type == FAKE.type:
            return OnDevice(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):  # copies to the host, as from a GPU
            return args[0].value.tolist()
        return func(*args, **kwargs)


class DeviceAudit(TorchDispatchMode):
    """Runs operations on ``OnDevice`` tensors on the CPU and records every one that mixes devices.

    ``mixed``: Counter of ``(operation, devices)`` for operations that met a device tensor and a CPU tensor of one or
    more dimensions. ``device_ops``: how many operations ran on the device (a run that never reached it shows 0).
    ``cpu_matmuls``: matrix products computed wholly on the CPU (a model's forward pass that never reached the
    device: a run on a GPU should have none).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mixed: Counter = Counter()
        self.device_ops = 0
        self.cpu_matmuls = 0
        self._from_data = _TensorsFromData()

    def __enter__(self):
        self._from_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._from_data.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_device = any(isinstance(t, OnDevice) for t in tensors)
        left_behind = [t for t in tensors if not isinstance(t, OnDevice) and t.device.type == "cpu" and t.dim() > 0]
        if on_device and left_behind:
            self.mixed[(str(func), "meta+cpu")] += 1
        if not on_device and func in MATMULS and any(t.device.type == "cpu" for t in tensors):
            self.cpu_matmuls += 1
        target = kwargs.get("device")
        if target is not None:
            target = torch.device(target)
            if target.type == FAKE.type:
                kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        wrap = target.type == FAKE.type if target is not None else on_device
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            wrap = False
        if wrap:
            self.device_ops += 1
            return tree_map(_wrap, out)
        return out


def on_device(module: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is on the fake device."""
    return all(isinstance(t, OnDevice) for t in list(module.parameters()) + list(module.buffers()))
