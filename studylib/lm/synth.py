"""The offline preference data set: project prompts, reference-model samples, simulated annotator labels.

``build_offline_preferences`` takes the first ``n_prompts`` prompts of ``data/prompts.jsonl`` (a fixed,
pre-shuffled list written for this project: 40 topics x 8 task templates plus 40 hand-written prompts),
holds out the last ``eval_fraction`` of them as test prompts and the ``validation_fraction`` before those as
validation prompts (for choosing a learning rate: ``studies/pilot.yaml``), samples ``completions_per_prompt``
completions for each training prompt from the reference model (pure sampling at ``temperature``: no
top-k/top-p, so the samples come from ``pi_ref`` itself), and labels them with an ``AnnotatorPool``:

- **unpaired**: each completion is a row, ``label ~ Bernoulli(pool.approve(x, y))``;
- **paired**: each prompt's completions are paired (disjoint pairs (0,1), (2,3), ... or all pairs), and
  the first wins with probability ``pool.prefer(x, a, b)``; pairs of identical completions are dropped.

**The samples are kept as the model produced them**: each row carries its token ids (``completion_ids``,
``chosen_ids``, ``rejected_ids``) straight from the sampler, ending in EOS only where the model produced EOS
(a completion cut at ``max_new_tokens`` has none), so the training rows are draws from ``pi_ref`` (what
DDRO and RDRO assume) and the on-policy samples a reward model scores have the same form as the rows it was
fit on. The text beside the ids (decoded, special tokens skipped) is what the annotators read.

Before any training, ``target_distance`` measures how far the data's exact target ``p+ ∝ pi_ref approve`` is
from the reference on the sampled set (``stats``: ``target_kl``, ``target_approval``): a target near the
reference is one no method can show much on. Both data sets come from the same samples and the same
per-annotator scores. Empty completions are dropped (and counted). Draws use ``seed`` only, so the same
configuration gives identical data; results are cached on disk under a hash of the configuration (model name,
sizes, sampling knobs, seed, pool config, prompt file hash), written to a temporary directory and renamed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from studylib.checks import UserError
from studylib.lm.annotators import AnnotatorPool
from studylib.lm.data import Messages, encode_prompt
from studylib.lm.models import cache_root
from studylib.lm.sampling import ended_with_eos, sample_completions
from studylib.results import atomic_directory

SYNTH_VERSION = 2
PROMPTS_PATH = Path(__file__).resolve().parents[2] / "data" / "prompts.jsonl"


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """The project's prompts: rows ``{id, prompt, topic, task}`` from ``data/prompts.jsonl`` (or ``path``)."""
    path = Path(path) if path is not None else PROMPTS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (it ships in the repository's data/ folder)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{path}: row {i} has no non-empty string 'prompt'")
    return rows


def sample_ids_and_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 16,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> list[tuple[list[int], str]]:
    """One sampled completion per prompt (``studylib.lm.sampling``): its token ids as sampled (EOS only if the model
    produced it) and its text for the annotators (decoded without special tokens, stripped)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    completions = sample_completions(
        model,
        tokenizer,
        encoded,
        max_new_tokens=max_new_tokens,
        seed=seed,
        temperature=temperature,
        batch_size=batch_size,
        desc="sampling completions" if progress else None,
        device=device,
    )
    return [(ids, tokenizer.decode(ids, skip_special_tokens=True).strip()) for ids in completions]


def target_distance(approvals: np.ndarray) -> dict[str, float]:
    """How far the exact target is from the reference on the sampled set, per prompt then averaged.

    ``approvals`` (prompts, K): ``approve(x, y_i)`` of K reference samples per prompt. On the sampled set the
    reference is uniform over a prompt's K samples and the target puts ``w_i = a_i / sum_j a_j`` on sample i, so
    ``KL(p+ || pi_ref) = sum_i w_i log(K w_i)`` (at most ``log K``) and a perfect fit's approval is
    ``sum_i w_i a_i``. Prompts with no approved sample have no target there: counted, left out of the means.
    """
    approvals = np.asarray(approvals, dtype=float)
    if approvals.ndim != 2 or approvals.shape[1] < 2:
        raise UserError(f"approvals must be (prompts, K >= 2), got shape {approvals.shape}")
    total = approvals.sum(axis=1)
    has = total > 0
    w = approvals[has] / total[has, None]
    k = approvals.shape[1]
    kl = np.where(w > 0, w * np.log(np.where(w > 0, k * w, 1.0)), 0.0).sum(axis=1)
    return {
        "target_kl": float(kl.mean()) if has.any() else float("nan"),
        "target_kl_max": float(np.log(k)),
        "target_approval": float((w * approvals[has]).sum(axis=1).mean()) if has.any() else float("nan"),
        "reference_approval": float(approvals.mean()),
        "prompts_without_target": int((~has).sum()),
    }


def cyclic_triple_fraction(pool: AnnotatorPool, scores: list[np.ndarray]) -> tuple[int, int]:
    """(cyclic, all) triples of one prompt's samples under the pool's preferences (a > b > c > a, strictly)."""
    cyclic = total = 0
    for i, j, k in itertools.combinations(range(len(scores)), 3):
        total += 1
        ab, bc, ca = (pool.prefer_scores(scores[u], scores[v]) for u, v in ((i, j), (j, k), (k, i)))
        cyclic += (ab > 0.5 and bc > 0.5 and ca > 0.5) or (ab < 0.5 and bc < 0.5 and ca < 0.5)
    return cyclic, total


@dataclass
class OfflinePreferences:
    """The offline data: canonical unpaired and paired training sets, held-out prompts, and bookkeeping."""

    unpaired_train: Dataset
    paired_train: Dataset
    eval_prompts: list[Messages]  # the test prompts
    validation_prompts: list[Messages]
    preferred_fraction: float
    config: dict
    stats: dict = field(default_factory=dict)
    path: Path | None = None
    from_cache: bool = False


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _pairs(n: int, pairing: str) -> list[tuple[int, int]]:
    if pairing == "disjoint":
        return [(i, i + 1) for i in range(0, n - 1, 2)]
    if pairing == "all":
        return list(itertools.combinations(range(n), 2))
    raise UserError(f"pairing must be 'disjoint' or 'all', got {pairing!r}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _load(path: Path) -> OfflinePreferences:
    meta = json.loads((path / "meta.json").read_text())
    return OfflinePreferences(
        unpaired_train=Dataset.from_list(_read_jsonl(path / "unpaired_train.jsonl")),
        paired_train=Dataset.from_list(_read_jsonl(path / "paired_train.jsonl")),
        eval_prompts=json.loads((path / "eval_prompts.json").read_text()),
        validation_prompts=json.loads((path / "validation_prompts.json").read_text()),
        preferred_fraction=meta["preferred_fraction"],
        config=meta["config"],
        stats=meta["stats"],
        path=path,
        from_cache=True,
    )


def build_offline_preferences(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    model_name: str,
    n_prompts: int = 256,
    completions_per_prompt: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    eval_fraction: float = 0.25,
    validation_fraction: float = 0.125,
    batch_size: int = 16,
    pairing: str = "disjoint",
    pool: AnnotatorPool | None = None,
    prompts_path: str | Path | None = None,
    progress: bool = True,
    sample_dtype: str | None = None,
    device: torch.device | str = "cpu",
) -> OfflinePreferences:
    """Build (or load from cache) the offline preference data; see the module docstring.

    ``sample_dtype`` ("bfloat16"): sample from a copy of ``model`` in that dtype, the reference a run with a bf16
    frozen base computes (LoRA with ``bf16: true``); None: ``model`` as it is. ``device``: where ``model`` is (the
    run's ``Runtime.device``); samples are drawn there (a device other than the CPU is part of the cache key: its
    random streams differ).

    ``model``/``tokenizer`` may be ``None`` when the data are cached. ``pool`` defaults to
    ``AnnotatorPool(seed=0)`` (the same pool must judge evaluation). ``cache_dir`` defaults to
    ``$STUDYLIB_CACHE/offline_prefs`` (else ``~/.cache/studylib/offline_prefs``).
    """
    pool = pool if pool is not None else AnnotatorPool(seed=0)
    prompt_file = Path(prompts_path) if prompts_path is not None else PROMPTS_PATH
    rows = load_prompts(prompt_file)
    if not 3 <= n_prompts <= len(rows):
        raise UserError(f"n_prompts must be in [3, {len(rows)}] ({prompt_file}), got {n_prompts}")
    if completions_per_prompt < 2 or temperature <= 0 or max_new_tokens < 1:
        raise UserError("need completions_per_prompt >= 2, temperature > 0, max_new_tokens >= 1")
    if not (0.0 < eval_fraction < 1.0 and 0.0 <= validation_fraction < 1.0 - eval_fraction):
        raise UserError(
            f"need 0 < eval_fraction < 1 and 0 <= validation_fraction < 1 - eval_fraction, got {eval_fraction} "
            f"and {validation_fraction}"
        )
    n_eval = min(max(1, round(eval_fraction * n_prompts)), n_prompts - 2)
    n_validation = min(round(validation_fraction * n_prompts), n_prompts - n_eval - 1)
    config = {
        "version": SYNTH_VERSION,
        "model_name": model_name,
        "n_prompts": n_prompts,
        "completions_per_prompt": completions_per_prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "validation_fraction": validation_fraction,
        "batch_size": batch_size,
        "pairing": pairing,
        "pool": pool.config(),
        "sample_dtype": sample_dtype,
        "prompts_sha256": hashlib.sha256(prompt_file.read_bytes()).hexdigest(),
    }
    if torch.device(device).type != "cpu":
        config["device"] = torch.device(device).type
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "offline_prefs"
    target = root / f"{model_name.replace('/', '--')}-{_config_hash(config)}"
    if (target / "meta.json").is_file():
        return _load(target)
    if model is None or tokenizer is None:
        raise UserError(f"no cached data at {target}: pass the model and tokenizer to generate it")

    start = time.perf_counter()
    chosen = rows[:n_prompts]
    n_train = n_prompts - n_eval - n_validation
    train_rows, validation_rows, eval_rows = chosen[:n_train], chosen[n_train:-n_eval], chosen[-n_eval:]
    messages = [[{"role": "user", "content": r["prompt"]}] for r in train_rows]
    expanded = [m for m in messages for _ in range(completions_per_prompt)]
    sampler = copy.deepcopy(model).to(getattr(torch, sample_dtype)) if sample_dtype else model
    samples = sample_ids_and_texts(
        sampler,
        tokenizer,
        expanded,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        device=device,
    )
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng([seed, SYNTH_VERSION])
    sample_rows, unpaired, paired, p_chosen, approvals = [], [], [], [], []
    n_identical = n_cyclic = n_triples = 0
    for p, (row, msgs) in enumerate(zip(train_rows, messages, strict=True)):
        group = samples[p * completions_per_prompt : (p + 1) * completions_per_prompt]
        scores = [pool.scores(row["prompt"], text) for _, text in group]
        approve = [pool.approve_scores(s) for s in scores]
        approvals.append(approve)
        cyclic, triples = cyclic_triple_fraction(pool, scores)
        n_cyclic, n_triples = n_cyclic + cyclic, n_triples + triples
        draws = rng.random(len(group))
        for (ids, text), s, a, u in zip(group, scores, approve, draws, strict=True):
            label = bool(u < a)
            sample_rows.append(
                {
                    "prompt_id": row["id"],
                    "completion": text,
                    "completion_ids": ids,
                    "finished": ended_with_eos(ids, eos),
                    "scores": [round(float(v), 6) for v in s],
                    "approve": a,
                    "label": label,
                }
            )
            if text:
                unpaired.append({"prompt": msgs, "completion": text, "completion_ids": ids, "label": label})
        for i, j in _pairs(len(group), pairing):
            u = rng.random()
            (a_ids, a_text), (b_ids, b_text) = group[i], group[j]
            if not a_text or not b_text or a_ids == b_ids:
                n_identical += int(a_ids == b_ids and a_text != "")
                continue
            prob = pool.prefer_scores(scores[i], scores[j])
            (win, win_ids), (lose, lose_ids) = ((a_text, a_ids), (b_text, b_ids))[:: 1 if u < prob else -1]
            paired.append(
                {"prompt": msgs, "chosen": win, "rejected": lose, "chosen_ids": win_ids, "rejected_ids": lose_ids}
            )
            p_chosen.append(prob if u < prob else 1.0 - prob)
    if not unpaired or not paired:
        raise RuntimeError("every sampled completion was empty; check the model, tokenizer and max_new_tokens")
    preferred_fraction = float(np.mean([r["label"] for r in unpaired]))
    stats = {
        "completions": len(samples),
        "empty_completions": sum(not t for _, t in samples),
        "unfinished_completions": sum(not ended_with_eos(ids, eos) for ids, _ in samples),
        "mean_tokens": float(np.mean([len(ids) for ids, _ in samples])),
        "mean_words": float(np.mean([len(t.split()) for _, t in samples])),
        "mean_approve": float(np.mean([r["approve"] for r in sample_rows])),
        **target_distance(np.array(approvals)),
        "cyclic_triples": n_cyclic / max(n_triples, 1),
        "train_prompts": len(train_rows),
        "validation_prompts": len(validation_rows),
        "test_prompts": len(eval_rows),
        "unpaired_rows": len(unpaired),
        "pairs": len(paired),
        "identical_pairs_dropped": n_identical,
        "mean_p_chosen": float(np.mean(p_chosen)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    as_messages = lambda part: [[{"role": "user", "content": r["prompt"]}] for r in part]  # noqa: E731
    meta = {"config": config, "stats": stats, "preferred_fraction": preferred_fraction}

    with atomic_directory(target) as tmp:
        _write_jsonl(tmp / "unpaired_train.jsonl", unpaired)
        _write_jsonl(tmp / "paired_train.jsonl", paired)
        _write_jsonl(tmp / "samples.jsonl", sample_rows)
        (tmp / "eval_prompts.json").write_text(json.dumps(as_messages(eval_rows), ensure_ascii=False))
        (tmp / "validation_prompts.json").write_text(json.dumps(as_messages(validation_rows), ensure_ascii=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    result = _load(target)
    result.from_cache = False
    return result
