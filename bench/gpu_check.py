"""The GPU path, checked in one command: every model and batch on the device, and how fast, beside TRL.

    .venv/bin/python bench/gpu_check.py          # on a GPU: ~0.5B Qwen2- and Llama-shaped models, bf16 (< 8 min)
    .venv/bin/python bench/gpu_check.py --tiny   # tiny sizes on whatever device there is (tests/test_gpu_check.py)

No network: the models are built from configs (random weights; Qwen2.5-0.5B's shape, and a Llama 3 shape of about
0.5B parameters), the tokenizer is the tiny byte-level one (``studylib.lm.tiny``), the rows are made here (as
``bench/vs_trl.py`` makes them). Each case runs ``--steps`` optimiser steps:

1. for each architecture (qwen2, llama) and each tuning (LoRA, full fine-tuning): DPO, KTO and RDRO on the offline
   trainer and reverse KL on the on-policy trainer, then evaluation's sampling and scoring of the trained policy;
2. TRL's ``DPOTrainer`` on the same model, rows and length (LoRA), beside our DPO;
3. notebook 04 under papermill with the paper profile's RDRO knobs (full fine-tuning, bf16, epochs, gradient
   accumulation) and small sizes, on the Qwen2-shaped model saved to a folder;
4. with two GPUs or more: our DPO and reverse KL in two processes (``accelerate launch``).

Checks, raised as errors: a forward pre-hook on every module finds each tensor input and each parameter on the
run's device; after training, every parameter of the policy is there. Prints per case: median step time, tokens per
second, MFU (model FLOPs per step, counted as ``bench/vs_trl.py`` counts them, over the step time and the device's
measured bf16 matmul peak), and peak device memory (GPU only). Writes ``gpu_check.json`` and ``gpu_check.md``
to ``--out`` (default ``results/bench``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from vs_trl import StepClock, build_trl, model_flops_per_step, our_rows, texts  # noqa: E402

from studylib.lm.runtime import Runtime, make_runtime  # noqa: E402
from studylib.lm.tiny import TINY_CONFIG, tiny_tokenizer  # noqa: E402
from studylib.results import write_atomic  # noqa: E402

SHAPES = {  # architecture: (config class, model class, the 0.5B shape)
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)),
}  # fmt: skip
OFFLINE_LOSSES = ("dpo", "kto", "rdro")


def build_model(arch: str, tokenizer, tiny: bool, runtime: Runtime) -> torch.nn.Module:
    """A randomly initialised model of ``arch``'s shape (tiny: 2 layers of hidden size 64), on the run's device."""
    config_class, model_class, shape = SHAPES[arch]
    if tiny:
        small = {k: v for k, v in TINY_CONFIG.items() if k not in ("rope_theta", "max_position_embeddings")}
        shape = small | {"num_hidden_layers": 2, "tie_word_embeddings": shape["tie_word_embeddings"]}
        shape["vocab_size"] = len(tokenizer)
    config = config_class(
        **shape,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with runtime.device:  # built where it runs (a 0.5B model is built in a second there)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


class OnDeviceCheck:
    """While active, every module's forward checks that its tensor inputs and its own parameters are on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls, self.handle = device, 0, None

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.check)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def check(self, module: torch.nn.Module, inputs: tuple) -> None:
        self.calls += 1
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)] + list(module.parameters(recurse=False))
        for tensor in tensors:
            if tensor.device.type != self.device.type:
                raise AssertionError(
                    f"{type(module).__name__}: a tensor on {tensor.device}, the run is on {self.device}"
                )


def train_config(args, use_lora: bool, runtime: Runtime, **knobs):
    from studylib.lm.config import TrainConfig

    return TrainConfig(
        learning_rate=1e-5, max_steps=args.steps, batch_size=args.batch_size, lr_scheduler_type="constant",
        warmup_ratio=0.0, bf16=runtime.bf16, use_lora=use_lora, save_steps=10**6, reference_batch_size=args.batch_size,
        precompute_reference=True, **knobs,
    )  # fmt: skip


def synchronize(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def measured_peak(runtime: Runtime) -> float:
    """The device's best bf16 matmul rate (FLOP/s) over square sizes: the MFU denominator."""
    best = 0.0
    for size in (1024, 2048, 4096, 8192) if runtime.device.type == "cuda" else (256, 512):
        a = torch.randn(size, size, device=runtime.device, dtype=torch.bfloat16)
        torch.mm(a, a)
        synchronize(runtime)
        start = time.perf_counter()
        for _ in range(5):
            torch.mm(a, a)
        synchronize(runtime)
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - start))
    return best


