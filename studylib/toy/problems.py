"""Tabular preference problems (contexts x items), their exact targets, and finite data sets drawn from them.

Three settings (STUDY.md section 3):

- **S1** paired, not Bradley-Terry: completions drawn from ``pi_ref``, ``P(a > b | x)`` with a cyclic
  (intransitive) part; the preferred distribution is ``p+ = 2 pi_ref Borda`` (``Borda(a) = E_b~pi_ref P(a > b)``).
- **S2** unpaired, imbalanced: ``y ~ pi_ref``, label ``~ Bernoulli(q(x, y))``, preferred fraction ``Q`` far from
  1/2 and equal in every context; ``p+ = pi_ref q / Q``.
- **S3** paper 3's model: ``P(a > b | x) = sigmoid(gamma log pi*(a)/pi*(b))``, pairs drawn from a non-uniform
  ``pi_ref``; the target is ``pi*``.

Contexts are equally likely. A data set of size n is the first n draws of one seed's stream, so data sets of
growing size are nested. Counts index labels as ``0 = non-preferred, 1 = preferred``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, log_softmax, logit


@dataclass(frozen=True)
class TabularProblem:
    """One toy: a reference policy, how data are generated, and the distribution a consistent method reaches.

    ``kind`` is ``"paired"`` (rows are (x, winner, loser); ``pref[x, a, b] = P(a > b | x)``) or ``"unpaired"``
    (rows are (x, y, label); ``q[x, y] = P(preferred | x, y)``). ``log_ref`` and ``target`` are (C, K).
    """

    name: str
    kind: str
    log_ref: np.ndarray
    target: np.ndarray
    pref: np.ndarray | None = None
    q: np.ndarray | None = None
    gamma: float | None = None
    params: dict = field(default_factory=dict)

    @property
    def contexts(self) -> int:
        """Number of contexts C."""
        return self.log_ref.shape[0]

    @property
    def items(self) -> int:
        """Number of items (completions) K per context."""
        return self.log_ref.shape[1]

    @property
    def preferred_fraction(self) -> float:
        """Population fraction of preferred rows in the unpaired view (1/2 for paired problems)."""
        if self.kind == "paired":
            return 0.5
        return float((np.exp(self.log_ref) * self.q).sum(axis=1).mean())


def _random_logits(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return scale * rng.standard_normal(shape)


def borda(pref: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``Borda(a | x) = sum_b ref(b | x) P(a > b | x)`` for ``pref`` (C, K, K) and ``ref`` (C, K)."""
    return np.einsum("xab,xb->xa", pref, ref)


def make_s1(
    contexts: int = 10,
    items: int = 10,
    cyclic: float = 2.0,
    bt_scale: float = 1.0,
    ref_scale: float = 1.0,
    seed: int = 0,
) -> TabularProblem:
    """S1: ``P(a > b) = sigmoid(s(a) - s(b) + cyclic sin(2 pi (a - b)/K))``, a BT part plus a cyclic part.

    The cyclic term is antisymmetric, so ``P(a > b) + P(b > a) = 1``; for ``cyclic`` large enough it makes the
    preference intransitive (rock-paper-scissors) and no Bradley-Terry reward explains it.
    """
    rng = np.random.default_rng([1, seed])
    log_ref = log_softmax(_random_logits(rng, (contexts, items), ref_scale), axis=1)
    score = _random_logits(rng, (contexts, items), bt_scale)
    a = np.arange(items)
    cycle = np.sin(2 * np.pi * (a[:, None] - a[None, :]) / items)
    pref = expit(score[:, :, None] - score[:, None, :] + cyclic * cycle[None])
    params = dict(contexts=contexts, items=items, cyclic=cyclic, bt_scale=bt_scale, ref_scale=ref_scale, seed=seed)
    return TabularProblem("S1", "paired", log_ref, borda_target(pref, log_ref), pref=pref, params=params)


def borda_target(pref: np.ndarray, log_ref: np.ndarray) -> np.ndarray:
    """S1's preferred distribution ``p+ = 2 pi_ref Borda`` (normalised against rounding), shapes as ``borda``."""
    ref = np.exp(log_ref)
    target = 2.0 * ref * borda(pref, ref)
    return target / target.sum(1, keepdims=True)


