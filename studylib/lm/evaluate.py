"""Evaluate a policy against its reference: samples, win rate, approval, KL, length, diversity.

Both models sample completions for the same held-out prompts at temperature 1 (``studylib.lm.sampling``, so the
samples come from the models themselves and the KL estimate is unbiased): ``samples_per_prompt`` from each.
The annotator pool judges every policy sample against every reference sample of its prompt (ties count half):
the offline stand-in for AlpacaEval's win rate. ``KL(pi || pi_ref)`` is estimated as the mean of
``log pi(y|x) - log pi_ref(y|x)`` over the policy's samples.

Seeds: the policy's and the reference's samples use independent seeds drawn from the run's seed
(``evaluation_seeds``, recorded in the summary). The reference's samples depend only on the reference model,
the prompts and that seed, so every method of a seed is judged against the same ones (cached on disk:
``reference_samples``); a difference between two methods of a seed is then paired prompt by prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from studylib.lm.batching import pad_token_id, score_sequences, unwrap
from studylib.lm.models import cache_root
from studylib.lm.reference import Reference, autocast_context
from studylib.lm.sampling import ended_with_eos, sample_completions
from studylib.lm.stats import bootstrap_interval
from studylib.results import save_json, write_atomic

if TYPE_CHECKING:
    from torch import nn

    from studylib.lm.annotators import AnnotatorPool
    from studylib.lm.config import RunConfig
    from studylib.lm.preferences import PreferenceData
    from studylib.lm.runtime import Runtime

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


def derived_seed(seed: int, key: int) -> int:
    """An independent sampling seed drawn from a run's seed: key 1 and 2 the evaluation's policy and reference
    samples (``evaluation_seeds``), 3 and 4 the training curves' (``studylib.lm.curves``), 5 and 6 the final
    distance to the target's (``distance_to_target``)."""
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def evaluation_seeds(seed: int) -> tuple[int, int]:
    """``(policy_seed, reference_seed)``: independent sampling seeds derived from a run's seed (not ``s`` and
    ``s + 1``, which would couple one seed's policy samples to the next seed's reference samples)."""
    return derived_seed(seed, 1), derived_seed(seed, 2)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights (LoRA adapters left out: under LoRA the reference is the base)."""
    sums = [
        f"{name}:{tuple(p.shape)}:{p.dtype}:{p.detach().double().sum().item():.12e}"
        for name, p in unwrap(model).named_parameters()
        if "lora_" not in name
    ]
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()[:16]


def reference_samples(
    reference_model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    cache: bool = True,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """``samples_per_prompt`` reference samples per prompt (prompt-major), drawn on ``device``, cached under a hash of
    the reference's weights, the prompts, the knobs, the seed and (other than the CPU) the device type: every
    method of a seed gets the same ones."""
    expanded = [list(p) for p in prompt_ids for _ in range(samples_per_prompt)]
    inputs = [model_fingerprint(reference_model), expanded, max_new_tokens, seed, batch_size]
    if torch.device(device).type != "cpu":  # its random streams differ from the CPU's
        inputs.append(torch.device(device).type)
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    path = cache_root() / "reference_samples" / f"{key}.json"
    if cache and path.is_file():
        return json.loads(path.read_text())
    samples = sample_completions(
        reference_model,
        tokenizer,
        expanded,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        desc="reference samples",
        device=device,
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(samples))
    return samples


def summarise(samples: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """The evaluation's numbers from its per-sample table, with 95% bootstrap intervals over prompts for the win
    rate, the approval, its gain over the reference's samples of the same prompts, and the KL
    (``studylib.lm.stats``)."""
    per_prompt = samples.groupby("prompt_index")[["win", "approved", "reference_approved", "logratio"]].mean()
    per_prompt["approval_gain"] = per_prompt["approved"] - per_prompt["reference_approved"]  # paired by prompt
    out: dict[str, float] = {}
    for name, column in (("win_rate", "win"), ("approval", "approved"), ("approval_gain", "approval_gain"),
                         ("kl", "logratio")):  # fmt: skip
        estimate, low, high = bootstrap_interval(per_prompt[column].to_numpy(), seed=seed)
        out |= {name: estimate, f"{name}_low": low, f"{name}_high": high}
    return out | {
        "reference_approval": float(samples.groupby("prompt_index")["reference_approved"].mean().mean()),
        "length": float(samples["length"].mean()),
        "reference_length": float(samples["reference_length"].mean()),
        "finished": float(samples["finished"].mean()),
        "distinct_1": distinct_n(samples["completion"].tolist(), 1),
        "distinct_2": distinct_n(samples["completion"].tolist(), 2),
        "n_prompts": int(samples["prompt_index"].nunique()),
        "samples_per_prompt": int(samples.groupby("prompt_index").size().min()),
    }


def evaluate(
    policy,
    tokenizer,
    prompts: Sequence[Messages],
    judge: Judge,
    *,
    reference=None,
    max_new_tokens: int = 32,
    seed: int = 0,
    samples_per_prompt: int = 2,
    batch_size: int = 16,
    cache_reference_samples: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], pd.DataFrame]:
    """Sample from ``policy`` and its reference on ``prompts``; judge, score and summarise.

    ``reference``: a separate reference model, or None for a PEFT policy (its adapters disabled; see
    ``studylib.lm.reference``). Returns the summary (with the sampling seeds) and a table with one row per policy
    sample: its prompt, the sample, its win against the prompt's reference samples, approval, log-ratio, length.
    """
    if not prompts:
        raise ValueError("no evaluation prompts")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    ref = Reference(policy, reference)
    pad_id, eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
    policy_seed, reference_seed = evaluation_seeds(seed)
    prompt_ids = encode_prompts(tokenizer, prompts)
    m = samples_per_prompt
    expanded = [p for p in prompt_ids for _ in range(m)]
    knobs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": device}
    policy_ids = sample_completions(policy, tokenizer, expanded, seed=policy_seed, desc="policy samples", **knobs)
    with ref.active() as reference_model:
        reference_ids = reference_samples(
            reference_model, tokenizer, prompt_ids, samples_per_prompt=m, seed=reference_seed,
            cache=cache_reference_samples, **knobs,
        )  # fmt: skip
        reference_logps = score_sequences(reference_model, expanded, policy_ids, pad_id, batch_size, device=device)
    policy_logps = score_sequences(policy, expanded, policy_ids, pad_id, batch_size, device=device)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows = []
    for p, messages in enumerate(prompts):
        text = prompt_text(messages)
        references = [decode(ids) for ids in reference_ids[p * m : (p + 1) * m]]
        for i in range(m):
            k = p * m + i
            completion = decode(policy_ids[k])
            rows.append(
                {
                    "prompt_index": p,
                    "prompt": text,
                    "sample": i,
                    "completion": completion,
                    "reference_completion": references[i],
                    "win": float(np.mean([judge.prefer(text, completion, r) for r in references])),
                    "approved": float(judge.approve(text, completion)),
                    "reference_approved": float(judge.approve(text, references[i])),
                    "logratio": float(policy_logps[k] - reference_logps[k]),
                    "length": len(policy_ids[k]),
                    "reference_length": len(reference_ids[k]),
                    "finished": ended_with_eos(policy_ids[k], eos_id),
                }
            )
    samples = pd.DataFrame(rows)
    summary = summarise(samples, seed) | {"policy_sample_seed": policy_seed, "reference_sample_seed": reference_seed}
    return summary, samples


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


def evaluate_policy(
    config: RunConfig,
    policy,
    tokenizer,
    data: PreferenceData,
    pool: AnnotatorPool,
    reference: nn.Module | None,
    runtime: Runtime,
) -> tuple[dict, pd.DataFrame]:
    """``studylib.lm.evaluate.evaluate`` on the run's held-out prompts, seeded by the run's seed, on the runtime's
    device (where training left the policy and its reference).

    A bf16 run is evaluated as it was trained: under ``autocast_context`` (bf16 autocast, peft's adapter input
    casting off), the numerics its loss and its on-policy samples saw. (Without it the adapters would run in
    float32: the same policy up to rounding, per-sequence log-probs differing by 0.37 nats sd on the 135M model,
    and the evaluation about a tenth slower: ``bench/eval_cost.py``.)

    Beside ``evaluate``'s numbers: ``KL(p+ || pi)`` on the same prompts (``target_samples_per_prompt`` reference
    samples each: ``studylib.lm.target``), and the approval and KL to the target on ``train_eval_prompts`` training
    prompts (``train_`` keys), so a policy that fits its training prompts only shows it.
    """
    with autocast_context(policy, runtime.resolve(config.train), runtime.device):
        summary, samples = evaluate(
            policy,
            tokenizer,
            data.eval_prompts,
            pool,
            reference=reference,
            max_new_tokens=config.eval.eval_max_new_tokens,
            seed=config.train.seed,
            samples_per_prompt=config.eval.eval_samples_per_prompt,
            batch_size=config.train.generation_batch_size,
            device=runtime.device,
        )
        extra, target, train = distance_to_target(config, policy, tokenizer, data, pool, reference, runtime)
    if target is not None:  # each prompt's KL to the target beside its samples (the report averages over seeds)
        samples = samples.merge(target[["prompt_index", *TARGET_COLUMNS]], on="prompt_index", how="left")
    if train is not None:
        extra["train_per_prompt"] = train.drop(columns="prompt_index").to_dict(orient="list")
    return summary | extra, samples


TARGET_COLUMNS = ("kl_to_target", "reference_kl_to_target")


def distance_to_target(
    config: RunConfig,
    policy,
    tokenizer,
    data: PreferenceData,
    pool: AnnotatorPool,
    reference: nn.Module | None,
    runtime: Runtime,
) -> tuple[dict[str, float], pd.DataFrame | None, pd.DataFrame | None]:
    """``kl_to_target`` (with the reference's and the gain) on the evaluation prompts, and ``train_approval`` and
    ``train_kl_to_target`` (with the reference's) on the first ``train_eval_prompts`` training prompts: the summary,
    and the per-prompt tables of each (None where switched off)."""
    from studylib.lm.target import TargetProbe, summarise_approval, summarise_target_kl

    k, seed = config.eval.target_samples_per_prompt, config.train.seed
    reference_seed, policy_seed = derived_seed(seed, 5), derived_seed(seed, 6)
    knobs = {
        "reference": reference,
        "max_new_tokens": config.eval.eval_max_new_tokens,
        "seed": reference_seed,
        "batch_size": config.train.generation_batch_size,
        "device": runtime.device,
    }
    out: dict[str, float] = {}
    target = train = None
    if k > 0:
        probe = TargetProbe(policy, tokenizer, data.eval_prompts, pool, samples_per_prompt=k, **knobs)
        target = probe.per_prompt(policy)
        out |= summarise_target_kl(target, seed) | {"target_samples_per_prompt": k}
    n = config.eval.train_eval_prompts
    if n > 0 and data.train_prompts:
        m = config.eval.eval_samples_per_prompt
        probe = TargetProbe(policy, tokenizer, data.train_prompts[:n], pool, samples_per_prompt=max(k, m), **knobs)
        approval, kl = probe.per_prompt_approval(policy, m, policy_seed), probe.per_prompt(policy)
        train = approval.merge(kl[["prompt_index", *TARGET_COLUMNS]], on="prompt_index")
        out |= summarise_approval(approval, seed, "train_") | summarise_target_kl(kl, seed, "train_")
        out["train_eval_prompts"] = len(train)
    return out, target, train
