"""The answer-set policy: the LM's next-token distribution at the answer position, restricted to K candidates.

    pi_theta(y | x) = softmax_{y in Y(x)}  W_head[y] . norm(base(x) + s B A m(x))

with ``base`` and ``m`` cached (``features.py``) and a LoRA update ``s B A`` of the last block's ``down_proj``
(Hu et al., 2021), initialised as peft initialises LoRA: ``A`` Kaiming-uniform (a = sqrt 5), ``B = 0``, so the
policy starts exactly at the reference ``pi_ref`` (the same formula with ``B = 0``, i.e. the frozen model). The
logits are float32; log-probabilities are taken in float64, so KLs and log-ratios ``T`` carry no float32 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from studylib.lm_exact.features import AnswerFeatures


def candidate_log_probs(features: AnswerFeatures, delta: Tensor | None = None) -> Tensor:
    """``log softmax`` over each prompt's candidates (C, K), float64; ``delta`` (C, d) is added before the norm."""
    hidden = features.base if delta is None else features.base + delta
    logits = torch.einsum("cd,ckd->ck", features.norm(hidden), features.head)
    return torch.log_softmax(logits.double(), dim=-1)


def reference_log_probs(features: AnswerFeatures) -> Tensor:
    """``log pi_ref(y | x)`` (C, K): the frozen model, no adapter."""
    with torch.no_grad():
        return candidate_log_probs(features)


class AnswerSetPolicy(nn.Module):
    """A rank-``r`` LoRA adapter on the last ``down_proj`` (``in_features -> out_features``); ``forward`` gives the
    restricted log-probs (C, K) of the prompts in ``features``. ``alpha`` defaults to ``2 r`` (the project's LoRA
    default), so ``s = alpha / r = 2``; ``seed`` draws ``A``."""

    def __init__(self, in_features: int, out_features: int, r: int = 16, alpha: float | None = None, seed: int = 0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.scaling = (2 * r if alpha is None else alpha) / r
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
        self.lora_A = nn.Parameter((torch.rand(r, in_features, generator=generator) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))

    @classmethod
    def for_features(cls, features: AnswerFeatures, r: int = 16, seed: int = 0) -> AnswerSetPolicy:
        """A policy sized for ``features``."""
        return cls(features.hidden.shape[1], features.base.shape[1], r=r, seed=seed)

    def delta(self, features: AnswerFeatures) -> Tensor:
        """``s B A m(x)`` (C, d)."""
        return self.scaling * (features.hidden @ self.lora_A.T) @ self.lora_B.T

    def forward(self, features: AnswerFeatures) -> Tensor:
        return candidate_log_probs(features, self.delta(features))

    def merged_down_weight(self, weight: Tensor) -> Tensor:
        """``W_down + s B A``: the adapter merged into a down-projection weight (brute-force checks)."""
        return weight + self.scaling * (self.lora_B @ self.lora_A).to(weight)
