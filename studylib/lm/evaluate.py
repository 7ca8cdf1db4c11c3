"""Evaluate a policy against its reference: samples, win rate, approval, KL, length, diversity.

Both models sample completions for the same held-out prompts at temperature 1 (``studylib.lm.sampling``,
so the samples come from the models themselves and the KL estimate is unbiased). The annotator pool judges
each policy completion against the reference's completion for the same prompt (ties count half): the
offline stand-in for AlpacaEval's win rate. ``KL(pi || pi_ref)`` is estimated as the mean of
``log pi(y|x) - log pi_ref(y|x)`` over the policy's samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from studylib.lm.batching import pad_token_id, score_sequences
from studylib.lm.reference import Reference
from studylib.lm.sampling import sample_completions
from studylib.results import save_json

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

    ``reference``: a separate reference model, or None for a PEFT policy (its adapters disabled; see
    ``studylib.lm.reference``).
    Returns the summary and a per-prompt table (prompt, both completions, judgments, log-ratio, lengths).
    """
    if not prompts:
        raise ValueError("no evaluation prompts")
    ref = Reference(policy, reference)
    pad_id = pad_token_id(tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts)
    knobs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    policy_ids = sample_completions(policy, tokenizer, prompt_ids, seed=seed, desc="policy samples", **knobs)
    with ref.active() as reference_model:
        reference_ids = sample_completions(
            reference_model, tokenizer, prompt_ids, seed=seed + 1, desc="reference samples", **knobs
        )
        reference_logps = score_sequences(reference_model, prompt_ids, policy_ids, pad_id, batch_size)
    policy_logps = score_sequences(policy, prompt_ids, policy_ids, pad_id, batch_size)
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
    path: str | Path,
    instructions: Sequence[str],
    outputs: Sequence[str],
    generator: str,
    stamp: Mapping[str, Any] | None = None,
) -> Path:
    """AlpacaEval's ``model_outputs.json`` (instruction, output, generator, dataset), written atomically, with
    its stamp beside it (``model_outputs.stamp.json``)."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    records = [
        {"instruction": i, "output": o, "generator": generator, "dataset": "studylib"}
        for i, o in zip(instructions, outputs, strict=True)
    ]
    return save_json(records, path, stamp or {"generator": generator})["json"]


def mean_sd(values: Sequence[float]) -> str:
    """``mean ± sd`` over seeds (sd with ddof 1; '-' for a single value)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 1:
        return f"{arr[0]:.3f}"
    return f"{arr.mean():.3f} ± {arr.std(ddof=1):.3f}"
