"""studylib: statistically consistent preference alignment, in one small library.

- ``studylib.losses``: every loss, and the registry ``get_loss(name, **knobs)``.
- ``studylib.logprobs``: per-sequence log-probs from a causal LM's logits.
- ``studylib.toy``: exact tabular experiments (density vs relative density ratio, consistency, stability).
- ``studylib.lm``: language-model helpers (models, data, annotators, trainer, evaluation).
"""

__version__ = "0.1.0"
