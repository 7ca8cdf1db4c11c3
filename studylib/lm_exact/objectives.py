"""Training objectives over the policy's table of log-probs (prompts x candidates): the registry's losses on a data
set given as counts of its distinct cells, the population risk (the infinite-data limit), and the floor.

**A data set is its cell counts** (``DataCells``): a data set of n rows has few distinct cells, (prompt, winner,
loser) for pairs or (prompt, candidate, label) for labelled rows, and every loss the study trains is a mean of
per-row terms once its batch statistics are fixed (the preferred fraction, KTO's detached ``z0``). So the full-batch
objective on n rows is ``L_n = sum_c (count_c / n) l_c(u_c)``, with ``u_c`` the cell's log-probs. The same formula
with ``count_c / n`` replaced by the cell's probability is the **population risk**: training on it with the same
optimiser gives the method's infinite-data limit. Sampled sets have integer counts (``sample_cells``), the population
has expected ones (``population_cells``).

**One call on the distinct cells.** The registry loss is called once on the M distinct cells (one row each), which
gives ``dL_cells/du_c = l_c'(u_c) / M``; the objective's gradient is then that of the surrogate
``sum_c (count_c / n) M dL_cells/du_c u_c`` (the derivatives held fixed), exactly, at a cost that does not grow
with n (the toy's solver uses the same per-cell derivatives: ``studylib.toy.fit``). The objective's *value* on a
sampled set is the registry loss on its n rows (``Objective.value``, no gradient); the population risk's value is
not computed (its cells have no integer multiplicity).

What a loss receives is its family's (``studylib.families``: ``cell_rows``), as in the toy and the LM trainers:

- unpaired: rows ``(x, y, label)``; paired data enter through their unpaired view (every winner a
  preferred row, every loser a non-preferred one). ``mismatched_pairs`` (KTO's ``z0``): each prompt with the
  previous row's completion, TRL's shift by one; over the population, prompts and completions paired independently.
  The loss gets their mean log-probs as one row each, so its ``z0`` is the data set's, not the cells'.
- paired: ``(x, winner, loser)``; with ``needs_reward_model`` (distillation) every unordered pair of
  candidates of every training prompt, each once, with reward margins ``R(a) - R(b)`` (the toy's ``fit_distill``).
- on-policy (reverse KL, RLHF): the loss's own exact objective ``loss.exact`` over all K candidates,
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

from studylib.families import family_of
from studylib.lm_exact.cells import every_row, touched
from studylib.losses import Loss
from studylib.toy.fit import table_kl
from studylib.toy.problems import TabularProblem, count_cells, expected_counts, unpaired_view

LossFn = Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]
POPULATION_ROWS = 1e12
"""The population's counts are its expected counts at this n: weights are counts over their total, and the reward
model's ridge (worth one row) vanishes, as in the toy's ``population_limits``."""


@dataclass
class Objective:
    """``fn(log_pi) -> (loss, metrics)``, whose gradient is the objective's; ``value(log_pi)`` the objective itself
    (None where it is not computed); ``cells`` (C, K) marks the (prompt, candidate) cells the data touch."""

    fn: LossFn
    cells: Tensor
    value: Callable[[Tensor], float] | None = None

    def __call__(self, log_pi: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.fn(log_pi)


@dataclass(frozen=True)
class DataCells:
    """A data set on ``problem``'s prompts as counts: ``counts`` (C, K, K) ``[x, winner, loser]`` for pairs or
    (C, K, 2) ``[x, item, label]``; ``mismatched`` (C, K): the (prompt, another row's completion) cells of its
    unpaired view; ``sampled``: integer counts of drawn rows (False: the population's expected counts)."""

    counts: np.ndarray
    mismatched: np.ndarray
    sampled: bool
    paired: bool

    @property
    def labels(self) -> np.ndarray:
        """The unpaired view's counts (C, K, 2): non-preferred, preferred (every winner +, every loser -)."""
        if not self.paired:
            return self.counts
        return np.stack([self.counts.sum(-2), self.counts.sum(-1)], axis=-1)

    @property
    def preferred_fraction(self) -> float:
        """The unpaired view's fraction of preferred rows (1/2 for pairs)."""
        labels = self.labels
        return float(labels[..., 1].sum() / labels.sum())


def sample_cells(problem: TabularProblem, rows: dict[str, np.ndarray]) -> DataCells:
    """The counts of a drawn data set ``rows`` (``sample_rows``); mismatched cells as TRL pairs them: each row's
    prompt with the previous row's completion in the unpaired view."""
    view = unpaired_view(rows)
    K = problem.items
    flat = view["context"] * K + np.roll(view["item"], 1)
    mismatched = np.bincount(flat, minlength=problem.contexts * K).reshape(problem.contexts, K)
    return DataCells(count_cells(problem, rows), mismatched, sampled=True, paired=problem.kind == "paired")


def population_cells(problem: TabularProblem) -> DataCells:
    """The population: expected counts (``expected_counts`` at ``POPULATION_ROWS``), and mismatched cells with prompt
    and completion independent (each drawn from the unpaired view's marginal)."""
    counts = expected_counts(problem, POPULATION_ROWS)
    data = DataCells(counts, np.zeros(counts.shape[:2]), sampled=False, paired=problem.kind == "paired")
    joint = data.labels.sum(-1) / data.labels.sum()
    mismatched = POPULATION_ROWS * np.outer(joint.sum(1), joint.sum(0))
    return DataCells(counts, mismatched, sampled=False, paired=problem.kind == "paired")


def _surrogate(loss: Loss, inputs: dict[str, Tensor], policy_keys: tuple[str, ...], weights: Tensor) -> tuple:
    """One loss call on the distinct cells; returns ``sum_c w_c l_c'(u_c) u_c`` (the objective's gradient) and
    the call's metrics."""
    leaves = {k: inputs[k].detach().requires_grad_(True) for k in policy_keys}
    cell_loss, metrics = loss(**({k: v.detach() for k, v in inputs.items()} | leaves))
    grads = torch.autograd.grad(cell_loss, list(leaves.values()), allow_unused=True)
    M = weights.numel()
    terms = [(M * weights * g * inputs[k]).sum() for k, g in zip(leaves, grads, strict=True) if g is not None]
    return torch.stack(terms).sum(), metrics


def loss_objective(
    loss: Loss, problem: TabularProblem, data: DataCells, log_ref: Tensor, rewards: Tensor | None = None
) -> Objective:
    """The registry ``loss`` on the data set ``data`` of ``problem``'s prompts (sampled or the population);
    ``rewards`` (C, K) where the loss ``needs_reward_model``."""
    shape = tuple(log_ref.shape)
    if loss.needs_reward_model and rewards is None:
        raise ValueError(f"loss {loss.name!r} needs a reward table (rewards=...)")
    if getattr(loss, "reduction", "flat") == "per_class" and getattr(loss, "preferred_fraction", None) is None:
        raise ValueError(f"loss {loss.name!r} reduces per class: build it with the data set's preferred_fraction")
    found = family_of(loss).cell_rows(loss, data, log_ref, rewards)
    if found is None:  # reverse KL, RLHF: their own exact objective over every candidate

        def exact(lp: Tensor) -> tuple[Tensor, dict]:
            return loss.exact(lp, log_ref, rewards) / shape[0], {}

        return Objective(exact, torch.ones(shape, dtype=torch.bool), lambda lp: float(exact(lp)[0]))
    rows, keys, build = found
    cells = touched(shape, *(rows.index[k] for k in ("cell", "chosen", "rejected") if k in rows.index))
    beta = loss.kl_coefficient
    no_kl = {"kl_penalty": torch.zeros((), dtype=torch.float64)} if beta > 0 else {}

    def fn(lp: Tensor) -> tuple[Tensor, dict]:
        surrogate, metrics = _surrogate(loss, build(lp, rows.index) | no_kl, keys, rows.weights)
        return (surrogate + beta * table_kl(lp, log_ref).mean() if beta > 0 else surrogate), metrics

    value = None
    if rows.repeats is not None:
        all_rows = every_row(rows)

        def value(lp: Tensor) -> float:
            with torch.no_grad():
                kl = {"kl_penalty": table_kl(lp, log_ref).mean()} if beta > 0 else {}
                return float(loss(**build(lp, all_rows), **kl)[0])

    return Objective(fn, cells, value)


def floor_objective(target: np.ndarray) -> Objective:
    """``KL(target || pi_theta)`` averaged over prompts: the floor, fitted to the exact target."""
    t = torch.as_tensor(target, dtype=torch.float64)
    log_t = torch.where(t > 0, t, torch.ones_like(t)).log()

    def kl(lp: Tensor) -> tuple[Tensor, dict]:
        return (t * (log_t - lp)).sum(-1).mean(), {}

    return Objective(kl, t > 0, lambda lp: float(kl(lp)[0]))
