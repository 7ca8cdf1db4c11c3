"""Where an offline step's time goes: torch.profiler over a few steps of our trainer, top operations by CPU time.

    .venv/bin/python bench/profile_step.py [--loss rdro] [--precision bf16] [--steps 3]

Same model, rows, LoRA and batch as ``bench/vs_trl.py`` (reference log-probs precomputed before the profiled steps).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import build_ours, our_rows, texts  # noqa: E402

from studylib.lm.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--loss", default="rdro", choices=["rdro", "dpo", "kto"])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=40)
    parser.add_argument("--rows", type=int, default=20, help="operations listed")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    kind = "paired" if args.loss == "dpo" else "unpaired"
    rows = our_rows(tokenizer, texts(tokenizer, args.steps * args.batch_size, args.completion_tokens), kind)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_ours(model, tokenizer, rows, args.loss, args.precision, "precomputed", args.steps, args, tmp)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
