"""Our trainer against TRL's DPOTrainer and KTOTrainer: seconds per step, peak memory and MFU, side by side.

    .venv/bin/python bench/vs_trl.py            # all cases, about 15 minutes on 2 cores
    .venv/bin/python bench/vs_trl.py --steps 2 --cases dpo-fp32-fly   # a quick look

Same model (the embedded SmolLM2-135M-Instruct unless ``--model``), same rows (``--batch-size`` rows per step, a
prompt of about 50 tokens and completions of ``--completion-tokens``), same LoRA (r 16, alpha 32, every
projection), same precision, same reference (on the fly, or log-probs precomputed before training), no gradient
checkpointing for either (TRL turns it on by default: it saves memory for about 20-30% more time). bf16: the
frozen base weights in bfloat16 for both (TRL: plus its ``bf16=True`` autocast); LoRA adapters float32.

Each case runs in its own process (a clean peak RSS), TRL and ours interleaved (the order alternates from case
to case); ``--warmup`` steps, then ``--steps`` timed steps (time between the ends of consecutive optimizer
steps, data loading included). The same run first measures this machine's matmul peak (the best of square
GEMMs of sizes 1024-4096, fp32 and bf16). MFU = model FLOPs per step / (median step time x the peak of the
case's precision), where model FLOPs count the work any implementation must do: 2 N_body FLOPs per token
per forward (N_body: parameters of the transformer blocks), 2 H V per completion token for the output
layer, a backward pass costing one forward (input gradients only: the base is frozen; LoRA's own FLOPs are
negligible), plus the reference's forward when it runs on the fly, and for KTO the policy's forward on the
mismatched pairs (and the reference's, on the fly). So MFU ratios equal speed ratios,
and MFU says how close a case comes to the hardware.

Writes ``results/bench/vs_trl.csv`` (one row per case and implementation) and ``results/bench/vs_trl.json``
(the machine, versions, the matmul peaks, the command).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studylib.lm.runtime import processor_name  # noqa: E402
from studylib.results import write_atomic  # noqa: E402

# case: (our loss, TRL's trainer, precision, reference)
CASES = {
    "dpo-fp32-fly": ("dpo", "dpo", "fp32", "on_the_fly"),
    "dpo-fp32-pre": ("dpo", "dpo", "fp32", "precomputed"),
    "kto-fp32-pre": ("kto", "kto", "fp32", "precomputed"),
    "dpo-bf16-fly": ("dpo", "dpo", "bf16", "on_the_fly"),
    "dpo-bf16-pre": ("dpo", "dpo", "bf16", "precomputed"),
    "kto-bf16-pre": ("kto", "kto", "bf16", "precomputed"),
    "rdro-bf16-pre": ("rdro", "kto", "bf16", "precomputed"),  # ours: RDRO; TRL: its KTO (no RDRO there)
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}


def matmul_peak(
    dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5, budget_seconds: float = 1.0
) -> float:
    """Best GFLOP/s of square GEMMs in ``dtype`` over ``sizes`` and ``repeats`` runs each (after a warm-up).

    Bounded: a size whose GEMM takes more than ``budget_seconds`` is not repeated and no larger size is tried (on a
    processor without native bf16, a bf16 GEMM of 4096 runs at about 1 GFLOP/s: minutes each, 8 in all)."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        first = _timed(lambda: torch.mm(a, b))  # noqa: B023 (called here); also the warm-up
        if first > budget_seconds:
            return max(best, 2 * size**3 / first / 1e9)
        seconds = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))  # noqa: B023 (called here)
        best = max(best, 2 * size**3 / seconds / 1e9)
    return best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- the rows both implementations train on ---------------------------------------------------------------
