"""Evaluation metrics against hand-computed values, and evaluation of a tiny model end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from peft import LoraConfig, get_peft_model

from studylib.lm.batching import score_sequences
from studylib.lm.evaluate import (
    distinct_n,
    evaluate,
    evaluation_seeds,
    mean_sd,
    summarise,
    write_alpaca_eval_outputs,
)
from studylib.lm.sampling import sample_completions
from studylib.lm.tiny import tiny_model, tiny_tokenizer


def test_distinct_n_hand_values():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran over 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n(["a"], 2) == 0.0


def test_summarise_hand_values():
    samples = pd.DataFrame(
        {
            "prompt_index": [0, 0, 1, 1],
            "completion": ["a b", "a c", "a b", "d"],
            "win": [1.0, 0.5, 0.0, 0.5],
            "approved": [0.0, 1.0, 1.0, 1.0],
            "reference_approved": [0.5, 0.5, 0.0, 1.0],
            "logratio": [0.2, -0.1, 0.4, 0.3],
            "length": [3, 5, 3, 1],
            "reference_length": [4, 4, 2, 2],
            "finished": [True, False, False, False],
        }
    )
    s = summarise(samples)
    # per prompt: win 0.75 and 0.25, approval 0.5 and 1, KL 0.05 and 0.35
    assert s["win_rate"] == 0.5 and s["approval"] == 0.75 and s["kl"] == pytest.approx(0.2)
    # two prompts: the bootstrap's resamples take the two values, or twice one of them
    assert s["win_rate_low"] == 0.25 and s["win_rate_high"] == 0.75
    assert s["kl_low"] == pytest.approx(0.05) and s["kl_high"] == pytest.approx(0.35)
    assert s["length"] == 3.0 and s["finished"] == 0.25 and s["distinct_1"] == pytest.approx(4 / 7)
    assert s["n_prompts"] == 2 and s["samples_per_prompt"] == 2 and s["reference_approval"] == 0.5
    assert mean_sd([1.0, 2.0, 3.0]) == "2.000 ± 1.000"


class LengthJudge:
    """Prefers the shorter text; approves texts under 10 characters."""

    def prefer(self, prompt, a, b):
        return 1.0 if len(a) < len(b) else 0.0 if len(a) > len(b) else 0.5

    def approve(self, prompt, completion):
        return float(len(completion) < 10)


def test_evaluate_tiny_model_end_to_end():
    tokenizer = tiny_tokenizer()
    reference = tiny_model(tokenizer, seed=0)
    policy = tiny_model(tokenizer, seed=1)  # a different model: KL is not zero
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(5)]
    summary, samples = evaluate(
        policy, tokenizer, prompts, LengthJudge(), reference=reference, max_new_tokens=6, samples_per_prompt=3,
        cache_reference_samples=False,
    )  # fmt: skip
    assert len(samples) == 15 and samples.groupby("prompt_index").size().tolist() == [3] * 5
    # each policy sample is judged against every reference sample of its prompt
    policy_seed, reference_seed = evaluation_seeds(0)
    assert (summary["policy_sample_seed"], summary["reference_sample_seed"]) == (policy_seed, reference_seed)
    for _, group in samples.groupby("prompt_index"):
        references = group["reference_completion"].tolist()
        for completion, win in zip(group["completion"], group["win"], strict=True):
            assert win == pytest.approx(sum(LengthJudge().prefer("", completion, r) for r in references) / 3)
    assert summary["win_rate"] == pytest.approx(samples["win"].mean())
    # the KL estimate is the mean log-ratio of the policy's own samples, recomputed independently here
    from studylib.lm.data import encode_prompt

    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts for _ in range(3)]
    completions = sample_completions(policy, tokenizer, prompt_ids, max_new_tokens=6, seed=policy_seed, batch_size=16)
    lp = score_sequences(policy, prompt_ids, completions, tokenizer.pad_token_id)
    lr = score_sequences(reference, prompt_ids, completions, tokenizer.pad_token_id)
    assert summary["kl"] == pytest.approx((lp - lr).mean().item(), abs=1e-4)
    assert summary["kl_low"] <= summary["kl"] <= summary["kl_high"]
    assert all(1 <= n <= 6 for n in samples["length"])


def test_evaluation_seeds_are_independent_and_reference_samples_shared(tmp_path, monkeypatch):
    """Policy and reference samples use unrelated seeds (a LoRA policy at init *is* its reference, yet its samples
    differ from the reference's); the reference's samples are cached and shared by any policy on that reference."""
    monkeypatch.setenv("STUDYLIB_CACHE", str(tmp_path))
    seeds = [evaluation_seeds(s) for s in range(4)]
    assert len({x for pair in seeds for x in pair}) == 8  # no seed's policy seed is another's reference seed
    tokenizer = tiny_tokenizer()
    base = tiny_model(tokenizer)
    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    prompts = [[{"role": "user", "content": f"Tell me {i}."}] for i in range(6)]
    _, first = evaluate(get_peft_model(base, lora), tokenizer, prompts, LengthJudge(), max_new_tokens=8)
    assert (first["completion"] != first["reference_completion"]).any()
    cached = list((tmp_path / "reference_samples").iterdir())
    assert len(cached) == 1
    other = tiny_model(tokenizer)  # the same base weights, a new policy (its own adapters)
    _, second = evaluate(get_peft_model(other, lora), tokenizer, prompts, LengthJudge(), max_new_tokens=8)
    assert second["reference_completion"].tolist() == first["reference_completion"].tolist()
    assert len(list((tmp_path / "reference_samples").iterdir())) == 1  # the same file: shared, not resampled


def test_evaluate_lora_policy_at_init_has_zero_kl():
    tokenizer = tiny_tokenizer()
    policy = get_peft_model(tiny_model(tokenizer), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    prompts = [[{"role": "user", "content": "Hi?"}]] * 3
    summary, _ = evaluate(policy, tokenizer, prompts, LengthJudge(), max_new_tokens=4, cache_reference_samples=False)
    assert summary["kl"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters to disable; pass a separate frozen reference"):
        evaluate(tiny_model(tokenizer), tokenizer, prompts, LengthJudge())


def test_alpaca_eval_outputs_schema(tmp_path):
    path = write_alpaca_eval_outputs(tmp_path / "model_outputs.json", ["Say hi"], ["Hi!"], generator="rdro-seed0")
    records = json.loads(path.read_text())
    assert records == [{"instruction": "Say hi", "output": "Hi!", "generator": "rdro-seed0", "dataset": "studylib"}]
    stamp = json.loads((tmp_path / "model_outputs.stamp.json").read_text())  # stamped beside, format untouched
    assert stamp["generator"] == "rdro-seed0" and "git_commit" in stamp and "created" in stamp
    with pytest.raises(ValueError, match="1 instructions but 2 outputs"):
        write_alpaca_eval_outputs(tmp_path / "x.json", ["a"], ["b", "c"], generator="g")
