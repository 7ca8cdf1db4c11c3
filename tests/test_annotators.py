"""The simulated annotator pool: deterministic, well-formed, and demonstrably not Bradley-Terry."""

import itertools

import numpy as np
import pytest

from studylib.lm.annotators import Annotator, AnnotatorPool, brevity, bt_fit, diversity, on_topic, sentiment

PROMPT = "Explain how volcanoes erupt."
# ordered a > b > c by sentiment, b > c > a by closeness to 10 words, c > a > b by use of the prompt's words
A = "What a wonderful, amazing and beautiful question! I love it so much, thank you, it is truly great and fun to think about volcanoes today."  # noqa: E501
B = "Sure, here is a small note for you about that thing."
C = "Sadly, volcanoes erupt when terrible pressure builds up and magma escapes violently."

FRAGMENTS = [
    "Volcanoes erupt when magma rises.",
    "I love this wonderful topic!",
    "This is sad and terrible.",
    "Pressure builds under the crust until it escapes.",
    "It is what it is.",
    "The the the the.",
    "Lava cools into new rock.",
    "Okay.",
]


def _completions(n: int = 30, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(FRAGMENTS, size=rng.integers(1, 6))) for _ in range(n)]


def test_properties():
    assert sentiment("I love it, wonderful!") > 0.8 > 0.2 > sentiment("terrible, awful, I hate it")
    assert brevity("one two three four five six seven eight nine", 9) == 1.0
    assert brevity("one two", 9) == pytest.approx(0.3)
    assert on_topic(PROMPT, C) == 1.0 and on_topic(PROMPT, B) == 0.0
    assert diversity("a b c d e") == 1.0 and diversity("the the the the the the") == pytest.approx(1 / 6)
    assert diversity("") == 0.0


def test_same_seed_same_pool_different_seed_different_pool():
    one, two, other = AnnotatorPool(seed=3), AnnotatorPool(seed=3), AnnotatorPool(seed=4)
    assert one.config() == two.config() and one.config() != other.config()
    assert np.array_equal(one.scores(PROMPT, A), two.scores(PROMPT, A))
    assert len(one) == 3 and {a.kind for a in one.annotators} == {"sentiment", "brevity", "on_topic"}
    eight = AnnotatorPool(seed=3, n_annotators=8, kinds=("sentiment", "brevity", "on_topic", "diversity"))
    assert len(eight) == 8 and {a.kind for a in eight.annotators} == {"sentiment", "brevity", "on_topic", "diversity"}


def test_label_rules_majority_and_fraction():
    """majority: 1 above half the annotators approving, 0 below, 1/2 on a tie; fraction: the share itself."""
    annotators = [Annotator("sentiment", 0, 0.5), Annotator("brevity", 10, 0.5), Annotator("on_topic", 0, 0.5)]
    majority = AnnotatorPool(annotators=annotators)
    fraction = AnnotatorPool(annotators=annotators, label_rule="fraction")
    for n_approving in range(4):
        scores = np.array([0.9] * n_approving + [0.1] * (3 - n_approving))
        assert fraction.approve_scores(scores) == pytest.approx(n_approving / 3)
        assert majority.approve_scores(scores) == (1.0 if n_approving >= 2 else 0.0)
    tie = AnnotatorPool(annotators=annotators[:2])
    assert tie.approve_scores(np.array([0.9, 0.1])) == 0.5
    with pytest.raises(ValueError, match="label_rule"):
        AnnotatorPool(label_rule="mean")


def test_prefer_and_approve_are_probabilities():
    pool = AnnotatorPool(seed=0)
    for a, b in itertools.combinations([A, B, C, "Okay."], 2):
        p = pool.prefer(PROMPT, a, b)
        assert 0.0 <= p <= 1.0 and p + pool.prefer(PROMPT, b, a) == pytest.approx(1.0)
        assert (p * len(pool) * 2) % 1 == 0  # multiples of 1/(2n): votes are 0, 1/2 or 1
    assert pool.prefer(PROMPT, A, A) == 0.5
    approvals = [pool.approve(PROMPT, c) for c in (A, B, C, "Okay.")]
    assert all(0.0 <= x <= 1.0 for x in approvals) and len(set(approvals)) > 1


def test_explicit_condorcet_cycle():
    pool = AnnotatorPool(
        annotators=[Annotator("sentiment", 0, 0.5), Annotator("brevity", 10, 0.5), Annotator("on_topic", 0, 0.5)]
    )
    s = {name: pool.scores(PROMPT, text) for name, text in zip("ABC", (A, B, C), strict=True)}
    assert s["A"][0] > s["B"][0] > s["C"][0]  # sentiment
    assert s["B"][1] > s["C"][1] > s["A"][1]  # brevity
    assert s["C"][2] > s["A"][2] > s["B"][2]  # on topic
    p_ab, p_bc, p_ca = pool.prefer(PROMPT, A, B), pool.prefer(PROMPT, B, C), pool.prefer(PROMPT, C, A)
    assert p_ab > 0.5 and p_bc > 0.5 and p_ca > 0.5
    rewards, residual = bt_fit(pool.preference_matrix(PROMPT, [A, B, C]))
    assert residual == pytest.approx(1 / 6, abs=1e-3)  # best BT fit: all equal, predicts 1/2 for a 2/3 cycle
    assert np.ptp(rewards) < 1e-3


def test_default_pool_is_badly_fit_by_bradley_terry():
    """The default pool's preferences are no BT model's: the best fit misses by > 0.15. (Its majority cycles when
    its three properties order three texts in Condorcet's pattern, as in ``test_explicit_condorcet_cycle``; how
    often on the study's samples is measured when the data are built: ``cyclic_triples`` in the data's stats.)"""
    items = _completions()
    for seed in range(3):
        assert bt_fit(AnnotatorPool(seed=seed).preference_matrix(PROMPT, items))[1] > 0.15


def test_bt_fit_recovers_a_bradley_terry_matrix():
    r = np.array([0.0, 0.5, -1.0, 2.0])
    prefs = 1 / (1 + np.exp(-(r[:, None] - r[None, :])))
    fitted, residual = bt_fit(prefs)
    assert residual < 1e-3
    assert np.allclose(fitted, r - r.mean(), atol=1e-2)
