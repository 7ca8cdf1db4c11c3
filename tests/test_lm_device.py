"""Every model and tensor of a run lives on the run's device: whole runs on a second, audited device.

The process state's device is set to ``meta`` (as ``accelerate launch`` on a GPU sets it to ``cuda``), and the run
goes through ``tests/device_audit.py``: tensors moved to ``meta`` keep real CPU values, and every operation that mixes
one with a tensor left on the CPU is recorded (on a GPU, torch would raise there). A run passes when no operation
mixed devices, work really ran on the device, and the trained policy ended there. Each case takes another path:
offline data sampled on the device, a reward model fit there, reference log-probs precomputed and on the fly, a
separate frozen reference (full fine-tuning), the on-policy trainer with reward-model rewards and with a KL term,
evaluation's sampling and scoring. About 1 s a case on the tiny model.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from device_audit import DeviceAudit, OnDevice
from transformers import TrainingArguments

from studylib.lm.experiment import run_experiment

FAKE = torch.device("meta")
# the offline trainer's optimiser without fused kernels (the fake device has none; fused AdamW is a GPU choice)
PLAIN_ADAM = {"training_args": {"optim": "adamw_torch"}}


@pytest.fixture
def on_fake_device(monkeypatch):
    """The process state's device is ``meta`` for the test (accelerate's and transformers' views of it alike)."""
    PartialState(cpu=True)
    PartialState._shared_state["device"] = FAKE
    original = TrainingArguments.__dict__["device"]
    monkeypatch.setattr(TrainingArguments, "device", property(lambda self: (original.__get__(self), FAKE)[1]))
    monkeypatch.setattr(Accelerator, "device", property(lambda self: FAKE))
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


CASES = {
    "dpo-offline-data": {"loss": "dpo", "dataset": "offline", "dataset_path": None, "n_prompts": 8,
                          "completions_per_prompt": 2, "data_max_new_tokens": 4, "eval_fraction": 0.25},
    "dpo-full-on-the-fly": {"loss": "dpo", "use_lora": False, "precompute_reference": False},
    "kto-precomputed": {"loss": "kto", "precompute_reference": True, "curve_every": 1},  # measured while training
    "distill-reward-model": {"loss": "distill", "loss_kwargs": {"beta": 0.0}},
    "reverse_kl-on-policy": {"loss": "reverse_kl", "samples_per_prompt": 2, "prompts_per_step": 2,
                             "max_new_tokens": 4, "curve_every": 1},
    "pmle-kl-full": {"loss": "pmle", "loss_kwargs": {"gamma": 0.5, "beta": 0.1}, "use_lora": False,
                     "samples_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 4},
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_run_computes_on_its_device_and_leaves_nothing_behind(tiny_run, on_fake_device, case, monkeypatch):
    on_policy = CASES[case]["loss"] in ("reverse_kl", "pmle")  # the offline trainer alone takes training_args
    config = tiny_run(**({} if on_policy else PLAIN_ADAM) | CASES[case])
    placed = []
    original_evaluate = __import__("studylib.lm.evaluate", fromlist=["evaluate"]).evaluate

    def evaluate_and_check(policy, *args, **kwargs):  # where training left the policy: on the device, all of it
        placed.append(all(isinstance(p, OnDevice) for p in policy.parameters()))
        return original_evaluate(policy, *args, **kwargs)

    monkeypatch.setattr("studylib.lm.evaluate.evaluate", evaluate_and_check)
    monkeypatch.setattr("studylib.lm.export.save_trained_model", lambda *args, **kwargs: None)  # no storage
    with DeviceAudit() as audit:
        record = run_experiment(config)
    assert dict(audit.mixed) == {}, f"{case}: operations mixed the device and the CPU: {dict(audit.mixed)}"
    assert audit.device_ops > 1000, f"{case}: only {audit.device_ops} operations ran on the device"
    assert audit.cpu_matmuls == 0, f"{case}: {audit.cpu_matmuls} matrix products ran on the CPU, not the device"
    assert placed == [True], f"{case}: the trained policy is not (all) on the run's device"
    assert record["runtime"]["device"] == "meta" and math.isfinite(record["kl"])


def test_the_audit_sees_a_tensor_left_on_the_cpu():
    """The audit's own check: a device tensor meeting a CPU tensor is recorded (and still computed)."""
    with DeviceAudit() as audit:
        on_device = torch.ones(3).to(FAKE)
        total = (on_device @ torch.ones(3, 2)).sum()
        scalar_ok = on_device * torch.tensor(2.0)  # a 0-d CPU scalar may meet a device tensor, as on a GPU
        assert float(total) == 6.0 and isinstance(scalar_ok, OnDevice)
    assert sum(audit.mixed.values()) == 1 and next(iter(audit.mixed))[0].startswith("aten.mm")
