"""The Bradley-Terry reward model on a tiny Llama: it learns separable pairs, leaves the policy alone, feeds distill."""

from __future__ import annotations

import random

import pytest
import torch

from studylib.lm.config import TrainConfig
from studylib.lm.online import train_online
from studylib.lm.reward import (
    attach_reward_margins,
    held_out_accuracy,
    held_out_by_prompt,
    load_reward_model,
    reward_accuracy,
    score,
    train_reward_model,
)
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.losses import get_loss

TOPICS = ["tea", "rain", "cats", "maths", "bread", "stars", "boats", "music", "snow", "chess", "bees", "glass"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def separable_pairs(tokenizer, n: int, seed: int) -> list[dict]:
    """Chosen completions repeat 'yes', rejected ones 'no' (lengths vary, so length alone does not separate)."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    rows = []
    for i in range(n):
        prompt = f"Tell me about {rng.choice(TOPICS)} #{seed * 1000 + i}."
        rows.append(
            {
                "prompt_ids": enc(prompt),
                "chosen_ids": enc(" ".join(["yes"] * rng.randint(1, 3))) + [eos],
                "rejected_ids": enc(" ".join(["no"] * rng.randint(1, 5))) + [eos],
            }
        )
    return rows


@pytest.fixture(scope="module")
def trained(tokenizer):
    model = tiny_model(tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, held_out = separable_pairs(tokenizer, 24, seed=0), separable_pairs(tokenizer, 16, seed=1)
    reward_model, history = train_reward_model(
        model, tokenizer, train, eval_rows=held_out, epochs=3, lr=1e-3, batch_size=8, seed=0
    )
    return model, before, reward_model, history, held_out


def test_bt_loss_falls_and_held_out_accuracy_is_high(trained):
    _, _, reward_model, history, held_out = trained
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 9  # 3 epochs x 3 batches
    assert losses[0] > 0.3 and sum(losses[-3:]) / 3 < 0.1 * losses[0]
    assert {"step", "epoch", "accuracy", "grad_norm"} <= set(history[0])
    evals = [e["eval_accuracy"] for e in history if "eval_accuracy" in e]
    assert len(evals) == 3 and evals[-1] == 1.0
    assert reward_accuracy(reward_model, held_out) == 1.0
    assert not any(p.requires_grad for p in reward_model.parameters())


def test_policy_model_is_not_modified(trained):
    model, before, reward_model, _, _ = trained
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    backbone_params = {id(p) for p in reward_model.backbone.parameters()}
    assert not backbone_params & {id(p) for p in model.parameters()}  # a copy, not shared tensors


def test_scores_do_not_depend_on_padding_or_batching(trained):
    _, _, reward_model, _, held_out = trained
    prompts = [r["prompt_ids"] for r in held_out]
    completions = [r["rejected_ids"] for r in held_out]  # lengths 3 to 15: rows are padded differently
    one_by_one = score(reward_model, prompts, completions, batch_size=1)
    batched = score(reward_model, prompts, completions, batch_size=16)
    torch.testing.assert_close(one_by_one, batched, atol=1e-5, rtol=1e-5)
    assert one_by_one.std() > 0


def test_reward_margins_feed_offline_distill(trained):
    _, _, reward_model, _, held_out = trained
    rows = attach_reward_margins(reward_model, held_out)
    prompts = [r["prompt_ids"] for r in held_out]
    expected = reward_model.score(prompts, [r["chosen_ids"] for r in held_out]) - reward_model.score(
        prompts, [r["rejected_ids"] for r in held_out]
    )
    assert [r["reward_margin"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
    assert all(r["reward_margin"] > 0 for r in rows)
    assert "reward_margin" not in held_out[0]  # copies, inputs untouched


def test_lora_reward_model_learns_and_merges(tokenizer):
    model = tiny_model(tokenizer, seed=3)
    train, held_out = separable_pairs(tokenizer, 24, seed=2), separable_pairs(tokenizer, 16, seed=3)
    reward_model, history = train_reward_model(
        model, tokenizer, train, epochs=5, lr=3e-3, batch_size=8, use_lora=True, lora_r=4, seed=1
    )
    losses = [e["loss"] for e in history]
    assert len(losses) == 15 and sum(losses[-3:]) < 0.5 * sum(losses[:3])  # last epoch against the first
    assert reward_accuracy(reward_model, held_out) >= 0.9
    assert not any("lora" in n for n, _ in reward_model.named_parameters())  # merged into a plain backbone
    assert not getattr(model, "peft_config", None) and not any("lora" in n for n, _ in model.named_modules())


def test_save_load_round_trip_and_reward_fn_for_online_distill(tmp_path, tokenizer):
    model = tiny_model(tokenizer, seed=4)
    pairs = separable_pairs(tokenizer, 8, seed=4)
    reward_model, _ = train_reward_model(model, tokenizer, pairs, epochs=1, batch_size=4, output_dir=tmp_path / "rm")
    assert (tmp_path / "rm" / "reward_history.json").is_file()
    loaded = load_reward_model(model, tokenizer, tmp_path / "rm")
    prompts, completions = [r["prompt_ids"] for r in pairs], [r["chosen_ids"] for r in pairs]
    torch.testing.assert_close(loaded.score(prompts, completions), reward_model.score(prompts, completions))
    config = TrainConfig(max_steps=2, prompts_per_step=2, max_new_tokens=4, use_lora=False)
    distill = get_loss("distill")
    policy, history = train_online(model, tokenizer, distill, config, prompt_ids=prompts, reward_fn=loaded.score)
    assert len(history) == 2 and 0.0 < history[0]["targets/mean"] < 1.0


def test_bad_rows_fail_clearly(tokenizer):
    rows = [{"prompt_ids": [5], "completion_ids": [6, 2], "label": True}]
    with pytest.raises(ValueError, match="needs paired rows"):
        train_reward_model(tiny_model(tokenizer), tokenizer, rows)
    with pytest.raises(ValueError, match="no training pairs"):
        train_reward_model(tiny_model(tokenizer), tokenizer, [])


def test_reward_model_scores_what_it_was_fit_on(tmp_path):
    """The reward model is fit on the offline set's pairs and scores the policy's on-policy samples: both must be
    the sampler's raw ids under one length cap (EOS only where generated). A config that gives them different caps
    is refused, naming both knobs; and the on-policy trainer hands the reward function the sampler's ids as they
    came (each one either ended by the model's EOS or cut at the cap, never re-encoded)."""
    from studylib.lm.config import RunConfig

    with pytest.raises(ValueError, match=r"max_new_tokens \(48\) must equal data_max_new_tokens \(32\)"):
        RunConfig.from_flat({"loss": "rlhf", "max_new_tokens": 48, "data_max_new_tokens": 32})
    RunConfig.from_flat({"loss": "rlhf", "max_new_tokens": 32, "data_max_new_tokens": 32})
    RunConfig.from_flat({"loss": "dpo", "max_new_tokens": 48, "data_max_new_tokens": 32})  # no reward model

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    eos_bonus = torch.zeros(len(tokenizer))
    eos_bonus[tokenizer.eos_token_id] = 3.0  # some samples end early, others run to the cap
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + eos_bonus)
    scored: list[list[int]] = []

    def reward_fn(prompts, completions):
        scored.extend(completions)
        return torch.tensor([len(c) / 6.0 for c in completions])

    prompts = [tokenizer.encode(f"Say {w}.", add_special_tokens=False) for w in ("hi", "yo", "ok", "no")]
    cfg = TrainConfig(max_steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, use_lora=False)
    train_online(model, tokenizer, get_loss("rlhf"), cfg, prompt_ids=prompts, reward_fn=reward_fn)
    eos = tokenizer.eos_token_id
    finished = [c for c in scored if c[-1] == eos]
    cut = [c for c in scored if c[-1] != eos]
    assert len(scored) == 16 and finished and cut
    assert all(eos not in c[:-1] for c in finished) and all(len(c) == 6 and eos not in c for c in cut)


def test_the_held_out_split_is_by_prompt_and_its_accuracy_has_an_interval(trained, tokenizer):
    _, _, reward_model, _, held_out = trained
    rows = [{**r, "prompt_ids": r["prompt_ids"][:16]} for r in held_out]  # pairs share prompts: by topic
    train, held = held_out_by_prompt(rows, 0.25, seed=0)
    assert len(train) + len(held) == len(rows) and held
    assert not {tuple(r["prompt_ids"]) for r in train} & {tuple(r["prompt_ids"]) for r in held}
    flipped = [{**r, "chosen_ids": r["rejected_ids"], "rejected_ids": r["chosen_ids"]} for r in rows[:4]]
    out = held_out_accuracy(reward_model, rows[4:] + flipped)  # the model ranks every pair right: 4 are now wrong
    assert out["reward_accuracy_held_out"] == pytest.approx(1 - 4 / len(rows))
    assert out["reward_accuracy_held_out_low"] < out["reward_accuracy_held_out_prompt_mean"]
    assert out["reward_accuracy_held_out_high"] <= 1.0
    assert out["reward_held_out_pairs"] == len(rows)


class LongerWins:
    """A pool stand-in: the longer completion wins, equal lengths split evenly."""

    def prefer(self, prompt: str, a: str, b: str) -> float:
        return 0.5 if len(a) == len(b) else float(len(a) > len(b))


def test_every_pair_takes_each_prompts_pairs_with_the_pools_majority_winner():
    from datasets import Dataset

    from studylib.lm.preferences import every_pair

    prompt = [{"role": "user", "content": "Say something."}]
    other = [{"role": "user", "content": "Say more."}]
    texts = ["a", "bb", "ccc", "dd"]
    rows = [{"prompt": prompt, "completion": t, "completion_ids": [ord(c) for c in t], "label": True} for t in texts]
    rows.append({"prompt": other, "completion": "e", "completion_ids": [101], "label": False})
    pairs = every_pair(Dataset.from_list(rows), LongerWins())
    # 6 pairs of the first prompt less the even split (bb, dd); the lone completion of the second pairs with none
    assert len(pairs) == 5
    assert all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)
    assert {(p["chosen"], p["rejected"]) for p in pairs} >= {("ccc", "a"), ("dd", "a"), ("ccc", "bb")}
