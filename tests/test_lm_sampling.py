"""The one sampler: one seeding rule (per batch, independent of history, caller's RNG untouched), one EOS rule."""

from __future__ import annotations

import pytest
import torch

from studylib.lm.sampling import _sample_batch, batch_seed, ended_with_eos, sample_completions
from studylib.lm.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, seed=0), tokenizer


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(f"Say {i}.", add_special_tokens=False) for i in range(n)]


def test_samples_depend_on_the_seed_only_and_leave_the_callers_rng_alone(tiny):
    model, tokenizer = tiny
    ids = prompts(tokenizer, 5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample_completions(model, tokenizer, ids, max_new_tokens=6, seed=3, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    torch.manual_seed(999)  # another history before the call
    assert sample_completions(model, tokenizer, ids, max_new_tokens=6, seed=3, batch_size=2) == first
    assert sample_completions(model, tokenizer, ids, max_new_tokens=6, seed=4, batch_size=2) != first


def test_batch_b_is_drawn_with_its_own_seed(tiny):
    """Batch 1 of a call is what the batch sampler draws under batch 1's seed, whatever came before."""
    model, tokenizer = tiny
    ids = prompts(tokenizer, 4)
    whole = sample_completions(model, tokenizer, ids, max_new_tokens=5, seed=2, batch_size=2)
    assert batch_seed(2, 1) == 2 * 1_000_003 + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch_seed(2, 1))
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        second = _sample_batch(model, ids[2:], pad, eos, 5, 1.0, torch.device("cpu"))
    assert whole[2:] == second


def test_eos_kept_only_where_generated(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    completions = sample_completions(model, tokenizer, prompts(tokenizer, 16), max_new_tokens=3, seed=0)
    for c in completions:
        assert 1 <= len(c) <= 3
        assert eos not in c[:-1]  # cut after the first EOS
        if not ended_with_eos(c, eos):
            assert len(c) == 3  # only a completion that reached the cap lacks an EOS, and none is added
    # make EOS certain: every sample is then exactly [eos]
    with torch.no_grad():
        bias = torch.full((model.config.vocab_size,), -1e4)
        bias[eos] = 1e4
        model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        assert sample_completions(model, tokenizer, prompts(tokenizer, 3), max_new_tokens=4, seed=0) == [[eos]] * 3
    finally:
        model.lm_head.bias = None


def test_bad_arguments_fail_clearly(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_completions(model, tokenizer, [[5]], max_new_tokens=2, seed=0, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens and batch_size must be >= 1"):
        sample_completions(model, tokenizer, [[5]], max_new_tokens=0, seed=0)
    with pytest.raises(ValueError, match="prompt to sample from is empty"):
        sample_completions(model, tokenizer, [[]], max_new_tokens=2, seed=0)
