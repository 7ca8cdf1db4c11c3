"""``bench/gpu_check.py`` cannot rot: it runs here at tiny sizes on the CPU (every case but two processes), and its
placement check fails a forward pass that meets a tensor off the run's device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from studylib.study import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import SHAPES, OnDeviceCheck  # noqa: E402


def test_the_gpu_check_runs_every_case_at_tiny_sizes(tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--steps", "2", "--batch-size", "2"]
    command += ["--completion-tokens", "8", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    cases = {r["case"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["cases"]}
    for arch in SHAPES:
        for tuning in ("lora", "full"):
            for loss in ("dpo", "kto", "rdro", "reverse_kl (on-policy)"):
                record = cases[f"{arch} {tuning} {loss}"]
                assert record["forward_checks"] > 100 and record["step_s"] > 0
        assert cases[f"{arch} lora dpo (TRL DPOTrainer)"]["tokens_per_s"] > 0
    assert "notebook 04 (paper profile's RDRO, small)" in cases
    assert "| qwen2 lora dpo |" in (tmp_path / "gpu_check.md").read_text()


def test_the_placement_check_fails_a_forward_pass_off_the_device():
    layer = torch.nn.Linear(2, 2)
    with OnDeviceCheck(torch.device("cpu")) as check:
        layer(torch.ones(1, 2))
    assert check.calls == 1
    with (
        pytest.raises(AssertionError, match="a tensor on cpu, the run is on meta"),
        OnDeviceCheck(torch.device("meta")),
    ):
        layer(torch.ones(1, 2))
