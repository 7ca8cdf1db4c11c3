"""A tiny, fully offline tokenizer and Llama model for tests and the smoke profile.

The tokenizer is byte-level (256 byte tokens, no merges) plus three special tokens, with a ChatML chat
template like SmolLM2's; the model is a randomly initialised ``LlamaForCausalLM`` of about 200K
parameters. Both are built in milliseconds without touching the network, and are deterministic for a seed.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_CONFIG: dict[str, object] = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (ids 0-2 special: pad, bos ``<|im_start|>``, eos ``<|im_end|>``) with a ChatML template.

    Every string round-trips exactly (byte-level, no unknown tokens). ``pad != eos``, unlike SmolLM2,
    so code that confuses the two is caught by tests.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=int(TINY_CONFIG["max_position_embeddings"]),
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_overrides: object) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer``, identical for the same seed.

    ``config_overrides`` replace entries of ``TINY_CONFIG`` (e.g. ``num_hidden_layers=1``). The global
    torch RNG is left untouched. Float32.
    """
    params = {**TINY_CONFIG, **config_overrides}
    rope_theta = params.pop("rope_theta")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **params,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
