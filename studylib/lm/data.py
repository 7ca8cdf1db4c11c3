"""Preference data sets in one canonical form, and the tokenisation helpers the trainer calls.

Canonical forms (``datasets.Dataset``):

- **unpaired**: ``prompt`` (list of chat messages ``{"role", "content"}``), ``completion`` (str), ``label`` (bool).
- **paired**: ``prompt`` (messages), ``chosen`` (str), ``rejected`` (str).

Sources, from the hub or from local files in the same schema (``.jsonl``, ``.json``, ``.parquet``, or a
directory holding ``<split>.jsonl|json|parquet``):

- UF-G ``trl-lib/ultrafeedback-gpt-3.5-turbo-helpfulness``: prompt/completion strings, label bool.
- MIX-14K ``trl-lib/kto-mix-14k``: prompt a message list, completion a one-message assistant list, label bool.
- ``HuggingFaceH4/ultrafeedback_binarized`` (splits ``train_prefs``/``test_prefs``): prompt str; chosen
  and rejected message lists (user, then assistant); the canonical prompt is ``chosen[:-1]``.

Both string and conversational layouts are accepted for every column, so trl-lib's other variants load too.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from studylib.checks import UserError

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]

UFG = "trl-lib/ultrafeedback-gpt-3.5-turbo-helpfulness"
MIX14K = "trl-lib/kto-mix-14k"
UF_BINARIZED = "HuggingFaceH4/ultrafeedback_binarized"

# short name -> (hub id, kind, default train split, default test split)
DATASETS: dict[str, tuple[str, str, str, str]] = {
    "ufg": (UFG, "unpaired", "train", "test"),
    "mix14k": (MIX14K, "unpaired", "train", "test"),
    "ufb": (UF_BINARIZED, "paired", "train_prefs", "test_prefs"),
}

_SUFFIX_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class SchemaError(UserError):
    """A data set does not have the expected columns or value types; the message names column, row and source."""


def _read_columns(source: str | Path, split: str, columns: tuple[str, ...], limit: int | None) -> tuple[Dataset, str]:
    """``_read_raw``, checked to have ``columns``, its first ``limit`` rows (all if None)."""
    raw, where = _read_raw(source, split)
    _need_columns(raw, columns, where)
    return (raw if limit is None else raw.select(range(min(limit, len(raw))))), where


def _read_raw(source: str | Path, split: str) -> tuple[Dataset, str]:
    """The raw rows of ``source`` (a local file/directory, or a hub id) and a description for error messages."""
    path = Path(source).expanduser()
    if path.is_dir():
        candidates = [path / f"{split}{suffix}" for suffix in _SUFFIX_BUILDER]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no {split}.jsonl / {split}.json / {split}.parquet in directory {path}")
        path = found[0]
    if path.suffix in _SUFFIX_BUILDER:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        if path.suffix != ".parquet":
            _check_json_text(path)
        try:
            ds = datasets.load_dataset(_SUFFIX_BUILDER[path.suffix], data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - Arrow raises many types on inconsistent rows
            raise SchemaError(f"file {path}: cannot be read as a table ({type(err).__name__}: {err})") from err
        return ds, f"file {path}"
    try:
        return datasets.load_dataset(str(source), split=split), f"hub data set {source} (split {split})"
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "not available"
        raise FileNotFoundError(
            f"could not load {source!r} split {split!r}: not a local .jsonl/.json/.parquet file or directory, and "
            f"the Hugging Face hub is unreachable or has no such data set ({type(err).__name__}: {err}). "
            f"Connect to the internet, or pass a local file in the same schema."
        ) from err


def _check_json_text(path: Path) -> None:
    """A ``.json`` or ``.jsonl`` file must be UTF-8 text, and parse whole (one JSON document) or line by line (JSON
    Lines): else a ``SchemaError`` naming the file and the line (Arrow's own error names neither)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SchemaError(
            f"file {path}: line {line} is not UTF-8 text (byte {data[err.start]:#04x}): save the file as UTF-8"
        ) from None
    if path.suffix == ".json":
        try:
            json.loads(text)
            return
        except ValueError:
            pass  # JSON Lines, then
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise SchemaError(
                    f"file {path}: line {number} is not valid JSON ({err.msg}, column {err.colno})"
                ) from None


