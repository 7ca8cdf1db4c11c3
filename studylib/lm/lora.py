"""LoRA adapters (peft): the one helper that adds them, for the policy and the reward model alike."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every attention and MLP projection of Llama / Qwen2-style models; names absent from a model are skipped."""


def add_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = LORA_TARGETS,
    task_type: str | None = "CAUSAL_LM",
    seed: int | None = None,
) -> nn.Module:
    """``model`` wrapped with fresh LoRA adapters on the ``target_modules`` it has (``alpha`` defaults to ``2 r``).

    ``seed``: the adapters' initial weights are drawn under this seed with the caller's random state left as it
    was; None draws from the current torch random state. ``task_type`` None for a bare backbone (no LM head). Its
    ``save_pretrained`` saves the adapters without the base model's embeddings, so it never looks up the hub.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"lora_r must be >= 1, got {r}")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in target_modules if m in present]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {list(target_modules)} exist in the model")
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type=task_type,
    )
    if seed is None:
        wrapped = get_peft_model(model, config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrapped = get_peft_model(model, config)
    # peft's save_pretrained asks the hub whether the base model's vocabulary was resized (save_embedding_layers
    # "auto"), trying the network and warning on every saved run; a run never resizes it: save the adapters alone
    wrapped.save_pretrained = functools.partial(wrapped.save_pretrained, save_embedding_layers=False)
    return wrapped


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model whose adapters can be disabled."""
    return hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None))