def offline_case(arch, tuning, loss, tokenizer, rows, args, runtime, peak) -> dict:
    from studylib.lm.trainer import build_trainer, preferred_fraction
    from studylib.losses import build_loss

    model = build_model(arch, tokenizer, args.tiny, runtime)
    kind = "paired" if loss == "dpo" else "unpaired"
    tokens = our_rows(tokenizer, rows, kind)
    fraction = preferred_fraction(tokens) if kind == "unpaired" else None
    loss_fn = build_loss(loss, {"alpha": "auto"} if loss == "rdro" else {}, fraction)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp, OnDeviceCheck(runtime.device) as check:
        config = train_config(args, tuning == "lora", runtime, training_args={"disable_tqdm": True})
        trainer = build_trainer(model, tokenizer, tokens, loss_fn, config, tmp, runtime=runtime)
        trainer.add_callback(clock)
        reset_memory(runtime)
        trainer.train()
        policy = trainer.model
        reference = trainer.reference.model if trainer.reference is not None else None  # full fine-tuning's copy
        sample_and_score(policy, reference, tokenizer, args, runtime)
    check_placed(policy, runtime)
    forwards = 2.0 + (2.0 if loss == "kto" else 0.0)  # precomputed reference; KTO: the mismatched pairs too
    flops = model_flops_per_step(model.config, tokens, kind, args.batch_size, forwards)
    return timing(f"{arch} {tuning} {loss}", clock.ends, tokens, kind, args, runtime, peak, flops, check.calls)


def online_case(arch, tuning, tokenizer, rows, args, runtime) -> dict:
    from studylib.lm.data import encode_prompt
    from studylib.lm.online import train_online
    from studylib.losses import get_loss

    model = build_model(arch, tokenizer, args.tiny, runtime)
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": r["prompt"][:80]}]) for r in rows[:8]]

    def reward(prompt_ids, completion_ids) -> torch.Tensor:  # a reward that varies: short completions win
        return torch.tensor([-float(len(c)) for c in completion_ids])

    config = train_config(args, tuning == "lora", runtime, prompts_per_step=4, samples_per_prompt=2,
                          max_new_tokens=args.completion_tokens)  # fmt: skip
    with OnDeviceCheck(runtime.device) as check:
        reset_memory(runtime)
        policy, history = train_online(model, tokenizer, get_loss("reverse_kl"), config, prompt_ids=prompts,
                                       reward_fn=reward, runtime=runtime)  # fmt: skip
    check_placed(policy, runtime)
    seconds = [entry["step_seconds"] for entry in history[1:]] or [history[0]["step_seconds"]]
    return {
        "case": f"{arch} {tuning} reverse_kl (on-policy)",
        "step_s": statistics.median(seconds),
        "tokens_per_s": None,
        "mfu": None,
        "peak_memory_gib": peak_memory(runtime),
        "forward_checks": check.calls,
    }


def sample_and_score(policy, reference, tokenizer, args, runtime) -> None:
    """Evaluation's sampling and scoring of the trained policy against its reference, on the device."""
    from studylib.lm.evaluate import evaluate

    prompts = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Say hi."}]]

    class LengthJudge:
        def prefer(self, prompt, a, b):
            return float(len(a) < len(b))

        def approve(self, prompt, completion):
            return len(completion) < 20

    summary, _ = evaluate(policy, tokenizer, prompts, LengthJudge(), reference=reference, max_new_tokens=16,
                          cache_reference_samples=False, device=runtime.device)  # fmt: skip
    assert 0.0 <= summary["win_rate"] <= 1.0


def trl_case(arch, tokenizer, rows, args, runtime, peak) -> dict:
    model = build_model(arch, tokenizer, args.tiny, runtime).to(torch.bfloat16 if runtime.bf16 else torch.float32)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        settings = argparse.Namespace(batch_size=args.batch_size)
        precision = "bf16" if runtime.bf16 else "fp32"
        trainer = build_trl(model, tokenizer, rows, "dpo", precision, "precomputed", args.steps, settings, tmp)
        trainer.add_callback(clock)
        reset_memory(runtime)
        trainer.train()
    tokens = our_rows(tokenizer, rows, "paired")
    flops = model_flops_per_step(model.config, tokens, "paired", args.batch_size, 2.0)
    return timing(f"{arch} lora dpo (TRL DPOTrainer)", clock.ends, tokens, "paired", args, runtime, peak, flops, 0)


