"""T4: stability under minibatch training (RDRO Figures 4-5), on a small data set of a toy setting.

Minibatch Adam on a (C, K) logit table started at the reference, with the library losses on real rows. Every step
logs the loss, the gradient norm, the largest ratio ``exp T`` in the batch and over the data set's cells, and
DDRO's guard activations. DDRO's pole at ``exp T = 2`` makes its gradients spike; RDRO's per-row gradients are
bounded and its ratio stays near ``1/alpha`` (its target is bounded by ``1/alpha``; under minibatch noise the
iterates of a normalised policy can pass it by a fraction, see ``seed_spread``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch

from studylib.families import family_of
from studylib.toy.fit import one_thread
from studylib.toy.problems import TabularProblem, sample_rows, unpaired_view
from studylib.toy.sweeps import Method


def stability_methods(problem: TabularProblem, alpha: float | None = None, beta: float = 1.0) -> list[Method]:
    """DDRO, RDRO (``alpha`` defaults to the preferred fraction) and KTO, per-class where the loss has it."""
    alpha = round(problem.preferred_fraction, 6) if alpha is None else alpha
    return [
        Method("DDRO", "ddro", {"reduction": "per_class"}),
        Method(f"RDRO (alpha={alpha:g})", "rdro", {"alpha": alpha, "reduction": "per_class"}),
        Method(f"KTO (beta={beta:g})", "kto", {"beta": beta}),
    ]


def _cosine_with_warmup(step: int, steps: int, warmup: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup * steps`` steps, then a cosine decay to 0."""
    warm = max(1, int(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@one_thread
def stability_run(
    problem: TabularProblem,
    methods: Sequence[Method] | None = None,
    n: int = 128,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 0.1,
    seed: int = 0,
    optimizer: str = "adam",
    warmup: float = 0.1,
) -> pd.DataFrame:
    """Train each method by minibatch Adam on the same data set and batch order; one row per (method, step).

    ``optimizer``: ``"adam"`` or ``"sgd"``; the learning rate warms up linearly over the first ``warmup`` fraction
    of the steps, then decays by a cosine to 0 (the schedule of the RDRO authors' LM runs).
    The data set is the unpaired view of ``n`` draws of seed ``seed`` (2n rows for a paired problem). Per-class
    losses get the data set's preferred fraction (the minibatch form of the per-class mean); KTO gets TRL's
    mismatched pairs (completions shifted by one inside the batch). Columns: method, step, loss, grad_norm,
    ratio_max_batch, ratio_max_data, guard (activations this step), guard_total (so far).
    """
    methods = stability_methods(problem) if methods is None else list(methods)
    rows = unpaired_view(sample_rows(problem, n, seed))
    x, y = torch.as_tensor(rows["context"]), torch.as_tensor(rows["item"])
    labels = torch.as_tensor(rows["label"])
    fraction = labels.double().mean().item()
    log_ref = torch.as_tensor(problem.log_ref, dtype=torch.float64)
    cells = torch.unique(x * problem.items + y)
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(x), generator=generator) for _ in range(steps * batch_size // len(x) + 1)])
    out = []
    for method in methods:
        knobs = dict(method.knobs)
        if knobs.get("reduction") == "per_class":
            knobs["preferred_fraction"] = fraction
        loss_fn = Method(method.label, method.loss, knobs).build()
        theta = log_ref.clone().requires_grad_(True)
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]([theta], lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_with_warmup(s, steps, warmup))
        guard_total = 0
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            logp = torch.log_softmax(theta, -1)
            bx, by = x[idx], y[idx]
            loss, metrics = loss_fn(**family_of(loss_fn).table_batch(logp, log_ref, bx, by, labels[idx]))
            opt.zero_grad()
            loss.backward()
            grad_norm = theta.grad.norm().item()
            opt.step()
            schedule.step()
            guard = int(metrics.get("guard/activations", torch.tensor(0)))
            guard_total += guard
            with torch.no_grad():
                data_ratio = (logp - log_ref).reshape(-1)[cells].max().exp().item()
            out.append(
                (
                    method.label,
                    step,
                    loss.item(),
                    grad_norm,
                    metrics["ratio/max"].item(),
                    data_ratio,
                    guard,
                    guard_total,
                )
            )
    columns = ["method", "step", "loss", "grad_norm", "ratio_max_batch", "ratio_max_data", "guard", "guard_total"]
    return pd.DataFrame(out, columns=columns)


def stability_over_seeds(
    problem: TabularProblem, seeds: Sequence[int], methods: Sequence[Method] | None = None, **run: object
) -> pd.DataFrame:
    """``stability_summary`` of one run per seed (data set and batch order), stacked with a ``seed`` column."""
    frames = [stability_summary(stability_run(problem, methods, seed=s, **run)).assign(seed=s) for s in seeds]
    return pd.concat(frames, ignore_index=True)


def seed_spread(per_seed: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per method over seeds: runs whose batch ratio went past ``1/alpha``, the largest ``ratio * alpha``, the
    median of the runs' largest gradient norms, and runs in which DDRO's guard fired."""
    g = per_seed.assign(over=per_seed["ratio_max_batch"] * alpha).groupby("method", sort=False)
    return pd.DataFrame(
        {
            "runs": g.size(),
            "runs_ratio_above_1_over_alpha": g["over"].apply(lambda s: int((s > 1).sum())),
            "largest_ratio_times_alpha": g["over"].max(),
            "median_of_max_grad_norm": g["grad_norm_max"].median(),
            "runs_with_guard_activations": g["guard_total"].apply(lambda s: int((s > 0).sum())),
        }
    ).reset_index()


def stability_summary(log: pd.DataFrame) -> pd.DataFrame:
    """Per method: largest ratio (batch, data), largest and median gradient norm, total guard activations."""
    grouped = log.groupby("method", sort=False)
    return pd.DataFrame(
        {
            "ratio_max_batch": grouped["ratio_max_batch"].max(),
            "ratio_max_data": grouped["ratio_max_data"].max(),
            "grad_norm_max": grouped["grad_norm"].max(),
            "grad_norm_median": grouped["grad_norm"].median(),
            "guard_total": grouped["guard"].sum(),
            "loss_final": grouped["loss"].last(),
        }
    ).reset_index()
