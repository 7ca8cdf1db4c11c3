"""T3: the consistency sweep. Every method fitted exactly on nested data sets of growing size, for several seeds,
with the forward KL to the setting's target and a fitted log-log slope per method.

A consistent method's KL falls like 1/n (slope -1); an inconsistent one plateaus (slope near 0) or grows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from torch import Tensor

from studylib.families import Family, family_of
from studylib.losses import LOSSES, Loss, get_loss
from studylib.toy import fit
from studylib.toy.problems import TabularProblem, expected_counts, forward_kl, sample_counts

BETA_GRID: tuple[float, ...] = tuple(2.0**k for k in range(-3, 5))
"""KL coefficients tried for RLHF and DPO in S3; the best per n (by KL to pi*, an oracle choice) is kept."""


@dataclass(frozen=True)
class Method:
    """A method of the sweep: a registry loss with its knobs.

    ``tune`` names a knob chosen per n from ``grid`` by the smallest mean KL over seeds (paper 3 tunes the KL
    coefficient per n). How the toy fits the method (``fit``) follows from what the loss declares.
    """

    label: str
    loss: str
    knobs: Mapping[str, object] = field(default_factory=dict)
    tune: str | None = None
    grid: tuple[float, ...] = ()

    @property
    def family(self) -> Family:
        """The loss's family (``studylib.families``), which says how the toy fits it (``Family.toy_fit``)."""
        return family_of(LOSSES[self.loss])

    @property
    def needs_rewards(self) -> bool:
        """Whether the fit reads the Bradley-Terry reward model fitted on the pairs (distillation, on-policy)."""
        return self.family.needs_reward_table(LOSSES[self.loss])

    def build(self, value: float | None = None) -> Loss:
        """The library loss, with the tuned knob set to ``value`` if this method tunes one."""
        knobs = dict(self.knobs)
        if self.tune is not None:
            knobs[self.tune] = value
        return get_loss(self.loss, **knobs)


def default_methods(problem: TabularProblem) -> list[Method]:
    """The methods STUDY.md section 3 compares in each setting, with the toy's knobs.

    S1/S2: DPO and KTO at beta = 1 (the toy's logit scale; any fixed beta plateaus). RDRO's alpha is the
    population preferred fraction (1/2 in S1). S3: PMLE, distillation and reverse KL with KL coefficient 0 and
    gamma equal to the preference model's (reverse KL: entropy weight gamma), RLHF and DPO with beta tuned per n.
    """
    if problem.name == "S1":
        return [
            Method("DDRO", "ddro"),
            Method("RDRO (alpha=1/2)", "rdro", {"alpha": 0.5}),
            Method("DPO (beta=1)", "dpo", {"beta": 1.0}),
            Method("KTO (beta=1)", "kto", {"beta": 1.0}),
        ]
    if problem.name == "S2":
        q = round(problem.preferred_fraction, 6)
        return [
            Method(f"RDRO per-class (alpha={q:.2f})", "rdro", {"alpha": q, "reduction": "per_class"}),
            Method(f"RDRO flat (alpha={q:.2f})", "rdro", {"alpha": q, "reduction": "flat"}),
            Method("DDRO", "ddro"),
            Method("KTO (beta=1)", "kto", {"beta": 1.0}),
        ]
    if problem.name == "S3":
        g = problem.gamma
        return [
            Method("PMLE", "pmle", {"gamma": g, "beta": 0.0}),
            Method("distillation", "distill", {"gamma": g, "beta": 0.0}),
            Method("reverse KL", "reverse_kl", {"gamma": g, "beta": 0.0}),
            Method("RLHF (beta tuned)", "rlhf", {}, "beta", BETA_GRID),
            Method("DPO (beta tuned)", "dpo", {}, "beta", BETA_GRID),
        ]
    raise KeyError(f"no default methods for problem {problem.name!r}")


def fit_method(
    problem: TabularProblem, counts: np.ndarray, method: Method, loss: Loss, ridge: float, rewards: Tensor | None
) -> tuple[Tensor, dict]:
    """Fit one method on stacked data sets ``counts`` (B, C, K, K | 2); returns log pi (B, C, K) and solver info.
    How is the loss's family's (``Family.toy_fit``): label counts, KTO's ``z0`` fixed point, pair counts, soft
    labels or the exact on-policy objective from the reward table."""
    return method.family.toy_fit(problem, counts, loss, ridge, rewards)


