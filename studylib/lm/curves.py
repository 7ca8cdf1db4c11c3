"""Evaluation during training: every ``curve_every`` steps, approval and ``KL(p+ || pi)`` on fixed prompts.

A loss curve says whether the optimiser makes progress on its own objective; these points say whether that
progress moves the policy toward its target. ``CurveProbe`` holds two fixed prompt sets (``curve_prompts``
validation prompts and as many training prompts), each with reference samples judged once
(``studylib.lm.target.TargetProbe``); at each point it samples the policy on them (the same seed every time, so
two points differ by the policy, not the draw) and scores the reference samples. The points join the run's
per-step log as ``curve/approval``, ``curve/kl_to_target``, ``curve/train_approval``, ... (with ``_low`` /
``_high`` interval ends), so ``curves.csv`` and the run's figure carry them. Both trainers call it: the offline
trainer through ``CurveCallback``, the on-policy trainer after its step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import TrainerCallback

from studylib.lm.batching import unwrap
from studylib.lm.reference import autocast_context
from studylib.lm.target import TargetProbe

if TYPE_CHECKING:
    from torch import nn

    from studylib.lm.annotators import AnnotatorPool
    from studylib.lm.config import RunConfig
    from studylib.lm.preferences import PreferenceData
    from studylib.lm.runtime import Runtime

PREFIX = "curve/"


class CurveProbe:
    """Measures a policy on the run's fixed validation and training prompts (``measure``), every ``every`` steps."""

    def __init__(
        self,
        config: RunConfig,
        policy: nn.Module,
        tokenizer,
        data: PreferenceData,
        pool: AnnotatorPool,
        reference: nn.Module | None,
        runtime: Runtime,
    ) -> None:
        self.every, self.samples_per_prompt = config.eval.curve_every, config.eval.eval_samples_per_prompt
        self.train_config, self.device = runtime.resolve(config.train), runtime.device
        from studylib.lm.evaluate import derived_seed

        reference_seed, self.policy_seed = derived_seed(config.train.seed, 3), derived_seed(config.train.seed, 4)
        n = config.eval.curve_prompts
        knobs = {
            "reference": reference if reference is not None else policy,  # before training the policy is pi_ref
            "samples_per_prompt": max(config.eval.target_samples_per_prompt, self.samples_per_prompt),
            "max_new_tokens": config.eval.eval_max_new_tokens,
            "seed": reference_seed,
            "batch_size": config.train.generation_batch_size,
            "device": runtime.device,
        }
        with autocast_context(policy, self.train_config, self.device):
            self.probes = {
                "": TargetProbe(policy, tokenizer, data.validation_prompts[:n], pool, **knobs),
                "train_": TargetProbe(policy, tokenizer, data.train_prompts[:n], pool, **knobs),
            }

    def due(self, step: int) -> bool:
        """Whether ``step`` is a curve point."""
        return self.every > 0 and step % self.every == 0

    def measure(self, policy: nn.Module, step: int) -> dict[str, float]:
        """``{"step": step, "curve/approval": ..., "curve/kl_to_target": ..., "curve/train_approval": ...}``."""
        entry: dict[str, float] = {"step": step}
        with autocast_context(policy, self.train_config, self.device):
            for prefix, probe in self.probes.items():
                entry |= probe.approval(policy, self.samples_per_prompt, self.policy_seed, PREFIX + prefix)
                entry |= probe.kl(policy, prefix=PREFIX + prefix)
        return entry


def curve_probe_for(
    config: RunConfig,
    policy: nn.Module,
    tokenizer,
    data: PreferenceData,
    pool: AnnotatorPool,
    reference: nn.Module | None,
    runtime: Runtime,
) -> CurveProbe | None:
    """The run's ``CurveProbe``, built before training (its reference samples are the untrained policy's), or None
    when ``curve_every`` is 0 or this process is not the main one (only the main process measures)."""
    if config.eval.curve_every == 0 or not runtime.is_main_process:
        return None
    return CurveProbe(config, policy, tokenizer, data, pool, reference, runtime)


class CurveCallback(TrainerCallback):
    """The offline trainer's hook: a curve point joins ``state.log_history`` (saved in every checkpoint, so a
    resumed run keeps its earlier points) at each step the probe names."""

    def __init__(self, probe: CurveProbe) -> None:
        self.probe = probe

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and self.probe.due(state.global_step):
            # the main process alone (the others wait for it at their next step); outside any distributed wrapper
            state.log_history.append(self.probe.measure(unwrap(model), state.global_step))
