"""Token rows to padded tensors, and sequence log-probs of those tensors under a model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from studylib.logprobs import sequence_logps


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (masks, never pad ids, mark real tokens)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` for prompt + completion rows."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    completion = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if not c:
            raise ValueError(f"row {i} has an empty completion")
        input_ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def model_logps(model: torch.nn.Module, batch: dict[str, Tensor], average: bool = False) -> Tensor:
    """Per-sequence completion log-probs of a padded batch under ``model`` (gradients flow if enabled)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"], average=average)


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    average: bool = False,
    desc: str | None = None,
) -> Tensor:
    """Log-probs of many (prompt, completion) token rows, in batches, with a progress bar if ``desc``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None):
        batch = pad_sequences(prompts[start : start + batch_size], completions[start : start + batch_size], pad_id)
        out.append(model_logps(model, {k: v.to(device) for k, v in batch.items()}, average).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
