"""Candidate words as token ids: each word must be exactly one token of the model's tokenizer, after its prompt.

The answer-set policy reads one next-token logit per candidate, so a word that the tokenizer splits into several
tokens has no single logit: that is an error, raised before anything runs, naming the word and its pieces. A word is
also checked in context: the prompt followed by the word must tokenize as the prompt's tokens plus the word's one
token (a byte-level BPE could otherwise merge across the boundary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase


class CandidateTokenError(ValueError):
    """A candidate word is not one token of the tokenizer (alone or after its prompt)."""


def candidate_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """The token id of each word; ``CandidateTokenError`` if a word is not exactly one token."""
    ids = []
    for word in words:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) != 1:
            shown = [tokenizer.decode([p]) for p in pieces]
            raise CandidateTokenError(
                f"candidate {word!r} is {len(pieces)} tokens {shown} of this tokenizer, not one: the answer-set policy "
                "needs one next-token logit per candidate; choose single-token words (mind the leading space)"
            )
        ids.append(pieces[0])
    return ids


def check_in_context(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], words: Sequence[str], ids: Sequence[int]
) -> None:
    """Every ``prompt + word`` must tokenize as ``prompt``'s tokens followed by the word's id."""
    for prompt in prompts:
        base = tokenizer.encode(prompt)
        joined = tokenizer([prompt + w for w in words])["input_ids"]
        for word, token, tokens in zip(words, ids, joined, strict=True):
            if tokens != [*base, token]:
                raise CandidateTokenError(
                    f"after the prompt {prompt!r}, candidate {word!r} does not tokenize as one token appended to the "
                    f"prompt's tokens ({len(tokens) - len(base)} new tokens)"
                )


def category_ids(
    tokenizer: PreTrainedTokenizerBase, candidates: Mapping[str, Sequence[str]], prompts: Mapping[str, Sequence[str]]
) -> dict[str, list[int]]:
    """Token ids of each category's candidates, checked alone and after each of the category's ``prompts``."""
    out = {}
    for category, words in candidates.items():
        out[category] = candidate_ids(tokenizer, words)
        check_in_context(tokenizer, prompts.get(category, ()), words, out[category])
    return out
