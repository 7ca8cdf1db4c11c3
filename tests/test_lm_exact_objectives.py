"""The answer-set study's objectives: a data set given as counts of its distinct cells trains exactly as its rows do
(value and gradient against the registry loss called on every row), and the population risk is minimised at the
target exactly for the methods the theory calls consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studylib.lm_exact.experiment import data_cells, lm_methods, method_objective, prepare
from studylib.lm_exact.objectives import population_cells, sample_cells
from studylib.lm_exact.story import expected
from studylib.losses import build_loss
from studylib.toy.problems import unpaired_view


@pytest.fixture(scope="module")
def prepared():
    return prepare(
        "tiny", "data/lm_exact/prompts.jsonl", "data/lm_exact/candidates_tiny.json", ["S1", "S2", "S3"], bf16=False
    )


def _logits(shape, seed: int = 0) -> torch.Tensor:
    return (
        0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ).requires_grad_()


def _row_loss(loss, setting, rows, log_pi, log_ref, rewards):
    """The registry loss on every row of ``rows``, built here from the rows themselves (the oracle)."""
    if loss.kind == "on_policy":
        return loss.exact(log_pi, log_ref, rewards) / log_pi.shape[0]
    if loss.kind == "unpaired":
        view = unpaired_view(rows)
        x, y = torch.as_tensor(view["context"]), torch.as_tensor(view["item"])
        inputs = {
            "policy_logps": log_pi[x, y],
            "reference_logps": log_ref[x, y],
            "labels": torch.as_tensor(view["label"]),
        }
        if loss.mismatched_pairs:
            shifted = torch.roll(y, 1)  # each prompt with the previous row's completion (TRL's shift)
            inputs |= {"policy_kl_logps": log_pi[x, shifted], "reference_kl_logps": log_ref[x, shifted]}
        return loss(**inputs)[0]
    if loss.needs_reward_model:  # every unordered pair of every prompt
        a, b = torch.triu_indices(log_pi.shape[1], log_pi.shape[1], offset=1)
        x, w, l_ = (
            torch.arange(log_pi.shape[0]).repeat_interleave(len(a)),
            a.repeat(log_pi.shape[0]),
            b.repeat(log_pi.shape[0]),
        )
        extra = {"reward_margins": rewards[x, w] - rewards[x, l_]}
    else:
        x, w, l_ = (torch.as_tensor(rows[k]) for k in ("context", "winner", "loser"))
        extra = {}
    inputs = {
        "policy_chosen_logps": log_pi[x, w],
        "policy_rejected_logps": log_pi[x, l_],
        "reference_chosen_logps": log_ref[x, w],
        "reference_rejected_logps": log_ref[x, l_],
    }
    if loss.kl_coefficient > 0:
        extra["kl_penalty"] = (log_pi.exp() * (log_pi - log_ref)).sum(-1).mean()
    return loss(**inputs, **extra)[0]


def _methods(prepared):
    for setting in prepared.settings.values():
        for method in lm_methods(setting):
            yield setting, method
    yield (
        prepared.settings["S3"],
        lm_methods(prepared.settings["S3"])[0].__class__("PMLE with a KL term", "pmle", {"gamma": 0.5, "beta": 0.3}),
    )


def test_cell_counts_train_exactly_as_the_rows_do(prepared):
    log_ref = prepared.log_ref["train"]
    checked = 0
    for setting, method in _methods(prepared):
        rows = setting.rows(700, seed=3)
        data = sample_cells(setting.train, rows)
        assert data.counts.sum() == 700
        objective = method_objective(prepared, setting, method, data)
        loss = build_loss(method.loss, dict(method.knobs), data.preferred_fraction)
        rewards = setting.reward_table(data.counts) if loss.needs_reward_model else None
        theta = _logits(log_ref.shape, seed=checked)
        log_pi = torch.log_softmax(theta, -1)
        want = _row_loss(loss, setting, rows, log_pi, log_ref, rewards)
        (want_grad,) = torch.autograd.grad(want, theta)
        surrogate, _ = objective(torch.log_softmax(theta, -1))
        (grad,) = torch.autograd.grad(surrogate, theta)
        torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12, msg=f"{setting.name} {method.label}")
        assert objective.value(log_pi.detach()) == pytest.approx(want.item(), rel=1e-12), method.label
        checked += 1
    assert checked == 13


def test_the_population_risk_is_least_at_the_target_exactly_for_the_consistent_methods(prepared):
    verdicts = {}
    for setting, method in _methods(prepared):
        if method.label == "PMLE with a KL term":
            continue
        objective = method_objective(prepared, setting, method, data_cells(setting, None, seed=0))
        # no rows to count: only objectives on the reward model's table (every pair, or on-policy) have a value
        assert (objective.value is None) == (method.loss not in ("distill", "reverse_kl")), method.label
        theta = torch.log(torch.as_tensor(setting.train.target)).requires_grad_()
        (grad,) = torch.autograd.grad(objective(torch.log_softmax(theta, -1))[0], theta)
        stationary = grad.abs().max().item() < 1e-7
        verdicts[(setting.name, method.label)] = stationary
        assert stationary == expected(setting.name, method.label), (setting.name, method.label, grad.abs().max())
    assert sum(verdicts.values()) == 6 and len(verdicts) == 12


def test_population_cells_are_the_expected_counts(prepared):
    s1, s2 = prepared.settings["S1"], prepared.settings["S2"]
    pairs = population_cells(s1.train)
    assert pairs.preferred_fraction == pytest.approx(0.5)
    np.testing.assert_allclose(pairs.counts.sum((1, 2)) / pairs.counts.sum(), 1 / s1.train.contexts, rtol=1e-12)
    labelled = population_cells(s2.train)
    assert labelled.preferred_fraction == pytest.approx(s2.train.preferred_fraction, rel=1e-12)
    mismatched = labelled.mismatched / labelled.mismatched.sum()
    joint = labelled.counts.sum(-1) / labelled.counts.sum()
    np.testing.assert_allclose(mismatched, np.outer(joint.sum(1), joint.sum(0)), rtol=1e-12)
    sampled = data_cells(s2, 50_000, seed=1)
    assert abs(sampled.preferred_fraction - labelled.preferred_fraction) < 0.01
