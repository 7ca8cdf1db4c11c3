"""A simulated annotator pool that is deliberately not Bradley-Terry.

Each annotator judges one property of a completion, with its own parameters drawn from the pool's seed:

- ``sentiment``: VADER's compound score (``vaderSentiment`` lexicon, shipped in its wheel), mapped to [0, 1].
- ``brevity``: closeness of the word count to the annotator's target length, ``min(r, 1/r)`` with
  ``r = (words + 1) / (target + 1)``.
- ``on_topic``: the fraction of the prompt's content words that the completion uses.
- ``diversity``: distinct words / words (repetition is penalised; texts under 5 words are scaled down).

Judgments are deterministic per annotator: annotator ``j`` prefers ``a`` to ``b`` when
``s_j(a) > s_j(b) + tol`` (within ``tol``: half a vote each). The pool's ``prefer(x, a, b)`` is the fraction
of annotators preferring ``a``. ``approve(x, y)`` is the probability that ``y`` is labelled preferred, by the
pool's ``label_rule``:

- ``"majority"`` (the default): 1 when more than half of the annotators' scores clear their thresholds, 0 when
  fewer than half do (1/2 on a tie). Labels are then a deterministic function of the text, so the exact target
  ``p+(y|x) ∝ pi_ref(y|x) approve(x, y)`` is ``pi_ref`` restricted to the approved completions: far from
  ``pi_ref`` whenever the reference's samples straddle the thresholds (``target_distance`` measures it).
- ``"fraction"``: the fraction of annotators approving (a label is one random annotator's verdict). Softer:
  with independent annotators most completions get 1/3 or 2/3 and the target stays near the reference.

The default pool is one annotator per property the reference's samples vary in: positive tone (VADER), the
prompt's content words, and brevity (a target of 12-18 words, where SmolLM2's 32-token samples run about 26).

**Why this is not Bradley-Terry.** BT says ``P(a > b) = sigmoid(r(a) - r(b))`` for one scalar reward ``r``,
which forces stochastic transitivity: ``P(a>b) > 1/2`` and ``P(b>c) > 1/2`` imply ``P(a>c) > 1/2``. A
majority over annotators who rank by different properties breaks that (Condorcet's paradox): with one
annotator per property and items ordered ``a > b > c`` by sentiment, ``b > c > a`` by brevity and
``c > a > b`` by topicality, ``P(a>b) = P(b>c) = P(c>a) = 2/3``, a cycle no reward can produce (the best
BT fit predicts 1/2 everywhere). Probabilities are also multiples of ``1/n_annotators``, often exactly 0
or 1, which no finite BT reward reproduces. ``bt_fit`` measures the misfit on any set of items.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import minimize

POOL_VERSION = 2
KINDS = ("sentiment", "brevity", "on_topic", "diversity")
DEFAULT_KINDS = ("sentiment", "on_topic", "brevity")
LABEL_RULES = ("majority", "fraction")
# Approval thresholds per kind (an annotator's own threshold is this plus seeded jitter). Calibrated on
# SmolLM2-135M-Instruct samples (32 new tokens, temperature 1): the default pool's annotators approve about
# 32% (sentiment), 37% (on topic) and 46% (brevity) of them, and its majority about 30%, near UF-G's 39%
# preferred fraction, so the unpaired data are imbalanced like the paper's.
BASE_THRESHOLDS = {"sentiment": 0.8, "brevity": 0.6, "on_topic": 0.5, "diversity": 0.87}
TARGET_WORDS = (12.0, 18.0)  # brevity annotators' target word counts are drawn uniformly from this range

_WORD = re.compile(r"[a-z0-9']+")
_STOPWORDS = frozenset(
    "a an the and or but if then of to in on for with about as at by from into is are was were be been being "
    "this that these those it its i you he she we they me my your our their what which who whom how why when "
    "where do does did can could should would will shall may might must not no so than too very just give write "
    "explain describe tell list make please some any one two three short brief simple".split()
)


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def sentiment(text: str) -> float:
    """VADER compound score mapped from [-1, 1] to [0, 1]."""
    return (_vader().polarity_scores(text)["compound"] + 1.0) / 2.0


def brevity(text: str, target: float) -> float:
    """``min(r, 1/r)`` with ``r = (words + 1) / (target + 1)``: 1 at the target length."""
    ratio = (len(words(text)) + 1.0) / (target + 1.0)
    return min(ratio, 1.0 / ratio)


def on_topic(prompt: str, text: str) -> float:
    """The fraction of the prompt's content words (stemmed, stop words dropped) that ``text`` uses."""
    keys = {_stem(w) for w in words(prompt) if w not in _STOPWORDS and len(w) > 2}
    if not keys:
        return 0.5
    return len(keys & {_stem(w) for w in words(text)}) / len(keys)


def diversity(text: str) -> float:
    """Distinct words / words, times ``min(1, words / 5)``; 0 for an empty text."""
    tokens = words(text)
    if not tokens:
        return 0.0
    return len(set(tokens)) / len(tokens) * min(1.0, len(tokens) / 5.0)


@dataclass(frozen=True)
class Annotator:
    """One annotator: the property it judges, its brevity target (words), and its approval threshold."""

    kind: str
    target: float
    threshold: float

    def score(self, prompt: str, completion: str) -> float:
        """This annotator's score of ``completion`` for ``prompt``, in [0, 1]."""
        if self.kind == "sentiment":
            return sentiment(completion)
        if self.kind == "brevity":
            return brevity(completion, self.target)
        if self.kind == "on_topic":
            return on_topic(prompt, completion)
        if self.kind == "diversity":
            return diversity(completion)
        raise ValueError(f"unknown annotator kind {self.kind!r}; known: {KINDS}")


