"""Two processes train as one: ``accelerate launch`` on 2 CPU processes (gloo) against one process, same global batches.

``tests/distributed_worker.py`` runs, with LoRA on the tiny Llama: DPO and KTO (reference on the fly, through the
DDP wrapper) and RDRO (reference precomputed) on the offline trainer; reverse KL and PMLE with a KL term on the
on-policy one. Once in 2 processes (2 rows of each micro-batch each) and once in 1 (4 rows), both at once: every
logged number and the trained weights must agree. It also calls losses directly on rows split unevenly between
the processes, one holding none. About 20-30 s in all (two runs of the worker, mostly imports).

**Tolerance.** The runs differ only in how rows are batched (padding width, matmul shapes) and in the order
gradients are summed (DDP's all-reduce): float32 rounding, no formula. Logged values agree to ``rel=1e-4``,
``abs=5e-5``: a sequence log-prob of ~100 tokens near -70 carries ~1e-5 of rounding (float32's spacing at 64 is
7.6e-6), and rewards and ``T`` are differences of such. Weights: AdamW divides each gradient element by its
root-mean-square plus 1e-8, so an element whose gradient is ~1e-9 turns rounding into a visible move (1.2e-4 at
lr 1e-2 in one of DPO's 14,592 LoRA weights); the check is on the whole update,
``||w_2 - w_1|| <= 1e-3 ||w_1 - w_0||``, with ``grad_norm`` (checked per step) catching a rescaled gradient that
Adam's normalisation would hide. Measured: logged values within a tenth of the tolerance (largest: RDRO's
``grad_norm`` of 3.465, off by 3.4e-5), weights within 6e-5 of the update. The bugs this guards against are
far larger: KTO's ``z0`` of the local rows only logs 0.71 and 1.46 where the whole batch's is 0.66 and 1.60,
and moves ``grad_norm`` by 2.5e-3 relative; unsummed gradients halve or double it; metrics of one process's rows
miss log-probs by 5 to 18. The two processes' weights must be identical: they take the same steps. The
uneven-split losses run in float64 on the same rows: equal to 1e-12 (measured: exactly).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studylib.lm.batching import gather_rows, process_share, scale_for_averaged_gradients, sum_gradients

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
CASES = ("dpo", "kto", "rdro", "bco", "dpo-accumulate", "kto-full", "reverse_kl", "pmle")
REL, ABS = 1e-4, 5e-5
UPDATE_REL = 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, dict]:
    """(one process, rank 0 of two, rank 1 of two): the worker's results, both runs started at once."""
    tmp = tmp_path_factory.mktemp("distributed")
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf"),  # no accelerate config of the user's
        "ACCELERATE_USE_CPU": "true",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), str(WORKER), str(tmp / "two")]
    single = [sys.executable, str(WORKER), str(tmp / "one")]
    started = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in (launch, single)
    ]
    for process in started:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-4000:]

    def load(path: Path) -> dict:
        return torch.load(path, weights_only=False)

    one, rank0, rank1 = load(tmp / "one" / "rank0.pt"), load(tmp / "two" / "rank0.pt"), load(tmp / "two" / "rank1.pt")
    assert (one["processes"], rank0["processes"]) == (1, 2)
    return one, rank0, rank1


@pytest.mark.parametrize("case", CASES)
def test_logged_losses_and_metrics_equal_one_process(runs, case):
    one, two, _ = runs
    expected, got = one[case]["steps"], two[case]["steps"]
    assert len(got) == len(expected) >= 2
    for step, (a, b) in enumerate(zip(expected, got, strict=True), start=1):
        assert set(a) == set(b), f"{case} step {step}: logged {sorted(set(a) ^ set(b))} in one run only"
        for key, value in a.items():
            if key == "rewards/accuracies" and step == 1:
                # at step 1 the policy is its reference, so every margin is 0 up to float32 rounding, and the share
                # of margins > 0 is that rounding's sign (0.25 against 0.0 on an AVX2-only processor); the margins
                # themselves are compared (to ABS)
                continue
            assert b[key] == pytest.approx(value, rel=REL, abs=ABS), f"{case} step {step}: {key}"


