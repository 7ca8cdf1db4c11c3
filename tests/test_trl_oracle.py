"""DPO and KTO against TRL's own loss code (trl==1.16.0, a test-only oracle) on the same random inputs.

TRL computes these losses inside ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss`` from a
model's per-token log-probs. We call those methods unbound, with a stand-in trainer (its knobs) and a
stand-in model that returns chosen per-token log-probs, so TRL's arithmetic runs on our numbers.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from studylib.losses import get_loss

trl = pytest.importorskip("trl")
from trl import DPOTrainer, KTOTrainer  # noqa: E402


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


class _StandInModel:
    """Returns the given per-token log-probs whatever the inputs; the fields TRL reads for metrics."""

    training = True

    def __init__(self, per_token_logps: torch.Tensor) -> None:
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token_logps)
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def _trainer_stub(model, **knobs):
    return SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **knobs,
    )


def _random_per_token(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(batch, length - 1, generator=gen) * 3
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, :3] = 0  # prompt tokens
    per_token = per_token * mask[:, 1:]  # TRL's fused head returns 0 on masked (label -100) positions
    return per_token, mask


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_dpo_matches_trl(beta):
    batch, length = 6, 9
    per_token, mask = _random_per_token(2 * batch, length, seed=int(beta * 100))
    logps = per_token.sum(1)
    policy_chosen, policy_rejected = logps.chunk(2)
    gen = torch.Generator().manual_seed(7)
    ref_chosen, ref_rejected = (
        policy_chosen + torch.randn(batch, generator=gen),
        policy_rejected + torch.randn(batch, generator=gen),
    )
    stub = _trainer_stub(
        _StandInModel(per_token),
        beta=beta,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        use_weighting=False,
        label_smoothing=0.0,
    )
    inputs = {
        "input_ids": torch.zeros(2 * batch, length, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, length, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    trl_loss = DPOTrainer._compute_loss(stub, stub.model, inputs, False)
    ours, metrics = get_loss("dpo", beta=beta)(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert metrics[name].item() == pytest.approx(stub._metrics["train"][name][-1], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize(("beta", "kl_shift"), [(0.1, 0.5), (0.1, -0.5), (0.5, 2.0)])
def test_kto_matches_trl(beta, kl_shift):
    batch, length = 8, 7
    per_token, mask = _random_per_token(batch, length, seed=3)
    policy = per_token.sum(1)
    gen = torch.Generator().manual_seed(11)
    reference = policy + torch.randn(batch, generator=gen)
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    policy_kl = torch.randn(batch, generator=gen) - 5
    reference_kl = policy_kl - kl_shift + 0.1 * torch.randn(batch, generator=gen)
    stub = _trainer_stub(
        _StandInModel(per_token),
        beta=beta,
        loss_type="kto",
        precompute_ref_logps=True,
        calculate_KL=True,
        desirable_weight=1.0,
        undesirable_weight=1.0,
        _compute_kl_logps=lambda model, batch: policy_kl,
    )
    inputs = {
        "input_ids": torch.zeros(batch, length, dtype=torch.long),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": mask,
        "label": labels,
        "ref_logps": reference,
        "ref_KL_logps": reference_kl,
    }
    trl_loss = KTOTrainer._compute_loss(stub, stub.model, inputs, False)
    ours, metrics = get_loss("kto", beta=beta)(
        policy, reference, labels, policy_kl_logps=policy_kl, reference_kl_logps=reference_kl
    )
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    trl_metrics = stub._metrics["train"]
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name][-1], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 1.0), (0.5, 0.0), (2.5, 1.375)])
def test_simpo_equals_trl_cpo_simpo(beta, gamma):
    """SimPO against TRL's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` on length-normalised log-probs."""
    from trl.experimental.cpo import CPOTrainer

    gen = torch.Generator().manual_seed(7)
    chosen, rejected = -torch.rand(16, generator=gen) * 3, -torch.rand(16, generator=gen) * 3
    stub = SimpleNamespace(
        alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo", label_smoothing=0.0, accelerator=_Accelerator()
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, chosen, rejected)
    ours, metrics = get_loss("simpo", beta=beta, gamma=gamma)(chosen, rejected)
    torch.testing.assert_close(ours, losses.mean())
    torch.testing.assert_close(metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean())
