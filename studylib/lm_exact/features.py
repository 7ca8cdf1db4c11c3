"""One frozen forward pass: everything below the trainable adapter, at the answer position, computed once.

The policy trains a LoRA adapter on the last decoder block's MLP down-projection only (``policy.py``). At the
answer position (the prompt's last token, whose next-token logits score the candidates) the causal LM computes::

    m(x)  = act(W_gate n(r)) * (W_up n(r))          input of the last block's down_proj (frozen)
    h(x)  = r(x) + (W_down + s B A) m(x)            the block's output; r(x): residual after its attention
    logit = W_head[y] . norm(h(x))                  for each candidate y

Nothing below ``down_proj`` changes when the adapter trains (the adapter acts at every position, but in the last
block a position's output feeds no other position), so ``m(x)`` and ``base(x) = r(x) + W_down m(x)`` are cached from
one forward pass with hooks, and the policy is the LM with that LoRA, exactly. ``bf16`` runs this pass under bfloat16
autocast (about 2x faster on a CPU with AVX-512 BF16); the cached tensors are stored in float32 and ``base`` is
recomputed from ``m`` in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class AnswerFeatures:
    """Frozen features of C prompts at the answer position, and the frozen modules above the adapter.

    ``hidden`` (C, I): ``m(x)``; ``base`` (C, d): ``r(x) + W_down m(x)``; ``head`` (C, K, d): the LM head's rows of
    each prompt's candidates; ``norm``: a frozen copy of the model's final norm.
    """

    hidden: Tensor
    base: Tensor
    head: Tensor
    norm: nn.Module

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def subset(self, index: Sequence[int] | Tensor) -> AnswerFeatures:
        """The features of the prompts ``index``."""
        index = torch.as_tensor(index, dtype=torch.long)
        return AnswerFeatures(self.hidden[index], self.base[index], self.head[index], self.norm)


def load_answer_model(name: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``"tiny"``: the offline tiny Llama of ``studylib.lm.tiny`` (tests, smoke); otherwise ``load_model(name)``."""
    if name == "tiny":
        from studylib.lm.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_model(tokenizer, seed=seed), tokenizer
    from studylib.lm.models import load_model

    return load_model(name)


def last_block(model: PreTrainedModel) -> nn.Module:
    """The last decoder block (Llama / Qwen2 layout: ``model.model.layers[-1]``)."""
    return model.get_decoder().layers[-1]


@torch.no_grad()
def answer_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidate_ids: Sequence[Sequence[int]],
    bf16: bool = False,
    batch_size: int = 64,
) -> AnswerFeatures:
    """Cache ``m(x)`` and ``base(x)`` at each prompt's last token (right-padded batches, sorted by length)."""
    block, captured = last_block(model), {}
    down = block.mlp.down_proj
    hooks = [
        down.register_forward_pre_hook(lambda _, args: captured.__setitem__("m", args[0])),
        block.post_attention_layernorm.register_forward_pre_hook(lambda _, args: captured.__setitem__("r", args[0])),
    ]
    encoded = [tokenizer.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    hidden = torch.zeros(len(prompts), down.in_features)
    residual = torch.zeros(len(prompts), down.out_features)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            last = torch.tensor([len(encoded[i]) - 1 for i in rows])
            ids = torch.full((len(rows), int(last.max()) + 1), pad)
            for j, i in enumerate(rows):
                ids[j, : len(encoded[i])] = torch.tensor(encoded[i])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model.get_decoder()(input_ids=ids, attention_mask=(torch.arange(ids.shape[1]) <= last[:, None]).long())
            at = torch.arange(len(rows))
            hidden[rows] = captured["m"][at, last].float()
            residual[rows] = captured["r"][at, last].float()
    finally:
        for hook in hooks:
            hook.remove()
    base = residual + copy.deepcopy(down).float()(hidden)
    head = model.get_output_embeddings().weight.detach().float()[torch.as_tensor(candidate_ids)]
    norm = copy.deepcopy(model.get_decoder().norm).float().requires_grad_(False)
    return AnswerFeatures(hidden, base, head, norm)


def prompt_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    categories: Sequence[str],
    ids: Mapping[str, Sequence[int]],
    bf16: bool = False,
) -> AnswerFeatures:
    """``answer_features`` with each prompt's candidates those of its category."""
    return answer_features(model, tokenizer, prompts, [ids[c] for c in categories], bf16=bf16)
