"""The reference policy ``pi_ref``: one access point for its log-probs, whatever holds it.

Two strategies, chosen once per run:

- under LoRA, the policy itself with its adapters disabled (nothing copied);
- under full fine-tuning, a separate frozen copy of the starting model (``frozen_copy``).

A policy wrapped for several processes (``DistributedDataParallel``, DeepSpeed, ...) is unwrapped first: the
wrapper hides peft's ``disable_adapter``, and calling through it would make the "reference" the policy
itself. The reference's forward then bypasses the wrapper, which is right: it runs without gradients, so there
is nothing for the wrapper to synchronise (``tests/test_lm_distributed.py`` checks that it is the base model under
DDP). (The third strategy, log-probs computed once before training, is ``trainer.attach_reference_logps``,
which computes them through this class.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from studylib.lm.batching import model_logps, unwrap
from studylib.lm.config import RunConfig, TrainConfig
from studylib.lm.lora import add_lora, has_adapters


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
    model: nn.Module,
    config: TrainConfig,
    needs_reference: bool,
    reference_model: nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Reference | None]:
    """The trainable policy and its reference, as both trainers set them up, both on ``device`` (the run's
    ``Runtime.device``).

    Seeds torch with ``config.seed`` (LoRA's initial weights); under LoRA the policy is ``model`` with fresh
    adapters and the reference is the policy with them disabled; under full fine-tuning the policy is ``model``
    itself and the reference ``reference_model`` (a frozen copy of ``model`` if None). ``needs_reference``
    False (a reference-free loss): no reference at all, and no copy.

    ``config.bf16``: under LoRA the frozen base is held in bfloat16 and peft keeps the adapters in float32;
    under full fine-tuning the policy and its reference are float32 (a bf16 checkpoint is cast up: its
    updates would otherwise round away, and a reference of the policy's own dtype makes T = 0 exactly at the
    start); either way the forward passes run under bf16 autocast (``autocast_context``). Log-probs and losses
    are accumulated in float32.
    """
    torch.manual_seed(config.seed)
    if config.use_lora:
        reference_model = None
        model = model.to(device, torch.bfloat16) if config.bf16 else model.to(device)
        model = add_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    else:
        model = model.to(device, torch.float32)
        if needs_reference and reference_model is None:
            reference_model = frozen_copy(model)
        if reference_model is not None:
            reference_model = reference_model.to(device, torch.float32)
    return model, (Reference(model, reference_model) if needs_reference else None)


def adapter_input_casting_off(model: nn.Module) -> AbstractContextManager:
    """peft's casting of each adapted layer's input to the adapter's dtype, switched off (for use under autocast).

    peft casts each adapted layer's input to the adapter's dtype (float32) before the adapter; under autocast the
    adapter's matmul then casts it back to bf16. Off, the adapter gets the bf16 input directly: no float32 copy
    of every adapted layer's input (computed, and kept for the backward pass).
    """
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(unwrap(model))


def autocast_context(model: nn.Module, config: TrainConfig, device: torch.device | str) -> AbstractContextManager:
    """For a bf16 run: bf16 autocast on ``device`` (the run's; float32 trained weights, bf16 matmuls) with
    ``adapter_input_casting_off``; otherwise nothing. (The offline trainer gets the same from
    ``AlignmentTrainer.compute_loss_context_manager``.)
    """
    if not config.bf16:
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(torch.autocast(torch.device(device).type, dtype=torch.bfloat16))
    stack.enter_context(adapter_input_casting_off(model))
    return stack


def separate_reference(config: RunConfig, model: nn.Module) -> nn.Module | None:
    """The frozen reference a full fine-tuning run trains and evaluates against (None under LoRA, whose reference is
    the policy with its adapters disabled). Made before training, which changes ``model`` in place."""
    return None if config.train.use_lora else frozen_copy(model)
