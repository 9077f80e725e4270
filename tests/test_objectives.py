"""Each objective's expected gradient equals the exact gradient of the divergence it claims.

On the enumerated toy space, the one-sample estimator's exact mean under q is computed from
the advantage the objective's own loss applies (exact.objective_advantages) and compared to
autograd through the exact divergence: on-policy (q = π) and off-policy (q = prior).
"""

from __future__ import annotations

import math

import pytest
import torch

from dmtune.constraints import TokenCount, TokenPresent
from dmtune.exact import (
    estimator_variance,
    expected_gradient,
    kl,
    objective_advantages,
    policy_scores,
    target_truth,
)
from dmtune.objectives import (
    OBJECTIVES,
    Batch,
    dpg,
    dpg_baseline,
    fdpg,
    get_objective,
    kl_control,
    reinforce,
)
from dmtune.target import Target

BETA = 0.7
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def setting(toy, toy_policy, space):
    """Exact quantities for a hybrid-free pointwise target and a strictly positive one."""
    prior, _ = toy
    with torch.no_grad():
        log_prior = space.log_probs(prior)
    pointwise = Target(pointwise=(TokenPresent(4, "has_d"),))
    distributional = Target(distributional=(TokenCount(4, "n_d"),), moments=torch.tensor([1.2]))
    distributional.fit(log_prior, torch.zeros_like(log_prior), distributional.score(space.samples))
    reward = TokenCount(4, "n_d")(space.samples).double()
    return {
        "log_prior": log_prior, "pointwise": pointwise, "distributional": distributional,
        "reward": reward,
    }


def _divergence(name, kwargs, log_pi, log_prior, log_p, reward):
    """The quantity each objective claims to minimise, differentiable in log π."""
    pi = log_pi.exp()
    if name == "reinforce":
        return -(pi @ reward)
    if name == "kl_control":
        return -(pi @ reward - kwargs["beta"] * kl(log_pi, log_prior))
    if name in ("dpg", "dpg_baseline", "kl_dpg"):
        return kl(log_p, log_pi)
    divergence = kwargs["divergence"]
    if divergence == "forward_kl":
        return kl(log_p, log_pi)
    if divergence == "reverse_kl":
        return kl(log_pi, log_p)
    if divergence == "js":  # ½ KL(π‖m) + ½ KL(p‖m), m = (π + p)/2: defined where p = 0
        log_m = torch.logaddexp(log_pi, log_p) - math.log(2)
        return 0.5 * (kl(log_pi, log_m) + kl(log_p, log_m))
    return 0.5 * (log_pi.exp() - log_p.exp()).abs().sum()  # tv


CASES = [
    ("reinforce", {"baseline": "none"}, "pointwise", False),
    ("reinforce", {"baseline": "mean"}, "pointwise", False),
    ("reinforce", {"baseline": 0.3}, "pointwise", False),
    ("kl_control", {"beta": BETA, "baseline": "none"}, "pointwise", False),
    ("kl_control", {"beta": BETA, "baseline": "mean"}, "pointwise", False),
    ("dpg", {}, "pointwise", False),
    ("dpg", {}, "pointwise", True),
    ("dpg_baseline", {}, "pointwise", False),
    ("dpg_baseline", {}, "pointwise", True),
    ("dpg_baseline", {}, "distributional", True),
    ("kl_dpg", {}, "pointwise", True),
    ("fdpg", {"divergence": "forward_kl"}, "pointwise", True),
    ("fdpg", {"divergence": "reverse_kl"}, "distributional", True),
    ("fdpg", {"divergence": "reverse_kl"}, "distributional", False),
    ("fdpg", {"divergence": "js"}, "distributional", True),
    ("fdpg", {"divergence": "js"}, "pointwise", False),
    ("fdpg", {"divergence": "tv", "baseline": "none"}, "distributional", True),
]


@pytest.mark.parametrize("name, kwargs, target_kind, off_policy", CASES)
def test_expected_gradient_equals_the_exact_gradient_of_the_divergence(
    toy_policy, space, setting, name, kwargs, target_kind, off_policy
):
    params = list(toy_policy.parameters())
    log_prior, reward = setting["log_prior"], setting["reward"]
    truth = target_truth(space, setting[target_kind], log_prior)
    log_pi = space.log_probs(toy_policy)  # (n,) with grad
    log_q = log_prior if off_policy else log_pi.detach()
    batch = Batch(log_pi, log_q, log_prior, truth.log_p + truth.log_z, truth.log_z, reward)

    advantages = objective_advantages(get_objective(name).loss, batch, **kwargs)
    expected = expected_gradient(advantages, log_pi, log_q, params)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(
        _divergence(name, kwargs, log_pi, log_prior, truth.log_p, reward), params)])

    assert exact.norm() > 1e-3  # a real gradient, not 0 = 0
    assert (expected - exact).norm() / exact.norm() < REL_TOL


def test_every_registered_objective_is_covered():
    assert {case[0] for case in CASES} == set(OBJECTIVES)


