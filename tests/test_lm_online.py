"""On-policy training on a tiny Llama: every objective trains, LoRA references, resume, unbiased estimators."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from studylib.lm.batching import model_logps, pad_sequences
from studylib.lm.config import TrainConfig
from studylib.lm.online import OnlineTrainer, kl_estimate, train_online
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.losses import get_loss

WORDS = ["hi", "yo", "ok", "no", "tea", "sun"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def low_byte_reward(prompts, completions) -> torch.Tensor:
    """Fraction of completion tokens in the lower half of the vocabulary: varies between samples."""
    return torch.tensor([sum(t < 130 for t in c) / len(c) for c in completions], dtype=torch.float32)


def prompts_for(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(f"Say {w}.", add_special_tokens=False) for w in WORDS]


def pairs_for(tokenizer, margins: bool = False) -> list[dict]:
    eos = tokenizer.eos_token_id
    rows = []
    for i, w in enumerate(WORDS):
        row = {
            "prompt_ids": tokenizer.encode(f"Say {w}.", add_special_tokens=False),
            "chosen_ids": tokenizer.encode(f"{w}, friend!", add_special_tokens=False) + [eos],
            "rejected_ids": tokenizer.encode("No.", add_special_tokens=False) + [eos],
        }
        if margins:
            row["reward_margin"] = 1.0 + 0.1 * i
        rows.append(row)
    return rows


def config(**overrides) -> TrainConfig:
    knobs = {"max_steps": 3, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 5}
    knobs.update({"use_lora": False, "learning_rate": 1e-2})
    knobs.update(overrides)
    return TrainConfig(**knobs)


def run(model, tokenizer, loss: str = "reverse_kl", knobs=None, pairs=None, **overrides):
    """``train_online`` on the prompts (or ``pairs``) with ``low_byte_reward``."""
    return train_online(
        model,
        tokenizer,
        get_loss(loss, **(knobs or {})),
        config(**overrides),
        prompt_ids=None if pairs else prompts_for(tokenizer),
        reward_fn=None if pairs else low_byte_reward,
        pair_rows=pairs,
    )


CASES = {
    "reverse_kl": ("reverse_kl", {}, False),
    "rlhf": ("rlhf", {}, False),
    "distill_online": ("distill", {}, False),
    "distill_dataset_pairs": ("distill", {}, True),
    "pmle_with_kl": ("pmle", {"gamma": 0.5, "beta": 0.1}, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_objective_trains_every_parameter(tokenizer, case):
    loss, knobs, uses_pairs = CASES[case]
    model = tiny_model(tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = pairs_for(tokenizer, margins=True) if uses_pairs else None
    policy, history = run(model, tokenizer, loss, knobs, pairs)
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"{case}: parameters did not change: {unchanged}"
    assert [e["step"] for e in history] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in history)
    assert "kl" in history[0]  # every case here has a KL term (estimated on policy samples)
    if not uses_pairs or case == "pmle_with_kl":
        assert 1 <= history[0]["completions/mean_length"] <= 5


def test_lora_reference_is_the_base_model(tokenizer):
    policy, history = run(tiny_model(tokenizer, seed=1), tokenizer, use_lora=True, lora_r=4, max_steps=2)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: policy == reference
    assert history[0]["ratio/max"] == pytest.approx(1.0, abs=1e-5)
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)


def test_reverse_kl_raises_the_reward(tokenizer):
    knobs = {"max_steps": 20, "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 4}
    knobs |= {"lr_scheduler_type": "constant", "warmup_ratio": 0.0}  # the objective, not the schedule, under test
    _, history = run(tiny_model(tokenizer, seed=0), tokenizer, learning_rate=3e-3, **knobs)
    rewards = [e["rewards/mean"] for e in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, f"mean reward {first:.3f} -> {last:.3f}"


def test_learning_rate_follows_the_offline_trainers_schedule(tokenizer):
    """Warm-up for ceil(warmup_ratio * steps) steps, then cosine decay: transformers' schedule, as the offline
    Trainer uses it (the rate logged at a step is the one that step used)."""
    _, history = run(tiny_model(tokenizer), tokenizer, max_steps=5, warmup_ratio=0.2, learning_rate=1e-2)
    expected = [0.0] + [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [e["learning_rate"] for e in history] == pytest.approx(expected)


def test_resumed_run_repeats_the_uninterrupted_one(tmp_path, tokenizer):
    prompts = prompts_for(tokenizer)
    knobs = {"use_lora": True, "lora_r": 4, "prompts_per_step": 4}  # 4 of 6 prompts: steps cross an epoch
    loss = get_loss("reverse_kl")

    cfg = config(max_steps=4, save_steps=2, **knobs)
    common = {"prompt_ids": prompts, "reward_fn": low_byte_reward}
    straight, straight_history = train_online(tiny_model(tokenizer), tokenizer, loss, cfg, **common)
    killed = OnlineTrainer(tiny_model(tokenizer), tokenizer, loss, cfg, output_dir=tmp_path / "run", **common)
    for _ in range(2):  # two steps and their checkpoint, then the process dies
        killed.train_step()
    killed.save(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint-2" / "state.pt").is_file()
    resumed, history = train_online(tiny_model(tokenizer), tokenizer, loss, cfg, output_dir=tmp_path / "run", **common)
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    assert [e["loss"] for e in history] == pytest.approx([e["loss"] for e in straight_history], rel=1e-5)
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 4


def test_resume_with_other_knobs_is_refused(tmp_path, tokenizer):
    common = {"prompt_ids": prompts_for(tokenizer), "reward_fn": low_byte_reward, "output_dir": tmp_path}
    train_online(tiny_model(tokenizer), tokenizer, get_loss("rlhf"), config(max_steps=1), **common)
    with pytest.raises(ValueError, match=r"other knobs \(learning_rate: saved 0.01, now 0.1"):
        train_online(
            tiny_model(tokenizer), tokenizer, get_loss("rlhf"), config(max_steps=1, learning_rate=0.1), **common
        )


@pytest.mark.parametrize("where", ["weights", "gradient"])
def test_divergence_stops_before_the_weights_go_bad(tmp_path, tokenizer, where):
    prompts = prompts_for(tokenizer)
    trainer = OnlineTrainer(
        tiny_model(tokenizer),
        tokenizer,
        get_loss("rlhf"),
        config(max_steps=3),
        prompt_ids=prompts,
        reward_fn=low_byte_reward,
    )
    trainer.train_step()
    good = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    if where == "weights":  # NaN log-probs: named from the weights, whatever torch's error says
        with torch.no_grad():
            trainer.policy.lm_head.weight[0, 0] = float("nan")
        match = r"on-policy training diverged at step 2: 1 trained weight tensor\(s\) are not finite"
    else:
        trainer.policy.lm_head.weight.register_hook(lambda grad: grad * float("nan"))
        match = "on-policy training diverged at step 2: the gradient norm is nan"
    with pytest.raises(FloatingPointError, match=match):
        trainer.train_step()
    if where == "gradient":  # the bad gradient never reached the weights
        for name, p in trainer.policy.named_parameters():
            torch.testing.assert_close(p.detach(), good[name], msg=name)


def test_an_error_that_mentions_inf_is_not_called_divergence(tokenizer):
    """Divergence is read from the numbers: an error whose text says "inf" with finite weights stays what it is."""

    def failing_reward(prompts, completions):
        raise RuntimeError("reward server: info unavailable")

    trainer = OnlineTrainer(
        tiny_model(tokenizer), tokenizer, get_loss("rlhf"), config(max_steps=1), prompt_ids=prompts_for(tokenizer),
        reward_fn=failing_reward,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="info unavailable"):
        trainer.train_step()


def test_bad_inputs_fail_clearly(tokenizer):
    model, prompts = tiny_model(tokenizer), prompts_for(tokenizer)
    reverse_kl, pmle, distill = get_loss("reverse_kl"), get_loss("pmle"), get_loss("distill")
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        OnlineTrainer(model, tokenizer, reverse_kl, config(samples_per_prompt=1), prompt_ids=prompts)
    with pytest.raises(ValueError, match="trains on labelled rows"):
        OnlineTrainer(model, tokenizer, get_loss("rdro"), config(), prompt_ids=prompts)
    with pytest.raises(ValueError, match="pmle trains on data-set pairs"):
        OnlineTrainer(model, tokenizer, pmle, config(), prompt_ids=prompts)
    with pytest.raises(ValueError, match="needs rows with reward_margin"):
        OnlineTrainer(model, tokenizer, distill, config(), pair_rows=pairs_for(tokenizer))
    with pytest.raises(ValueError, match="needs reward_fn"):
        OnlineTrainer(model, tokenizer, reverse_kl, config(), prompt_ids=prompts)
    with pytest.raises(ValueError, match="must be >= 1"):
        OnlineTrainer(model, tokenizer, reverse_kl, config(max_steps=0), prompt_ids=prompts)


# --- unbiasedness by enumeration --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kl_estimate_is_unbiased_by_enumeration(k):
    """E over k i.i.d. samples of the estimate's value and gradient equal KL(pi || pi_0) and its gradient."""
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(4, generator=gen, dtype=torch.float64).log_softmax(0)
    logp = logits.log_softmax(0)
    exact = (logp.exp() * (logp - reference)).sum()
    (exact_grad,) = torch.autograd.grad(exact, logits, retain_graph=True)
    value, expected = 0.0, torch.zeros(())
    for sample in itertools.product(range(4), repeat=k):
        idx = torch.tensor(sample)
        weight = logp[idx].sum().exp().detach()
        expected = expected + weight * kl_estimate(logp[idx], reference[idx], samples_per_prompt=k)
        value += float(weight * (logp[idx] - reference[idx]).mean().detach())
    (grad,) = torch.autograd.grad(expected, logits)
    assert value == pytest.approx(exact.item(), rel=1e-10)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-9, atol=1e-12)
    assert exact_grad.abs().max() > 1e-3  # not trivially zero


