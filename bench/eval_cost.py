"""What one LM run's evaluation costs, measured side by side in one run: batch size and autocast.

    .venv/bin/python bench/eval_cost.py [--model smollm2-135m-instruct] [--prompts 64] [--samples 2]

A LoRA policy (bf16 base, adapters perturbed so they matter) is evaluated on the offline set's test prompts as
``studylib.lm.evaluate.evaluate`` does it (policy and reference samples, both scored, the pool's judgments; no
cache), three ways: 16 rows at a time without autocast (the old default), 64 without, and 64 under the training's
bf16 autocast (``reference.autocast_context``, what ``experiment.evaluate_policy`` does now). Prints each one's
seconds and its ratio to the first. Builds the offline data set (cached) if it is not there: a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from studylib.lm.annotators import AnnotatorPool
from studylib.lm.config import RunConfig
from studylib.lm.evaluate import evaluate
from studylib.lm.experiment import load_policy, load_preferences
from studylib.lm.reference import autocast_context, policy_and_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    config = RunConfig.from_flat({"model": args.model, "bf16": True, "use_lora": True, "eval_prompts": args.prompts})
    model, tokenizer = load_policy(config)
    pool = AnnotatorPool(seed=0)
    data = load_preferences(config, model, tokenizer, pool)
    policy, _ = policy_and_reference(model, config.train, needs_reference=True)
    with torch.no_grad():  # adapters as after some training: B no longer zero
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3, generator=torch.Generator().manual_seed(0))
    ways = [
        ("batch 16, no autocast", 16, False),
        ("batch 64, no autocast", 64, False),
        ("batch 64, autocast", 64, True),
    ]
    seconds = []
    for label, batch_size, autocast in ways:
        context = autocast_context(policy, config.train) if autocast else contextlib.nullcontext()
        start = time.perf_counter()
        with context:
            summary, _ = evaluate(
                policy, tokenizer, data.eval_prompts, pool, samples_per_prompt=args.samples,
                batch_size=batch_size, cache_reference_samples=False,
            )  # fmt: skip
        seconds.append(time.perf_counter() - start)
        print(f"{label}: {seconds[-1]:.1f} s (win rate {summary['win_rate']:.3f}, KL {summary['kl']:.3f})", flush=True)
    for (label, _, _), s in zip(ways, seconds, strict=True):
        print(f"{label}: {s / seconds[0]:.2f} x the first")


if __name__ == "__main__":
    main()
