"""Evaluation metrics against hand-computed values, and evaluation of a tiny model end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from peft import LoraConfig, get_peft_model

from studylib.lm.batching import score_sequences
from studylib.lm.evaluate import distinct_n, evaluate, mean_sd, summarise, write_alpaca_eval_outputs
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
            "completion": ["a b", "a c"],
            "win": [1.0, 0.5],
            "approved": [0.25, 0.75],
            "reference_approved": [0.5, 0.5],
            "logratio": [0.2, -0.1],
            "length": [3, 5],
            "reference_length": [4, 4],
        }
    )
    s = summarise(samples)
    assert s["win_rate"] == 0.75 and s["approval"] == 0.5 and s["kl"] == pytest.approx(0.05)
    assert s["length"] == 4.0 and s["distinct_1"] == pytest.approx(3 / 4) and s["n_prompts"] == 2
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
    summary, samples = evaluate(policy, tokenizer, prompts, LengthJudge(), reference=reference, max_new_tokens=6)
    expected_wins = [
        LengthJudge().prefer("", a, b)
        for a, b in zip(samples["completion"], samples["reference_completion"], strict=True)
    ]
    assert samples["win"].tolist() == expected_wins
    assert summary["win_rate"] == pytest.approx(sum(expected_wins) / 5)
    # the KL estimate is the mean log-ratio of the policy's own samples, recomputed independently here
    from studylib.lm.data import encode_prompt

    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    completions = sample_completions(policy, tokenizer, prompt_ids, max_new_tokens=6, seed=0, batch_size=8)
    lp = score_sequences(policy, prompt_ids, completions, tokenizer.pad_token_id)
    lr = score_sequences(reference, prompt_ids, completions, tokenizer.pad_token_id)
    assert summary["kl"] == pytest.approx((lp - lr).mean().item(), abs=1e-4)
    assert all(1 <= n <= 6 for n in samples["length"])


def test_evaluate_lora_policy_at_init_has_zero_kl():
    tokenizer = tiny_tokenizer()
    policy = get_peft_model(tiny_model(tokenizer), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    prompts = [[{"role": "user", "content": "Hi?"}]] * 3
    summary, _ = evaluate(policy, tokenizer, prompts, LengthJudge(), max_new_tokens=4)
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
