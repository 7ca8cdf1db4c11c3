"""A data set of the answer-set study as the rows a loss is called on: its distinct cells, as flat indices into the
policy's (prompts x candidates) table, with their weights and multiplicities (``studylib.lm_exact.objectives``).
Which rows and which inputs a loss gets is its family's (``studylib.families``: ``cell_rows``); these are the
pieces they are built from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def flat_index(K: int, x: np.ndarray, y: np.ndarray | Tensor) -> Tensor:
    """Flat indices ``x K + y`` of (prompt, candidate) cells: ``table.reshape(-1).take(flat)`` gathers one value per
    row (faster than two-index gathers, forward and backward)."""
    return torch.as_tensor(np.asarray(x), dtype=torch.long) * K + torch.as_tensor(np.asarray(y), dtype=torch.long)


def take(table: Tensor, flat: Tensor) -> Tensor:
    return table.reshape(-1).take(flat)


def touched(shape: tuple[int, int], *flats: Tensor) -> Tensor:
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    for flat in flats:
        mask[flat] = True
    return mask.view(shape)


@dataclass
class CellRows:
    """Distinct cells of a data set: per-row index tensors (``index``: name -> flat cell index, or constant
    tensors), their weights (summing to 1) and integer multiplicities (None for the population)."""

    index: dict[str, Tensor]
    weights: Tensor
    repeats: Tensor | None


def _distinct(data, counts: np.ndarray) -> tuple[np.ndarray, Tensor, Tensor | None]:
    """Positions of the non-zero cells of ``counts``, their weights and (sampled sets) multiplicities."""
    flat = np.flatnonzero(counts)
    values = counts.reshape(-1)[flat]
    weights = torch.as_tensor(values / values.sum(), dtype=torch.float64)
    return flat, weights, (torch.as_tensor(values.astype(np.int64)) if data.sampled else None)


def unpaired_rows(data) -> CellRows:
    flat, weights, repeats = _distinct(data, data.labels)
    cell, label = flat // 2, flat % 2 == 1
    return CellRows({"cell": torch.as_tensor(cell), "labels": torch.as_tensor(label)}, weights, repeats)


def paired_rows(data, K: int) -> CellRows:
    flat, weights, repeats = _distinct(data, data.counts)
    x, winner, loser = flat // (K * K), (flat // K) % K, flat % K
    return CellRows({"chosen": flat_index(K, x, winner), "rejected": flat_index(K, x, loser)}, weights, repeats)


def mismatched_means(data, log_ref: Tensor) -> Callable[[Tensor], dict[str, Tensor]]:
    """KTO's mismatched pairs as one row: the data set's mean log-probs of them (its ``z0`` reads only the mean)."""
    weights = torch.as_tensor(data.mismatched / data.mismatched.sum(), dtype=torch.float64)
    ref = (weights * log_ref).sum().reshape(1)
    return lambda lp: {"policy_kl_logps": (weights * lp).sum().reshape(1), "reference_kl_logps": ref}


def every_row(rows: CellRows) -> dict[str, Tensor]:
    """Every row of a sampled data set, as indices (cells repeated by their counts)."""
    return {k: v.repeat_interleave(rows.repeats) for k, v in rows.index.items()}


def all_pairs(shape: tuple[int, int]) -> CellRows:
    """Every unordered pair of candidates of every prompt, each once (distillation: the toy's ``fit_distill``)."""
    C, K = shape
    a, b = torch.triu_indices(K, K, offset=1)
    x = torch.arange(C).repeat_interleave(len(a))
    index = {"chosen": x * K + a.repeat(C), "rejected": x * K + b.repeat(C)}
    count = len(index["chosen"])
    return CellRows(index, torch.full((count,), 1.0 / count, dtype=torch.float64), torch.ones(count, dtype=int))
