"""Sequence log-probs against a naive log_softmax + gather."""

from __future__ import annotations

import pytest
import torch

from studylib.logprobs import sequence_logps


def naive(logits, input_ids, completion_mask, average=False):
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    picked = torch.gather(logp, -1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:].double()
    total = (picked * mask).sum(1)
    return total / mask.sum(1) if average else total


def random_batch(dtype, seed=0, batch=4, length=12, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen) * 4).to(dtype)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.long)
    prompt_lengths, completion_lengths = [2, 3, 5, 1], [4, 6, 2, 9]
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
        mask[i, p : p + c] = 1  # prompt before, right padding after
    return logits, input_ids, mask


@pytest.mark.parametrize("average", [False, True])
def test_float32_matches_naive(average):
    logits, ids, mask = random_batch(torch.float32)
    ours = sequence_logps(logits, ids, mask, average=average)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), naive(logits, ids, mask, average), atol=1e-4, rtol=1e-5)


def test_bfloat16_upcasts_and_matches_naive_on_the_same_logits():
    logits, ids, mask = random_batch(torch.bfloat16, seed=1)
    ours = sequence_logps(logits, ids, mask)
    assert ours.dtype == torch.float32
    # the reference upcasts the very same bf16 values: only float32 rounding may differ
    torch.testing.assert_close(ours.double(), naive(logits, ids, mask), atol=1e-3, rtol=1e-5)


def test_masked_tokens_do_not_count():
    logits, ids, mask = random_batch(torch.float32, seed=2)
    changed = logits.clone()
    changed[mask == 0] = torch.randn_like(changed[mask == 0])  # logits at masked positions...
    # ... still predict the first completion token, so keep the position before each completion
    for i in range(ids.shape[0]):
        start = int(mask[i].nonzero()[0])
        changed[i, start - 1] = logits[i, start - 1]
    torch.testing.assert_close(sequence_logps(changed, ids, mask), sequence_logps(logits, ids, mask))


def test_gradient_flows_and_matches_naive():
    logits, ids, mask = random_batch(torch.float32, seed=3)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().double().requires_grad_(True)
    sequence_logps(a, ids, mask).sum().backward()
    naive(b, ids, mask).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-4)


def test_errors_name_the_problem():
    logits, ids, mask = random_batch(torch.float32)
    with pytest.raises(ValueError, match="completion_mask shape"):
        sequence_logps(logits, ids, mask[:, :-1])
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"sequences \[2\] have an empty completion"):
        sequence_logps(logits, ids, empty)
    with pytest.raises(ValueError, match="logits must be"):
        sequence_logps(logits[0], ids, mask)


def test_bfloat16_gradient_is_float32_accurate_and_chunking_changes_nothing(monkeypatch):
    """The chunked float32 log-sum-exp and its recomputed gradient: the same for any chunk size, and the bf16
    logits' gradient equal to the float64 one on the same values up to bf16 rounding of the result."""
    logits, ids, mask = random_batch(torch.bfloat16, seed=4)
    results = []
    for chunk in (1 << 22, 7 * 50):  # one chunk, and 7 positions per chunk
        monkeypatch.setattr("studylib.logprobs.CHUNK_ELEMENTS", chunk)
        a = logits.clone().requires_grad_(True)
        value = sequence_logps(a, ids, mask)
        value.sum().backward()
        results.append((value, a.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0)
    b = logits.double().requires_grad_(True)
    naive(b, ids, mask).sum().backward()
    assert results[0][1].dtype == torch.bfloat16
    torch.testing.assert_close(results[0][1].double(), b.grad, atol=4e-3, rtol=1e-2)
