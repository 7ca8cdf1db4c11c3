"""Each loss pinned to mathematics: closed-form optima, gradient bounds, hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from studylib.losses import DDRO, LOSSES, RDRO, available_losses, build_loss, get_loss


@pytest.fixture(autouse=True)
def float64_default():
    """Exact checks run in float64; the default is restored for other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rows_from_counts(counts: list[int], label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Item indices and labels of a data set with ``counts[y]`` rows of item y."""
    items = torch.tensor([y for y, c in enumerate(counts) for _ in range(c)])
    return items, torch.full_like(items, int(label), dtype=torch.bool)


def fit_free_logratios(loss_fn, pos_counts: list[int], neg_counts: list[int]) -> torch.Tensor:
    """Minimise the loss of a counted data set over one free log-ratio T per item (L-BFGS)."""
    pos_items, pos_labels = rows_from_counts(pos_counts, True)
    neg_items, neg_labels = rows_from_counts(neg_counts, False)
    items, labels = torch.cat([pos_items, neg_items]), torch.cat([pos_labels, neg_labels])
    logratios = torch.zeros(len(pos_counts), requires_grad=True)
    opt = torch.optim.LBFGS(
        [logratios], lr=1, max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe", tolerance_change=1e-16
    )

    def closure():
        opt.zero_grad()
        t = logratios[items]
        loss, _ = loss_fn(t, torch.zeros_like(t), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return logratios.detach()


POS = [4, 3, 2, 1]  # p+ = [.4, .3, .2, .1]
NEG = [1, 1, 3, 5]  # p- = [.1, .1, .3, .5]


def densities():
    p_pos = torch.tensor(POS, dtype=torch.float64) / sum(POS)
    p_neg = torch.tensor(NEG, dtype=torch.float64) / sum(NEG)
    return p_pos, p_neg


# --- DPO -------------------------------------------------------------------------------------------------


def test_dpo_is_log2_when_policy_equals_reference():
    logps = torch.randn(16) * 10
    other = torch.randn(16) * 10
    loss, metrics = get_loss("dpo", beta=0.1)(logps, other, logps, other)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-12)


def test_dpo_hand_value():
    # beta 0.5, chosen log-ratio 2, rejected log-ratio -1: -log sigmoid(0.5 * 3)
    loss, m = get_loss("dpo", beta=0.5)(
        torch.tensor([1.0]), torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-2.0])
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/accuracies"].item() == 1.0


# --- SimPO -----------------------------------------------------------------------------------------------


def test_simpo_hand_value_and_optimum():
    # beta 2, gamma 1, mean log-probs -0.5 (chosen) and -1.5 (rejected): -log sigmoid(2 * 1 - 1)
    loss, m = get_loss("simpo", beta=2.0, gamma=1.0)(torch.tensor([-0.5]), torch.tensor([-1.5]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(-1.0) and m["rewards/margins"].item() == pytest.approx(2.0)
    # a margin of exactly gamma / beta gives log 2: the target margin is where the loss crosses log 2
    at_margin, _ = get_loss("simpo", beta=2.0, gamma=1.0)(torch.tensor([-1.0]), torch.tensor([-1.5]))
    assert at_margin.item() == pytest.approx(math.log(2), rel=1e-12)
    # reference log-probs, if passed, change nothing: SimPO is reference-free
    with_ref, _ = get_loss("simpo")(
        torch.tensor([-0.5]),
        torch.tensor([-1.5]),
        reference_chosen_logps=torch.tensor([9.0]),
        reference_rejected_logps=torch.tensor([-9.0]),
    )
    without, _ = get_loss("simpo")(torch.tensor([-0.5]), torch.tensor([-1.5]))
    assert with_ref.item() == without.item()


# --- what each loss declares it needs ---------------------------------------------------------------------


def test_declared_needs():
    """The declarations the routing reads; a change here changes which trainer, rows and models a run uses."""
    needs = {
        name: (cls.kind, cls.uses_reference, cls.needs_reward_model, cls.mismatched_pairs, cls.length_normalized)
        for name, cls in LOSSES.items()
    }
    assert needs == {
        "dpo": ("paired", True, False, False, False),
        "simpo": ("paired", False, False, False, True),
        "kto": ("unpaired", True, False, True, False),
        "bco": ("unpaired", True, False, False, False),
        "ddro": ("unpaired", True, False, False, False),
        "rdro": ("unpaired", True, False, False, False),
        "pmle": ("paired", False, False, False, False),
        "distill": ("paired", False, True, False, False),
        "reverse_kl": ("on_policy", True, True, False, False),
        "rlhf": ("on_policy", True, True, False, False),
    }
    assert {n for n, c in LOSSES.items() if c.takes_class_fraction} == {"ddro", "rdro"}
    # a KL term makes a reference-free loss need the reference and policy samples
    assert not get_loss("pmle", beta=0.0).needs_reference and not get_loss("pmle", beta=0.0).samples_policy
    assert get_loss("pmle", beta=0.1).needs_reference and get_loss("pmle", beta=0.1).kl_coefficient == 0.1
    assert get_loss("reverse_kl").samples_policy and get_loss("dpo").kl_coefficient == 0.0


def test_build_loss_resolves_auto_once():
    rdro = build_loss("rdro", {"alpha": "auto"}, preferred_fraction=0.3)
    assert rdro.alpha == 0.3 and rdro.preferred_fraction == 0.3
    assert build_loss("rdro", {"alpha": 0.5, "preferred_fraction": 0.2}, 0.3).preferred_fraction == 0.2
    assert build_loss("ddro", {}, 0.25).preferred_fraction == 0.25
    assert build_loss("dpo", {"beta": 0.2}, 0.5).beta == 0.2  # no class fraction for a paired loss
    with pytest.raises(ValueError, match="only alpha may be 'auto'"):
        build_loss("dpo", {"beta": "auto"}, 0.5)
    with pytest.raises(ValueError, match="alpha='auto' needs labelled data"):
        build_loss("rdro", {"alpha": "auto"})
    with pytest.raises(ValueError, match="needs both classes, but every row is preferred"):
        build_loss("rdro", {}, 1.0)
    with pytest.raises(KeyError, match="unknown loss 'ipo'"):
        build_loss("ipo")


# --- RDRO ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 0.8])
def test_rdro_positive_loss_minimised_at_log_inverse_alpha(alpha):
    grid = torch.linspace(-6, 6, 120001)
    loss_fn = RDRO(alpha=alpha, reduction="flat")
    losses, _ = loss_fn.row_losses(grid, torch.ones_like(grid, dtype=torch.bool))
    assert grid[losses.argmin()].item() == pytest.approx(math.log(1 / alpha), abs=1e-4)
    # and the gradient of the batch loss vanishes there exactly
    t = torch.tensor([math.log(1 / alpha)], requires_grad=True)
    loss_fn(t, torch.zeros(1), torch.ones(1, dtype=torch.bool))[0].backward()
    assert t.grad.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.2, 0.39, 0.7])
def test_rdro_logistic_gradient_bounds(alpha):
    t = torch.linspace(-20, 20, 2001, requires_grad=True)
    row = RDRO(alpha=alpha, reduction="flat").row_losses
    pos, _ = row(t, torch.ones_like(t, dtype=torch.bool))
    (grad_pos,) = torch.autograd.grad(pos.sum(), t)
    neg, _ = row(t, torch.zeros_like(t, dtype=torch.bool))
    (grad_neg,) = torch.autograd.grad(neg.sum(), t)
    assert grad_pos.min() > -1 and grad_pos.max() < alpha
    assert grad_neg.min() > 0 and grad_neg.max() < 1 - alpha
    # the bounds are tight at the ends of the range
    assert grad_pos.min() < -1 + 1e-6 and grad_pos.max() > alpha - 1e-6


@pytest.mark.parametrize("f", ["logistic", "squared", "kliep"])
@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_rdro_per_class_population_minimiser_is_relative_ratio(f, alpha):
    p_pos, p_neg = densities()
    fitted = fit_free_logratios(RDRO(alpha=alpha, f=f), POS, NEG).exp()
    relative_ratio = p_pos / (alpha * p_pos + (1 - alpha) * p_neg)
    torch.testing.assert_close(fitted, relative_ratio, atol=1e-6, rtol=1e-6)
    assert fitted.max() <= 1 / alpha


def test_rdro_flat_reduction_moves_minimiser_under_imbalance():
    # + class 10 rows, - class 30 rows: flat mean weights classes 1:3
    neg = [3 * c for c in NEG]
    alpha = 0.25  # the preferred fraction, as RDRO prescribes
    p_pos, p_neg = densities()
    per_class = fit_free_logratios(RDRO(alpha=alpha), POS, neg).exp()
    flat = fit_free_logratios(RDRO(alpha=alpha, reduction="flat"), POS, neg).exp()
    target = p_pos / (alpha * p_pos + (1 - alpha) * p_neg)
    torch.testing.assert_close(per_class, target, atol=1e-6, rtol=1e-6)
    pi_pos, pi_neg = 0.25, 0.75
    flat_target = pi_pos * p_pos / (alpha * pi_pos * p_pos + (1 - alpha) * pi_neg * p_neg)
    torch.testing.assert_close(flat, flat_target, atol=1e-6, rtol=1e-6)
    assert (flat - target).abs().max() > 0.1


def test_per_class_weights_use_given_training_fraction():
    t = torch.tensor([0.3, -0.2, 0.1])
    labels = torch.tensor([True, False, False])
    loss_fn = RDRO(alpha=0.4, preferred_fraction=0.4)
    loss, _ = loss_fn(t, torch.zeros(3), labels)
    pos, neg = F.softplus(t) * 1.4 - t, F.softplus(t) * 0.6
    expected = (pos[0] / 0.4 + neg[1] / 0.6 + neg[2] / 0.6) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


# --- DDRO ------------------------------------------------------------------------------------------------


def test_ddro_per_class_population_minimiser():
    p_pos, p_neg = densities()
    fitted = fit_free_logratios(DDRO(guard_eps=1e-6), POS, NEG).exp()
    torch.testing.assert_close(fitted, 2 * p_pos / (p_pos + p_neg), atol=1e-6, rtol=1e-6)


def test_ddro_hand_values_below_pole():
    t = torch.tensor([0.2, 0.2])
    loss_fn = DDRO(reduction="flat")
    loss, m = loss_fn(t, torch.zeros(2), torch.tensor([True, False]))
    expected = ((math.log(2) - 0.2) + (math.log(2) - math.log(2 - math.exp(0.2)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["guard/activations"].item() == 0


def test_ddro_stays_finite_past_pole_and_counts_guard():
    eps = 1e-2
    t = torch.tensor([0.0, math.log(2) - 1e-9, 1.0, 5.0, 5.0], requires_grad=True)
    labels = torch.tensor([False, False, False, False, True])
    loss, m = DDRO(guard_eps=eps, reduction="flat")(t, torch.zeros(5), labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(t.grad).all()
    assert m["guard/activations"].item() == 3  # the three non-preferred rows past exp T = 2 - eps
    # past the guard the gradient is the tangent's slope, (2 - eps) / eps, divided by the batch size
    assert t.grad[2].item() == pytest.approx((2 - eps) / eps / 5, rel=1e-12)
    assert t.grad[3].item() == pytest.approx((2 - eps) / eps / 5, rel=1e-12)
    # the guard is continuous at its threshold
    t_guard = torch.tensor([math.log(2 - eps)])
    below, _ = DDRO(guard_eps=eps, reduction="flat").negative_loss(t_guard - 1e-9)
    above, _ = DDRO(guard_eps=eps, reduction="flat").negative_loss(t_guard + 1e-9)
    assert below.item() == pytest.approx(above.item(), abs=1e-5)


def test_ratio_max_metric():
    t = torch.tensor([0.1, -0.5, 0.4])
    _, m = RDRO()(t, torch.zeros(3), torch.tensor([1, 0, 1]))
    assert m["ratio/max"].item() == pytest.approx(math.exp(0.4))


# --- PMLE and distillation -------------------------------------------------------------------------------


def test_pmle_hand_value_and_kl_term():
    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    loss, _ = get_loss("pmle", gamma=0.5)(chosen, rejected)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss_kl, m = get_loss("pmle", gamma=0.5, beta=0.2)(chosen, rejected, kl_penalty=torch.tensor(0.7))
    assert loss_kl.item() == pytest.approx(expected + 0.2 * 0.7, rel=1e-12)
    assert m["kl"].item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="kl_penalty"):
        get_loss("pmle", beta=0.2)(chosen, rejected)


def test_distillation_hand_value():
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-3.0])
    margins = torch.tensor([math.log(3.0)])  # p = sigmoid(log 3) = 0.75
    loss, _ = get_loss("distill", gamma=0.5, beta=0.0)(chosen, rejected, reward_margins=margins)
    z = 0.5 * 2.0
    expected = -(0.75 * math.log(1 / (1 + math.exp(-z))) + 0.25 * math.log(1 / (1 + math.exp(z))))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_distillation_minimised_where_policy_margin_matches_reward():
    # the soft-label BCE is minimised at gamma * (log pi(y1) - log pi(y2)) = R(y1) - R(y2)
    margin = torch.zeros(1, requires_grad=True)
    loss_fn = get_loss("distill", gamma=0.1, beta=0.0)
    opt = torch.optim.LBFGS(
        [margin], max_iter=200, line_search_fn="strong_wolfe", tolerance_change=1e-16, tolerance_grad=1e-12
    )

    def closure():
        opt.zero_grad()
        loss, _ = loss_fn(margin, torch.zeros(1), reward_margins=torch.tensor([0.8]))
        loss.backward()
        return loss

    opt.step(closure)
    assert (0.1 * margin).item() == pytest.approx(0.8, abs=1e-6)


# --- reverse KL ------------------------------------------------------------------------------------------


def test_reverse_kl_surrogate_gradient_is_unbiased_by_enumeration():
    """Expected RLOO surrogate gradient over every ordered k-tuple of samples equals the exact gradient."""
    torch.manual_seed(0)
    logits = torch.randn(3, requires_grad=True)
    ref_logprobs = torch.log_softmax(torch.randn(3), 0)
    rewards = torch.randn(3)
    loss_fn = get_loss("reverse_kl", gamma=0.3, beta=0.7)
    exact = loss_fn.exact(torch.log_softmax(logits, 0), ref_logprobs, rewards)
    (exact_grad,) = torch.autograd.grad(exact, logits)
    expected_grad = torch.zeros(3)
    k = 3
    for tup in itertools.product(range(3), repeat=k):
        logprobs = torch.log_softmax(logits, 0)
        idx = torch.tensor(tup)
        prob = logprobs[idx].sum().exp().detach()
        surrogate, _ = loss_fn(logprobs[idx], ref_logprobs[idx], rewards[idx], samples_per_prompt=k)
        (g,) = torch.autograd.grad(surrogate, logits)
        expected_grad += prob * g
    torch.testing.assert_close(expected_grad, exact_grad, atol=1e-10, rtol=1e-10)


def test_reverse_kl_exact_minimiser_is_tilted_reference():
    # minimiser of -E R - gamma H + beta KL is  pi ∝ pi0^(beta/(beta+gamma)) exp(R/(beta+gamma))
    torch.manual_seed(1)
    ref = torch.log_softmax(torch.randn(5), 0)
    rewards = torch.randn(5)
    gamma, beta = 0.2, 0.5
    loss_fn = get_loss("reverse_kl", gamma=gamma, beta=beta)
    logits = torch.zeros(5, requires_grad=True)
    opt = torch.optim.LBFGS(
        [logits], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe", tolerance_change=1e-16
    )

    def closure():
        opt.zero_grad()
        j = loss_fn.exact(torch.log_softmax(logits, 0), ref, rewards)
        j.backward()
        return j

    opt.step(closure)
    target = torch.softmax(beta / (beta + gamma) * ref + rewards / (beta + gamma), 0)
    torch.testing.assert_close(torch.softmax(logits.detach(), 0), target, atol=1e-7, rtol=1e-6)


# --- registry and validation -----------------------------------------------------------------------------


def test_registry_lists_every_method():
    expected = {"dpo", "simpo", "kto", "bco", "ddro", "rdro", "pmle", "distill", "reverse_kl", "rlhf"}
    assert set(available_losses()) == expected
    assert get_loss("rdro", alpha=0.39).alpha == 0.39


@pytest.mark.parametrize(
    ("name", "knobs", "message"),
    [
        ("rdro", {"alpha": 1.0}, "alpha must lie strictly inside"),
        ("rdro", {"alpha": 0.0}, "alpha must lie strictly inside"),
        ("rdro", {"f": "hinge"}, "f must be one of"),
        ("rdro", {"reduction": "sum"}, "reduction must be one of"),
        ("dpo", {"beta": 0.0}, "beta must be a finite number > 0"),
        ("kto", {"beta": -1.0}, "beta must be a finite number > 0"),
        ("pmle", {"gamma": 0}, "gamma must be a finite number > 0"),
        ("ddro", {"guard_eps": 2.0}, "guard_eps must lie strictly inside"),
        ("simpo", {"beta": 0.0}, "beta must be a finite number > 0"),
        ("simpo", {"gamma": -1.0}, "gamma must be a finite number >= 0"),
        ("dpo", {"alpha": 0.3}, "bad knobs for loss 'dpo'"),
    ],
)
def test_bad_knobs_raise_clearly(name, knobs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        get_loss(name, **knobs)


def test_unknown_loss_name():
    with pytest.raises(KeyError, match="unknown loss 'ipo'.*available: bco"):
        get_loss("ipo")


def test_bad_tensors_raise_clearly():
    loss_fn = get_loss("rdro")
    with pytest.raises(ValueError, match="reference_logps has 3 values but policy_logps has 4"):
        loss_fn(torch.zeros(4), torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="policy_logps contains NaN"):
        loss_fn(torch.tensor([0.0, float("nan")]), torch.zeros(2), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="labels must be bool or 0/1"):
        loss_fn(torch.zeros(2), torch.zeros(2), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="must be 1-D"):
        get_loss("dpo")(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="both classes"):
        loss_fn(torch.zeros(2), torch.zeros(2), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="empty batch"):
        loss_fn(torch.zeros(0), torch.zeros(0), torch.zeros(0))