def _need_columns(ds: Dataset, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {missing}; found {ds.column_names}")


def _messages(value: Any, column: str, row: int, where: str) -> Messages:
    """A prompt value as a message list: a string becomes one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise SchemaError(
        f"{where}: column {column!r} row {row}: expected a string or a non-empty list of {{role, content}} "
        f"messages, got {type(value).__name__}: {str(value)[:80]!r}"
    )


def _completion_text(value: Any, column: str, row: int, where: str) -> str:
    """A completion value as text: a string, or the content of the final (assistant) message of a list."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        last = value[-1]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise SchemaError(f"{where}: column {column!r} row {row}: the last message must be an assistant message")
        value = last["content"]
    if not isinstance(value, str):
        raise SchemaError(
            f"{where}: column {column!r} row {row}: expected a string or a message list, got {type(value).__name__}"
        )
    return value


def _empty(texts: Sequence[str], columns: Sequence[str], row: int, where: str, drop: bool) -> bool:
    """Whether a row has an empty completion: raise unless ``drop``, in which case the caller skips the row."""
    for text, column in zip(texts, columns, strict=True):
        if not text.strip():
            if drop:
                return True
            raise SchemaError(f"{where}: column {column!r} row {row}: empty completion (drop_empty=True skips it)")
    return False


def load_unpaired(
    source: str | Path = UFG, split: str = "train", limit: int | None = None, *, drop_empty: bool = False
) -> Dataset:
    """Load an unpaired data set (UF-G, MIX-14K or the same schema locally) in the canonical unpaired form.

    ``label`` must be bool; missing columns, wrong types and empty completions raise ``SchemaError`` naming
    column, row and source (``drop_empty=True`` skips rows with empty completions, with a logged count).
    ``limit`` keeps the first rows only.
    """
    raw, where = _read_columns(source, split, ("prompt", "completion", "label"), limit)
    out: dict[str, list] = {"prompt": [], "completion": [], "label": []}
    dropped = 0
    for i, row in enumerate(raw):
        if not isinstance(row["label"], bool):
            raise SchemaError(
                f"{where}: column 'label' row {i}: expected bool, got {type(row['label']).__name__} {row['label']!r}"
            )
        prompt = _messages(row["prompt"], "prompt", i, where)
        completion = _completion_text(row["completion"], "completion", i, where)
        if _empty([completion], ["completion"], i, where, drop_empty):
            dropped += 1
            continue
        out["prompt"].append(prompt)
        out["completion"].append(completion)
        out["label"].append(row["label"])
    _report_dropped(where, dropped, len(out["prompt"]))
    return Dataset.from_dict(out)


def load_paired(
    source: str | Path = UF_BINARIZED, split: str = "train_prefs", limit: int | None = None, *, drop_empty: bool = False
) -> Dataset:
    """Load a paired data set (``ultrafeedback_binarized`` or the same schema locally) in the canonical paired form.

    If ``chosen`` is a conversation, the prompt is its messages before the last; else the ``prompt`` column.
    Errors and ``drop_empty`` as in ``load_unpaired``.
    """
    raw, where = _read_columns(source, split, ("prompt", "chosen", "rejected"), limit)
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    dropped = 0
    for i, row in enumerate(raw):
        chosen = row["chosen"]
        if isinstance(chosen, list) and len(chosen) > 1:
            prompt = _messages(chosen[:-1], "chosen", i, where)
        else:
            prompt = _messages(row["prompt"], "prompt", i, where)
        texts = [_completion_text(chosen, "chosen", i, where), _completion_text(row["rejected"], "rejected", i, where)]
        if _empty(texts, ["chosen", "rejected"], i, where, drop_empty):
            dropped += 1
            continue
        out["prompt"].append(prompt)
        out["chosen"].append(texts[0])
        out["rejected"].append(texts[1])
    _report_dropped(where, dropped, len(out["prompt"]))
    return Dataset.from_dict(out)


def _report_dropped(where: str, dropped: int, kept: int) -> None:
    """Warn about rows dropped for an empty completion; refuse a data set that has nothing left."""
    if dropped and not kept:
        raise UserError(f"{where}: every one of its {dropped} rows has an empty completion: nothing to train on")
    if dropped:
        logger.warning("%s: dropped %d rows with empty completions", where, dropped)


def load_named(
    name: str,
    split: str = "train",
    *,
    path: str | Path | None = None,
    limit: int | None = None,
    drop_empty: bool = False,
) -> Dataset:
    """Load a data set by short name (``ufg``, ``mix14k``, ``ufb``) from the hub or from ``path``.

    ``split`` "train"/"test" map to the data set's own split names (``train_prefs``/``test_prefs`` for ufb).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    hub_id, kind, train_split, test_split = DATASETS[name]
    split = {"train": train_split, "test": test_split}.get(split, split)
    loader = load_unpaired if kind == "unpaired" else load_paired
    return loader(path if path is not None else hub_id, split, limit, drop_empty=drop_empty)


def paired_to_unpaired(ds: Dataset) -> Dataset:
    """The unpaired view of a paired data set: every winner a ``True`` row, every loser a ``False`` row."""
    _need_columns(ds, ("prompt", "chosen", "rejected"), "paired data set")
    out: dict[str, list] = {"prompt": [], "completion": [], "label": []}
    for row in ds:
        for completion, label in ((row["chosen"], True), (row["rejected"], False)):
            out["prompt"].append(row["prompt"])
            out["completion"].append(completion)
            out["label"].append(label)
    return Dataset.from_dict(out)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt_messages: Messages) -> list[int]:
    """Token ids of a prompt: the chat template with the generation prompt, or a plain fallback.

    The fallback (tokenizers without a chat template) is ``"role: content"`` lines then ``"assistant:"``,
    with the tokenizer's usual special tokens (e.g. BOS).
    """
    if not prompt_messages:
        raise UserError("empty prompt: expected at least one message")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt_messages) + "assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_completion(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Token ids of a completion, without special prefix, with EOS appended; an empty completion raises."""
    if not isinstance(completion, str) or not completion.strip():
        raise UserError(f"empty completion {completion!r}: every completion needs at least one token besides EOS")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token")
    return [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def completion_tokens(tokenizer: PreTrainedTokenizerBase, row: dict, column: str) -> list[int]:
    """A completion's token ids: the row's ``<column>_ids`` as they are when it has them (the offline set keeps
    each sample's ids as the model produced them, EOS only where the model produced it), else the text in
    ``column`` encoded with EOS appended (``encode_completion``: hub data sets hold finished texts)."""
    ids = row.get(f"{column}_ids")
    if ids is None:
        return encode_completion(tokenizer, row[column])
    ids = [int(i) for i in ids]
    if not [i for i in ids if i != tokenizer.eos_token_id]:
        raise UserError(f"empty completion in column {column}_ids {ids!r}: it needs a token besides EOS")
    return ids


def truncate(
    prompt_ids: list[int], completion_ids: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], bool]:
    """Fit prompt + completion into ``max_length`` tokens; returns (prompt, completion, truncated).

    Only when the pair is too long: the prompt keeps its last ``max_prompt_length`` tokens, then the
    completion keeps its first ``max_length - len(prompt)`` tokens (at least one, since
    ``max_prompt_length < max_length``). Pairs that fit are returned unchanged.
    """
    if not 0 < max_prompt_length < max_length:
        raise UserError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return list(prompt_ids), list(completion_ids), False
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    return list(prompt_ids), list(completion_ids[: max_length - len(prompt_ids)]), True


def _prompt_encoder(tokenizer: PreTrainedTokenizerBase):
    cache: dict[str, list[int]] = {}

    def encode(messages: Messages) -> list[int]:
        key = repr([(m["role"], m["content"]) for m in messages])
        if key not in cache:
            cache[key] = encode_prompt(tokenizer, messages)
        return cache[key]

    return encode


def tokenize_unpaired(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int
) -> tuple[list[dict], dict]:
    """Rows ``{prompt_ids, completion_ids, label}`` for a canonical unpaired data set, and counts to report.

    Completions: the data set's ``completion_ids`` where it has them, else its texts (``completion_tokens``).
    Counts: ``rows``, ``positives``, ``truncated_prompts``, ``truncated_completions``.
    """
    _need_columns(ds, ("prompt", "completion", "label"), "unpaired data set")
    encode = _prompt_encoder(tokenizer)
    rows, counts = [], {"rows": 0, "positives": 0, "truncated_prompts": 0, "truncated_completions": 0}
    for row in ds:
        prompt, completion = encode(row["prompt"]), completion_tokens(tokenizer, row, "completion")
        p, c, _ = truncate(prompt, completion, max_length, max_prompt_length)
        counts["truncated_prompts"] += len(p) < len(prompt)
        counts["truncated_completions"] += len(c) < len(completion)
        counts["rows"] += 1
        counts["positives"] += bool(row["label"])
        rows.append({"prompt_ids": p, "completion_ids": c, "label": bool(row["label"])})
    _refuse_all_cut(counts, counts["rows"], max_length)
    return rows, counts


def tokenize_paired(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int
) -> tuple[list[dict], dict]:
    """Rows ``{prompt_ids, chosen_ids, rejected_ids}`` for a canonical paired data set, and counts to report.

    Both completions share one prompt, truncated as ``truncate`` would for the longer completion; completions
    from ``chosen_ids``/``rejected_ids`` where the data set has them (``completion_tokens``).
    Counts: ``rows``, ``truncated_prompts``, ``truncated_completions`` (chosen and rejected both counted).
    """
    _need_columns(ds, ("prompt", "chosen", "rejected"), "paired data set")
    encode = _prompt_encoder(tokenizer)
    rows, counts = [], {"rows": 0, "truncated_prompts": 0, "truncated_completions": 0}
    for row in ds:
        prompt = encode(row["prompt"])
        chosen, rejected = completion_tokens(tokenizer, row, "chosen"), completion_tokens(tokenizer, row, "rejected")
        p, _, _ = truncate(prompt, max(chosen, rejected, key=len), max_length, max_prompt_length)
        ch, rj = chosen[: max_length - len(p)], rejected[: max_length - len(p)]
        counts["rows"] += 1
        counts["truncated_prompts"] += len(p) < len(prompt)
        counts["truncated_completions"] += (len(ch) < len(chosen)) + (len(rj) < len(rejected))
        rows.append({"prompt_ids": p, "chosen_ids": ch, "rejected_ids": rj})
    _refuse_all_cut(counts, 2 * counts["rows"], max_length)
    return rows, counts


def _refuse_all_cut(counts: dict, completions: int, max_length: int) -> None:
    """A data set whose every completion ``max_length`` cuts trains on fragments: refused, naming the knob."""
    if completions and counts["truncated_completions"] == completions:
        raise UserError(
            f"max_length {max_length} cuts every one of the {completions} completions (prompts cut: "
            f"{counts['truncated_prompts']} of {counts['rows']} rows): raise max_length or lower max_prompt_length"
        )


def prompt_key(messages: Messages) -> str:
    """A hashable key of a chat prompt (its messages as canonical JSON)."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def split_by_prompt(ds: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split one data set into disjoint training and evaluation rows **by prompt**: a shuffled ``eval_fraction``
    (at least one) of its distinct prompts, drawn with ``seed``, is held out with all its rows."""
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"eval_fraction must lie inside (0, 1), got {eval_fraction}")
    keys = [prompt_key(p) for p in ds["prompt"]]
    distinct = list(dict.fromkeys(keys))
    if len(distinct) < 2:
        raise UserError(f"cannot hold out prompts: the data set has {len(distinct)} distinct prompt(s)")
    random.Random(seed).shuffle(distinct)
    held = set(distinct[: min(len(distinct) - 1, max(1, round(eval_fraction * len(distinct))))])
    train_rows = [i for i, k in enumerate(keys) if k not in held]
    eval_rows = [i for i, k in enumerate(keys) if k in held]
    return ds.select(train_rows), ds.select(eval_rows)


def count_duplicates(ds: Dataset) -> int:
    """Rows that repeat an earlier row exactly (every column)."""
    seen: set[str] = set()
    repeats = 0
    for row in ds:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
        repeats += key in seen
        seen.add(key)
    return repeats