def texts(tokenizer, n_rows: int, completion_tokens: int) -> list[dict]:
    """``n_rows`` rows of templated prompts (data/prompts.jsonl) and two completions of ``completion_tokens``."""
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "data" / "prompts.jsonl").read_text().splitlines()]
    rows = []
    for i in range(n_rows):
        messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pieces = [" ".join(prompts[(i + k) % len(prompts)] for k in range(offset, offset + 6)) for offset in (1, 7)]
        chosen, rejected = (
            tokenizer.decode(tokenizer.encode(p, add_special_tokens=False)[:completion_tokens]) for p in pieces
        )
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "label": i % 3 == 0})
    return rows


def our_rows(tokenizer, rows: list[dict], kind: str) -> list[dict]:
    eos = [tokenizer.eos_token_id]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    if kind == "paired":
        return [
            {"prompt_ids": encode(r["prompt"]), "chosen_ids": encode(r["chosen"]) + eos,
             "rejected_ids": encode(r["rejected"]) + eos}
            for r in rows
        ]  # fmt: skip
    return [
        {"prompt_ids": encode(r["prompt"]), "completion_ids": encode(r["chosen"]) + eos, "label": r["label"]}
        for r in rows
    ]


# --- one case in one process -----------------------------------------------------------------------------
class StepClock:
    """A TrainerCallback recording the time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def __getattr__(self, name):  # every other callback event: do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def model_flops_per_step(config, rows: list[dict], kind: str, batch_size: int, forwards: float) -> float:
    """See the module docstring: useful FLOPs of one step of ``batch_size`` rows, ``forwards`` forward passes."""
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    inter = config.intermediate_size
    kv = hidden // config.num_attention_heads * config.num_key_value_heads
    n_body = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    completions = ("chosen_ids", "rejected_ids") if kind == "paired" else ("completion_ids",)
    batch = rows[:batch_size]
    all_tokens = sum(len(r["prompt_ids"]) + len(r[c]) for r in batch for c in completions)
    completion_tokens = sum(len(r[c]) for r in batch for c in completions)
    forward = 2 * n_body * all_tokens + 2 * hidden * vocab * completion_tokens
    return forward * forwards


def run_case(case: str, impl: str, args: argparse.Namespace) -> dict:
    from studylib.lm.models import load_model

    loss_name, trl_name, precision, reference = CASES[case]
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    n_steps = args.warmup + args.steps
    rows = texts(tokenizer, n_steps * args.batch_size, args.completion_tokens)
    clock = StepClock()
    kind = "paired" if (loss_name if impl == "ours" else trl_name) == "dpo" else "unpaired"
    tokens = our_rows(tokenizer, rows, kind)
    with tempfile.TemporaryDirectory() as tmp:
        if impl == "ours":
            trainer = build_ours(model, tokenizer, tokens, loss_name, precision, reference, n_steps, args, tmp)
        else:
            trainer = build_trl(model, tokenizer, rows, trl_name, precision, reference, n_steps, args, tmp)
        trainer.add_callback(clock)
        trainer.train()
    steps = [b - a for a, b in zip(clock.ends[args.warmup - 1 : -1], clock.ends[args.warmup :], strict=True)]
    uses_kl = (loss_name if impl == "ours" else trl_name) == "kto"
    on_the_fly = reference == "on_the_fly"
    forwards = 2.0 + on_the_fly + ((1.0 + on_the_fly) if uses_kl else 0.0)
    return {
        "case": case,
        "loss": loss_name if impl == "ours" else trl_name,
        "precision": precision,
        "reference": reference,
        "impl": impl,
        "step_s_median": statistics.median(steps),
        "step_s_min": min(steps),
        "step_s_max": max(steps),
        "timed_steps": len(steps),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_gflop_per_step": model_flops_per_step(model.config, tokens, kind, args.batch_size, forwards) / 1e9,
    }


def build_ours(model, tokenizer, rows, loss_name, precision, reference, n_steps, args, output_dir):
    from studylib.lm.config import TrainConfig
    from studylib.lm.trainer import build_trainer, preferred_fraction
    from studylib.losses import build_loss

    config = TrainConfig(
        learning_rate=1e-5, max_steps=n_steps, batch_size=args.batch_size, lr_scheduler_type="constant",
        warmup_ratio=0.0, bf16=precision == "bf16", lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
        precompute_reference=reference == "precomputed", save_steps=10**6, reference_batch_size=args.batch_size,
    )  # fmt: skip
    fraction = preferred_fraction(rows) if "label" in rows[0] else None
    loss_fn = build_loss(loss_name, {"beta": 0.1} if loss_name in ("dpo", "kto") else {"alpha": "auto"}, fraction)
    return build_trainer(model, tokenizer, rows, loss_fn, config, output_dir)


def build_trl(model, tokenizer, rows, trl_name, precision, reference, n_steps, args, output_dir):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from studylib.lm.lora import LORA_TARGETS

    common = dict(
        output_dir=output_dir, learning_rate=1e-5, max_steps=n_steps, per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="constant", bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(),
        precompute_ref_log_probs=reference == "precomputed", precompute_ref_batch_size=args.batch_size,
        report_to=[], save_strategy="no", logging_steps=1, beta=0.1, max_length=None, dataloader_num_workers=0,
        disable_tqdm=True, gradient_checkpointing=False,  # TRL's default is True: ours runs without
    )  # fmt: skip
    peft_config = LoraConfig(**LORA, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    if trl_name == "dpo":
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        return DPOTrainer(
            model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer,
            peft_config=peft_config,
        )  # fmt: skip
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"], "label": r["label"]} for r in rows])
    return KTOTrainer(
        model=model, args=KTOConfig(**common), train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )


# --- the driver ----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_case(*args.child, args)), flush=True)
        return

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"{processor_name()}, {torch.get_num_threads()} threads: matmul peak "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)  # fmt: skip
    records = []
    for i, case in enumerate(args.cases):
        for impl in ("trl", "ours") if i % 2 == 0 else ("ours", "trl"):
            command = [sys.executable, __file__, "--child", case, impl]
            command += [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("model", "batch_size", "warmup", "steps")
            ]
            command += [f"--completion-tokens={args.completion_tokens}"]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{case} / {impl} failed:\n{done.stderr[-3000:]}")
            record = json.loads(lines[-1][len("RESULT ") :])
            gflop = record["model_gflop_per_step"]
            record["mfu"] = gflop / record["step_s_median"] / peaks[record["precision"]]
            records.append(record)
            print(f"{case:14s} {impl:4s} {record['step_s_median']:6.2f} s/step "
                  f"[{record['step_s_min']:.2f}, {record['step_s_max']:.2f}]  "
                  f"{record['peak_rss_mib']:6.0f} MiB  MFU {record['mfu']:.2f}", flush=True)  # fmt: skip
    table = pd.DataFrame(records)
    table.insert(0, "processor", processor_name())
    out = Path(args.out)
    write_atomic(out / "vs_trl.csv", table.to_csv(index=False, float_format="%.4g"))
    import transformers
    import trl

    meta = {
        "command": "python bench/vs_trl.py " + " ".join(sys.argv[1:]),
        "processor": processor_name(),
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "settings": {k: getattr(args, k) for k in ("model", "batch_size", "completion_tokens", "warmup", "steps")},
    }
    write_atomic(out / "vs_trl.json", json.dumps(meta, indent=2) + "\n")
    print(ratio_summary(table))


def ratio_summary(table: pd.DataFrame) -> str:
    """Per case: TRL's median step time / ours (our speed-up) and our peak memory / TRL's."""
    lines = ["case            speed-up (TRL s / ours s)   memory (ours / TRL)   our MFU"]
    for case, group in table.groupby("case", sort=False):
        ours, theirs = group.set_index("impl").loc["ours"], group.set_index("impl").loc["trl"]
        lines.append(
            f"{case:15s} {theirs.step_s_median / ours.step_s_median:6.2f}x"
            f"{ours.peak_rss_mib / theirs.peak_rss_mib:27.2f}{ours.mfu:17.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
