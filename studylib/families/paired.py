"""The paired family (DPO, SimPO, PMLE, preference distillation): a row is (prompt, chosen, rejected).

- **Offline LM** (``studylib.lm.trainer``): a batch holds every pair's chosen completions, then its rejected ones
  (one forward pass over both); reference log-probs of both, precomputed or on the fly; distillation's rows carry
  the reward model's ``reward_margin`` (soft labels).
- **On-policy LM** (``studylib.lm.online``): online distillation samples two completions of each prompt from the
  policy and labels them with the reward model's margin; PMLE and distillation with a KL term step over the data
  set's pairs and sample the policy only for the KL estimate.
- **Tables**: a pair loss reads (chosen, rejected) log-probs only through their difference, so a table passes
  margins (``table_inputs``); distillation takes every unordered pair of candidates once (``cell_rows``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from studylib.families.base import Family, Inputs, LogpsFn
from studylib.lm.batching import gather_rows, model_logps, pad_sequences, process_share


class PairedFamily(Family):
    name = "paired"
    kind = "paired"
    row_keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    policy_keys = ("policy_chosen_logps", "policy_rejected_logps")
    row_labels = (None,)
    uses_pairs = True

    # --- the offline LM trainer ------------------------------------------------------------------------------------
    def data_size(self, data) -> int:
        return len(data.paired) if data.paired is not None else len(data.unpaired)

    def data_rows(self, data, tokenizer, data_config, pairs: list[dict] | None) -> tuple[list, dict]:
        if pairs is None:
            raise ValueError("the paired family trains on the data set's pairs: tokenise them first")
        return pairs, {}  # tokenised with their counts by the caller, who also fits the reward model on them

    def check_rows(self, rows: list[dict], loss) -> None:
        super().check_rows(rows, loss)
        if loss.needs_reward_model and "reward_margin" not in rows[0]:
            raise ValueError(f"{loss.name} needs rows with reward_margin (studylib.lm.reward.attach_reward_margins)")

    def reference_completions(self, rows: list[dict]) -> dict[str, list]:
        return {"chosen": [r["chosen_ids"] for r in rows], "rejected": [r["rejected_ids"] for r in rows]}

    def attach_reference(self, rows: list[dict], scores: dict[str, Tensor]) -> list[dict]:
        chosen, rejected = scores["chosen"], scores["rejected"]
        return [
            {**r, "ref_chosen_logps": float(chosen[i]), "ref_rejected_logps": float(rejected[i])}
            for i, r in enumerate(rows)
        ]

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, Tensor]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        batch = pad_sequences(prompts + prompts, completions, pad_id)
        if "ref_chosen_logps" in rows[0]:  # in the batch's row order: chosen, then rejected
            batch["ref_logps"] = torch.tensor(
                [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows]
            )
        if "reward_margin" in rows[0]:
            batch["reward_margins"] = torch.tensor([float(r["reward_margin"]) for r in rows])
        return batch

    def loss_inputs(self, loss, batch: dict, policy: LogpsFn, reference: LogpsFn) -> Inputs:
        chosen, rejected = policy("").chunk(2)
        ref_chosen = ref_rejected = None
        if loss.uses_reference:
            ref_chosen, ref_rejected = reference("").to(chosen).chunk(2)
        chosen, rejected, ref_chosen, ref_rejected, margins = gather_rows(
            chosen, rejected, ref_chosen, ref_rejected, batch.get("reward_margins")
        )
        return _pairs(chosen, rejected, ref_chosen, ref_rejected, margins)

    # --- the on-policy LM trainer ----------------------------------------------------------------------------------
    def sampled_inputs(self, trainer, seed: int) -> tuple[Inputs, dict[str, Tensor], list]:
        """Online distillation: two samples of each prompt, labelled by reward margins, plus the KL term on them."""
        policy, reference, rewards, completions = trainer.sampled_rows(2, seed)
        inputs = _pairs(policy[0::2], policy[1::2], None, None, rewards[0::2] - rewards[1::2])
        if trainer.loss_fn.kl_coefficient > 0:
            inputs["kl_penalty"] = trainer.kl_estimate(policy, reference, 2)
        return inputs, {"rewards/mean": rewards.mean()}, completions

    def pair_inputs(self, trainer, seed: int) -> tuple[Inputs, dict[str, Tensor], list]:
        """Data-set pairs (PMLE, offline distillation); policy samples only for the KL term (coefficient > 0)."""
        loss = trainer.loss_fn
        rows = trainer.step_pair_rows()
        mine = rows[process_share(len(rows))]
        batch = {k: v.to(trainer.device) for k, v in self.collate(mine, trainer.pad_id).items()}
        chosen, rejected = model_logps(trainer.policy, batch, loss.length_normalized).chunk(2)
        extra: Inputs = {}
        samples: list = []
        if loss.kl_coefficient > 0:
            k = trainer.config.samples_per_prompt
            sample_prompts = [r["prompt_ids"] for r in rows for _ in range(k)]
            samples = trainer.sample(sample_prompts, seed)
            share = process_share(len(sample_prompts))
            policy, reference = gather_rows(*trainer.logps(sample_prompts[share], samples[share]))
            extra["kl_penalty"] = trainer.kl_estimate(policy, reference, k)
        chosen, rejected, margins = gather_rows(chosen, rejected, batch.get("reward_margins"))
        return _pairs(chosen, rejected, None, None, margins) | extra, {}, samples

    # --- the tables ------------------------------------------------------------------------------------------------
    def toy_fit(self, problem, counts, loss, ridge: float, rewards: Tensor | None) -> tuple:
        from studylib.toy import fit

        if not loss.needs_reward_model:
            return fit.fit_paired(problem, counts, loss, ridge)
        if rewards is None:
            raise ValueError(f"{loss.name} needs the reward model's table")
        return fit.fit_distill(problem, rewards, loss)

    def table_inputs(self, policy: Tensor, reference: Tensor, labels: Tensor | None = None) -> Inputs:
        zero = torch.zeros_like(policy)
        return _pairs(policy, zero, reference, torch.zeros_like(reference), None)

    def cell_rows(self, loss, data, log_ref: Tensor, rewards: Tensor | None) -> tuple:
        from studylib.lm_exact import cells

        K = log_ref.shape[1]
        rows = cells.all_pairs(log_ref.shape) if loss.needs_reward_model else cells.paired_rows(data, K)

        def build(lp: Tensor, index: dict[str, Tensor]) -> Inputs:
            chosen, rejected = index["chosen"], index["rejected"]
            margins = None if rewards is None else cells.take(rewards, chosen) - cells.take(rewards, rejected)
            return _pairs(
                cells.take(lp, chosen),
                cells.take(lp, rejected),
                cells.take(log_ref, chosen),
                cells.take(log_ref, rejected),
                margins,
            )

        return rows, self.policy_keys, build


def _pairs(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None, margins: Tensor | None
) -> Inputs:
    """A paired loss's keyword inputs (reference and margins only where given)."""
    inputs = {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected}
    if ref_chosen is not None:
        inputs |= {"reference_chosen_logps": ref_chosen, "reference_rejected_logps": ref_rejected}
    if margins is not None:
        inputs["reward_margins"] = margins
    return inputs
