"""The study's three settings put on the answer-set policy, by the toy's own problem definitions.

``studylib.toy.problems`` defines S1, S2 and S3 on a table of contexts; here a context is a prompt and its reference
is the frozen LM restricted to the prompt's candidates. The preferences belong to the prompt's category: the toy
problem is built with one context per category (``make_problem(setting, contexts=G, items=K)``) and
``on_reference`` gives every prompt its category's preferences on its own ``pi_ref(.|x)``:

- S1 (paired, intransitive): ``P(a > b | x)`` of the category; target ``p+ = 2 pi_ref Borda``.
- S2 (unpaired, imbalanced): ``q(x, y)`` of the category, its offset re-calibrated per prompt so that every prompt's
  preferred fraction is the same (0.2); target ``p+ = pi_ref q / 0.2``.
- S3 (paper 3): ``P(a > b | x) = sigmoid(gamma log pi*(a)/pi*(b))`` with the category's ``pi*``; target ``pi*``.

A held-out prompt's target comes from its category's preferences and its own reference, so a policy that lowers
the held-out KL has learnt how preferences depend on prompts, not the training prompts' answers. Data are drawn by
the toy's ``sample_rows`` on the training prompts (prompts uniform, ``y ~ pi_ref(.|x)`` exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from studylib.toy.fit import fit_reward_model
from studylib.toy.problems import TabularProblem, make_problem, on_reference, sample_rows


@dataclass(frozen=True)
class LMSetting:
    """One setting on the LM: the toy problem of the categories and its copies on the training and held-out prompts."""

    name: str
    categories: TabularProblem
    train: TabularProblem
    heldout: TabularProblem

    def rows(self, n: int, seed: int) -> dict[str, np.ndarray]:
        """The first ``n`` rows of seed ``seed``'s stream on the training prompts (nested in ``n``)."""
        return sample_rows(self.train, n, seed)

    def reward_table(self, pair_counts: np.ndarray, ridge: float = 1.0) -> Tensor:
        """A Bradley-Terry reward per (training prompt, candidate), fitted on pair counts (C, K, K) by the toy's exact
        solver (a ridge worth ``ridge`` rows toward 0): distillation's soft labels and reverse KL's reward. On the
        population's expected counts (``objectives.population_cells``) the ridge vanishes."""
        rewards, _ = fit_reward_model(self.train, np.asarray(pair_counts)[None], ridge)
        return rewards[0].to(torch.float64)


def lm_setting(
    setting: str,
    log_ref_train: np.ndarray,
    groups_train: Sequence[int],
    log_ref_heldout: np.ndarray,
    groups_heldout: Sequence[int],
    problem_seed: int = 0,
) -> LMSetting:
    """Setting ``"S1"``, ``"S2"`` or ``"S3"`` with one toy context per category (``groups``: each prompt's category
    index) on the given reference log-probs (prompts x K)."""
    contexts = int(max(max(groups_train), max(groups_heldout))) + 1
    problem = make_problem(setting, contexts=contexts, items=np.shape(log_ref_train)[1], seed=problem_seed)
    return LMSetting(
        setting,
        problem,
        on_reference(problem, log_ref_train, groups_train),
        on_reference(problem, log_ref_heldout, groups_heldout),
    )