@pytest.mark.parametrize("case", CASES)
def test_trained_weights_equal_one_process(runs, case):
    one, two, other = runs
    start, expected, got = one[case]["initial"], one[case]["weights"], two[case]["weights"]
    assert set(got) == set(expected)
    assert all("lora_" in name for name in got) == (case != "kto-full")  # full fine-tuning trains every weight
    for name, value in got.items():
        assert torch.equal(value, other[case]["weights"][name]), f"{case}: the processes' {name} differ"
        torch.testing.assert_close(two[case]["initial"][name], start[name], rtol=0, atol=0)

    def norm(weights: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(w.double().pow(2).sum()) for w in weights.values()))

    update = norm({n: expected[n] - start[n] for n in start})
    difference = norm({n: got[n] - expected[n] for n in start})
    assert update > 0.1
    assert difference <= UPDATE_REL * update, f"{case}: weights differ by {difference:.3g}, the update is {update:.3g}"


def test_kto_reference_point_is_gathered(runs):
    """z0 (logged as ``kl``) is positive after the first step, so its equality above is not 0 == 0."""
    one, two, _ = runs
    kl = [step["kl"] for step in two["kto"]["steps"]]
    assert kl[0] == 0.0 and min(kl[1:]) > 0.1
    assert kl == pytest.approx([step["kl"] for step in one["kto"]["steps"]], rel=REL, abs=ABS)


def test_reference_is_the_base_model_under_the_wrapper(runs):
    """The trained policy's reference, asked of the DDP-wrapped model, is the base model, in both runs."""
    one, two, _ = runs
    assert two["dpo"]["wrapper"] == "DistributedDataParallel"
    for run in (one, two):
        torch.testing.assert_close(run["dpo"]["reference_logps"], run["dpo"]["base_logps"], rtol=0, atol=1e-6)
        assert (run["dpo"]["policy_logps"] - run["dpo"]["reference_logps"]).abs().max() > 0.1  # adapters trained
    torch.testing.assert_close(two["dpo"]["reference_logps"], one["dpo"]["reference_logps"], rtol=0, atol=1e-6)


def test_losses_on_unevenly_split_rows_equal_one_process(runs):
    """KTO's z0, BCO's running mean, RDRO's batch class fraction, RLOO groups: rows split 0/6, 2/4 and 3/3."""
    one, two, other = runs
    assert set(two["uneven"]) == set(one["uneven"]) and len(one["uneven"]) == 12
    for key, expected in one["uneven"].items():
        for run in (two, other):
            got = run["uneven"][key]
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-12, abs=1e-12), key
            torch.testing.assert_close(got["grads"], expected["grads"], rtol=1e-12, atol=1e-12, msg=key)
            for name, value in expected["metrics"].items():
                assert got["metrics"][name] == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), (key, name)


def test_caches_are_built_once_over_the_processes(runs):
    """Offline data, reward model, reference log-probs: the main process builds each, the other reads it."""
    one, rank0, rank1 = runs
    for case, what, count in [
        ("run", "offline data", 1),
        ("run", "reward model", 1),
        ("rdro", "reference log-probs", 1),
    ]:
        assert one[case]["builds"][what] == count, f"one process built {what} {one[case]['builds'][what]} times"
        assert rank0[case]["builds"][what] == count, f"the main process built {what} {rank0[case]['builds'][what]}x"
        assert rank1[case]["builds"][what] == 0, f"the second process built {what} again: it should read it"
    assert rank0["run"]["runtime"]["processes"] == 2 and one["run"]["runtime"]["processes"] == 1


def test_one_process_is_left_untouched():
    """Without a process group the helpers change nothing, so one-process results stay bit for bit."""
    rows = torch.randn(3, requires_grad=True)
    gathered = gather_rows(rows, None)
    assert gathered[0] is rows and gathered[1] is None
    assert process_share(5) == slice(0, 5)
    loss = rows.sum()
    assert scale_for_averaged_gradients(loss) is loss
    loss.backward()
    grad = rows.grad
    sum_gradients([rows])
    assert rows.grad is grad