def one_token_lm(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).double()


@pytest.mark.parametrize("loss", ["reverse_kl", "rlhf"])
def test_lm_rloo_gradient_is_unbiased_by_enumeration(loss):
    """One-token completions over a 6-token vocabulary: E over all ordered pairs of the RLOO surrogate's gradient
    (through the LM's parameters, via pad_sequences/model_logps) equals the exact gradient of J."""
    policy, reference = one_token_lm(0), one_token_lm(1)
    loss_fn = get_loss(loss, gamma=0.2, beta=0.3) if loss == "reverse_kl" else get_loss(loss, beta=0.3)
    prompt, vocab = [3, 4, 5], list(range(6))
    batch = pad_sequences([prompt] * 6, [[y] for y in vocab], pad_id=0)
    logp = model_logps(policy, batch)
    with torch.no_grad():
        ref = model_logps(reference, batch)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)  # all completions enumerated
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5], dtype=torch.float64)
    params = [p for p in policy.parameters() if p.requires_grad]
    exact = loss_fn.exact(logp.unsqueeze(0), ref.unsqueeze(0), rewards.unsqueeze(0))
    exact_grad = torch.autograd.grad(exact, params, retain_graph=True)
    expected = torch.zeros((), dtype=torch.float64)
    for i, j in itertools.product(range(6), repeat=2):
        idx = torch.tensor([i, j])
        surrogate, _ = loss_fn(logp[idx], ref[idx], rewards[idx], samples_per_prompt=2)
        expected = expected + (logp[i] + logp[j]).exp().detach() * surrogate
    grad = torch.autograd.grad(expected, params)
    scale = max(e.abs().max().item() for e in exact_grad)
    assert scale > 1e-3  # not trivially zero
    for g, e in zip(grad, exact_grad, strict=True):  # Llama's RMSNorm runs in float32, hence not 1e-12
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * scale)


def test_a_bad_reward_function_is_not_called_divergence(tokenizer):
    trainer = OnlineTrainer(
        tiny_model(tokenizer),
        tokenizer,
        get_loss("rlhf"),
        config(),
        prompt_ids=prompts_for(tokenizer),
        reward_fn=lambda prompts, completions: torch.zeros(len(completions) + 1),
    )
    with pytest.raises(ValueError, match="reward_fn returned 5 rewards for 4 completions"):
        trainer.train_step()
