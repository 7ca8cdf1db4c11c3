"""Per-sequence log-probabilities of completions from a causal LM's logits.

The log-softmax is never materialised: ``log p(target) = logit[target] - logsumexp(logits)`` is computed in
float32 a chunk of positions at a time (whatever the logits' dtype), and its gradient
``onehot(target) - softmax(logits)`` is recomputed the same way in the backward pass. So no float32 copy of a
(batch, length, vocab) tensor exists at any time, and bf16 logits keep float32 accuracy in the sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # float32 elements per chunk of the log-sum-exp (16 MiB)


class _SelectedLogSoftmax(torch.autograd.Function):
    """``log softmax(logits)[target]`` for (tokens, vocab) logits, in float32, chunked over tokens."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        chunk = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for i in range(0, logits.shape[0], chunk):
            lse[i : i + chunk] = torch.logsumexp(logits[i : i + chunk].float(), dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1).float() - lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        chunk = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        grad_logits = torch.empty_like(logits)
        grad = grad.float()
        for i in range(0, logits.shape[0], chunk):
            g = grad[i : i + chunk, None]
            part = torch.exp(logits[i : i + chunk].float() - lse[i : i + chunk, None]).mul_(-g)
            part.scatter_add_(1, targets[i : i + chunk, None], g)
            grad_logits[i : i + chunk] = part
        return grad_logits, None


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[..., target]`` in float32 (float64 for float64 logits), any leading shape."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)} plus a vocab axis")
    if logits.dtype == torch.float64:  # exact reference path (tests, toy)
        return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    flat = _SelectedLogSoftmax.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return flat.reshape(targets.shape)


def completion_logps(logits: Tensor, targets: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean) over the masked positions of ``log softmax(logits)[target]``, one value per row.

    ``logits``: (batch, positions, vocab), position t predicting ``targets[:, t]``; ``mask``: (batch, positions),
    1 where the target is a completion token. Only masked positions enter the log-sum-exp.
    """
    mask = mask.to(torch.bool)
    if not mask.any(dim=1).all():
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"sequences {empty} have an empty completion (no masked-in token after the first)")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    per_token = torch.zeros(mask.shape, dtype=dtype, device=logits.device)
    per_token = per_token.masked_scatter(mask, token_logps(logits[mask], targets[mask]))
    total = per_token.sum(dim=1)
    return total / mask.sum(dim=1) if average else total


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
    return completion_logps(logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:], average)
