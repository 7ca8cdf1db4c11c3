"""The answer-set policy on a tiny Llama from a config: its log-probs, targets and KLs are exact (against brute
force), a short run lowers the KL, and a candidate word that is not one token fails clearly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from studylib.lm.tiny import tiny_model, tiny_tokenizer
from studylib.lm_exact.candidates import CandidateTokenError, candidate_ids, category_ids
from studylib.lm_exact.experiment import data_cells, lm_methods, method_objective, prepare
from studylib.lm_exact.features import answer_features, last_block
from studylib.lm_exact.objectives import floor_objective, loss_objective, sample_cells
from studylib.lm_exact.policy import AnswerSetPolicy, reference_log_probs
from studylib.lm_exact.prompts import build_prompts, load_candidates, load_prompts
from studylib.lm_exact.train import TrainSettings, objective_value, policy_log_probs, train_policy
from studylib.losses import get_loss
from studylib.toy.problems import forward_kl

PROMPTS = ["Anna's favourite colour is", "Ben said that the best drink is", "The sport that Hiro likes best is"]
LETTERS = list("abcdefghij")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, seed=0).eval(), tokenizer


@pytest.fixture(scope="module")
def prepared():
    return prepare(
        "tiny", "data/lm_exact/prompts.jsonl", "data/lm_exact/candidates_tiny.json", ["S1", "S2", "S3"], bf16=False
    )


def brute_force_log_probs(model, tokenizer, prompt: str, ids: list[int]) -> torch.Tensor:
    """One prompt through the whole model, no padding, no cache: log softmax of the candidates' next-token logits."""
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(prompt)])).logits[0, -1]
    return torch.log_softmax(logits[ids].double(), dim=-1)


def test_restricted_policy_is_the_model_with_its_lora_merged(tiny):
    model, tokenizer = tiny
    ids = candidate_ids(tokenizer, LETTERS)
    features = answer_features(model, tokenizer, PROMPTS, [ids] * len(PROMPTS), batch_size=2)
    reference = reference_log_probs(features)
    for prompt, row in zip(PROMPTS, reference, strict=True):  # B = 0: the frozen model itself
        torch.testing.assert_close(row, brute_force_log_probs(model, tokenizer, prompt, ids), atol=1e-5, rtol=0)
    policy = AnswerSetPolicy.for_features(features, r=4, seed=1)
    with torch.no_grad():
        policy.lora_B.normal_(0.0, 0.5)
    merged = model.__class__(model.config).eval()
    merged.load_state_dict(model.state_dict())
    down = last_block(merged).mlp.down_proj
    with torch.no_grad():
        down.weight.copy_(policy.merged_down_weight(down.weight))
    trained = policy_log_probs(policy, features)
    assert (trained - reference).abs().max() > 0.05  # the adapter moved the policy
    for prompt, row in zip(PROMPTS, trained, strict=True):
        torch.testing.assert_close(row, brute_force_log_probs(merged, tokenizer, prompt, ids), atol=1e-5, rtol=0)


def brute_force_target(setting, problem, x: int) -> np.ndarray:
    """The preferred distribution of prompt x by enumerating what generates the data."""
    ref, K = np.exp(problem.log_ref[x]), problem.items
    if setting == "S2":  # y ~ ref, label ~ Bernoulli(q): P(y | preferred) by Bayes
        joint = np.array([ref[y] * problem.q[x, y] for y in range(K)])
        return joint / joint.sum()
    if setting == "S3":
        return None
    wins = np.zeros(K)  # S1: a, b ~ ref independently, the winner's distribution
    for a, b in itertools.product(range(K), range(K)):
        p = ref[a] * ref[b]
        wins[a] += p * problem.pref[x, a, b]
        wins[b] += p * (1 - problem.pref[x, a, b])
    return wins


@pytest.mark.parametrize("setting", ["S1", "S2", "S3"])
def test_targets_and_kl_are_exact(prepared, setting):
    lm = prepared.settings[setting]
    train, categories = lm.train, lm.categories
    order = list(load_candidates("data/lm_exact/candidates_tiny.json"))  # a category's toy context: its place here
    group_index = prepared.prompts.loc[prepared.prompts["split"] == "train", "category"].map(order.index)
    np.testing.assert_allclose(train.log_ref, prepared.log_ref["train"].numpy())
    for x in range(0, train.contexts, 17):
        want = brute_force_target(setting, train, x)
        if want is None:  # S3: the category's pi*, whatever the prompt's reference
            want = categories.target[group_index.iloc[x]]
        np.testing.assert_allclose(train.target[x], want, atol=1e-12)
        if setting == "S2":
            assert (np.exp(train.log_ref[x]) * train.q[x]).sum() == pytest.approx(0.2, abs=1e-9)
    log_pi = np.log(np.random.default_rng(0).dirichlet(np.ones(train.items), size=train.contexts))
    brute = np.mean(
        [
            sum(t * np.log(t / p) for t, p in zip(tr, np.exp(lp), strict=True))
            for tr, lp in zip(train.target, log_pi, strict=True)
        ]
    )
    assert forward_kl(train.target, log_pi) == pytest.approx(brute, rel=1e-12)


