"""studylib: statistically consistent preference alignment, in one small library.

- ``studylib.losses``: every loss, and the registry ``get_loss(name, **knobs)``.
- ``studylib.logprobs``: per-sequence log-probs from a causal LM's logits.
- ``studylib.toy``: exact tabular experiments (density vs relative density ratio, consistency, stability).
- ``studylib.lm``: language-model helpers (models, data, annotators, trainer, evaluation).
"""

import warnings

__version__ = "0.1.0"

from studylib import provenance as _provenance

_provenance.install()  # from the first import on, record the repository files read: each stamp names its sources

# tqdm.auto (imported by transformers and the study runner) picks widget progress bars in a Jupyter kernel, and
# without ipywidgets (left out on purpose: executed notebooks store widget bars frozen at 0%) it warns, then draws
# the text bars a papermill run should record. Those text bars are what we want: that one warning is dropped.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
