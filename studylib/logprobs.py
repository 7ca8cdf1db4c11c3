"""Per-sequence log-probabilities of completions from a causal LM's logits."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[..., target]`` without a full-vocabulary log-softmax copy where avoidable.

    Full-precision logits: the selected logit minus ``logsumexp`` over the vocabulary. Half-precision
    logits are upcast one sequence at a time, so the float32 copy is one row of the batch, never all.
    """
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
        return selected - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_targets in zip(logits, targets, strict=True):
        row_logits = row_logits.float()
        selected = torch.gather(row_logits, -1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(selected - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean, ``average=True``) of the completion tokens' log-probs, one value per sequence.

    ``logits``: (batch, length, vocab), as a causal LM returns them for ``input_ids`` (batch, length).
    ``completion_mask``: (batch, length), 1 on completion tokens (EOS included), 0 on prompt and padding.
    Position t's logits predict token t+1, so the first token of a sequence is never scored.
    Returns float32 (float64 for float64 logits).
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (batch, length, vocab) matching input_ids (batch, length); "
            f"got {tuple(logits.shape)} and {tuple(input_ids.shape)}"
        )
    if completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask shape {tuple(completion_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(torch.bool)
    if not mask.any(dim=1).all():
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"sequences {empty} have an empty completion (no masked-in token after the first)")
    per_token = token_logps(logits[:, :-1], targets)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    total = per_token.sum(dim=1)
    if average:
        return total / mask.sum(dim=1)
    return total
