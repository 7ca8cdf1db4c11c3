"""Unpaired baselines: KTO and BCO, as TRL implements them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from studylib.losses.base import (
    Loss,
    LossOutput,
    as_bool_labels,
    check_non_negative,
    check_positive,
    check_tensors,
    unpaired_metrics,
)


class KTO(Loss):
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024), as TRL's ``KTOTrainer.kto_loss``.

    With ``T = log pi - log pi_ref`` and the reference point
    ``z0 = max(0, mean over mismatched pairs (x, y') of T)``, detached::

        +:  lam_D (1 - sigmoid(beta (T - z0)))
        -:  lam_U (1 - sigmoid(beta (z0 - T)))

    averaged over all rows (TRL's flat mean). The mismatched pairs pair each prompt with another row's
    completion (the offline trainer fixes them once, a seeded cycle through the rows, as TRL fixes its KL
    pairs). Pass their log-probs as ``policy_kl_logps`` / ``reference_kl_logps``; without them ``z0 = 0``.
    ``z0`` is the mean over every mismatched pair passed: under several processes the trainers pass the
    whole micro-batch, all processes' rows (``studylib.lm.batching.gather_rows``), so it is their sum over
    their count, not TRL's mean of per-process means. Converges to a prospect-theory utility optimum, not
    to ``p+``.
    """

    name = "kto"
    kind = "unpaired"
    mismatched_pairs = True

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        self.beta = check_positive("beta", beta)
        self.desirable_weight = check_non_negative("desirable_weight", desirable_weight)
        self.undesirable_weight = check_non_negative("undesirable_weight", undesirable_weight)
        if self.desirable_weight == self.undesirable_weight == 0:
            raise ValueError("desirable_weight and undesirable_weight are both 0: the loss would be 0 for every row")

    def __call__(
        self,
        policy_logps: Tensor,
        reference_logps: Tensor,
        labels: Tensor,
        policy_kl_logps: Tensor | None = None,
        reference_kl_logps: Tensor | None = None,
        **unused: Tensor,
    ) -> LossOutput:
        check_tensors(policy_logps=policy_logps, reference_logps=reference_logps, labels=labels)
        if (policy_kl_logps is None) != (reference_kl_logps is None):
            raise ValueError("pass both policy_kl_logps and reference_kl_logps, or neither")
        labels = as_bool_labels(labels)
        if policy_kl_logps is None:
            kl = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
        else:
            check_tensors(policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
            kl = (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()
        logratios = policy_logps - reference_logps
        chosen = self.desirable_weight * (1 - torch.sigmoid(self.beta * (logratios - kl)))
        rejected = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - logratios)))
        loss = torch.where(labels, chosen, rejected).mean()
        metrics = unpaired_metrics(self.beta * logratios, policy_logps, labels)
        metrics["kl"] = kl
        metrics["ratio/max"] = logratios.detach().max().exp()
        return loss, metrics


class BCO(Loss):
    """Binary Classifier Optimization (Jung et al., 2024), as TRL's ``BCOTrainer.bco_loss`` (no UDM).

    A logistic classifier on the implied reward ``beta T`` with a running-mean offset ``delta``::

        +:  -log sigmoid(beta T - delta)
        -:  -log sigmoid(-(beta T - delta))

    ``delta`` is the running mean of every ``beta T`` seen so far, updated (detached) with each batch
    before the loss is computed, as TRL does (under several processes each gets the whole micro-batch, so
    each keeps the one-process mean). Averaged over all rows. The running sums are the loss's ``state_dict``:
    both trainers save them with every checkpoint, so a resumed run keeps the mean.
    """

    name = "bco"
    kind = "unpaired"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_positive("beta", beta)
        self._reward_sum = 0.0
        self._reward_count = 0

    def state_dict(self) -> dict[str, float]:
        return {"reward_sum": self._reward_sum, "reward_count": self._reward_count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._reward_sum, self._reward_count = float(state["reward_sum"]), int(state["reward_count"])

    @property
    def delta(self) -> float:
        """The running mean of the implied rewards seen so far (0 before any batch)."""
        return self._reward_sum / self._reward_count if self._reward_count else 0.0

    def __call__(self, policy_logps: Tensor, reference_logps: Tensor, labels: Tensor, **unused: Tensor) -> LossOutput:
        check_tensors(policy_logps=policy_logps, reference_logps=reference_logps, labels=labels)
        labels = as_bool_labels(labels)
        rewards = self.beta * (policy_logps - reference_logps)
        self._reward_sum += float(rewards.detach().sum())
        self._reward_count += rewards.numel()
        delta = self.delta
        losses = torch.where(labels, -F.logsigmoid(rewards - delta), -F.logsigmoid(-(rewards - delta)))
        metrics = unpaired_metrics(rewards, policy_logps, labels)
        metrics["delta"] = torch.tensor(delta)
        return losses.mean(), metrics