@fit.one_thread
def consistency_sweep(
    problem: TabularProblem,
    methods: Sequence[Method] | None = None,
    sizes: Sequence[int] = tuple(2**k for k in range(6, 17)),
    seeds: Sequence[int] = tuple(range(10)),
    ridge: float = 1.0,
) -> pd.DataFrame:
    """Fit every method on every (size, seed) data set; one row per fit with its forward KL to the target.

    Columns: setting, method, n, seed, kl, knob (the tuned value or NaN), selected (the tuned value kept for
    that n; always True for untuned methods), seconds (wall time of the batched fit it came from).
    """
    methods = default_methods(problem) if methods is None else list(methods)
    counts = sample_counts(problem, sizes, seeds)
    stacked = counts.reshape(len(sizes) * len(seeds), *counts.shape[2:])
    rewards = None
    if any(m.needs_rewards for m in methods):
        rewards, _ = fit.fit_reward_model(problem, stacked, ridge)
    grid_n, grid_seed = np.meshgrid(np.asarray(sizes), np.asarray(seeds), indexing="ij")
    frames = []
    for method in methods:
        for value in method.grid if method.tune else (None,):
            start = time.perf_counter()
            log_pi, _ = fit_method(problem, stacked, method, method.build(value), ridge, rewards)
            kl = forward_kl(problem.target, log_pi.numpy()).reshape(len(sizes), len(seeds))
            frames.append(
                pd.DataFrame(
                    {
                        "setting": problem.name,
                        "method": method.label,
                        "n": grid_n.ravel(),
                        "seed": grid_seed.ravel(),
                        "kl": kl.ravel(),
                        "knob": np.nan if value is None else value,
                        "seconds": time.perf_counter() - start,
                    }
                )
            )
    df = pd.concat(frames, ignore_index=True)
    mean_kl = df.groupby(["method", "n", "knob"], dropna=False)["kl"].transform("mean")
    best = mean_kl == mean_kl.groupby([df["method"], df["n"]]).transform("min")
    df["selected"] = df["knob"].isna() | best
    return df


@fit.one_thread
def population_limits(problem: TabularProblem, methods: Sequence[Method] | None = None) -> pd.DataFrame:
    """Each method's infinite-data limit: fitted on expected counts (n = 1e12, so the ridge vanishes).

    Columns: setting, method, kl_limit (KL to the target; the best over the grid for a tuned method), knob.
    A consistent method's limit is 0 up to solver precision; an inconsistent one's is its plateau.
    """
    methods = default_methods(problem) if methods is None else list(methods)
    counts = expected_counts(problem, 1e12)[None]
    rewards = None
    if any(m.needs_rewards for m in methods):
        rewards, _ = fit.fit_reward_model(problem, counts)
    rows = []
    for method in methods:
        best = (np.inf, np.nan)
        for value in method.grid if method.tune else (None,):
            log_pi, _ = fit_method(problem, counts, method, method.build(value), 1.0, rewards)
            kl = max(0.0, float(forward_kl(problem.target, log_pi.numpy())[0]))  # -1e-17 is rounding
            best = min(best, (kl, np.nan if value is None else value))
        rows.append({"setting": problem.name, "method": method.label, "kl_limit": best[0], "knob": best[1]})
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count of the KL over seeds, per method and n (selected fits only)."""
    kept = df[df["selected"]]
    out = kept.groupby(["setting", "method", "n"], sort=False).agg(
        kl_mean=("kl", "mean"), kl_sd=("kl", "std"), seeds=("kl", "size"), knob=("knob", "first")
    )
    return out.reset_index()


def fit_slopes(df: pd.DataFrame, min_n: int = 2**11) -> pd.DataFrame:
    """Least-squares slope of log KL against log n for n >= ``min_n``, per method.

    ``slope``: of the seed-mean KL; ``slope_sd``: spread of the per-seed slopes; ``kl_at_max_n``: seed-mean KL at
    the largest n. Slope -1 is the parametric rate of a consistent method; near 0 a plateau.
    """
    rows = []
    kept = df[df["selected"] & (df["n"] >= min_n)]
    for (setting, method), group in kept.groupby(["setting", "method"], sort=False):
        log_n = np.log(group["n"].to_numpy(float))
        mean = group.groupby("n")["kl"].mean()
        slope = np.polyfit(np.log(mean.index.to_numpy(float)), np.log(mean.to_numpy()), 1)[0]
        per_seed = [
            np.polyfit(log_n[mask], np.log(group["kl"].to_numpy()[mask]), 1)[0]
            for mask in (group["seed"].to_numpy() == s for s in group["seed"].unique())
        ]
        rows.append(
            {
                "setting": setting,
                "method": method,
                "slope": slope,
                "slope_sd": float(np.std(per_seed, ddof=1)),
                "kl_at_max_n": mean.iloc[-1],
                "n_max": int(mean.index[-1]),
                "min_n": min_n,
            }
        )
    return pd.DataFrame(rows)
