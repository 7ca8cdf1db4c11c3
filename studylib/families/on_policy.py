"""The on-policy family (reverse KL, RLHF): a step is groups of completions sampled from the current policy, with
their rewards.

- **Offline LM**: none (no data-set rows).
- **On-policy LM** (``studylib.lm.online``): ``samples_per_prompt`` samples of each of the step's prompts, their
  rewards from the reward model, the policy's and the reference's log-probs; the loss is the registry's RLOO
  surrogate (leave-one-out needs at least 2 samples a prompt).
- **Tables**: with K candidates the expectation under the policy needs no samples: the loss's own exact objective
  (``loss.exact``) over the reward model's table.
"""

from __future__ import annotations

from torch import Tensor

from studylib.families.base import Family, Inputs


class OnPolicyFamily(Family):
    name = "on_policy"
    kind = "on_policy"
    samples_prompts = True
    min_samples_per_prompt = 2

    def sampled_inputs(self, trainer, seed: int) -> tuple[Inputs, dict[str, Tensor], list]:
        k = trainer.config.samples_per_prompt
        policy, reference, rewards, completions = trainer.sampled_rows(k, seed)
        inputs = {"policy_logps": policy, "reference_logps": reference, "rewards": rewards, "samples_per_prompt": k}
        return inputs, {}, completions

    def toy_fit(self, problem, counts, loss, ridge: float, rewards: Tensor | None) -> tuple:
        from studylib.toy import fit

        if rewards is None:
            raise ValueError(f"{loss.name} needs the reward model's table")
        return fit.fit_on_policy(problem, rewards, loss)

    def needs_reward_table(self, loss) -> bool:
        return True

    def cell_rows(self, loss, data, log_ref: Tensor, rewards: Tensor | None) -> None:
        return None  # the exact objective over every candidate: lm_exact.objectives uses loss.exact
