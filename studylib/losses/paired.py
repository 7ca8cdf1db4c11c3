"""Paired losses: DPO and SimPO (baselines), preference MLE and preference distillation (paper 3).

Each takes per-sequence log-probs of the chosen (winner) and rejected (loser) completion of every pair.
Paper 3's objectives may add ``beta KL(pi || pi_0)``: that term needs samples from the policy (LM) or
the whole table (toy), so the caller computes a differentiable estimate and passes it as
``kl_penalty``; the loss adds ``beta * kl_penalty``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from studylib.losses.base import (
    Loss,
    LossOutput,
    Metrics,
    check_non_negative,
    check_positive,
    check_tensors,
    paired_metrics,
)


def _add_kl(loss: Tensor, metrics: dict, beta: float, kl_penalty: Tensor | None, name: str) -> Tensor:
    if beta == 0.0:
        return loss
    if kl_penalty is None:
        raise ValueError(f"{name} has beta={beta} > 0: pass kl_penalty, an estimate of KL(pi || pi_0)")
    metrics["kl"] = kl_penalty.detach()
    return loss + beta * kl_penalty


def _gamma_metrics(
    gamma: float, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None
) -> dict:
    """TRL's pair metrics with rewards ``gamma * (log pi - log pi_ref)`` (``gamma * log pi`` without a reference)."""
    chosen_rewards = gamma * (policy_chosen - (0.0 if ref_chosen is None else ref_chosen))
    rejected_rewards = gamma * (policy_rejected - (0.0 if ref_rejected is None else ref_rejected))
    return paired_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)


class DPO(Loss):
    """Direct Preference Optimization (Rafailov et al., 2023), TRL's ``sigmoid`` loss.

    ``loss = -log sigmoid(beta ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))``

    Converges to ``pi_ref exp(r/beta)`` only if preferences follow a Bradley-Terry model with reward r.
    """

    name = "dpo"
    kind = "paired"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_positive("beta", beta)

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor,
        **unused: Tensor,
    ) -> LossOutput:
        check_tensors(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            reference_chosen_logps=reference_chosen_logps,
            reference_rejected_logps=reference_rejected_logps,
        )
        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps)
        rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps)
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
        return loss, paired_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)


class SimPO(Loss):
    """Simple Preference Optimization (Meng, Xia and Chen, 2024), TRL's ``CPOTrainer`` with ``loss_type="simpo"``.

    ``loss = -log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)``

    with ``avg log pi(y) = log pi(y|x) / |y|`` (the mean over completion tokens: ``length_normalized``) and a
    target margin ``gamma``. Reference-free: no reference log-probs are computed for it. Like DPO it fits a
    Bradley-Terry model (here on length-normalised log-probs), so it has no consistency guarantee under
    intransitive preferences. Defaults: beta 2.0, gamma 1.0 (gamma / beta = 0.5, the SimPO repository's
    Llama-3-8B setting).
    """

    name = "simpo"
    kind = "paired"
    uses_reference = False
    length_normalized = True

    def __init__(self, beta: float = 2.0, gamma: float = 1.0) -> None:
        self.beta = check_positive("beta", beta)
        self.gamma = check_non_negative("gamma", gamma)

    def __call__(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, **unused: Tensor) -> LossOutput:
        """Reference-free: reference log-probs, if a caller passes them (by keyword), are not read."""
        check_tensors(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
        chosen_rewards = self.beta * policy_chosen_logps
        rejected_rewards = self.beta * policy_rejected_logps
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma).mean()
        return loss, paired_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)


class _ScaledMarginLoss(Loss):
    """What PMLE and preference distillation share (paper 3): a data term on the policy's scaled log-prob margin
    ``z = gamma (log pi(y_w) - log pi(y_l))`` (no reference), ``gamma``-scaled reward metrics, and an added
    ``beta KL(pi || pi_0)`` estimated from policy samples (``kl_penalty``). A subclass gives ``data_loss``."""

    kind = "paired"
    uses_reference = False

    def __init__(self, gamma: float, beta: float) -> None:
        self.gamma = check_positive("gamma", gamma)
        self.beta = check_non_negative("beta", beta)

    @property
    def kl_coefficient(self) -> float:
        return self.beta

    def data_loss(self, logits: Tensor, reward_margins: Tensor | None) -> tuple[Tensor, Metrics]:
        """The data term's mean over pairs from ``z`` (``logits``), and any metrics of its own."""
        raise NotImplementedError

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor | None = None,
        reference_rejected_logps: Tensor | None = None,
        reward_margins: Tensor | None = None,
        kl_penalty: Tensor | None = None,
        **unused: Tensor,
    ) -> LossOutput:
        check_tensors(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            reward_margins=reward_margins,
            reference_chosen_logps=reference_chosen_logps,
            reference_rejected_logps=reference_rejected_logps,
        )
        loss, extra = self.data_loss(self.gamma * (policy_chosen_logps - policy_rejected_logps), reward_margins)
        metrics = _gamma_metrics(
            self.gamma, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        )
        metrics |= extra
        return _add_kl(loss, metrics, self.beta, kl_penalty, self.name), metrics


class PMLE(_ScaledMarginLoss):
    """Preference maximum likelihood (Yun et al., "Alignment as Distribution Learning", v2; read).

    ``loss = -log sigmoid(gamma (log pi(y_w) - log pi(y_l))) + beta KL(pi || pi_0)``

    The MLE of the preference model ``P(a > b) = sigmoid(gamma log pi*(a)/pi*(b))``; converges to
    ``pi*``. No reference enters the data term; ``rewards/*`` metrics use the reference log-probs when
    given (``gamma`` times the log-ratio), else the policy log-probs. Paper settings: gamma 5e-3,
    beta 0 (chat).
    """

    name = "pmle"

    def __init__(self, gamma: float = 5e-3, beta: float = 0.0) -> None:
        super().__init__(gamma, beta)

    def data_loss(self, logits: Tensor, reward_margins: Tensor | None) -> tuple[Tensor, Metrics]:
        return -F.logsigmoid(logits).mean(), {}


class PreferenceDistillation(_ScaledMarginLoss):
    """Preference distillation (Yun et al., "Alignment as Distribution Learning", v2; read).

    A reward model ``R`` fit by Bradley-Terry log-loss gives soft labels ``p = sigmoid(R(y1) - R(y2))``;
    the policy is fit by soft-label binary cross-entropy on ``z = gamma (log pi(y1) - log pi(y2))``::

        loss = -[p log sigmoid(z) + (1 - p) log sigmoid(-z)] + beta KL(pi || pi_0)

    Pass ``reward_margins = R(y1) - R(y2)`` (chosen first). Pairs may be data-set pairs (offline) or
    fresh samples from the policy (online, as the paper does). Converges to ``pi*``.
    Defaults: gamma 0.1, beta 0.05.
    """

    name = "distill"
    needs_reward_model = True

    def __init__(self, gamma: float = 0.1, beta: float = 0.05) -> None:
        super().__init__(gamma, beta)

    def data_loss(self, logits: Tensor, reward_margins: Tensor | None) -> tuple[Tensor, Metrics]:
        if reward_margins is None:
            raise ValueError("distill needs reward_margins = R(y1) - R(y2) from a reward model (keyword argument)")
        target = torch.sigmoid(reward_margins.detach())
        loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return loss, {"targets/mean": target.mean()}