def test_rows_are_drawn_from_the_reference(prepared):
    lm = prepared.settings["S2"]
    rows = lm.rows(200_000, seed=0)
    ref = np.exp(lm.train.log_ref)
    frequency = np.bincount(rows["item"], minlength=lm.train.items) / len(rows["item"])
    np.testing.assert_allclose(frequency, ref.mean(0), atol=4e-3)
    assert rows["label"].mean() == pytest.approx(0.2, abs=4e-3)


def test_a_short_run_lowers_the_kl(prepared):
    lm = prepared.settings["S1"]
    reference_kl = forward_kl(lm.train.target, prepared.log_ref["train"].numpy())
    method = lm_methods(lm)[1]  # RDRO (alpha=1/2)
    objective = method_objective(prepared, lm, method, data_cells(lm, 4096, seed=0))
    before = AnswerSetPolicy.for_features(prepared.features["train"], seed=0)
    policy, curve, _ = train_policy(
        prepared.features["train"], prepared.log_ref["train"], objective, TrainSettings(lr=0.03, steps=40), init_seed=0
    )
    features = prepared.features["train"]
    assert objective_value(objective, policy, features) < objective_value(objective, before, features)
    assert list(curve.columns) == ["step", "grad_norm", "ratio_max", "guard"] and len(curve) == 40
    assert forward_kl(lm.train.target, policy_log_probs(policy, prepared.features["train"]).numpy()) < reference_kl
    floor, _, _ = train_policy(
        prepared.features["train"],
        prepared.log_ref["train"],
        floor_objective(lm.train.target),
        TrainSettings(0.03, 40),
        0,
    )
    kl_floor = forward_kl(lm.train.target, policy_log_probs(floor, prepared.features["train"]).numpy())
    assert kl_floor < 0.5 * reference_kl


def test_objectives_feed_the_registry_losses(prepared):
    lm = prepared.settings["S3"]
    log_ref = prepared.log_ref["train"]
    log_pi = torch.log_softmax(
        log_ref + 0.3 * torch.randn(log_ref.shape, generator=torch.Generator().manual_seed(0)), -1
    )
    rows = lm.rows(256, seed=0)
    data = sample_cells(lm.train, rows)
    x, w, l_ = (torch.as_tensor(rows[k]) for k in ("context", "winner", "loser"))
    dpo = get_loss("dpo", beta=1.0)
    value = loss_objective(dpo, lm.train, data, log_ref).value(log_pi)
    want, _ = dpo(log_pi[x, w], log_pi[x, l_], log_ref[x, w], log_ref[x, l_])
    assert value == pytest.approx(want.item(), rel=1e-12)
    rewards = lm.reward_table(data.counts)
    reverse_kl = get_loss("reverse_kl", gamma=0.5, beta=0.0)
    value, _ = loss_objective(reverse_kl, lm.train, data, log_ref, rewards)(log_pi)
    assert value.item() == pytest.approx(reverse_kl.exact(log_pi, log_ref, rewards).item() / len(log_pi), rel=1e-12)


def test_ddro_gets_the_guard_eps_of_the_study(prepared):
    setting = prepared.settings["S1"]
    ddro = next(m for m in lm_methods(setting, guard_eps=0.2) if m.loss == "ddro")
    population = data_cells(setting, None, seed=0)  # every cell, both labels
    ref = prepared.log_ref["train"].exp()
    rows, rarest = torch.arange(len(ref)), ref.argmin(1)
    policy = ref * ((1 - 1.9 * ref[rows, rarest]) / (1 - ref[rows, rarest]))[:, None]
    policy[rows, rarest] = 1.9 * ref[rows, rarest]  # exp T = 1.9 on each prompt's rarest answer, below 1 elsewhere
    guarded = method_objective(prepared, setting, ddro, population)(policy.log())[1]["guard/activations"]
    default = next(m for m in lm_methods(setting) if m.loss == "ddro")
    assert default.knobs["guard_eps"] == 0.01
    unguarded = method_objective(prepared, setting, default, population)(policy.log())[1]["guard/activations"]
    assert guarded.item() == len(ref) and unguarded.item() == 0


def test_a_candidate_that_is_not_one_token_fails_clearly(tiny):
    _, tokenizer = tiny
    with pytest.raises(CandidateTokenError, match=r"candidate 'apple' is 5 tokens"):
        candidate_ids(tokenizer, ["a", "apple"])
    with pytest.raises(CandidateTokenError, match="candidate ' red'"):
        category_ids(tokenizer, {"colour": ["a", " red"]}, {"colour": PROMPTS})


def test_committed_prompts_are_the_templates():
    committed = load_prompts()
    built = build_prompts()
    assert committed.to_dict("records") == built.to_dict("records")
    assert 300 <= len(committed) and set(committed["split"]) == {"train", "heldout"}
    assert not set(committed.loc[committed["split"] == "train", "prompt"]) & set(
        committed.loc[committed["split"] == "heldout", "prompt"]
    )
