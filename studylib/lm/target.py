"""How far a policy is from its target, on sampled text: ``KL(p+ || pi)`` by importance weights on reference samples.

DDRO and RDRO target the preferred distribution ``p+(y|x) = pi_ref(y|x) a(x, y) / Z(x)``, where ``a(x, y)`` is the
probability that ``y`` is labelled preferred (the annotator pool's ``approve``) and ``Z(x) = E_ref[a]``. An
expectation under ``p+`` is a reweighted mean over reference samples, so with ``k`` samples ``y_i ~ pi_ref`` of a
prompt, ``a_i = a(x, y_i)`` and self-normalised weights ``w_i = a_i / sum_j a_j`` (``Z_hat = mean(a_i)``):

    KL(p+ || pi_ref) = E_p+[log a - log Z]            ~ sum_i w_i (log a_i - log Z_hat)
    KL(p+ || pi)     = KL(p+ || pi_ref) + E_p+[log pi_ref - log pi]
                                                     ~ KL(p+ || pi_ref) + sum_i w_i (log pi_ref(y_i) - log pi(y_i))

(terms with ``a_i = 0`` carry no weight). The gain ``KL(p+ || pi_ref) - KL(p+ || pi) = E_p+[log pi - log pi_ref]``
is the policy's mean log-ratio on the samples the target keeps: positive when the policy moved toward its target.
Both estimates use the same reference samples, so the gain is paired prompt by prompt; its finite-``k`` bias
(self-normalisation) is the same for every method. A prompt none of whose ``k`` reference samples is approved
has no estimate (``Z_hat = 0``) and is left out; ``target_prompts`` counts the prompts kept.

This is the sequence-level counterpart of notebook 06's exact excess KL. Paper 3's methods (PMLE, distillation,
reverse KL) target ``pi* ∝ pi_ref exp(r*/beta)`` under a Bradley-Terry model the pool does not follow, so their
own target cannot be written from the pool's judgments; their rows report the distance to ``p+`` too, as the
common yardstick of "closer to what the annotators approve" (docs/STUDY.md, section 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from studylib.lm.batching import pad_token_id, score_sequences
from studylib.lm.reference import Reference
from studylib.lm.sampling import sample_completions
from studylib.lm.stats import bootstrap_interval

if TYPE_CHECKING:
    from studylib.lm.evaluate import Judge, Messages


def target_kl_per_prompt(
    approvals: np.ndarray, reference_logps: np.ndarray, policy_logps: np.ndarray, samples_per_prompt: int
) -> pd.DataFrame:
    """Per prompt, from ``samples_per_prompt`` reference samples each (prompt-major flat arrays): the estimated
    ``target_mass`` (``Z_hat``), ``reference_approval`` (the same number: the reference's approval), and the
    estimates of ``reference_kl_to_target`` and ``kl_to_target`` (NaN where no sample is approved)."""
    k = samples_per_prompt
    a, ref, pol = (np.asarray(v, dtype=float) for v in (approvals, reference_logps, policy_logps))
    if not (a.shape == ref.shape == pol.shape and a.ndim == 1 and k >= 1 and a.size % k == 0 and a.size):
        shapes = f"{a.shape}, {ref.shape}, {pol.shape}"
        raise ValueError(f"need three equal 1-d arrays of prompts x {k} samples, got {shapes}")
    if ((a < 0) | (a > 1)).any():
        raise ValueError("approvals must lie in [0, 1]")
    a, ref, pol = a.reshape(-1, k), ref.reshape(-1, k), pol.reshape(-1, k)
    mass = a.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = a / a.sum(axis=1, keepdims=True)
        log_ratio_to_target = np.where(a > 0, np.log(np.where(a > 0, a, 1.0)) - np.log(mass)[:, None], 0.0)
        reference_kl = (weights * log_ratio_to_target).sum(axis=1)
        kl = reference_kl + (weights * (ref - pol)).sum(axis=1)
    kept = mass > 0
    return pd.DataFrame(
        {
            "prompt_index": np.arange(len(mass)),
            "target_mass": mass,
            "reference_approval": mass,
            "reference_kl_to_target": np.where(kept, reference_kl, np.nan),
            "kl_to_target": np.where(kept, kl, np.nan),
        }
    )


def summarise_target_kl(per_prompt: pd.DataFrame, seed: int = 0, prefix: str = "") -> dict[str, float]:
    """``kl_to_target``, ``reference_kl_to_target`` and their difference ``kl_to_target_gain`` (reference minus
    policy: positive is closer), each with its 95% bootstrap interval over the prompts that have a target."""
    kept = per_prompt.dropna(subset=["kl_to_target"])
    out: dict[str, float] = {f"{prefix}target_prompts": len(kept)}
    if kept.empty:
        return out
    columns = {
        "kl_to_target": kept["kl_to_target"],
        "reference_kl_to_target": kept["reference_kl_to_target"],
        "kl_to_target_gain": kept["reference_kl_to_target"] - kept["kl_to_target"],
    }
    for name, values in columns.items():
        estimate, low, high = bootstrap_interval(values.to_numpy(), seed=seed)
        out |= {f"{prefix}{name}": estimate, f"{prefix}{name}_low": low, f"{prefix}{name}_high": high}
    return out


class TargetProbe:
    """A fixed set of prompts with ``samples_per_prompt`` reference samples each, judged once: measures any policy's
    ``KL(p+ || pi)`` on them (``kl``) and its approval on fresh samples of its own (``approval``).

    The reference samples come from ``reference_samples`` (cached on disk, shared by every method of a seed) and
    their reference log-probs are computed once here; each measurement then costs one scoring pass of the policy
    (and, for ``approval``, one round of sampling).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        prompts: Sequence[Messages],
        judge: Judge,
        *,
        reference: torch.nn.Module | None = None,
        samples_per_prompt: int = 8,
        max_new_tokens: int = 32,
        seed: int = 0,
        batch_size: int = 16,
        cache: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        from studylib.lm.evaluate import encode_prompts, prompt_text, reference_samples

        if not prompts:
            raise ValueError("a target probe needs prompts")
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
        self.tokenizer, self.judge, self.k = tokenizer, judge, samples_per_prompt
        self.texts = [prompt_text(m) for m in prompts]
        self.prompt_ids = encode_prompts(tokenizer, prompts)
        self.knobs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": device}
        self.pad_id, self.batch_size, self.device = pad_token_id(tokenizer), batch_size, device
        self.expanded = [p for p in self.prompt_ids for _ in range(self.k)]
        with Reference(policy, reference).active() as reference_model:
            self.samples = reference_samples(
                reference_model, tokenizer, self.prompt_ids, samples_per_prompt=self.k, seed=seed, cache=cache,
                **self.knobs,
            )  # fmt: skip
            self.reference_logps = self._score(reference_model)
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        self.approvals = np.array(
            [float(judge.approve(self.texts[i // self.k], decode(ids))) for i, ids in enumerate(self.samples)]
        )

    def _score(self, model: torch.nn.Module) -> torch.Tensor:
        """Log-probs of the probe's reference samples under ``model`` (on the CPU)."""
        return score_sequences(model, self.expanded, self.samples, self.pad_id, self.batch_size, device=self.device)

    def per_prompt(self, policy: torch.nn.Module) -> pd.DataFrame:
        """``target_kl_per_prompt`` for ``policy`` on the probe's reference samples."""
        policy_logps = self._score(policy).double().numpy()
        return target_kl_per_prompt(self.approvals, self.reference_logps.double().numpy(), policy_logps, self.k)

    def kl(self, policy: torch.nn.Module, seed: int = 0, prefix: str = "") -> dict[str, float]:
        """``summarise_target_kl`` of ``per_prompt(policy)``."""
        return summarise_target_kl(self.per_prompt(policy), seed, prefix)

    def per_prompt_approval(self, policy: torch.nn.Module, samples_per_prompt: int, seed: int) -> pd.DataFrame:
        """Per prompt: the policy's approval on ``samples_per_prompt`` fresh samples (drawn with ``seed``) and the
        reference's on the probe's samples."""
        m = samples_per_prompt
        expanded = [p for p in self.prompt_ids for _ in range(m)]
        ids = sample_completions(policy, self.tokenizer, expanded, seed=seed, **self.knobs)
        approved = [
            float(self.judge.approve(self.texts[i // m], self.tokenizer.decode(c, skip_special_tokens=True)))
            for i, c in enumerate(ids)
        ]
        return pd.DataFrame(
            {
                "prompt_index": np.arange(len(self.prompt_ids)),
                "approval": np.reshape(approved, (-1, m)).mean(axis=1),
                "reference_approval": self.approvals.reshape(-1, self.k).mean(axis=1),
            }
        )

    def approval(
        self, policy: torch.nn.Module, samples_per_prompt: int, seed: int, prefix: str = ""
    ) -> dict[str, float]:
        """``summarise_approval`` of ``per_prompt_approval``."""
        return summarise_approval(self.per_prompt_approval(policy, samples_per_prompt, seed), seed, prefix)


def summarise_approval(per_prompt: pd.DataFrame, seed: int = 0, prefix: str = "") -> dict[str, float]:
    """The policy's approval, the reference's, and the gain (policy minus reference, paired by prompt), each with
    its 95% bootstrap interval over the prompts."""
    columns = {
        "approval": per_prompt["approval"],
        "reference_approval": per_prompt["reference_approval"],
        "approval_gain": per_prompt["approval"] - per_prompt["reference_approval"],
    }
    out: dict[str, float] = {}
    for name, values in columns.items():
        estimate, low, high = bootstrap_interval(values.to_numpy(), seed=seed)
        out |= {f"{prefix}{name}": estimate, f"{prefix}{name}_low": low, f"{prefix}{name}_high": high}
    return out
