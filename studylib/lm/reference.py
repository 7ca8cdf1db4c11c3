"""The reference policy ``pi_ref``: one access point for its log-probs, whatever holds it.

Two strategies, chosen once per run:

- under LoRA, the policy itself with its adapters disabled (nothing copied);
- under full fine-tuning, a separate frozen copy of the starting model (``frozen_copy``).

A policy wrapped for several processes (``DistributedDataParallel``, DeepSpeed, ...) is unwrapped first: the
wrapper hides peft's ``disable_adapter``, and calling through it would make the "reference" the policy
itself. (The third strategy, log-probs computed once before training, is ``trainer.attach_reference_logps``,
which computes them through this class.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from studylib.lm.batching import model_logps
from studylib.lm.config import TrainConfig
from studylib.lm.lora import add_lora, has_adapters


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any distributed or compiled wrapper (``module`` / ``_orig_mod`` attributes)."""
    while True:
        inner = model.__dict__.get("_modules", {}).get("module") or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen: a separate reference."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class Reference:
    """``pi_ref`` for a policy: ``model`` (a separate frozen reference) or, if None, the policy's adapters disabled."""

    def __init__(self, policy: nn.Module, model: nn.Module | None = None) -> None:
        if model is None and not has_adapters(unwrap(policy)):
            raise ValueError(
                "no reference: the policy has no LoRA adapters to disable; pass a separate frozen reference model"
            )
        self.policy, self.model = policy, model

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Within this context, the yielded module computes ``pi_ref`` (sample from it, or score with it)."""
        if self.model is not None:
            yield self.model
            return
        policy = unwrap(self.policy)
        with policy.disable_adapter():
            yield policy

    @torch.no_grad()
    def logps(self, batch: dict[str, Tensor], average: bool = False) -> Tensor:
        """Reference log-probs of a padded batch (no gradients)."""
        with self.active() as reference:
            return model_logps(reference, batch, average)


def policy_and_reference(
    model: nn.Module, config: TrainConfig, needs_reference: bool, reference_model: nn.Module | None = None
) -> tuple[nn.Module, Reference | None]:
    """The trainable policy and its reference, as both trainers set them up.

    Seeds torch with ``config.seed`` (LoRA's initial weights); under LoRA the policy is ``model`` with fresh
    adapters and the reference is the policy with them disabled; under full fine-tuning the policy is ``model``
    itself and the reference ``reference_model`` (a frozen copy of ``model`` if None). ``needs_reference``
    False (a reference-free loss): no reference at all, and no copy.
    """
    torch.manual_seed(config.seed)
    if config.use_lora:
        reference_model = None
        model = add_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    elif needs_reference and reference_model is None:
        reference_model = frozen_copy(model)
    return model, (Reference(model, reference_model) if needs_reference else None)
