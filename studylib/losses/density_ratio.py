"""Unpaired density-ratio losses: DDRO and RDRO.

Both read the policy's log-ratio ``T(x, y) = log pi_theta(y|x) - log pi_ref(y|x)`` as a density-ratio
model and fit it by Bregman density-ratio estimation on preferred (+) and non-preferred (-) rows.
Their empirical risk is a mean over D+ plus a mean over D- (``reduction="per_class"``, the default);
``reduction="flat"`` takes one mean over all rows, as the RDRO authors' code does, which weights the
classes by their frequency and moves the minimiser when the classes are imbalanced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from studylib.losses.base import Metrics, UnpairedDensityRatioLoss, check_fraction

LOG2 = math.log(2.0)


class DDRO(UnpairedDensityRatioLoss):
    """Direct Density Ratio Optimization (Higuchi et al., 2025), **reconstructed**.

    Per row, with ``T = log pi_theta - log pi_ref``::

        +:  log 2 - T
        -:  log 2 - log(2 - exp T)

    Logistic Bregman estimation of ``p+/p-`` with ``pi_ref`` taken as the 50/50 mixture of ``p+`` and
    ``p-``; the population minimiser is ``exp T = 2 p+ / (p+ + p-)``, i.e. ``pi_theta = p+`` when
    ``pi_ref = (p+ + p-)/2``. Reconstructed from the abstract and a third-party re-implementation;
    the paper's method section was not read.

    **Guard at the pole.** ``-log(2 - exp T)`` diverges as ``T -> log 2``. Beyond
    ``exp T = 2 - guard_eps`` the - loss is continued by its tangent line there (value ``-log eps``,
    slope ``(2 - eps)/eps``), so it stays finite and its gradient bounded by ``(2 - eps)/eps``. Each
    call counts the - rows past the guard in ``metrics["guard/activations"]``: DDRO's instability is
    a result to show, not a crash to hide.
    """

    name = "ddro"

    def __init__(
        self, reduction: str = "per_class", preferred_fraction: float | None = None, guard_eps: float = 1e-2
    ) -> None:
        super().__init__(reduction, preferred_fraction)
        self.guard_eps = check_fraction("guard_eps", guard_eps)

    def negative_loss(self, logratios: Tensor) -> tuple[Tensor, Tensor]:
        """The guarded ``log 2 - log(2 - exp T)`` and a mask of the rows where the guard fired."""
        eps = self.guard_eps
        t_guard = math.log(2.0 - eps)
        past = logratios > t_guard
        safe_t = torch.clamp(logratios, max=t_guard)
        exact = LOG2 - torch.log(2.0 - safe_t.exp())
        tangent = LOG2 - math.log(eps) + (2.0 - eps) / eps * (logratios - t_guard)
        return torch.where(past, tangent, exact), past

    def row_losses(self, logratios: Tensor, labels: Tensor) -> tuple[Tensor, Metrics]:
        negative, past = self.negative_loss(logratios)
        activations = (past & ~labels).sum().detach()
        return torch.where(labels, LOG2 - logratios, negative), {"guard/activations": activations}


def _logistic(logratios: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    softplus = F.softplus(logratios)
    return (1.0 + alpha) * softplus - logratios, (1.0 - alpha) * softplus


def _squared(logratios: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    ratio = logratios.exp()
    return alpha * (ratio**2 - 1.0) / 2.0 - (ratio - 1.0), (1.0 - alpha) * (ratio**2 - 1.0) / 2.0


def _kliep(logratios: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    ratio = logratios.exp()
    return alpha * ratio - logratios, (1.0 - alpha) * ratio


BREGMAN_F = {"logistic": _logistic, "squared": _squared, "kliep": _kliep}


class RDRO(UnpairedDensityRatioLoss):
    """Relative Density Ratio Optimization (Takahashi et al., 2025).

    Fits ``exp T`` to the relative density ratio ``r*_alpha = p+ / (alpha p+ + (1 - alpha) p-)``,
    which is bounded by ``1/alpha``. With ``r = exp T`` and a convex ``f``, the risk is::

        L_f = alpha E+[f'(r) r - f(r)] + (1 - alpha) E-[f'(r) r - f(r)] - E+[f'(r)]

    Per row (``f`` knob):

    - ``logistic`` (the authors' code; read), ``f(t) = t log t - (1+t) log(1+t)``:
      ``+: (1+alpha) softplus(T) - T``, ``-: (1-alpha) softplus(T)``.
      The + loss is minimised at ``T = log(1/alpha)``; its T-gradient lies in ``(-1, alpha)`` and the
      - loss's in ``(0, 1-alpha)``: bounded, the paper's stability argument.
    - ``squared`` (LSIF; derived), ``f(t) = (t-1)^2/2``:
      ``+: alpha (r^2-1)/2 - (r-1)``, ``-: (1-alpha)(r^2-1)/2``.
    - ``kliep`` (derived), ``f(t) = t log t - t``: ``+: alpha r - T``, ``-: (1-alpha) r``.

    ``alpha`` should be the preferred fraction of the training set (0.39 on UF-G): then
    ``pi_ref r*_alpha = p+`` when completions come from ``pi_ref``.
    """

    name = "rdro"

    def __init__(
        self,
        alpha: float = 0.5,
        f: str = "logistic",
        reduction: str = "per_class",
        preferred_fraction: float | None = None,
    ) -> None:
        super().__init__(reduction, preferred_fraction)
        self.alpha = check_fraction("alpha", alpha)
        if f not in BREGMAN_F:
            raise ValueError(f"f must be one of {sorted(BREGMAN_F)}, got {f!r}")
        self.f = f

    def row_losses(self, logratios: Tensor, labels: Tensor) -> tuple[Tensor, Metrics]:
        positive, negative = BREGMAN_F[self.f](logratios, self.alpha)
        return torch.where(labels, positive, negative), {}
