"""The offline preference data set: project prompts, reference-model samples, simulated annotator labels.

``build_offline_preferences`` takes the first ``n_prompts`` prompts of ``data/prompts.jsonl`` (a fixed,
pre-shuffled list written for this project: 40 topics x 8 task templates plus 40 hand-written prompts),
holds out the last ``eval_fraction`` of them as evaluation prompts, samples ``completions_per_prompt``
completions for each training prompt from the reference model (pure sampling at ``temperature``: no
top-k/top-p, so the samples come from ``pi_ref`` itself), and labels them with an ``AnnotatorPool``:

- **unpaired**: each completion is a row, ``label ~ Bernoulli(pool.approve(x, y))``;
- **paired**: each prompt's completions are paired (disjoint pairs (0,1), (2,3), ... or all pairs), and
  the first wins with probability ``pool.prefer(x, a, b)``; pairs of identical texts are dropped.

Both come from the same samples and the same per-annotator scores. Empty completions are dropped (and
counted). Draws use ``seed`` only, so the same configuration gives identical data; results are cached on
disk under a hash of the configuration (model name, sizes, sampling knobs, seed, pool config, prompt file
hash), written to a temporary directory and renamed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from studylib.lm.annotators import AnnotatorPool
from studylib.lm.data import Messages, encode_prompt
from studylib.lm.models import cache_root
from studylib.lm.sampling import ended_with_eos, sample_completions
from studylib.results import atomic_directory

SYNTH_VERSION = 1
PROMPTS_PATH = Path(__file__).resolve().parents[2] / "data" / "prompts.jsonl"


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """The project's prompts: rows ``{id, prompt, topic, task}`` from ``data/prompts.jsonl`` (or ``path``)."""
    path = Path(path) if path is not None else PROMPTS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (it ships in the repository's data/ folder)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}: row {i} has no non-empty string 'prompt'")
    return rows


def sample_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 16,
    progress: bool = True,
) -> list[tuple[str, bool]]:
    """One sampled completion per prompt (``studylib.lm.sampling``): ``(text, finished)``, ``finished`` meaning
    it ended with EOS. The text is decoded without special tokens and stripped."""
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
    )
    eos = tokenizer.eos_token_id
    return [
        (
            tokenizer.decode(c[:-1] if ended_with_eos(c, eos) else c, skip_special_tokens=True).strip(),
            ended_with_eos(c, eos),
        )
        for c in completions
    ]


