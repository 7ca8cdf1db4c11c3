"""Cost per step on the embedded model (or any model), measured side by side in one run.

    .venv/bin/python bench/lm_step.py [--model smollm2-135m-instruct] [--steps 6]

Prints seconds per optimizer step for an offline loss (RDRO, LoRA, reference log-probs cached) and an
on-policy one (reverse KL: sampling + reward + RLOO), both on the same batch shapes, and their ratio;
and sampling throughput. Uses the offline preference data's cache if present (else builds a small set).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from studylib.lm.annotators import AnnotatorPool
from studylib.lm.config import TrainConfig
from studylib.lm.data import encode_prompt, tokenize_unpaired
from studylib.lm.models import load_model
from studylib.lm.online import train_online
from studylib.lm.sampling import sample_completions
from studylib.lm.synth import build_offline_preferences
from studylib.lm.trainer import preferred_fraction, train
from studylib.losses import build_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-prompts", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, tokenizer = load_model(args.model)
    data = build_offline_preferences(
        model, tokenizer, model_name=args.model, n_prompts=args.n_prompts, pool=AnnotatorPool(0)
    )
    rows, _ = tokenize_unpaired(data.unpaired_train, tokenizer, 192, 96)
    prompts = [encode_prompt(tokenizer, p) for p in data.unpaired_train["prompt"][: args.batch_size]]

    start = time.perf_counter()
    completions = sample_completions(model, tokenizer, prompts, max_new_tokens=48, seed=0, batch_size=args.batch_size)
    gen_seconds = time.perf_counter() - start
    tokens = sum(len(c) for c in completions)

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(max_steps=args.steps + 1, batch_size=args.batch_size, save_steps=10_000)
        rdro = build_loss("rdro", {"alpha": "auto"}, preferred_fraction(rows))
        trainer = train(load_model(args.model)[0], tokenizer, rows, rdro, config, tmp)
        times = [e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e]
    offline = times[0] / (args.steps + 1)

    with tempfile.TemporaryDirectory() as tmp:
        online_config = TrainConfig(
            max_steps=args.steps + 1,
            prompts_per_step=args.batch_size // 2,
            samples_per_prompt=2,
            max_new_tokens=48,
            save_steps=10_000,
        )

        def reward(prompt_ids, completion_ids):  # stand-in reward: brevity, no model
            return -torch.tensor([len(c) for c in completion_ids], dtype=torch.float32) / 48

        _, history = train_online(
            load_model(args.model)[0],
            tokenizer,
            build_loss("reverse_kl"),
            online_config,
            prompt_ids=prompts,
            reward_fn=reward,
            output_dir=tmp,
        )
    online = sum(e["step_seconds"] for e in history[1:]) / len(history[1:])

    print(
        f"sampling: {tokens} tokens in {gen_seconds:.1f} s = {tokens / gen_seconds:.0f} tokens/s (batch {len(prompts)})"
    )
    print(f"offline RDRO, LoRA, batch {args.batch_size}: {offline:.2f} s/step ({1 / offline:.3f} steps/s)")
    print(f"online reverse KL, {args.batch_size // 2} prompts x 2 samples x 48 tokens: {online:.2f} s/step")
    print(f"ratio online / offline: {online / offline:.2f}")


if __name__ == "__main__":
    main()
