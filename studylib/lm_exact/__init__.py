"""The consistency claims on a real language model, measured exactly: the answer-set policy (notebook 06).

Prompts whose answer is one of K single-token candidate words; the policy is the LM's next-token softmax at the
answer position restricted to the candidates, so every target, sample and ``KL(target || pi_theta)`` is exact.

- ``prompts``     the templated prompts and candidate words (``data/lm_exact/``), train / held-out
- ``candidates``  candidate words as token ids; a word that is not one token is an error (``CandidateTokenError``)
- ``features``    one frozen forward pass: what lies below the trainable adapter, cached at the answer position
- ``policy``      ``pi_theta``: LoRA on the last block's down-projection, restricted softmax in float64
- ``targets``     the toy's S1, S2, S3 (``studylib.toy.problems``) put on each prompt's own reference
- ``objectives``  the registry's losses on a data set's distinct cells (or the population), fed the rows each
                  declares it needs; the floor's forward KL
- ``train``       full-batch AdamW with a per-step log (gradient norm, max exp T, DDRO's guard)
- ``experiment``  one run: a method on a data set or its population, a floor
- ``protocol``    the study's written rules: floors, each method's learning rate, sizes x seeds, limits, doubled
                  steps, DDRO's guard, the alpha sweep
- ``story``, ``plots``, ``studies``  findings computed from the tables, figures, the notebook's steps
"""
