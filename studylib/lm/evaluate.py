"""Evaluate a policy against its reference: samples, win rate, approval, KL, length, diversity.

Both models sample completions for the same held-out prompts at temperature 1 (so the samples come from
the models themselves and the KL estimate is unbiased). The annotator pool judges each policy completion
against the reference's completion for the same prompt (ties count half): the offline stand-in for
AlpacaEval's win rate. ``KL(pi || pi_ref)`` is estimated as the mean of
``log pi(y|x) - log pi_ref(y|x)`` over the policy's samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from studylib.lm.batching import reference_context, sample_new_tokens, score_sequences

Messages = list[dict[str, str]]


class Judge(Protocol):
    """What evaluation needs of an annotator pool."""

    def prefer(self, prompt: str, a: str, b: str) -> float: ...

    def approve(self, prompt: str, completion: str) -> bool | float: ...


def prompt_text(messages: Messages) -> str:
    """The last user message of a chat prompt: what the annotators read as the prompt."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError(f"prompt has no user message: {messages!r}")
    return users[-1]


def encode_prompts(tokenizer, prompts: Sequence[Messages]) -> list[list[int]]:
    """Chat-templated prompt token ids, ready for generation."""
    from studylib.lm.data import encode_prompt

    return [encode_prompt(tokenizer, p) for p in prompts]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    desc: str | None = "sampling",
) -> list[list[int]]:
    """Sample one completion per prompt (left-padded batches); each ends at its EOS, which it keeps."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    completions: list[list[int]] = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc=desc, disable=desc is None):
        rows = sample_new_tokens(
            model,
            prompt_ids[start : start + batch_size],
            pad_id=pad_id,
            eos_id=eos_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
        for row in rows:
            completions.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    model.train(was_training)
    return completions


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the whitespace-split texts (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarise(samples: pd.DataFrame) -> dict[str, float]:
    """The evaluation's numbers from its per-prompt table."""
    return {
        "win_rate": float(samples["win"].mean()),
        "approval": float(samples["approved"].mean()),
        "reference_approval": float(samples["reference_approved"].mean()),
        "kl": float(samples["logratio"].mean()),
        "length": float(samples["length"].mean()),
        "reference_length": float(samples["reference_length"].mean()),
        "distinct_1": distinct_n(samples["completion"].tolist(), 1),
        "distinct_2": distinct_n(samples["completion"].tolist(), 2),
        "n_prompts": int(len(samples)),
    }


def evaluate(
    policy,
    tokenizer,
    prompts: Sequence[Messages],
    judge: Judge,
    *,
    reference=None,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 8,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Sample from ``policy`` and its reference on ``prompts``; judge, score and summarise.

    ``reference``: a separate reference model, or None for a PEFT policy (its adapters disabled).
    Returns the summary and a per-prompt table (prompt, both completions, judgments, log-ratio, lengths).
    """
    if not prompts:
        raise ValueError("no evaluation prompts")
    if reference is None and not getattr(policy, "peft_config", None):
        raise ValueError("pass the reference model: the policy has no adapters to disable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, prompts)
    reference_model = policy if reference is None else reference
    knobs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    policy_ids = generate(policy, tokenizer, prompt_ids, seed=seed, desc="policy samples", **knobs)
    with reference_context(policy) if reference is None else nullcontext():
        reference_ids = generate(
            reference_model, tokenizer, prompt_ids, seed=seed + 1, desc="reference samples", **knobs
        )
    policy_logps = score_sequences(policy, prompt_ids, policy_ids, pad_id, batch_size)
    with reference_context(policy) if reference is None else nullcontext():
        reference_logps = score_sequences(reference_model, prompt_ids, policy_ids, pad_id, batch_size)
    rows = []
    for i, messages in enumerate(prompts):
        text = prompt_text(messages)
        completion = tokenizer.decode(policy_ids[i], skip_special_tokens=True)
        reference_completion = tokenizer.decode(reference_ids[i], skip_special_tokens=True)
        rows.append(
            {
                "prompt": text,
                "completion": completion,
                "reference_completion": reference_completion,
                "win": float(judge.prefer(text, completion, reference_completion)),
                "approved": float(judge.approve(text, completion)),
                "reference_approved": float(judge.approve(text, reference_completion)),
                "logratio": float(policy_logps[i] - reference_logps[i]),
                "length": len(policy_ids[i]),
                "reference_length": len(reference_ids[i]),
            }
        )
    samples = pd.DataFrame(rows)
    return summarise(samples), samples


def write_alpaca_eval_outputs(
    path: str | Path, instructions: Sequence[str], outputs: Sequence[str], generator: str
) -> Path:
    """AlpacaEval's ``model_outputs.json`` (instruction, output, generator, dataset), written atomically."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    records = [
        {"instruction": i, "output": o, "generator": generator, "dataset": "studylib"}
        for i, o in zip(instructions, outputs, strict=True)
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    tmp.replace(path)
    return path


def mean_sd(values: Sequence[float]) -> str:
    """``mean ± sd`` over seeds (sd with ddof 1; '-' for a single value)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 1:
        return f"{arr[0]:.3f}"
    return f"{arr.mean():.3f} ± {arr.std(ddof=1):.3f}"
