"""Full-batch AdamW on the answer-set policy, with a log of every step.

Each step evaluates the objective on the whole data set (every row, exactly: ``objectives``), so what differs between
data sets of different size is the data, not the noise of minibatches. AdamW (Loshchilov and Hutter, 2019) with
weight decay 0 (transformers' default), a linear warm-up over ``warmup`` of the steps and a cosine decay to 0 (the
schedule of the RDRO authors' runs), no gradient clipping (the gradient norm is logged before the step: DDRO's
spikes are a result). One torch thread (restored after): the tensors are small, and threads fighting over shared
cores made runs several times slower. Logged per step: the adapter's gradient norm, the largest
``exp T = pi_theta / pi_ref`` over the cells the data touch, and DDRO's guard activations (``guard/activations``:
distinct (prompt, candidate) cells of - rows past the guard; 0 for other losses).

The adapter's initialisation has its own seed (``init_seed``), apart from the data's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from transformers import get_cosine_schedule_with_warmup

from studylib.lm_exact.features import AnswerFeatures
from studylib.lm_exact.objectives import Objective
from studylib.lm_exact.policy import AnswerSetPolicy
from studylib.toy.fit import one_thread


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser knobs of one run: the learning rate (each method's own, chosen from a grid), steps, warm-up
    fraction and LoRA rank."""

    lr: float = 1e-2
    steps: int = 300
    warmup: float = 0.1
    rank: int = 16


CURVE_COLUMNS = ["step", "grad_norm", "ratio_max", "guard"]


@one_thread
def train_policy(
    features: AnswerFeatures, log_ref: Tensor, objective: Objective, settings: TrainSettings, init_seed: int
) -> tuple[AnswerSetPolicy, pd.DataFrame, float]:
    """A fresh policy (adapter drawn with ``init_seed``) trained on ``objective``; returns it, its per-step log
    and the seconds it took."""
    start = time.perf_counter()
    policy = AnswerSetPolicy.for_features(features, r=settings.rank, seed=init_seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup * settings.steps), settings.steps)
    log = []
    for step in range(settings.steps):
        log_pi = policy(features)
        loss, metrics = objective(log_pi)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in policy.parameters()]))
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            ratio = (log_pi - log_ref)[objective.cells].max().exp()
        guard = metrics.get("guard/activations", torch.zeros(()))
        log.append((step, grad_norm.item(), ratio.item(), int(guard)))
    return policy, pd.DataFrame(log, columns=CURVE_COLUMNS), time.perf_counter() - start


def policy_log_probs(policy: AnswerSetPolicy, features: AnswerFeatures) -> Tensor:
    """The trained policy's log-probs (C, K) on ``features``' prompts, without gradients."""
    with torch.no_grad():
        return policy(features)


def objective_value(objective: Objective, policy: AnswerSetPolicy, features: AnswerFeatures) -> float:
    """The training objective at ``policy`` (NaN where the objective has no value: the population's)."""
    if objective.value is None:
        return math.nan
    return objective.value(policy_log_probs(policy, features))
