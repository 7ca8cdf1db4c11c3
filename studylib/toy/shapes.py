"""T1 and T2: the density ratio against the relative density ratio, and the shapes of the losses.

T1 (RDRO Figure 1a): ``g* = p+/p-`` diverges as ``p- -> 0``; ``r*_alpha = p+/(alpha p+ + (1 - alpha) p-)`` stays
under ``1/alpha``. T2 (RDRO Figure 1b): each loss's + and - row loss, and its slope in ``T``, read from the
library losses themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from studylib.families import family_of
from studylib.losses import Loss, get_loss
from studylib.toy.fit import cell_derivatives, one_thread


def density_ratio(p_plus: np.ndarray, p_minus: np.ndarray) -> np.ndarray:
    """``g* = p+ / p-`` (infinite where ``p- = 0``)."""
    with np.errstate(divide="ignore"):
        return np.asarray(p_plus, float) / np.asarray(p_minus, float)


def relative_density_ratio(p_plus: np.ndarray, p_minus: np.ndarray, alpha: float) -> np.ndarray:
    """``r*_alpha = p+ / (alpha p+ + (1 - alpha) p-)``, at most ``1/alpha``."""
    p_plus = np.asarray(p_plus, float)
    return p_plus / (alpha * p_plus + (1.0 - alpha) * np.asarray(p_minus, float))


def ratio_curves(
    alphas: float | Sequence[float] = 0.5, p_minus: float = 0.1, p_plus_fixed: float = 0.5, num: int = 200
) -> pd.DataFrame:
    """Both ratios along two sweeps, for each alpha: ``p+`` over (0, 1] at fixed ``p-`` (``sweep="p_plus"``), and
    ``p-`` from 1 down to 1e-6 at fixed ``p+`` (``sweep="p_minus"``). Columns: sweep, p_plus, p_minus, g, r,
    alpha (``g`` does not depend on alpha)."""
    p_plus = np.linspace(1.0 / num, 1.0, num)
    p_minus_grid = np.logspace(0, -6, num)
    a = pd.DataFrame({"sweep": "p_plus", "p_plus": p_plus, "p_minus": p_minus})
    b = pd.DataFrame({"sweep": "p_minus", "p_plus": p_plus_fixed, "p_minus": p_minus_grid})
    base = pd.concat([a, b], ignore_index=True)
    base["g"] = density_ratio(base["p_plus"], base["p_minus"])
    frames = []
    for alpha in [alphas] if isinstance(alphas, (int, float)) else alphas:
        frame = base.copy()
        frame["r"] = relative_density_ratio(frame["p_plus"], frame["p_minus"], alpha)
        frame["alpha"] = float(alpha)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def row_loss(loss_fn: Loss, t: float, label: bool | None) -> float:
    """The loss of one row with log-ratio ``t`` and ``label``; for a pair loss (``label=None``) ``t`` is the
    margin ``T_w - T_l``."""
    value = torch.tensor([t], dtype=torch.float64)
    labels = None if label is None else torch.tensor([label])
    return loss_fn(**family_of(loss_fn).table_inputs(value, torch.zeros_like(value), labels))[0].item()


@one_thread
def loss_curves(
    t: Sequence[float] | np.ndarray | None = None, alpha: float = 0.3, beta: float = 1.0, guard_eps: float = 1e-2
) -> pd.DataFrame:
    """Per-row loss and its slope ``dl/dT`` for RDRO(alpha), DDRO(guard_eps), KTO(beta, z0 = 0) on + and - rows,
    and DPO(beta) on a pair against its margin. Columns: method, row (``+``, ``-``, ``pair``), T, loss, slope."""
    t = np.linspace(-4.0, 3.0, 281) if t is None else np.asarray(t, float)
    methods = {
        f"RDRO (alpha={alpha:g})": get_loss("rdro", alpha=alpha, reduction="flat"),
        f"DDRO (eps={guard_eps:g})": get_loss("ddro", reduction="flat", guard_eps=guard_eps),
        f"KTO (beta={beta:g})": get_loss("kto", beta=beta),
        f"DPO (beta={beta:g})": get_loss("dpo", beta=beta),
    }
    grid = torch.as_tensor(t, dtype=torch.float64)
    zero = torch.zeros_like(grid)
    frames = []
    for name, loss_fn in methods.items():
        family = family_of(loss_fn)
        for label in family.row_labels:
            flags = None if label is None else torch.full_like(grid, float(label)).bool()
            rows = family.table_inputs
            slope, _ = cell_derivatives(loss_fn, lambda u, f=flags, rows=rows: rows(u, zero, f), grid, second=False)
            frames.append(
                pd.DataFrame(
                    {
                        "method": name,
                        "row": {True: "+", False: "-", None: "pair"}[label],
                        "T": t,
                        "loss": [row_loss(loss_fn, v, label) for v in t],
                        "slope": slope.numpy(),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)