def notebook_case(tokenizer, args, runtime) -> dict:
    """Notebook 04 under papermill: the paper profile's RDRO run on UF-G, sizes small, a Qwen2-shaped model."""
    import papermill

    from studylib.study import NOTEBOOKS, load_study

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "qwen2"
        build_model("qwen2", tokenizer, args.tiny, runtime).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        _, runs = load_study("paper", results_dir=Path(tmp) / "results")
        (run,) = [r for r in runs if r.name == "rdro-paper-model=Qwen-Qwen2.5-1.5B-Instruct-method=ufg-rdro"]
        small = {"model": str(model_dir), "dataset_path": str(ROOT / "tests/fixtures/ufg.jsonl"), "batch_size": 2,
                 "gradient_accumulation_steps": 2, "max_length": 128, "max_prompt_length": 64, "eval_prompts": 2,
                 "eval_max_new_tokens": 8, "bf16": runtime.bf16}  # fmt: skip
        start = time.perf_counter()
        papermill.execute_notebook(str(NOTEBOOKS / "04_lm_alignment.ipynb"), str(Path(tmp) / "04.ipynb"),
                                   parameters=run.parameters | small, cwd=str(ROOT), progress_bar=False,
                                   kernel_name="python3")  # fmt: skip
        (metrics,) = (Path(tmp) / "results" / "lm").glob("*/metrics.json")
        record = json.loads(metrics.read_text())
    assert record["runtime"]["device"].split(":")[0] == runtime.device.type, record["runtime"]
    return {"case": "notebook 04 (paper profile's RDRO, small)", "step_s": None, "tokens_per_s": None, "mfu": None,
            "peak_memory_gib": None, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def two_processes(args) -> dict:
    """Our DPO and reverse KL in two processes on two GPUs; each process checks its own device."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--mixed_precision", "no", __file__, "--child-two-processes", f"--steps={args.steps}"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"two processes failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"case": "two processes: dpo + reverse_kl", "step_s": None, "tokens_per_s": None, "mfu": None,
            "peak_memory_gib": None, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def reset_memory(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)


def peak_memory(runtime: Runtime) -> float | None:
    return torch.cuda.max_memory_allocated(runtime.device) / 2**30 if runtime.device.type == "cuda" else None


def check_placed(policy: torch.nn.Module, runtime: Runtime) -> None:
    away = {str(p.device) for p in policy.parameters() if p.device.type != runtime.device.type}
    if away:
        raise AssertionError(f"parameters of the trained policy on {sorted(away)}, the run is on {runtime.device}")


def timing(case, ends, tokens, kind, args, runtime, peak, flops, calls) -> dict:
    steps = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)] or [float("nan")]
    step = statistics.median(steps)
    completions = ("chosen_ids", "rejected_ids") if kind == "paired" else ("completion_ids",)
    per_step = sum(len(r["prompt_ids"]) + len(r[c]) for r in tokens[: args.batch_size] for c in completions)
    return {"case": case, "step_s": step, "tokens_per_s": per_step / step, "mfu": flops / step / peak,
            "peak_memory_gib": peak_memory(runtime), "forward_checks": calls}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (the CPU test)")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps a case (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--skip", nargs="*", default=[], choices=["trl", "notebook", "two"])
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    parser.add_argument("--child-two-processes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    runtime = make_runtime(True if torch.cuda.is_available() else "auto")
    tokenizer = tiny_tokenizer()
    rows = texts(tokenizer, args.steps * args.batch_size, args.completion_tokens)
    if args.child_two_processes:
        assert runtime.num_processes == 2 and runtime.device.index == runtime.process_index, runtime
        offline_case("qwen2", "lora", "dpo", tokenizer, rows, args, runtime, measured_peak(runtime))
        online_case("qwen2", "lora", tokenizer, rows, args, runtime)
        return
    peak = measured_peak(runtime)
    name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "CPU"
    print(f"{name} ({runtime.device}); {runtime.precision}; bf16 matmul peak {peak / 1e12:.3g} TFLOP/s", flush=True)
    records, start = [], time.perf_counter()
    for arch in SHAPES:
        for tuning in ("lora", "full"):
            for loss in OFFLINE_LOSSES:
                records.append(offline_case(arch, tuning, loss, tokenizer, rows, args, runtime, peak))
                report(records[-1])
                if loss == "dpo" and tuning == "lora" and "trl" not in args.skip:  # TRL beside our DPO
                    records.append(trl_case(arch, tokenizer, rows, args, runtime, peak))
                    report(records[-1])
            records.append(online_case(arch, tuning, tokenizer, rows, args, runtime))
            report(records[-1])
    if "notebook" not in args.skip:
        records.append(notebook_case(tokenizer, args, runtime))
        report(records[-1])
    if "two" not in args.skip and torch.cuda.device_count() >= 2:
        records.append(two_processes(args))
        report(records[-1])
    meta = {"device": name, "precision": runtime.precision, "bf16_peak_tflops": peak / 1e12,
            "seconds": round(time.perf_counter() - start, 1), "command": "python bench/gpu_check.py "
            + " ".join(sys.argv[1:]), "torch": torch.__version__, "cases": records}  # fmt: skip
    out = Path(args.out)
    write_atomic(out / "gpu_check.json", json.dumps(meta, indent=2) + "\n")
    write_atomic(out / "gpu_check.md", markdown(meta))
    print(f"all checks passed in {meta['seconds']:.0f} s; wrote {out / 'gpu_check.md'}")


def report(record: dict) -> None:
    shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in record.items() if k != "case" and v is not None}
    print(f"{record['case']:45s} " + "  ".join(f"{k} {v}" for k, v in shown.items()), flush=True)


def markdown(meta: dict) -> str:
    lines = [f"# GPU check: {meta['device']}", "", f"`{meta['command']}`, torch {meta['torch']}; {meta['precision']};"
             f" measured bf16 matmul peak {meta['bf16_peak_tflops']:.3g} TFLOP/s; {meta['seconds']:.0f} s in all.", "",
             "| case | step (s) | tokens/s | MFU | peak memory (GiB) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in meta["cases"]:
        cells = [r.get(k) for k in ("step_s", "tokens_per_s", "mfu", "peak_memory_gib")]
        lines.append(f"| {r['case']} | " + " | ".join("-" if v is None else f"{v:.3g}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