class AnnotatorPool:
    """A seeded mixture of property annotators; ``prefer`` and ``approve`` are fractions of annotators.

    ``kinds`` are cycled to ``n_annotators`` annotators; each draws its brevity target from
    ``TARGET_WORDS`` and its threshold as ``BASE_THRESHOLDS[kind] + U(-jitter, jitter)``. Pass
    ``annotators`` to set them explicitly (``seed`` is then only recorded). ``label_rule``: how ``approve``
    turns the annotators' verdicts into a label probability (module docstring). Same seed, same pool.
    """

    def __init__(
        self,
        seed: int = 0,
        n_annotators: int = 3,
        kinds: Sequence[str] = DEFAULT_KINDS,
        tol: float = 0.02,
        jitter: float = 0.02,
        annotators: Sequence[Annotator] | None = None,
        label_rule: str = "majority",
    ) -> None:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown annotator kinds {unknown}; known: {KINDS}")
        if n_annotators < 1 or tol < 0:
            raise ValueError(f"need n_annotators >= 1 and tol >= 0, got {n_annotators} and {tol}")
        if label_rule not in LABEL_RULES:
            raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {label_rule!r}")
        self.seed, self.tol, self.label_rule = seed, tol, label_rule
        if annotators is None:
            rng = np.random.default_rng(seed)
            annotators = []
            for i in range(n_annotators):
                kind = kinds[i % len(kinds)]
                target = float(np.round(rng.uniform(*TARGET_WORDS), 1))
                threshold = float(np.round(BASE_THRESHOLDS[kind] + rng.uniform(-jitter, jitter), 3))
                annotators.append(Annotator(kind, target if kind == "brevity" else 0.0, threshold))
        self.annotators: tuple[Annotator, ...] = tuple(annotators)
        self.thresholds = np.array([a.threshold for a in self.annotators])
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.annotators)

    def config(self) -> dict:
        """Everything that determines the pool's judgments (for cache keys and reports)."""
        return {
            "version": POOL_VERSION,
            "seed": self.seed,
            "tol": self.tol,
            "label_rule": self.label_rule,
            "annotators": [asdict(a) for a in self.annotators],
        }

    def scores(self, prompt: str, completion: str) -> np.ndarray:
        """Per-annotator scores of ``completion`` for ``prompt`` (shape ``(n_annotators,)``, values in [0, 1])."""
        key = (prompt, completion)
        if key not in self._cache:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[key] = np.array([a.score(prompt, completion) for a in self.annotators])
        return self._cache[key]

    def prefer_scores(self, scores_a: np.ndarray, scores_b: np.ndarray) -> float:
        """P(a beats b) from per-annotator scores: each annotator's vote is 1, 0, or 1/2 within ``tol``."""
        diff = np.asarray(scores_a) - np.asarray(scores_b)
        votes = np.where(diff > self.tol, 1.0, np.where(diff < -self.tol, 0.0, 0.5))
        return float(votes.mean())

    def approve_scores(self, scores: np.ndarray) -> float:
        """The label probability from per-annotator scores, by ``label_rule`` (module docstring)."""
        approving = float((np.asarray(scores) >= self.thresholds).mean())
        if self.label_rule == "fraction":
            return approving
        return 1.0 if approving > 0.5 else 0.0 if approving < 0.5 else 0.5

    def prefer(self, prompt: str, a: str, b: str) -> float:
        """Probability that ``a`` beats ``b`` for ``prompt``: the fraction of annotators preferring it, ties half."""
        return self.prefer_scores(self.scores(prompt, a), self.scores(prompt, b))

    def approve(self, prompt: str, completion: str) -> float:
        """Probability that ``completion`` is labelled preferred (``label_rule``)."""
        return self.approve_scores(self.scores(prompt, completion))

    def preference_matrix(self, prompt: str, completions: Sequence[str]) -> np.ndarray:
        """``P[i, j] = prefer(prompt, completions[i], completions[j])`` (diagonal 1/2)."""
        s = [self.scores(prompt, c) for c in completions]
        return np.array([[self.prefer_scores(si, sj) for sj in s] for si in s])


def bt_fit(prefs: np.ndarray) -> tuple[np.ndarray, float]:
    """Best Bradley-Terry fit to a preference matrix: rewards (mean 0) and the max |P - sigmoid(r_i - r_j)|.

    Minimises the cross-entropy of ``sigmoid(r_i - r_j)`` against ``P[i, j]`` over all ordered pairs (a
    small ridge keeps rewards finite when some ``P`` are 0 or 1). A max residual well above 0 means no
    scalar reward explains the preferences.
    """
    p = np.asarray(prefs, dtype=float)
    n = p.shape[0]
    if p.shape != (n, n):
        raise ValueError(f"prefs must be square, got shape {p.shape}")
    off = ~np.eye(n, dtype=bool)

    def loss(r: np.ndarray) -> tuple[float, np.ndarray]:
        z = r[:, None] - r[None, :]
        sig = 1.0 / (1.0 + np.exp(-z))
        eps = 1e-12
        value = -(p * np.log(sig + eps) + (1 - p) * np.log(1 - sig + eps))[off].sum() + 1e-4 * (r @ r)
        g = np.where(off, sig - p, 0.0)
        return float(value), g.sum(axis=1) - g.sum(axis=0) + 2e-4 * r

    r = minimize(loss, np.zeros(n), jac=True, method="L-BFGS-B").x
    r -= r.mean()
    residual = np.abs(p - 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :]))))[off]
    return r, float(residual.max()) if residual.size else 0.0