def _variance(loss_fn, kwargs, policy, log_proposal, space, setting, scores):
    truth = target_truth(space, setting["pointwise"], setting["log_prior"])
    with torch.no_grad():
        log_pi = space.log_probs(policy)
    log_q = log_pi if log_proposal is None else log_proposal
    batch = Batch(
        log_pi, log_q, setting["log_prior"], truth.log_p + truth.log_z, truth.log_z,
        setting["reward"],
    )
    return estimator_variance(objective_advantages(loss_fn, batch, **kwargs), scores, log_q).item()


@pytest.mark.parametrize("off_policy", [False, True])
def test_the_baseline_lowers_the_exact_variance_of_dpg(toy, toy_policy, space, setting, off_policy):
    """At the start of training (π = a), on-policy and with another proposal. (Far from the
    start, with q far from π, ρ = π/q explodes and the baseline hurts: KL-adaptive DPG keeps q a
    recent copy of π for that reason; benchmarks/exact_toy.py measures it.)"""
    prior, _ = toy
    scores = policy_scores(prior, space)
    with torch.no_grad():
        log_q = space.log_probs(toy_policy) if off_policy else None
    plain = _variance(dpg, {}, prior, log_q, space, setting, scores)
    with_baseline = _variance(dpg_baseline, {}, prior, log_q, space, setting, scores)
    assert with_baseline < 0.5 * plain


def test_a_baseline_lowers_the_exact_variance_of_reinforce(toy_policy, space, setting):
    scores = policy_scores(toy_policy, space)
    with torch.no_grad():
        mean_reward = (space.log_probs(toy_policy).exp() @ setting["reward"]).item()
    plain = _variance(reinforce, {"baseline": "none"}, toy_policy, None, space, setting, scores)
    with_baseline = _variance(
        reinforce, {"baseline": mean_reward}, toy_policy, None, space, setting, scores
    )
    assert with_baseline < 0.9 * plain


def _random_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_pi = (torch.randn(n, generator=g, dtype=torch.float64) - 5).requires_grad_(True)
    log_q = log_pi.detach() + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    log_prior = log_pi.detach() + torch.randn(n, generator=g, dtype=torch.float64)
    reward = torch.rand(n, generator=g, dtype=torch.float64)
    log_z = torch.tensor(-4.0, dtype=torch.float64)
    return Batch(log_pi, log_q, log_prior, log_prior + reward, log_z, reward)


def test_fdpg_forward_kl_is_dpg_sample_by_sample():
    batch = _random_batch()
    assert torch.allclose(
        objective_advantages(fdpg, batch, divergence="forward_kl", baseline="none"),
        objective_advantages(dpg, batch))
    # and with baseline B = 1 it is GDC++: ρ(p/π − 1) = w − ρ
    assert torch.allclose(
        objective_advantages(fdpg, batch, divergence="forward_kl", baseline=1.0),
        objective_advantages(dpg_baseline, batch))


def test_fdpg_reverse_kl_is_kl_control_with_beta_one(toy_policy, space, setting):
    """Same expected gradient as KL-control (β = 1) toward p_1 = a·exp(r): equal up to a
    constant shift of the pseudo-reward, which a baseline removes sample by sample."""
    log_prior, reward = setting["log_prior"], setting["reward"]
    log_target = log_prior + reward
    log_z = torch.logsumexp(log_target, 0)
    log_pi = space.log_probs(toy_policy)
    batch = Batch(log_pi, log_pi.detach(), log_prior, log_target, log_z, reward)
    params = list(toy_policy.parameters())
    rev = objective_advantages(fdpg, batch, divergence="reverse_kl", baseline="none")
    ctrl = objective_advantages(kl_control, batch, beta=1.0, baseline="none")
    assert torch.allclose(rev - ctrl, (-log_z - 1).expand_as(rev))  # the constant −log Z − 1
    g_rev = expected_gradient(rev, log_pi, log_pi.detach(), params)
    g_ctrl = expected_gradient(ctrl, log_pi, log_pi.detach(), params)
    assert (g_rev - g_ctrl).norm() / g_ctrl.norm() < REL_TOL


def test_objectives_are_pure_and_only_log_pi_carries_gradient():
    batch = _random_batch()
    for name, spec in OBJECTIVES.items():
        loss, metrics = spec.loss(batch)
        assert loss.requires_grad and loss.dim() == 0, name
        assert all(not v.requires_grad for v in metrics.values()), name
        (grad,) = torch.autograd.grad(loss, batch.log_policy)
        assert torch.isfinite(grad).all(), name


def test_unknown_objective_names_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown objective 'dpgg'; valid: reinforce, kl_control, dpg"
    ):
        get_objective("dpgg")


def test_no_satisfying_sample_and_an_unseen_z_give_zero_weights_not_nan():
    batch = _random_batch()
    nothing = float("-inf")
    empty = Batch(batch.log_policy, batch.log_proposal, batch.log_prior,
                  torch.full_like(batch.log_prior, nothing),
                  torch.tensor(nothing, dtype=torch.float64), batch.reward)
    assert (empty.log_weight == nothing).all()
    for name in ("dpg", "dpg_baseline", "kl_dpg"):
        loss, _ = OBJECTIVES[name].loss(empty)
        (grad,) = torch.autograd.grad(loss, empty.log_policy)
        assert torch.isfinite(grad).all(), name
