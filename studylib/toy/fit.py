"""Exact full-batch fits of logit tables in float64, with the losses of ``studylib.losses``.

**Batched tables.** A fit takes B independent data sets (every seed and every size of a sweep) as one
(B, C, K) logit table. A loss of a data set is a sum over its rows, and every row touches one context, so the
objective separates into B x C units of K logits each: one batched solver reaches every unit's own optimum.

**Data sets as weighted cells.** A data set of n rows has few distinct cells ((context, item, label) or
(context, winner, loser)). Every loss here is a mean of per-row terms ``l(u)`` of one scalar per row (``T`` for
unpaired rows, the margin of log-probs for pairs; a pair loss reads its two log-probs only through their
difference), so one call of the library loss on the distinct cells, differentiated by autograd, gives every
cell's ``l'(u_c)`` and ``l''(u_c)`` (``M dL/du_c`` and the diagonal of ``M d2L/du2``, M cells). The objective of
a data set is ``sum_c w_c l(u_c)`` with ``w_c`` the cell's count over n (``flat``) or over its class size
(``per_class``), plus a ridge ``ridge / (2 n) ||theta - theta_0||^2`` per data set (a Gaussian prior worth
``ridge`` rows, which keeps cells the data never show finite and vanishes as n grows).

**Solver.** Newton's method per unit with the exact K x K Hessian (chain rule through ``log_softmax``; eigenvalues
taken in absolute value so non-convex losses still descend), a step cap, and a per-unit line search on the
directional derivative. It stops when every unit's largest gradient entry (mean scale) is below ``tol``.
On-policy objectives (reverse KL, RLHF) are exact table functionals (``loss.exact``); their per-unit Hessians come
from autograd directly.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
import torch
from torch import Tensor

from studylib.families import family_of
from studylib.losses import Loss, get_loss
from studylib.toy.problems import TabularProblem

DTYPE = torch.float64
P = ParamSpec("P")
R = TypeVar("R")


def one_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with one torch intra-op thread, restoring the setting after: the toy's tensors are small, and
    threads fighting over shared cores made runs several times slower."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper


def _t(a: np.ndarray | Tensor) -> Tensor:
    return a.to(DTYPE) if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a), dtype=DTYPE)


def cell_derivatives(
    loss_fn: Loss, rows: Callable[[Tensor], dict[str, Tensor]], u: Tensor, second: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Per-row ``l'(u_c)`` and ``l''(u_c)`` of a mean-of-rows loss, from one call on the rows built from ``u``."""
    u = u.detach().requires_grad_(True)
    loss, _ = loss_fn(**rows(u))
    (g,) = torch.autograd.grad(loss, u, create_graph=second)
    m = u.numel()
    if not second:
        return g.detach() * m, None
    if not g.requires_grad:  # the loss is linear in u on every row
        return g.detach() * m, torch.zeros_like(u)
    (h,) = torch.autograd.grad(g.sum(), u, allow_unused=True)
    return g.detach() * m, (torch.zeros_like(u) if h is None else h.detach() * m)


