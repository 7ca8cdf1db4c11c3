"""On-policy objectives: reverse KL (paper 3) and plain RLHF, as per-sample REINFORCE surrogates."""

from __future__ import annotations

from torch import Tensor

from studylib.losses.base import Loss, LossOutput, check_non_negative, check_tensors


class ReverseKL(Loss):
    """Reverse-KL minimisation (Yun et al., "Alignment as Distribution Learning", v2; read).

    Objective, per prompt, over completions ``a ~ pi``::

        J(pi) = -E_pi[R(x, a)] - gamma H(pi(.|x)) + beta KL(pi || pi_0)
              =  E_pi[c(a)],   c(a) = -R(x, a) + (beta + gamma) log pi(a) - beta log pi_0(a)

    which is RLHF with KL coefficient ``beta + gamma`` toward ``pi_0^(beta/(beta+gamma))``; its
    minimiser is ``pi*`` when ``R`` is the reward of paper 3's preference model. The paper optimises it
    with PPO; here a leave-one-out REINFORCE (RLOO) surrogate, since ``grad J = E[c(a) grad log pi(a)]``::

        loss = mean_i  stopgrad(c_i - mean_{j != i} c_j) * log pi(a_i)

    Rows come in groups of ``samples_per_prompt`` consecutive samples of one prompt (at least 2).
    The surrogate's value is not ``J``; ``objective`` in the metrics is the sample estimate of ``J``.
    Defaults: gamma 0.01 (entropy), beta 0.05 (KL).
    """

    name = "reverse_kl"
    kind = "on_policy"
    needs_reward_model = True

    def __init__(self, gamma: float = 0.01, beta: float = 0.05) -> None:
        self.gamma = check_non_negative("gamma", gamma)
        self.beta = check_non_negative("beta", beta)

    def sample_costs(self, policy_logps: Tensor, reference_logps: Tensor, rewards: Tensor) -> Tensor:
        """``c(a)`` for each sample, detached."""
        costs = -rewards + (self.beta + self.gamma) * policy_logps - self.beta * reference_logps
        return costs.detach()

    def exact(self, policy_logprobs: Tensor, reference_logprobs: Tensor, rewards: Tensor) -> Tensor:
        """``J`` summed over contexts for full distributions over items (rows: contexts; toy use)."""
        probs = policy_logprobs.exp()
        costs = -rewards + (self.beta + self.gamma) * policy_logprobs - self.beta * reference_logprobs
        return (probs * costs).sum()

    def __call__(
        self,
        policy_logps: Tensor,
        reference_logps: Tensor,
        rewards: Tensor,
        samples_per_prompt: int = 2,
        **unused: Tensor,
    ) -> LossOutput:
        check_tensors(policy_logps=policy_logps, reference_logps=reference_logps, rewards=rewards)
        k = samples_per_prompt
        if k < 2 or policy_logps.numel() % k:
            raise ValueError(
                f"samples_per_prompt must be >= 2 and divide the batch ({policy_logps.numel()} rows), got {k}"
            )
        costs = self.sample_costs(policy_logps, reference_logps, rewards)
        loss = (leave_one_out_advantages(costs, k) * policy_logps).mean()
        logratios = (policy_logps - reference_logps).detach()
        metrics = {
            "objective": costs.mean(),
            "rewards/mean": rewards.detach().mean(),
            "kl": logratios.mean(),
            "entropy": -policy_logps.detach().mean(),
            "logps/policy": policy_logps.detach().mean(),
            "ratio/max": logratios.max().exp(),
        }
        return loss, metrics


class RLHF(ReverseKL):
    """Plain KL-regularised RLHF: reverse KL with no entropy bonus (gamma = 0).

    ``J(pi) = -E_pi[R] + beta KL(pi || pi_0)``, maximised toward ``pi_0 exp(R/beta)``; standard.
    """

    name = "rlhf"

    def __init__(self, beta: float = 0.05, gamma: float = 0.0) -> None:
        super().__init__(gamma=gamma, beta=beta)


def leave_one_out_advantages(costs: Tensor, samples_per_prompt: int) -> Tensor:
    """RLOO advantages ``c_i - mean_{j != i} c_j`` for consecutive groups of samples."""
    k = samples_per_prompt
    grouped = costs.view(-1, k)
    return (k / (k - 1) * (grouped - grouped.mean(dim=1, keepdim=True))).reshape(-1)