@dataclass
class OfflinePreferences:
    """The offline data: canonical unpaired and paired training sets, held-out prompts, and bookkeeping."""

    unpaired_train: Dataset
    paired_train: Dataset
    eval_prompts: list[Messages]
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
    raise ValueError(f"pairing must be 'disjoint' or 'all', got {pairing!r}")


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
    n_prompts: int = 200,
    completions_per_prompt: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    eval_fraction: float = 0.2,
    batch_size: int = 16,
    pairing: str = "disjoint",
    pool: AnnotatorPool | None = None,
    prompts_path: str | Path | None = None,
    progress: bool = True,
) -> OfflinePreferences:
    """Build (or load from cache) the offline preference data; see the module docstring.

    ``model``/``tokenizer`` may be ``None`` when the data are cached. ``pool`` defaults to
    ``AnnotatorPool(seed=0)`` (the same pool must judge evaluation). ``cache_dir`` defaults to
    ``$STUDYLIB_CACHE/offline_prefs`` (else ``~/.cache/studylib/offline_prefs``).
    """
    pool = pool if pool is not None else AnnotatorPool(seed=0)
    prompt_file = Path(prompts_path) if prompts_path is not None else PROMPTS_PATH
    rows = load_prompts(prompt_file)
    if not 2 <= n_prompts <= len(rows):
        raise ValueError(f"n_prompts must be in [2, {len(rows)}] ({prompt_file}), got {n_prompts}")
    if completions_per_prompt < 2 or not 0.0 < eval_fraction < 1.0 or temperature <= 0 or max_new_tokens < 1:
        raise ValueError(
            "need completions_per_prompt >= 2, 0 < eval_fraction < 1, temperature > 0, max_new_tokens >= 1"
        )
    n_eval = min(max(1, round(eval_fraction * n_prompts)), n_prompts - 1)
    config = {
        "version": SYNTH_VERSION,
        "model_name": model_name,
        "n_prompts": n_prompts,
        "completions_per_prompt": completions_per_prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "batch_size": batch_size,
        "pairing": pairing,
        "pool": pool.config(),
        "prompts_sha256": hashlib.sha256(prompt_file.read_bytes()).hexdigest(),
    }
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "offline_prefs"
    target = root / f"{model_name.replace('/', '--')}-{_config_hash(config)}"
    if (target / "meta.json").is_file():
        return _load(target)
    if model is None or tokenizer is None:
        raise ValueError(f"no cached data at {target}: pass the model and tokenizer to generate it")

    start = time.perf_counter()
    chosen = rows[:n_prompts]
    train_rows, eval_rows = chosen[: n_prompts - n_eval], chosen[n_prompts - n_eval :]
    messages = [[{"role": "user", "content": r["prompt"]}] for r in train_rows]
    expanded = [m for m in messages for _ in range(completions_per_prompt)]
    samples = sample_texts(
        model,
        tokenizer,
        expanded,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    rng = np.random.default_rng([seed, SYNTH_VERSION])
    sample_rows, unpaired, paired, p_chosen = [], [], [], []
    n_identical = 0
    for p, (row, msgs) in enumerate(zip(train_rows, messages, strict=True)):
        group = samples[p * completions_per_prompt : (p + 1) * completions_per_prompt]
        scores = [pool.scores(row["prompt"], text) for text, _ in group]
        approve = [pool.approve_scores(s) for s in scores]
        draws = rng.random(len(group))
        for (text, finished), s, a, u in zip(group, scores, approve, draws, strict=True):
            label = bool(u < a)
            sample_rows.append(
                {
                    "prompt_id": row["id"],
                    "completion": text,
                    "finished": finished,
                    "scores": [round(float(v), 6) for v in s],
                    "approve": a,
                    "label": label,
                }
            )
            if text:
                unpaired.append({"prompt": msgs, "completion": text, "label": label})
        for i, j in _pairs(len(group), pairing):
            u = rng.random()
            (a_text, _), (b_text, _) = group[i], group[j]
            if not a_text or not b_text or a_text == b_text:
                n_identical += int(a_text == b_text != "")
                continue
            prob = pool.prefer_scores(scores[i], scores[j])
            win, lose = (a_text, b_text) if u < prob else (b_text, a_text)
            paired.append({"prompt": msgs, "chosen": win, "rejected": lose})
            p_chosen.append(prob if u < prob else 1.0 - prob)
    if not unpaired or not paired:
        raise RuntimeError("every sampled completion was empty; check the model, tokenizer and max_new_tokens")
    preferred_fraction = float(np.mean([r["label"] for r in unpaired]))
    stats = {
        "completions": len(samples),
        "empty_completions": sum(not t for t, _ in samples),
        "unfinished_completions": sum(not f for _, f in samples),
        "mean_words": float(np.mean([len(t.split()) for t, _ in samples])),
        "mean_approve": float(np.mean([r["approve"] for r in sample_rows])),
        "unpaired_rows": len(unpaired),
        "pairs": len(paired),
        "identical_pairs_dropped": n_identical,
        "mean_p_chosen": float(np.mean(p_chosen)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    eval_prompts = [[{"role": "user", "content": r["prompt"]}] for r in eval_rows]
    meta = {"config": config, "stats": stats, "preferred_fraction": preferred_fraction}

    with atomic_directory(target) as tmp:
        _write_jsonl(tmp / "unpaired_train.jsonl", unpaired)
        _write_jsonl(tmp / "paired_train.jsonl", paired)
        _write_jsonl(tmp / "samples.jsonl", sample_rows)
        (tmp / "eval_prompts.json").write_text(json.dumps(eval_prompts, ensure_ascii=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    result = _load(target)
    result.from_cache = False
    return result
