"""What one LM run's evaluation costs, measured side by side in one run: batch size and autocast.

    .venv/bin/python bench/eval_cost.py [--model smollm2-135m-instruct] [--prompts 64] [--samples 2]

A LoRA policy (bf16 base, adapters perturbed so they matter) is evaluated on the offline set's test prompts as
``studylib.lm.evaluate.evaluate`` does it (policy and reference samples, both scored, the pool's judgments; no
cache), three ways: 16 rows at a time without autocast (the old default), 64 without, and 64 under the training's
bf16 autocast (``reference.autocast_context``, what ``experiment.evaluate_policy`` does now). Prints each one's
seconds and its ratio to the first; then how far apart the two numerics put the log-probs of the same samples.
Builds the offline data set (cached) if it is not there: a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from studylib.lm.annotators import AnnotatorPool
from studylib.lm.batching import pad_token_id, score_sequences
from studylib.lm.config import RunConfig
from studylib.lm.evaluate import encode_prompts, evaluate
from studylib.lm.experiment import load_policy, load_preferences
from studylib.lm.reference import autocast_context, policy_and_reference
from studylib.lm.runtime import make_runtime
from studylib.lm.sampling import sample_completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    config = RunConfig.from_flat({"model": args.model, "bf16": True, "use_lora": True, "eval_prompts": args.prompts})
    runtime = make_runtime(True)
    model, tokenizer = load_policy(config, runtime)
    pool = AnnotatorPool(seed=0)
    data = load_preferences(config, model, tokenizer, pool, runtime)
    policy, _ = policy_and_reference(model, config.train, needs_reference=True, device=runtime.device)
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
        context = autocast_context(policy, config.train, runtime.device) if autocast else contextlib.nullcontext()
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
    # the same sampled sequences scored both ways: how far apart the two numerics put a sequence's log-prob
    prompt_ids = [p for p in encode_prompts(tokenizer, data.eval_prompts) for _ in range(args.samples)]
    completions = sample_completions(policy, tokenizer, prompt_ids, max_new_tokens=32, seed=0, batch_size=64)
    plain = score_sequences(policy, prompt_ids, completions, pad_token_id(tokenizer), 64)
    with autocast_context(policy, config.train, runtime.device):
        autocast = score_sequences(policy, prompt_ids, completions, pad_token_id(tokenizer), 64)
    gap = autocast - plain
    print(
        f"log-prob of the same {len(gap)} samples, autocast minus float32 adapters: mean {gap.mean():.3f}, "
        f"sd {gap.std():.3f}, largest {gap.abs().max():.3f} nats (a sequence's log-prob: {plain.mean():.1f} on average)"
    )


if __name__ == "__main__":
    main()
