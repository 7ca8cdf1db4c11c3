"""Sampling completions from a causal LM: the one sampler of the project (data, on-policy training, evaluation).

Pure sampling (no top-k, no top-p) at ``temperature``, so at temperature 1 the samples are exact draws from
the model, truncated at ``max_new_tokens``. Two rules hold for every caller:

- **Seeding**: batch ``b`` of a call is drawn with the torch seed ``seed * 1_000_003 + b``, inside
  ``torch.random.fork_rng``: the samples depend only on ``(seed, batch_size, prompts)``, not on what ran
  before, and the caller's random state is left untouched.
- **EOS**: each completion keeps its tokens up to and including its first EOS; one that reached
  ``max_new_tokens`` without EOS is returned as it is, with no EOS added (``ended_with_eos`` tells which).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from studylib.lm.batching import pad_token_id

SEED_STRIDE = 1_000_003


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of batch ``batch_index`` of a call seeded with ``seed``."""
    return seed * SEED_STRIDE + batch_index


@torch.no_grad()
def _sample_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    device: torch.device,
) -> list[list[int]]:
    """One sample per prompt of a left-padded batch (built on ``device``): each row's new tokens, cut after the
    first EOS."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(list(p))
        mask[i, width - len(p) :] = 1
    generated = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    rows = generated[:, width:].tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def sample_completions(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    desc: str | None = None,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """One sampled completion (token ids) per prompt, under the module's seeding and EOS rules.

    ``prompt_ids``: chat-templated prompt tokens (``studylib.lm.data.encode_prompt``). ``desc``: a progress
    bar's label (None: no bar). ``device``: where ``model`` is (the run's ``Runtime.device``); the batches are
    built there. The model is put in eval mode while sampling and restored after.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("a prompt to sample from is empty")
    device = torch.device(device)
    pad_id, eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    completions: list[list[int]] = []
    starts = range(0, len(prompt_ids), batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, disable=desc is None)):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(batch_seed(seed, b))
            completions += _sample_batch(
                model, prompt_ids[start : start + batch_size], pad_id, eos_id, max_new_tokens, temperature, device
            )
    model.train(was_training)
    return completions


def ended_with_eos(completion: Sequence[int], eos_id: int) -> bool:
    """Whether a sampled completion ended with the model's own EOS (not cut at ``max_new_tokens``)."""
    return len(completion) > 0 and completion[-1] == eos_id
