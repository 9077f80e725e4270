"""Targets: λ fitting, unreachable moments, KL-control's target (Theorem 1), running log Ẑ."""

from __future__ import annotations

import math

import pytest
import torch

from dmtune.constraints import TokenCount, TokenPresent
from dmtune.exact import kl, target_truth
from dmtune.lm import encode_prompts, filler_token_id
from dmtune.sampling import Decoding, sample
from dmtune.target import RunningLogZ, Target, UnreachableMomentError, kl_control_log_target

HAS_A, HAS_D = TokenPresent(1, "has_a"), TokenPresent(4, "has_d")


def _exact_moments(space, target, log_prior):
    truth = target_truth(space, target, log_prior)
    return truth.log_p.exp() @ target.score(space.samples).features.double()


@pytest.mark.parametrize(
    "features, moments",
    [((HAS_D,), [0.5]), ((HAS_A, HAS_D), [0.3, 0.6]), ((TokenCount(2, "n_b"),), [1.5])],
)
def test_lambda_fit_reaches_the_target_moments_exactly(toy, space, features, moments):
    model, _ = toy
    target = Target(distributional=features, moments=torch.tensor(moments))
    with torch.no_grad():
        log_prior = space.log_probs(model)
    prior_moments = (
        space.log_probs(model).exp().detach() @ target.score(space.samples).features.double()
    )
    assert (prior_moments - torch.tensor(moments)).abs().max() > 0.05  # the fit has work to do
    fit = target.fit(log_prior, torch.zeros_like(log_prior), target.score(space.samples))
    achieved = _exact_moments(space, target, log_prior)
    assert (achieved - torch.tensor(moments, dtype=torch.float64)).abs().max() < 1e-3
    assert fit.iterations < 50 and 1.0 <= fit.ess <= len(space)


def test_lambda_fit_on_samples_is_within_standard_errors(toy, space):
    model, tokenizer = toy
    filler = filler_token_id(tokenizer, 5)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [""] * 20_000, filler)
    samples = sample(
        model, tokenizer, prompt_ids, prompt_mask, Decoding(4), filler,
        torch.Generator().manual_seed(3),
    )
    target = Target(distributional=(HAS_D,), moments=torch.tensor([0.5]))
    fit = target.fit(samples.log_q, samples.log_q, target.score(samples))
    with torch.no_grad():
        achieved = _exact_moments(space, target, space.log_probs(model)).item()
    standard_error = math.sqrt(0.25 / fit.ess)
    assert abs(achieved - 0.5) < 4 * standard_error


def test_moment_outside_the_observed_range_is_a_clear_error(toy, space):
    model, _ = toy
    with torch.no_grad():
        log_prior = space.log_probs(model)
    target = Target(distributional=(HAS_D,), moments=torch.tensor([1.0]))
    with pytest.raises(
        UnreachableMomentError, match=r"target moment 1 is not strictly inside \[0, 1\]"
    ):
        target.fit(log_prior, torch.zeros_like(log_prior), target.score(space.samples))


def test_jointly_unreachable_moments_are_a_clear_error(toy, space):
    model, _ = toy
    with torch.no_grad():
        log_prior = space.log_probs(model)
    # every sequence holds at most 4 tokens: n_a + n_b <= 4 cannot average 4.5
    features = (TokenCount(1, "n_a"), TokenCount(2, "n_b"))
    target = Target(distributional=features, moments=torch.tensor([2.5, 2.0]))
    with pytest.raises(UnreachableMomentError, match="did not reach the target moments"):
        target.fit(log_prior, torch.zeros_like(log_prior), target.score(space.samples))


def test_hybrid_target_is_zero_where_the_pointwise_constraint_fails(toy, space):
    model, _ = toy
    with torch.no_grad():
        log_prior = space.log_probs(model)
    target = Target(pointwise=(HAS_A,), distributional=(HAS_D,), moments=torch.tensor([0.5]))
    target.fit(log_prior, torch.zeros_like(log_prior), target.score(space.samples))
    truth = target_truth(space, target, log_prior)
    has_a = HAS_A(space.samples).bool()
    assert torch.isneginf(truth.log_p[~has_a]).all() and torch.isfinite(truth.log_p[has_a]).all()
    assert truth.log_p.exp() @ HAS_D(space.samples).double() == pytest.approx(0.5, abs=1e-3)


def test_theorem_1_kl_control_is_inference_toward_p_beta(toy, toy_policy, space):
    """E_π[r] − β KL(π‖a) = −β KL(π‖p_β) + β log Z_β, exactly (2206.00761, Theorem 1)."""
    model, _ = toy
    beta = 0.5
    reward = TokenCount(4, "n_d")(space.samples).double()
    with torch.no_grad():
        log_prior, log_pi = space.log_probs(model), space.log_probs(toy_policy)
    log_target = kl_control_log_target(log_prior, reward, beta)
    log_z = torch.logsumexp(log_target, 0)
    lhs = log_pi.exp() @ reward - beta * kl(log_pi, log_prior)
    rhs = -beta * kl(log_pi, log_target - log_z) + beta * log_z
    assert lhs.item() == pytest.approx(rhs.item(), abs=1e-10)
    assert abs(lhs.item()) > 0.1  # not a trivial 0 = 0


def test_running_log_z_is_log_mean_exp_of_everything_seen():
    torch.manual_seed(0)
    batches = [
        torch.randn(7) * 30 - 200, torch.randn(5) * 30 + 100, torch.tensor([float("-inf")] * 3)
    ]
    running = RunningLogZ()
    for batch in batches:
        value = running.update(batch)
    everything = torch.cat(batches).double()
    assert value.item() == pytest.approx(
        (torch.logsumexp(everything, 0) - math.log(15)).item(), rel=1e-12
    )
    restored = RunningLogZ()
    restored.load_state_dict(running.state_dict())
    assert restored.value.item() == value.item() and restored.count == 15