def calibrate_q(log_ref: np.ndarray, logits: np.ndarray, preferred_fraction: float) -> np.ndarray:
    """S2's ``q(x, y) = sigmoid(logits(x, y) + b(x))``, with ``b(x)`` set by bisection so that every context's
    preferred fraction ``E_ref q`` is ``preferred_fraction`` (it is increasing in ``b``)."""
    ref = np.exp(log_ref)
    lo, hi = np.full(len(ref), -50.0), np.full(len(ref), 50.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        too_high = (ref * expit(logits + mid[:, None])).sum(1) > preferred_fraction
        hi, lo = np.where(too_high, mid, hi), np.where(too_high, lo, mid)
    return expit(logits + ((lo + hi) / 2)[:, None])


def make_s2(
    contexts: int = 10,
    items: int = 10,
    preferred_fraction: float = 0.2,
    q_scale: float = 1.5,
    ref_scale: float = 1.0,
    seed: int = 0,
) -> TabularProblem:
    """S2: ``q(x, y) = sigmoid(u(x, y) + b(x))``, with ``b(x)`` set so every context's preferred fraction is ``Q``.

    Equal fractions across contexts make ``p+(x) = p(x)``, so the density-ratio target ``pi_ref q / Q`` is a
    normalised policy in every context.
    """
    rng = np.random.default_rng([2, seed])
    log_ref = log_softmax(_random_logits(rng, (contexts, items), ref_scale), axis=1)
    ref = np.exp(log_ref)
    q = calibrate_q(log_ref, _random_logits(rng, (contexts, items), q_scale), preferred_fraction)
    target = ref * q / (ref * q).sum(1, keepdims=True)
    params = dict(
        contexts=contexts,
        items=items,
        preferred_fraction=preferred_fraction,
        q_scale=q_scale,
        ref_scale=ref_scale,
        seed=seed,
    )
    return TabularProblem("S2", "unpaired", log_ref, target, q=q, params=params)


def make_s3(
    contexts: int = 10,
    items: int = 10,
    gamma: float = 0.5,
    star_scale: float = 1.0,
    ref_scale: float = 1.0,
    seed: int = 0,
) -> TabularProblem:
    """S3 (paper 3, Figure 1): ``P(a > b) = sigmoid(gamma log pi*(a)/pi*(b))``, pairs from a non-uniform ``pi_ref``."""
    rng = np.random.default_rng([3, seed])
    log_star = log_softmax(_random_logits(rng, (contexts, items), star_scale), axis=1)
    log_ref = log_softmax(_random_logits(rng, (contexts, items), ref_scale), axis=1)
    pref = expit(gamma * (log_star[:, :, None] - log_star[:, None, :]))
    params = dict(contexts=contexts, items=items, gamma=gamma, star_scale=star_scale, ref_scale=ref_scale, seed=seed)
    return TabularProblem("S3", "paired", log_ref, np.exp(log_star), pref=pref, gamma=gamma, params=params)


PROBLEMS = {"S1": make_s1, "S2": make_s2, "S3": make_s3}


def on_reference(problem: TabularProblem, log_ref: np.ndarray, groups: Sequence[int]) -> TabularProblem:
    """The same preferences on another reference: context i of the result has reference ``log_ref[i]`` (C', K) and
    the preferences of context ``groups[i]`` of ``problem``; its target is rebuilt as the setting defines it.

    S1: ``pref`` taken over, ``p+ = 2 pi_ref Borda`` under the new reference. S2: ``q``'s logits taken over and its
    offset re-calibrated so that every context's preferred fraction stays the same. S3: ``pref`` and ``pi*`` taken
    over (the target does not depend on the reference). Used to put the toy's settings on a language model.
    """
    groups = np.asarray(groups)
    log_ref = np.asarray(log_ref, dtype=float)
    if log_ref.shape != (len(groups), problem.items):
        raise ValueError(f"log_ref must be (len(groups), {problem.items}), got {log_ref.shape}")
    params = problem.params | {"on_reference": True}
    if problem.kind == "unpaired":
        q = calibrate_q(log_ref, logit(problem.q[groups]), problem.params["preferred_fraction"])
        target = np.exp(log_ref) * q / (np.exp(log_ref) * q).sum(1, keepdims=True)
        return TabularProblem(problem.name, "unpaired", log_ref, target, q=q, params=params)
    pref = problem.pref[groups]
    target = problem.target[groups] if problem.gamma is not None else borda_target(pref, log_ref)
    return TabularProblem(problem.name, "paired", log_ref, target, pref=pref, gamma=problem.gamma, params=params)


def make_problem(setting: str, **params: object) -> TabularProblem:
    """Build setting ``"S1"``, ``"S2"`` or ``"S3"`` with its keyword parameters."""
    if setting not in PROBLEMS:
        raise KeyError(f"unknown setting {setting!r}; available: {', '.join(PROBLEMS)}")
    return PROBLEMS[setting](**params)


def _draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` (n, K)."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs)) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=1), probs.shape[1] - 1)


CHUNK = 4096


def _draw_chunk(problem: TabularProblem, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    ref = np.exp(problem.log_ref)
    x = rng.integers(problem.contexts, size=n)
    if problem.kind == "paired":
        a, b = _draw(rng, ref[x]), _draw(rng, ref[x])
        a_wins = rng.random(n) < problem.pref[x, a, b]
        return {"context": x, "winner": np.where(a_wins, a, b), "loser": np.where(a_wins, b, a)}
    y = _draw(rng, ref[x])
    return {"context": x, "item": y, "label": rng.random(n) < problem.q[x, y]}


def sample_rows(problem: TabularProblem, n: int, seed: int) -> dict[str, np.ndarray]:
    """The first ``n`` draws of seed ``seed``'s data stream, as arrays of length n.

    Paired problems give ``context``, ``winner``, ``loser``; unpaired ones ``context``, ``item``, ``label``
    (bool, True = preferred). The stream is drawn in chunks of ``CHUNK`` rows, each from its own generator, so it
    depends only on (problem, seed): a smaller data set is a prefix of a larger one.
    """
    chunks = [_draw_chunk(problem, np.random.default_rng([17, seed, i]), CHUNK) for i in range(-(-n // CHUNK))]
    return {key: np.concatenate([c[key] for c in chunks])[:n] for key in chunks[0]}


def unpaired_view(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of a paired data set as unpaired rows: every winner a preferred row, every loser a non-preferred one."""
    if "item" in rows:
        return rows
    n = len(rows["context"])
    return {
        "context": np.concatenate([rows["context"], rows["context"]]),
        "item": np.concatenate([rows["winner"], rows["loser"]]),
        "label": np.concatenate([np.ones(n, bool), np.zeros(n, bool)]),
    }


def count_cells(problem: TabularProblem, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Counts of the distinct cells of a data set: paired (C, K, K) ``[x, winner, loser]``; unpaired (C, K, 2)
    ``[x, item, label]``."""
    C, K = problem.contexts, problem.items
    if problem.kind == "paired":
        flat = (rows["context"] * K + rows["winner"]) * K + rows["loser"]
        return np.bincount(flat, minlength=C * K * K).reshape(C, K, K)
    flat = (rows["context"] * K + rows["item"]) * 2 + rows["label"]
    return np.bincount(flat, minlength=C * K * 2).reshape(C, K, 2)


def sample_counts(problem: TabularProblem, sizes: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
    """Cell counts of nested data sets, shape (len(sizes), len(seeds), C, K, K | 2) (see ``count_cells``)."""
    out = []
    for seed in seeds:
        rows = sample_rows(problem, max(sizes), seed)
        out.append([count_cells(problem, {k: v[:n] for k, v in rows.items()}) for n in sizes])
    return np.asarray(out).swapaxes(0, 1)


def label_counts(problem: TabularProblem, counts: np.ndarray) -> np.ndarray:
    """Unpaired view of cell counts (..., C, K, 2): for a paired problem every winner is a preferred row and
    every loser a non-preferred one; an unpaired problem's counts pass through."""
    if problem.kind == "unpaired":
        return counts
    return np.stack([counts.sum(-2), counts.sum(-1)], axis=-1)


def expected_counts(problem: TabularProblem, n: float) -> np.ndarray:
    """Expected cell counts of a data set of size n (real-valued; shapes as ``count_cells``).

    Paired: ``P(x, w, l) = 2 pi_ref(w) pi_ref(l) P(w > l) / C`` (either draw may be the winner). Fitting a method
    on these counts with a vanishing ridge gives its population (infinite-data) limit.
    """
    ref = np.exp(problem.log_ref)
    if problem.kind == "paired":
        return n * 2.0 * ref[:, :, None] * ref[:, None, :] * problem.pref / problem.contexts
    return n * np.stack([ref * (1 - problem.q), ref * problem.q], axis=-1) / problem.contexts


def forward_kl(target: np.ndarray, log_policy: np.ndarray) -> np.ndarray:
    """``KL(target || policy)`` averaged over (equally likely) contexts; ``log_policy`` (..., C, K)."""
    safe = np.where(target > 0, target, 1.0)
    return (target * (np.log(safe) - log_policy)).sum(-1).mean(-1)
