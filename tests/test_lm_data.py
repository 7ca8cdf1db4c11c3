"""Data loaders (hub schemas from local fixtures), tokenisation helpers, and the offline preference set."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from studylib.lm import data as lmdata
from studylib.lm.data import (
    SchemaError,
    encode_completion,
    encode_prompt,
    load_named,
    load_paired,
    load_unpaired,
    paired_to_unpaired,
    tokenize_paired,
    tokenize_unpaired,
    truncate,
)
from studylib.lm.sampling import sample_completions
from studylib.lm.synth import build_offline_preferences, load_prompts, target_distance
from studylib.lm.tiny import tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_ufg_string_schema_becomes_canonical():
    ds = load_unpaired(FIXTURES / "ufg.jsonl")
    assert ds.column_names == ["prompt", "completion", "label"]
    assert len(ds) == 5
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": "What is the boiling point of water at sea level?"}]
    assert row["completion"].startswith("Water boils")
    assert [r["label"] for r in ds] == [True, False, True, False, False]


def test_mix14k_conversational_schema_becomes_canonical():
    ds = load_named("mix14k", "train", path=FIXTURES / "mix14k.jsonl")
    assert len(ds) == 4
    assert ds[0]["completion"] == "There are seven continents."
    assert [m["role"] for m in ds[2]["prompt"]] == ["user", "assistant", "user"]
    assert sum(ds["label"]) == 2


def test_ufb_paired_schema_and_unpaired_view():
    ds = load_paired(FIXTURES / "ufb.jsonl")
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[1]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert (ds[1]["chosen"], ds[1]["rejected"]) == ("2 + 2 = 4.", "It is 5.")
    flat = paired_to_unpaired(ds)
    assert len(flat) == 6 and sum(flat["label"]) == 3
    assert flat[2]["completion"] == "2 + 2 = 4." and flat[2]["label"] is True
    assert flat[3]["completion"] == "It is 5." and flat[3]["label"] is False


def test_directory_and_parquet_sources(tmp_path):
    ds = load_unpaired(FIXTURES / "ufg.jsonl")
    (tmp_path / "test.jsonl").write_text((FIXTURES / "ufg.jsonl").read_text())
    assert load_unpaired(tmp_path, split="test").to_list() == ds.to_list()
    lmdata.datasets.load_dataset("json", data_files=str(FIXTURES / "ufb.jsonl"), split="train").to_parquet(
        tmp_path / "train_prefs.parquet"
    )
    assert load_named("ufb", "train", path=tmp_path).to_list() == load_paired(FIXTURES / "ufb.jsonl").to_list()
    assert len(load_unpaired(FIXTURES / "ufg.jsonl", limit=2)) == 2


@pytest.mark.parametrize(
    ("name", "loader", "needle"),
    [
        ("ufg_missing_label.jsonl", load_unpaired, "missing column(s) ['label']"),
        ("ufg_bad_label.jsonl", load_unpaired, "column 'label' row 0: expected bool, got str"),
        ("mix14k_empty_completion.jsonl", load_unpaired, "column 'completion' row 1: empty completion"),
        ("ufb_missing_rejected.jsonl", load_paired, "missing column(s) ['rejected']"),
    ],
)
def test_broken_files_name_the_problem(name, loader, needle):
    with pytest.raises(SchemaError) as err:
        loader(FIXTURES / name)
    assert needle in str(err.value)
    assert name in str(err.value)


def test_drop_empty_skips_rows():
    ds = load_unpaired(FIXTURES / "mix14k_empty_completion.jsonl", drop_empty=True)
    assert len(ds) == 1


def test_unreachable_hub_gives_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(lmdata.datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="pass a local file in the same schema"):
        load_named("ufg")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_unpaired(FIXTURES / "nope.jsonl")


def test_encode_prompt_uses_chat_template_and_fallback(tok):
    msgs = [{"role": "user", "content": "Hi there"}]
    ids = encode_prompt(tok, msgs)
    assert tok.decode(ids) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    plain = tiny_tokenizer()
    plain.chat_template = None
    assert plain.decode(encode_prompt(plain, msgs)) == "user: Hi there\nassistant:"
    with pytest.raises(ValueError, match="empty prompt"):
        encode_prompt(tok, [])


def test_encode_completion_appends_eos_and_rejects_empty(tok):
    ids = encode_completion(tok, "ok!")
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == "ok!"
    assert tok.bos_token_id not in ids
    for bad in ("", "  \n"):
        with pytest.raises(ValueError, match="empty completion"):
            encode_completion(tok, bad)


def test_truncate_keeps_prompt_end_and_completion_start():
    p, c = list(range(10)), list(range(100, 108))
    assert truncate(p, c, 20, 5) == (p, c, False)
    tp, tc, flag = truncate(p, c, 12, 6)
    assert flag and tp == list(range(4, 10)) and tc == list(range(100, 106))
    tp, tc, flag = truncate(list(range(3)), c, 6, 4)  # short prompt kept whole, completion cut
    assert flag and tp == [0, 1, 2] and tc == [100, 101, 102]
    with pytest.raises(ValueError, match="max_prompt_length"):
        truncate(p, c, 10, 10)


def test_tokenize_unpaired_and_paired_counts(tok):
    ds = load_unpaired(FIXTURES / "ufg.jsonl")
    rows, counts = tokenize_unpaired(ds, tok, max_length=4096, max_prompt_length=2048)
    assert counts == {"rows": 5, "positives": 2, "truncated_prompts": 0, "truncated_completions": 0}
    assert rows[0]["completion_ids"][-1] == tok.eos_token_id and rows[0]["label"] is True
    rows, counts = tokenize_unpaired(ds, tok, max_length=80, max_prompt_length=60)
    assert all(len(r["prompt_ids"]) + len(r["completion_ids"]) <= 80 for r in rows)
    assert counts["truncated_prompts"] >= 1 and counts["truncated_completions"] >= 1
    pairs = load_paired(FIXTURES / "ufb.jsonl")
    prow, pcounts = tokenize_paired(pairs, tok, max_length=60, max_prompt_length=40)
    assert pcounts["rows"] == 3 and pcounts["truncated_completions"] == 1  # the long rejected greeting
    assert all(len(r["prompt_ids"]) + len(r["rejected_ids"]) <= 60 for r in prow)
    assert prow[0]["chosen_ids"] == encode_completion(tok, "Joyful.")


def test_prompt_file_is_diverse():
    rows = load_prompts()
    assert len(rows) >= 300
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert len({r["topic"] for r in rows}) >= 40 and len({r["task"] for r in rows}) >= 8


def _build(model, tok, cache, seed=0, **kw):
    knobs = dict(n_prompts=10, completions_per_prompt=4, max_new_tokens=12, eval_fraction=0.2, batch_size=8)
    knobs |= dict(validation_fraction=0.1)
    knobs.update(kw)
    return build_offline_preferences(model, tok, model_name="tiny", seed=seed, cache_dir=cache, progress=False, **knobs)


def test_offline_preferences_shape_cache_and_determinism(tok, tmp_path):
    model = tiny_model(tok, seed=0)
    first = _build(model, tok, tmp_path / "a")
    assert not first.from_cache
    assert first.unpaired_train.column_names == ["prompt", "completion", "completion_ids", "label"]
    assert first.paired_train.column_names == ["prompt", "chosen", "rejected", "chosen_ids", "rejected_ids"]
    assert len(first.eval_prompts) == 2 and first.eval_prompts[0][0]["role"] == "user"
    assert len(first.validation_prompts) == 1
    train_prompts = {r["prompt"][0]["content"] for r in first.unpaired_train}
    held_out = {p[0]["content"] for p in first.eval_prompts + first.validation_prompts}
    assert len(train_prompts) == 7 and not train_prompts & held_out and len(held_out) == 3
    assert first.stats["completions"] == 28 and len(first.unpaired_train) == 28 - first.stats["empty_completions"]
    assert len(first.paired_train) + first.stats["identical_pairs_dropped"] <= 14
    assert first.preferred_fraction == pytest.approx(sum(first.unpaired_train["label"]) / len(first.unpaired_train))

    again = _build(None, None, tmp_path / "a")  # cache hit: no model needed
    assert again.from_cache and again.config == first.config
    assert again.unpaired_train.to_list() == first.unpaired_train.to_list()

    fresh = _build(model, tok, tmp_path / "b")  # regenerated from the seed
    assert not fresh.from_cache
    assert fresh.unpaired_train.to_list() == first.unpaired_train.to_list()
    assert fresh.paired_train.to_list() == first.paired_train.to_list()
    other = _build(model, tok, tmp_path / "b", seed=1)
    assert other.unpaired_train["completion"] != first.unpaired_train["completion"]
    assert len(list((tmp_path / "b").iterdir())) == 2
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["config"]["pool"]["version"] >= 1 and meta["config"]["seed"] == 0


def test_offline_preferences_needs_model_when_not_cached(tmp_path):
    with pytest.raises(ValueError, match="pass the model and tokenizer"):
        _build(None, None, tmp_path)


def test_offline_rows_keep_the_sampled_ids_with_eos_only_where_generated(tok, tmp_path):
    """The rows are the sampler's own token ids: no decode/re-encode round trip, EOS only where the model made it.
    The tiny model's EOS logit is raised (+3) so that it stops early on some samples and runs to the cap on others:
    both kinds are checked."""
    model = tiny_model(tok, seed=0)
    eos_bonus = torch.zeros(len(tok))
    eos_bonus[tok.eos_token_id] = 3.0
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + eos_bonus)
    data = _build(model, tok, tmp_path, max_new_tokens=6, completions_per_prompt=6)
    prompts = [r["prompt"] for r in load_prompts()[:7]]
    expanded = [encode_prompt(tok, [{"role": "user", "content": p}]) for p in prompts for _ in range(6)]
    sampled = sample_completions(model, tok, expanded, max_new_tokens=6, seed=0, batch_size=8)
    kept = [s for s in sampled if tok.decode(s, skip_special_tokens=True).strip()]  # empty ones are dropped
    assert data.unpaired_train["completion_ids"] == kept
    finished = [ids for ids in kept if ids[-1] == tok.eos_token_id]
    cut = [ids for ids in kept if ids[-1] != tok.eos_token_id]
    assert finished and cut, "the check needs samples of both kinds"
    assert all(len(ids) == 6 and tok.eos_token_id not in ids for ids in cut)  # cut at the cap, no EOS appended
    assert all(tok.eos_token_id not in ids[:-1] for ids in finished)
    assert data.stats["unfinished_completions"] == sum(s[-1] != tok.eos_token_id for s in sampled)
    # the trainers' rows are these ids, untouched (tokenize_* read the ids, not the texts)
    rows, _ = tokenize_unpaired(data.unpaired_train, tok, max_length=4096, max_prompt_length=2048)
    assert [r["completion_ids"] for r in rows] == kept
    pairs, _ = tokenize_paired(data.paired_train, tok, max_length=4096, max_prompt_length=2048)
    assert all(r["chosen_ids"] in kept and r["rejected_ids"] in kept for r in pairs)


def test_target_distance_hand_values():
    # prompt 1: one approved of four -> KL log 4, perfect approval 1; prompt 2: all approved -> KL 0;
    # prompt 3: none approved -> no target (counted)
    stats = target_distance(np.array([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]))
    assert stats["target_kl"] == pytest.approx(np.log(4) / 2) and stats["prompts_without_target"] == 1
    assert stats["target_approval"] == 1.0 and stats["reference_approval"] == pytest.approx(5 / 12)
    # soft approvals: w = (0.5, 0.25, 0.25, 0) -> sum w log(4 w) = 0.5 log 2
    soft = target_distance(np.array([[0.5, 0.25, 0.25, 0.0]]))
    assert soft["target_kl"] == pytest.approx(0.5 * np.log(2))
    assert soft["target_approval"] == pytest.approx(0.5 * 0.5 + 2 * 0.25 * 0.25)
    with pytest.raises(ValueError, match="prompts, K >= 2"):
        target_distance(np.ones(4))
