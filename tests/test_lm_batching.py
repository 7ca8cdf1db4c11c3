"""Completion-only log-probs and bf16 on a tiny Llama: the same numbers as the full computation."""

from __future__ import annotations

import pytest
import torch

from studylib.lm.batching import last_token_index, model_logps, pad_sequences
from studylib.lm.config import TrainConfig
from studylib.lm.reference import autocast_context, policy_and_reference
from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm.trainer import train
from studylib.logprobs import sequence_logps
from studylib.losses import build_loss

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
COMPLETIONS = [[20, 21, 22, 23], [24], [25, 26, 27, 28, 29, 30, 31], [32, 33]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_tokenizer(), seed=0).eval()


def full_logps(model, batch, average=False):
    """The plain computation: logits at every position, then the completion tokens' log-softmax."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits
    return sequence_logps(logits.double(), batch["input_ids"], batch["completion_mask"], average)


def test_layout_prompts_end_together_and_completions_start_together():
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    assert batch["input_ids"].shape == (4, 6 + 7)
    assert (batch["completion_mask"][:, 6] == 1).all() and (batch["completion_mask"][:, :6] == 0).all()
    assert batch["input_ids"][1, :7].tolist() == PROMPTS[1] + COMPLETIONS[1]
    assert batch["input_ids"][2, 5:13].tolist() == PROMPTS[2] + COMPLETIONS[2]
    assert batch["position_ids"][2, 5:13].tolist() == list(range(8))  # positions count real tokens only
    assert last_token_index(batch["attention_mask"]).tolist() == [9, 6, 12, 7]


@pytest.mark.parametrize("average", [False, True])
def test_completion_only_logps_equal_the_full_computation_in_float32(model, average):
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    ours = model_logps(model, batch, average)
    torch.testing.assert_close(ours.double(), full_logps(model, batch, average), atol=2e-5, rtol=1e-6)
    with torch.no_grad():  # the same float32 log-softmax on logits at every position: bitwise equal
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    assert torch.equal(ours, sequence_logps(logits, batch["input_ids"], batch["completion_mask"], average))


def test_padding_changes_nothing(model):
    """Each row alone (no padding) against the padded batch: left-padded prompts keep their positions."""
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    together = model_logps(model, batch)
    alone = torch.cat(
        [model_logps(model, pad_sequences([p], [c], pad_id=0)) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    )
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-6)


def test_completion_only_gradients_equal_the_full_computation(model):
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    grads = []
    for compute in (model_logps, full_logps):
        model.zero_grad(set_to_none=True)
        compute(model, batch).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0].double(), grads[1].double(), atol=1e-5, rtol=1e-4)


BF16_TOLERANCE = 0.05  # nats per token: bf16 weights and activations, float32 log-softmax and sums


def test_bf16_frozen_base_matches_float32_within_tolerance():
    """A LoRA policy in bf16 (base weights bf16, adapters float32) against float32 on the same batch."""
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    tokens = batch["completion_mask"].sum(dim=1)
    values = {}
    for bf16 in (False, True):
        policy, reference = policy_and_reference(tiny_model(tiny_tokenizer(), seed=0), TrainConfig(bf16=bf16), True)
        with torch.no_grad(), autocast_context(policy, TrainConfig(bf16=bf16), "cpu"):
            values[bf16] = (model_logps(policy, batch), reference.logps(batch))
    assert values[True][0].dtype == torch.float32
    assert next(p for p in policy.parameters() if p.requires_grad).dtype == torch.float32  # adapters stay fp32
    assert next(p for n, p in policy.named_parameters() if "base_layer" in n).dtype == torch.bfloat16
    per_token_error = ((values[True][0] - values[False][0]).abs() / tokens).max()
    assert per_token_error < BF16_TOLERANCE
    torch.testing.assert_close(values[True][0], values[True][1], atol=0, rtol=0)  # at init: policy == reference


@pytest.mark.parametrize("use_lora", [True, False])
def test_bf16_trains_on_a_cpu_only_machine(tmp_path, use_lora):
    tokenizer = tiny_tokenizer()
    rows = [
        {"prompt_ids": p, "completion_ids": c + [tokenizer.eos_token_id], "label": i % 2 == 0}
        for i, (p, c) in enumerate(zip(PROMPTS * 2, COMPLETIONS * 2, strict=True))
    ]
    config = TrainConfig(bf16=True, use_lora=use_lora, max_steps=3, batch_size=4, learning_rate=1e-2, save_steps=100)
    loss_fn = build_loss("rdro", {"alpha": 0.5})
    trainer = train(tiny_model(tokenizer, seed=0), tokenizer, rows, loss_fn, config, tmp_path)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert trainer.args.bf16  # under autocast