@dataclass
class CellModel:
    """Cells of B data sets on a (B, C, K) table: ``u_c = theta[first_c] - lse`` (``softmax``) or
    ``theta[first_c] - theta[second_c]`` (``margin``), weighted by ``weights`` (mean scale), with ``rows(u)``
    building the loss's keyword arguments."""

    kind: str
    first: Tensor
    second: Tensor | None
    weights: Tensor
    rows: Callable[[Tensor], dict[str, Tensor]]

    def u(self, theta: Tensor) -> Tensor:
        """The per-cell scalar the loss sees, from the table."""
        if self.kind == "softmax":
            return torch.log_softmax(theta, -1).reshape(-1)[self.first]
        flat = theta.reshape(-1)
        return flat[self.first] - flat[self.second]

    def grad_hess(self, loss_fn: Loss, theta: Tensor, second: bool = True) -> tuple[Tensor, Tensor | None]:
        """Gradient (B, C, K) and per-context Hessians (B, C, K, K) of ``sum_c w_c l(u_c)``."""
        B, C, K = theta.shape
        d1, d2 = cell_derivatives(loss_fn, self.rows, self.u(theta), second)
        a = torch.zeros(B * C * K, dtype=DTYPE).index_add_(0, self.first, self.weights * d1)
        if self.kind == "margin":
            a.index_add_(0, self.second, -self.weights * d1)
            grad = a.view(B, C, K)
            if not second:
                return grad, None
            hess = torch.zeros(B * C, K * K, dtype=DTYPE)
            unit, i, j = self.first // K, self.first % K, self.second % K
            wh = self.weights * d2
            for r, s, sign in ((i, i, 1.0), (j, j, 1.0), (i, j, -1.0), (j, i, -1.0)):
                hess.index_put_((unit, r * K + s), sign * wh, accumulate=True)
            return grad, hess.view(B, C, K, K)
        probs = torch.softmax(theta, -1)
        a = a.view(B, C, K)
        s = a.sum(-1, keepdim=True)
        grad = a - s * probs
        if not second:
            return grad, None
        A = torch.zeros(B * C * K, dtype=DTYPE).index_add_(0, self.first, self.weights * d2).view(B, C, K)
        pp = probs[..., :, None] * probs[..., None, :]
        outer = probs[..., :, None] * A[..., None, :]
        hess = torch.diag_embed(A) - outer - outer.transpose(-1, -2) + A.sum(-1)[..., None, None] * pp
        hess = hess - s[..., None] * (torch.diag_embed(probs) - pp)
        return grad, hess


Derivatives = Callable[[Tensor, bool], tuple[Tensor, Tensor | None]]
"""``(theta, second) -> (gradient (B, C, K), per-context Hessians (B, C, K, K) or None)``."""


