"""Did a trained policy learn its target or its training completions? Log-ratios on seen and fresh completions.

A policy that learns ``p+`` raises the probability of approved completions it never saw as well as of the approved
completions it trained on. A policy that memorises raises the probability of its own training completions (the
rows it saw) and not of fresh approved completions of the same prompts. ``seen_and_fresh`` measures both on the
same training prompts: the mean log-ratio ``log pi(y|x) - log pi_ref(y|x)`` of

- **seen** completions: the training rows of those prompts (the offline set's samples), approved and not;
- **fresh** completions: new samples of the reference for the same prompts (``TargetProbe``: the same draws as the
  training curves' training-prompt probe), approved and not,

each with a 95% bootstrap interval over the prompts. ``KL(p+ || pi)`` falls exactly when the fresh approved
log-ratio rises (``studylib.lm.target``), so a seen/fresh gap is the reason a training-prompt curve does not
fall. Run it on finished run folders (LoRA runs on the offline set); each gets ``memorisation.csv`` (and ``.md``),
which notebook 05's pilot section gathers::

    python -m studylib.lm.memorisation results/pilot/<run> [<run> ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from studylib.checks import UserError
from studylib.lm.annotators import AnnotatorPool
from studylib.lm.batching import pad_token_id, score_sequences
from studylib.lm.config import RunConfig
from studylib.lm.data import encode_prompt, prompt_key
from studylib.lm.evaluate import derived_seed
from studylib.lm.stats import bootstrap_interval
from studylib.lm.target import TargetProbe


def log_ratio_table(
    prompt_index: np.ndarray, kind: str, approved: np.ndarray, log_ratio: np.ndarray, seed: int = 0
) -> list[dict]:
    """One row per approval class: the mean log-ratio over prompts (each prompt's mean over its completions of
    that class) with its interval, and the counts."""
    frame = pd.DataFrame({"prompt": prompt_index, "approved": approved, "log_ratio": log_ratio})
    rows = []
    for value, part in frame.groupby("approved"):
        per_prompt = part.groupby("prompt")["log_ratio"].mean().to_numpy()
        estimate, low, high = bootstrap_interval(per_prompt, seed=seed)
        rows.append({"completions": kind, "approved": bool(value), "log_ratio": estimate, "log_ratio_low": low,
                     "log_ratio_high": high, "prompts": len(per_prompt), "n": len(part)})  # fmt: skip
    return rows


SEEN, FRESH = "seen (training rows)", "fresh (new reference samples)"
"""The two kinds of completions the table reads: the run's own training rows, and new reference samples."""


def gap_label(kind: str) -> str:
    """The ``completions`` cell of a kind's approved-minus-rejected row (``approval_gap``)."""
    return f"{kind}: approved minus rejected"


def approval_gap(
    prompt_index: np.ndarray, kind: str, approved: np.ndarray, log_ratio: np.ndarray, seed: int = 0
) -> dict:
    """The approved completions' mean log-ratio minus the rejected ones', per prompt (the prompts with both), with
    its interval over those prompts: above 0 when the policy separates the completions by the pool's approval."""
    frame = pd.DataFrame({"prompt": prompt_index, "approved": approved, "log_ratio": log_ratio})
    means = frame.groupby(["prompt", "approved"])["log_ratio"].mean().unstack()
    has_both = {False, True} <= set(means.columns)
    gap = (means[True] - means[False]).dropna() if has_both else pd.Series(dtype=float)
    estimate, low, high = bootstrap_interval(gap.to_numpy(), seed=seed) if len(gap) else (np.nan, np.nan, np.nan)
    return {"completions": gap_label(kind), "approved": None, "log_ratio": estimate, "log_ratio_low": low,
            "log_ratio_high": high, "prompts": len(gap), "n": int(frame["prompt"].isin(gap.index).sum())}  # fmt: skip


def seen_and_fresh(run_dir: str | Path, n_prompts: int = 32) -> pd.DataFrame:
    """The seen and fresh log-ratio table of a finished LoRA run on the offline set (module docstring)."""
    from peft import PeftModel

    from studylib.lm.models import load_policy
    from studylib.lm.preferences import load_preferences
    from studylib.lm.reference import Reference, autocast_context
    from studylib.lm.runtime import make_runtime

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "model").is_dir():
        raise UserError(f"{run_dir}: not a finished run folder (no metrics.json or model/)")
    params = json.loads((run_dir / "metrics.json").read_text())["params"]
    config = RunConfig.from_flat({k: v for k, v in params.items() if k in RunConfig.flat_names()})
    if config.data.dataset != "offline" or not config.train.use_lora:
        raise UserError(f"{run_dir}: seen_and_fresh reads LoRA runs on the offline set")
    runtime = make_runtime(config.train.bf16)
    model, tokenizer = load_policy(config, runtime)
    pool = AnnotatorPool(seed=0)
    data = load_preferences(config, model, tokenizer, pool, runtime)
    policy = PeftModel.from_pretrained(model, run_dir / "model").eval()
    prompts = data.train_prompts[:n_prompts]
    keys = {prompt_key(p): i for i, p in enumerate(prompts)}
    seen = [r for r in data.unpaired if prompt_key(r["prompt"]) in keys]
    pad_id, batch = pad_token_id(tokenizer), config.train.generation_batch_size
    settings = runtime.resolve(config.train)
    with torch.no_grad(), autocast_context(policy, settings, runtime.device):
        prompt_ids = [encode_prompt(tokenizer, r["prompt"]) for r in seen]
        completions = [r["completion_ids"] for r in seen]
        policy_logps = score_sequences(policy, prompt_ids, completions, pad_id, batch, device=runtime.device)
        with Reference(policy).active() as reference:
            reference_logps = score_sequences(reference, prompt_ids, completions, pad_id, batch, device=runtime.device)
        fresh = TargetProbe(
            policy, tokenizer, prompts, pool, samples_per_prompt=max(config.eval.target_samples_per_prompt, 2),
            max_new_tokens=config.eval.eval_max_new_tokens, seed=derived_seed(config.train.seed, 3),
            batch_size=batch, device=runtime.device,
        )  # fmt: skip
        fresh_logps = fresh._score(policy)
    seen_index = np.array([keys[prompt_key(r["prompt"])] for r in seen])
    seen_args = (
        seen_index,
        np.array([bool(r["label"]) for r in seen]),
        (policy_logps - reference_logps).double().numpy(),
    )
    fresh_index = np.repeat(np.arange(len(prompts)), fresh.k)
    fresh_args = (fresh_index, fresh.approvals > 0.5, (fresh_logps - fresh.reference_logps).double().numpy())
    rows = []
    for kind, (index, approved, log_ratio) in ((SEEN, seen_args), (FRESH, fresh_args)):
        rows += log_ratio_table(index, kind, approved, log_ratio) + [approval_gap(index, kind, approved, log_ratio)]
    table = pd.DataFrame(rows)
    return table.assign(run=run_dir.name, loss=config.loss, learning_rate=config.train.learning_rate,
                        steps=config.train.max_steps, lora_r=config.train.lora_r,
                        completions_per_prompt=config.data.completions_per_prompt)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run folders (LoRA, offline set)")
    parser.add_argument("--prompts", type=int, default=32, help="training prompts to read (default 32)")
    args = parser.parse_args(argv)
    from studylib.results import save_table

    for run in args.runs:
        table = seen_and_fresh(run, args.prompts)
        print(table.drop(columns="run").to_string(index=False, float_format=lambda value: f"{value:.4g}"))
        save_table(table, Path(run) / "memorisation", {"run": Path(run).name, "prompts": args.prompts})


if __name__ == "__main__":
    main()
