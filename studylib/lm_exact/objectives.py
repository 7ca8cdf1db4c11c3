"""Training objectives over the policy's table of log-probs (prompts x candidates): the registry's losses, fed the
rows each declares it needs, and the floor's forward KL.

Every objective maps ``log pi_theta`` (C, K) to ``(loss, metrics)`` over the whole data set (full batch). What a
loss receives follows from its declarations (``studylib.losses.base.Loss``), as in the toy and the LM trainer:

- ``kind == "unpaired"``: rows ``(x, y, label)``; paired data enter through their unpaired view (every winner a
  preferred row, every loser a non-preferred one). ``mismatched_pairs`` (KTO's ``z0``): each prompt with the
  previous row's completion, TRL's shift by one.
- ``kind == "paired"``: ``(x, winner, loser)``; with ``needs_reward_model`` (distillation) every unordered pair of
  candidates of every training prompt, with reward margins ``R(a) - R(b)`` (the toy's ``fit_distill`` pairs).
- ``kind == "on_policy"`` (reverse KL, RLHF): the loss's own exact objective ``loss.exact`` over all K candidates,
  averaged over prompts: with K candidates the expectation under ``pi_theta`` needs no samples.
- a KL term ``beta KL(pi || pi_ref)`` (``kl_coefficient > 0``) is computed exactly over the candidates.

The floor is ``KL(target || pi_theta) = sum_y target log(target / pi_theta)``, averaged over prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from studylib.losses import Loss
from studylib.toy.fit import table_kl
from studylib.toy.problems import TabularProblem, unpaired_view

LossFn = Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class Objective:
    """``fn(log_pi) -> (loss, metrics)``; ``cells`` (C, K) marks the (prompt, candidate) cells the data touch."""

    fn: LossFn
    cells: Tensor

    def __call__(self, log_pi: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.fn(log_pi)


def _flat(K: int, x: np.ndarray, y: np.ndarray | Tensor) -> Tensor:
    """Flat indices ``x K + y`` of (prompt, candidate) cells: ``table.reshape(-1).take(flat)`` gathers one value per
    row (faster than two-index gathers, forward and backward)."""
    return torch.as_tensor(np.asarray(x), dtype=torch.long) * K + torch.as_tensor(np.asarray(y), dtype=torch.long)


def _take(table: Tensor, flat: Tensor) -> Tensor:
    return table.reshape(-1).take(flat)


def _cells(shape: tuple[int, int], *flats: Tensor) -> Tensor:
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    for flat in flats:
        mask[flat] = True
    return mask.view(shape)


def _with_kl(loss: Loss, log_ref: Tensor, inputs: Callable[[Tensor], dict]) -> Callable[[Tensor], dict]:
    if loss.kl_coefficient == 0:
        return inputs
    return lambda lp: inputs(lp) | {"kl_penalty": table_kl(lp, log_ref).mean()}


def loss_objective(
    loss: Loss,
    problem: TabularProblem,
    rows: dict[str, np.ndarray],
    log_ref: Tensor,
    rewards: Tensor | None = None,
) -> Objective:
    """The registry ``loss`` on the data set ``rows`` of ``problem``'s prompts; ``rewards`` (C, K) where the loss
    ``needs_reward_model``."""
    shape = tuple(log_ref.shape)
    if loss.needs_reward_model and rewards is None:
        raise ValueError(f"loss {loss.name!r} needs a reward table (rewards=...)")
    K = shape[1]
    if loss.kind == "unpaired":
        view = unpaired_view(rows) if problem.kind == "paired" else rows
        flat = _flat(K, view["context"], view["item"])
        shifted = _flat(K, view["context"], np.roll(view["item"], 1))  # each prompt with the previous row's answer
        labels, ref_rows, ref_shifted = torch.as_tensor(view["label"]), _take(log_ref, flat), _take(log_ref, shifted)

        def inputs(lp: Tensor) -> dict:
            out = {"policy_logps": _take(lp, flat), "reference_logps": ref_rows, "labels": labels}
            if loss.mismatched_pairs:
                out |= {"policy_kl_logps": _take(lp, shifted), "reference_kl_logps": ref_shifted}
            return out

        cells = _cells(shape, flat)
    elif loss.kind == "paired" and loss.needs_reward_model:
        a, b = torch.triu_indices(K, K, offset=1)
        x = np.repeat(np.arange(shape[0]), len(a))
        first, second = _flat(K, x, a.repeat(shape[0])), _flat(K, x, b.repeat(shape[0]))
        margins = _take(rewards, first) - _take(rewards, second)

        def inputs(lp: Tensor) -> dict:
            return {
                "policy_chosen_logps": _take(lp, first),
                "policy_rejected_logps": _take(lp, second),
                "reward_margins": margins,
            }

        cells = torch.ones(shape, dtype=torch.bool)
    elif loss.kind == "paired":
        chosen, rejected = _flat(K, rows["context"], rows["winner"]), _flat(K, rows["context"], rows["loser"])
        ref_chosen, ref_rejected = _take(log_ref, chosen), _take(log_ref, rejected)

        def inputs(lp: Tensor) -> dict:
            return {
                "policy_chosen_logps": _take(lp, chosen),
                "policy_rejected_logps": _take(lp, rejected),
                "reference_chosen_logps": ref_chosen,
                "reference_rejected_logps": ref_rejected,
            }

        cells = _cells(shape, chosen, rejected)
    elif loss.kind == "on_policy":
        return Objective(lambda lp: (loss.exact(lp, log_ref, rewards) / shape[0], {}), torch.ones(shape, dtype=bool))
    else:
        raise ValueError(f"loss {loss.name!r} has kind {loss.kind!r}, which the answer-set study does not train")
    full = _with_kl(loss, log_ref, inputs)
    return Objective(lambda lp: loss(**full(lp)), cells)


def floor_objective(target: np.ndarray) -> Objective:
    """``KL(target || pi_theta)`` averaged over prompts: the floor, fitted to the exact target."""
    t = torch.as_tensor(target, dtype=torch.float64)
    log_t = torch.where(t > 0, t, torch.ones_like(t)).log()
    return Objective(lambda lp: ((t * (log_t - lp)).sum(-1).mean(), {}), t > 0)