def cell_objective(loss_fn: Loss, model: CellModel, centre: Tensor, ridge: Tensor) -> Derivatives:
    """Derivatives of ``sum_c w_c l(u_c) + ridge_b / 2 ||theta_b - centre_b||^2`` (``ridge`` per data set)."""
    r = ridge.to(DTYPE).view(-1, 1, 1)
    eye = torch.eye(centre.shape[-1], dtype=DTYPE)

    def derivatives(theta: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
        g, h = model.grad_hess(loss_fn, theta, second)
        return g + r * (theta - centre), (None if h is None else h + r[..., None] * eye)

    return derivatives


def newton(
    derivatives: Derivatives, init: Tensor, tol: float = 1e-10, max_iter: int = 100, max_step: float = 4.0
) -> tuple[Tensor, dict[str, float]]:
    """Minimise a table objective unit by unit (one unit = one context of one data set) by Newton's method.

    Each step solves with the unit's Hessian, eigenvalues in absolute value (a descent direction even where the
    loss is not convex), caps the step at ``max_step`` per logit, and shortens it per unit until the directional
    derivative no longer turns up by more than a quarter of its starting size. Stops when every gradient entry is
    below ``tol`` (warns if ``max_iter`` comes first); the info reports iterations, derivative evaluations, the
    final largest gradient entry and whether every unit converged.
    """
    theta = init.clone().to(DTYPE)
    calls = iterations = 0
    while iterations < max_iter:
        g, h = derivatives(theta, True)
        calls += 1
        done = g.abs().amax(-1) < tol
        if done.all():
            break
        iterations += 1
        lam, vec = torch.linalg.eigh(h)
        lam = lam.abs().clamp(min=1e-12)
        step = -(vec @ ((vec.transpose(-1, -2) @ g[..., None]) / lam[..., None]))[..., 0]
        step = step / (step.abs().amax(-1, keepdim=True) / max_step).clamp(min=1.0)
        step[done] = 0.0
        slope0 = (g * step).sum(-1)
        t = torch.ones_like(slope0)
        for _ in range(6):
            g_t, _ = derivatives(theta + t[..., None] * step, False)
            calls += 1
            slope = (g_t * step).sum(-1)
            bad = (slope > 0.25 * slope0.abs()) & ~done
            if not bad.any():
                break
            t = torch.where(bad, t * (slope0 / (slope0 - slope)).clamp(0.1, 0.9), t)
        theta = theta + t[..., None] * step
    grad_max = derivatives(theta, False)[0].abs().max().item()
    if grad_max >= tol:
        warnings.warn(
            f"newton stopped after {max_iter} iterations with a gradient entry of {grad_max:.2e}", stacklevel=2
        )
    info = {"iterations": iterations, "derivative_calls": calls, "grad_max": grad_max, "converged": grad_max < tol}
    return theta, info


def _ref_table(problem: TabularProblem, blocks: int) -> Tensor:
    return _t(problem.log_ref).expand(blocks, -1, -1).clone()


def fit_unpaired(
    problem: TabularProblem,
    counts: np.ndarray,
    loss_fn: Loss,
    ridge: float = 1.0,
    reference_shift: np.ndarray | None = None,
    init: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Fit an unpaired loss (DDRO, RDRO, KTO) on label counts (B, C, K, 2); returns log pi (B, C, K).

    The loss's ``reduction`` is honoured: ``flat`` weighs a cell by count / n, ``per_class`` by count / (size of
    its class), i.e. the mean over D+ plus the mean over D-. Per-row terms come from a ``flat`` copy of the loss.
    ``reference_shift`` (B,) adds a constant to a data set's reference log-probs (KTO's detached ``z0``).
    """
    counts = _t(counts)
    B, C, K, _ = counts.shape
    reduction = getattr(loss_fn, "reduction", "flat")
    if reduction != "flat":
        loss_fn = copy.copy(loss_fn)
        loss_fn.reduction, loss_fn.preferred_fraction = "flat", None
    n_class = counts.sum((1, 2)).to(DTYPE)  # (B, 2): non-preferred, preferred
    n = n_class.sum(-1)
    if reduction == "per_class" and (n_class == 0).any():
        raise ValueError("per_class reduction needs both labels in every data set")
    cell = torch.nonzero(counts.reshape(-1)).flatten()
    block, label = cell // (C * K * 2), (cell % 2).bool()
    denominator = n_class[block, label.long()] if reduction == "per_class" else n[block]
    shift = torch.zeros(B, dtype=DTYPE) if reference_shift is None else _t(reference_shift)
    ref = _t(problem.log_ref).reshape(-1)[(cell // 2) % (C * K)] + shift[block]
    model = CellModel(
        "softmax",
        cell // 2,
        None,
        counts.reshape(-1)[cell].to(DTYPE) / denominator,
        lambda u: family_of(loss_fn).table_inputs(u, ref, label),
    )
    centre = _ref_table(problem, B)
    theta, info = newton(cell_objective(loss_fn, model, centre, ridge / n), centre if init is None else init)
    return torch.log_softmax(theta, -1), info


def mismatched_mean_logratio(problem: TabularProblem, counts: np.ndarray, log_policy: Tensor) -> np.ndarray:
    """Per data set, the mean of ``T(x, y')`` over mismatched pairs (x from the data's contexts, y' its items).

    KTO's reference point before ``max(0, .)``: TRL pairs each prompt with another row's completion; over a
    whole data set that pairs the two marginals independently.
    """
    counts = np.asarray(counts)
    n = counts.sum((1, 2, 3))
    p_x, p_y = counts.sum((2, 3)) / n[:, None], counts.sum((1, 3)) / n[:, None]
    logratio = log_policy.detach().numpy() - problem.log_ref[None]
    return np.einsum("bx,by,bxy->b", p_x, p_y, logratio)


def fit_kto(
    problem: TabularProblem, counts: np.ndarray, loss_fn: Loss, ridge: float = 1.0, outer: int = 10, tol: float = 1e-8
) -> tuple[Tensor, dict[str, float]]:
    """KTO's full-batch fit: the fixed point of fitting with ``z0`` held (it is detached) and updating ``z0``.

    ``z0 = max(0, mismatched mean of T)`` enters KTO only as ``T - z0``, so it is passed as a per-data-set shift
    of the reference log-probs and one library KTO (with no KL rows, hence its own ``z0 = 0``) serves every set.
    """
    z0 = np.zeros(np.asarray(counts).shape[0])
    log_policy, info = fit_unpaired(problem, counts, loss_fn, ridge, reference_shift=z0)
    for step in range(outer):
        new = np.maximum(0.0, mismatched_mean_logratio(problem, counts, log_policy))
        info["outer"] = step
        if np.abs(new - z0).max() < tol:
            break
        z0 = new
        log_policy, info = fit_unpaired(problem, counts, loss_fn, ridge, reference_shift=z0, init=log_policy)
    info["z0_max"] = float(z0.max())
    return log_policy, info


def _pair_model(counts: Tensor, margin_rows: Callable[[Tensor, Tensor], dict[str, Tensor]], ref: Tensor) -> CellModel:
    """Cells of pair counts (B, C, K, K); ``margin_rows(u, cell)`` builds the loss arguments from margins."""
    B, C, K, _ = counts.shape
    cell = torch.nonzero(counts.reshape(-1)).flatten()
    base = (cell // (K * K)) * K
    winner, loser = base + (cell // K) % K, base + cell % K
    n = counts.sum((1, 2, 3)).to(DTYPE)
    weights = counts.reshape(-1)[cell].to(DTYPE) / n[cell // (C * K * K)]
    ref_margin = ref[winner] - ref[loser]
    return CellModel("margin", winner, loser, weights, lambda u: margin_rows(u, ref_margin))


def table_kl(log_policy: Tensor, log_reference: Tensor) -> Tensor:
    """``KL(pi || pi_ref)`` per context (..., C), exact over the items; both arguments are log-probs (..., C, K)."""
    return (log_policy.exp() * (log_policy - log_reference)).sum(-1)


def _with_kl(derivatives: Derivatives, problem: TabularProblem, blocks: int, beta: float) -> Derivatives:
    """Add ``beta E_x KL(pi(.|x) || pi_ref(.|x))`` (contexts equally likely) to a data set's objective, exactly."""
    if beta == 0.0:
        return derivatives
    ref = _ref_table(problem, blocks)
    kl = separable_derivatives(lambda theta: beta * table_kl(torch.log_softmax(theta, -1), ref).mean(-1).sum())

    def total(theta: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
        (g, h), (g_kl, h_kl) = derivatives(theta, second), kl(theta, second)
        return g + g_kl, (None if h is None else h + h_kl)

    return total


def fit_paired(
    problem: TabularProblem, counts: np.ndarray, loss_fn: Loss, ridge: float = 1.0
) -> tuple[Tensor, dict[str, float]]:
    """Fit a paired loss (DPO, PMLE) on pair counts (B, C, K, K); returns log pi (B, C, K).

    PMLE's ``beta KL(pi || pi_0)`` (``pi_0 = pi_ref``), when ``beta > 0``, is computed exactly over the table.
    """
    counts = _t(counts)
    B = counts.shape[0]
    beta = loss_fn.kl_coefficient

    def rows(u: Tensor, ref_margin: Tensor) -> dict[str, Tensor]:
        extra = {"kl_penalty": torch.zeros((), dtype=DTYPE)} if beta else {}  # the exact KL is added below
        return family_of(loss_fn).table_inputs(u, ref_margin) | extra  # margins: a pair loss reads only those

    model = _pair_model(counts, rows, _ref_table(problem, B).reshape(-1))
    centre = _ref_table(problem, B)
    derivatives = cell_objective(loss_fn, model, centre, ridge / counts.sum((1, 2, 3)))
    theta, info = newton(_with_kl(derivatives, problem, B, beta), centre)
    return torch.log_softmax(theta, -1), info


def fit_reward_model(problem: TabularProblem, counts: np.ndarray, ridge: float = 1.0) -> tuple[Tensor, dict]:
    """Tabular Bradley-Terry reward R (B, C, K): minimise ``-log sigmoid(R(winner) - R(loser))``, ridge toward 0.

    The BT log-loss is the library's PMLE with ``gamma = 1`` applied to raw scores.
    """
    counts = _t(counts)
    B, C, K, _ = counts.shape
    zero = torch.zeros(B, C, K, dtype=DTYPE)
    bradley_terry = get_loss("pmle", gamma=1.0)
    model = _pair_model(counts, family_of(bradley_terry).table_inputs, zero.reshape(-1))
    return newton(cell_objective(bradley_terry, model, zero, ridge / counts.sum((1, 2, 3))), zero)


def fit_distill(problem: TabularProblem, rewards: Tensor, loss_fn: Loss) -> tuple[Tensor, dict[str, float]]:
    """Preference distillation over every unordered pair of items of every context, plus ``beta KL(pi || pi_ref)``
    computed exactly when ``beta > 0``.

    Soft labels ``sigmoid(R(a) - R(b))`` are consistent with ``pi ~ exp(R / gamma)``, so with ``beta = 0`` every
    full-support pair distribution has that minimiser; the paper samples pairs from pi, here each pair counts once.
    """
    B, C, K = rewards.shape
    a, b = torch.triu_indices(K, K, offset=1)
    base = (torch.arange(B * C) * K)[:, None]
    first, second = (base + a).reshape(-1), (base + b).reshape(-1)
    flat_r = _t(rewards.detach()).reshape(-1)
    margins = flat_r[first] - flat_r[second]
    weights = torch.full_like(margins, 1.0 / (C * a.numel()))  # a mean over the pairs of a data set
    extra = {"kl_penalty": torch.zeros((), dtype=DTYPE)} if loss_fn.beta else {}  # the exact KL is added below

    def rows(u: Tensor) -> dict[str, Tensor]:
        return {"policy_chosen_logps": u, "policy_rejected_logps": torch.zeros_like(u), "reward_margins": margins}

    model = CellModel("margin", first, second, weights, lambda u: rows(u) | extra)
    centre = _ref_table(problem, B)
    derivatives = cell_objective(loss_fn, model, centre, torch.zeros(B, dtype=DTYPE))
    theta, info = newton(_with_kl(derivatives, problem, B, loss_fn.beta), centre)
    return torch.log_softmax(theta, -1), info


def separable_derivatives(objective: Callable[[Tensor], Tensor]) -> Derivatives:
    """Derivatives of a scalar ``objective(theta)`` that is a sum of per-unit terms (no term mixes two contexts):
    the gradient by autograd, each unit's Hessian column j by differentiating ``grad . e_j`` (K double-backward
    passes for all units at once)."""

    def derivatives(theta: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
        theta = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(theta), theta, create_graph=second)
        if not second:
            return g.detach(), None
        K = theta.shape[-1]
        basis = torch.eye(K, dtype=DTYPE)
        columns = [
            torch.autograd.grad(g, theta, grad_outputs=basis[j].expand_as(g), retain_graph=j < K - 1)[0]
            for j in range(K)
        ]
        return g.detach(), torch.stack(columns, dim=-1)

    return derivatives


def fit_on_policy(problem: TabularProblem, rewards: Tensor, loss_fn: Loss) -> tuple[Tensor, dict[str, float]]:
    """Minimise ``loss_fn.exact`` (``E_pi[-R] - gamma H(pi) + beta KL(pi || pi_ref)``, exact over the table) for
    every context of every data set (reverse KL, RLHF); ``rewards`` (B, C, K)."""
    B, C, K = rewards.shape
    ref = _ref_table(problem, B)
    flat_ref, flat_r = ref.reshape(B * C, K), _t(rewards.detach()).reshape(B * C, K)

    def objective(theta: Tensor) -> Tensor:
        return loss_fn.exact(torch.log_softmax(theta, -1).reshape(B * C, K), flat_ref, flat_r)

    theta, info = newton(separable_derivatives(objective), ref)
    return torch.log_softmax(theta, -1), info
