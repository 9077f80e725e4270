"""Conditional targets (CDPG): per-context ``Z_c``, baselines and λ, against exact enumeration."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOY_MAX_NEW_TOKENS
from test_objectives import BETA, CASES, REL_TOL, _divergence

from dmtune import estimators as est
from dmtune import metrics as m
from dmtune.constraints import TokenCount, TokenPresent
from dmtune.exact import (
    ExactSpace,
    ExactTruth,
    expected_gradient,
    kl,
    objective_advantages,
)
from dmtune.lm import LM
from dmtune.objectives import Batch, get_objective
from dmtune.prompts import repeat_prompts
from dmtune.sampling import Decoding
from dmtune.target import Target, context_log_z
from dmtune.trainer import Trainer, TrainerConfig

PROMPTS = ["a", "b c"]  # words of the toy vocabulary: two contexts with different a(x|c)
HAS_D = TokenPresent(4, "has_d")


@pytest.fixture(scope="module")
def contexts_setting(toy):
    """Each prompt's enumerated space, joined: one row per (context, sequence)."""
    prior, tokenizer = toy
    spaces = [ExactSpace(prior, tokenizer, TOY_MAX_NEW_TOKENS, p) for p in PROMPTS]
    index = torch.cat([torch.full((len(s),), c) for c, s in enumerate(spaces)])
    contexts = repeat_prompts(PROMPTS, 1)  # prompts unused below; the index is what counts
    contexts = type(contexts)(tuple(PROMPTS[c] for c in index.tolist()), index, len(PROMPTS))
    with torch.no_grad():
        log_prior = torch.cat([s.log_probs(prior) for s in spaces])
    pointwise = Target(pointwise=(HAS_D,))
    distributional = Target(distributional=(TokenCount(4, "n_d"),), moments=torch.tensor([1.2]))
    scores = [distributional.score(s.samples) for s in spaces]
    joined = type(scores[0])(
        torch.cat([s.features for s in scores]),
        torch.cat([s.log_b for s in scores]),
        torch.cat([s.reward for s in scores]),
        {},
    )
    distributional.fit(log_prior, torch.zeros_like(log_prior), joined, contexts)
    reward = torch.cat([TokenCount(4, "n_d")(s.samples).double() for s in spaces])
    return {
        "spaces": spaces, "contexts": contexts, "log_prior": log_prior, "reward": reward,
        "pointwise": pointwise, "distributional": distributional,
    }


def _truths(setting, target):
    """Each context's exact normalised target."""
    truths = []
    for c, space in enumerate(setting["spaces"]):
        rows = setting["contexts"].index == c
        log_target = target.log_prob(setting["log_prior"][rows], target.score(space.samples))
        truths.append(ExactTruth.from_log_target(log_target))
    return truths


def test_lambda_is_shared_and_matches_the_mean_over_contexts_of_each_contexts_moment(
    contexts_setting,
):
    target = contexts_setting["distributional"]
    moments = [
        (truth.log_p.exp() @ TokenCount(4, "n_d")(space.samples).double()).item()
        for truth, space in zip(_truths(contexts_setting, target), contexts_setting["spaces"])
    ]
    assert moments[0] != pytest.approx(moments[1], abs=1e-2)  # the contexts differ ...
    assert sum(moments) / 2 == pytest.approx(1.2, abs=1e-4)  # ... their mean is the target


@pytest.mark.parametrize("name, kwargs, target_kind, off_policy", CASES)
def test_expected_gradient_with_exact_z_c_is_the_gradient_of_the_mean_divergence_over_contexts(
    toy, toy_policy, contexts_setting, name, kwargs, target_kind, off_policy
):
    setting = contexts_setting
    params = list(toy_policy.parameters())
    contexts, log_prior, reward = setting["contexts"], setting["log_prior"], setting["reward"]
    truths = _truths(setting, setting[target_kind])
    log_pi = torch.cat([s.log_probs(toy_policy) for s in setting["spaces"]])
    log_q = log_prior if off_policy else log_pi.detach()
    log_z = torch.stack([t.log_z for t in truths])[contexts.index]
    log_p = torch.cat([t.log_p for t in truths])
    batch = Batch(log_pi, log_q, log_prior, log_p + log_z, log_z, reward, contexts)

    advantages = objective_advantages(get_objective(name).loss, batch, **kwargs)
    # x ~ q(·|c) with c uniform over the contexts
    expected = expected_gradient(advantages, log_pi, log_q - math.log(len(PROMPTS)), params)
    divergence = sum(
        _divergence(name, kwargs, log_pi[rows], log_prior[rows], log_p[rows], reward[rows])
        for rows in (contexts.index == c for c in range(len(PROMPTS)))
    ) / len(PROMPTS)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(divergence, params)])

    assert exact.norm() > 1e-3
    assert (expected - exact).norm() / exact.norm() < REL_TOL


def test_baselines_are_per_context_leave_one_out_and_mean():
    reward = torch.tensor([1.0, 0.0, 0.0, 4.0, 6.0, 8.0], dtype=torch.float64)
    contexts = repeat_prompts(["x", "y"], 3)
    zeros = torch.zeros(6, dtype=torch.float64)
    batch = Batch(zeros, zeros, zeros, zeros, torch.tensor(0.0), reward, contexts)
    loss = get_objective("reinforce").loss
    loo = objective_advantages(loss, batch, baseline="loo")
    assert loo.tolist() == pytest.approx([1.0, -0.5, -0.5, -3.0, 0.0, 3.0])
    mean = objective_advantages(loss, batch, baseline="mean")
    assert mean.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0])
    shaped = objective_advantages(get_objective("kl_control").loss, batch, beta=BETA)
    assert shaped.tolist() == pytest.approx(mean.tolist())  # log π = log a: no KL term here


def test_per_context_log_z_and_kl_estimates_are_within_a_few_standard_errors_of_exact(toy):
    prior, tokenizer = toy
    lm = LM(prior, tokenizer)
    contexts = repeat_prompts(PROMPTS, 3000)
    generator = torch.Generator().manual_seed(0)
    samples = lm.sample(len(contexts), Decoding(TOY_MAX_NEW_TOKENS), generator, contexts=contexts)
    target = Target(pointwise=(HAS_D,))
    log_prior = lm.log_probs(samples).double()
    log_target = target.log_prob(log_prior, target.score(samples))
    _, per_context = context_log_z(log_target - samples.log_q.double(), contexts)
    for c, prompt in enumerate(PROMPTS):
        rows = contexts.index == c
        space = ExactSpace(prior, tokenizer, TOY_MAX_NEW_TOKENS, prompt)
        truth = ExactTruth.from_log_target(
            target.log_prob(space.log_probs(prior), target.score(space.samples))
        )
        # Ẑ_c is a mean of 0/1 indicators here: its standard error is binomial
        z_hat = per_context[c].exp().item()
        se = math.sqrt(z_hat * (1 - z_hat) / int(rows.sum()))
        assert abs(z_hat - truth.log_z.exp().item()) < 4 * se
        terms, _ = est.terms_with_log_z_error(
            est.kl_target_model_terms, log_target[rows], samples.log_q[rows].double(),
            log_prior[rows],
        )
        exact_kl = kl(truth.log_p, space.log_probs(prior).double()).item()
        assert abs(terms.mean().item() - exact_kl) < 4 * est.standard_error(terms).item()


def test_a_context_no_sample_reaches_weighs_nothing_and_is_counted():
    log_w = torch.tensor([0.0, -1.0, float("-inf"), float("-inf")], dtype=torch.float64)
    contexts = repeat_prompts(["x", "y"], 2)
    per_sample, per_context = context_log_z(log_w, contexts)
    assert torch.isneginf(per_context[1]) and torch.isfinite(per_sample).all()
    estimates = m.context_estimates(per_context)
    assert estimates[m.UNREACHED_CONTEXTS].item() == 0.5
    assert estimates[m.LOG_Z].item() == pytest.approx(per_context[0].item())


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpg_baseline", "kl_dpg"])
def test_cdpg_halves_the_exact_mean_kl_over_contexts(tmp_path, objective):
    from dmtune.priors import make_toy_prior

    (tmp_path / "prompts.txt").write_text("a\nb c\nd d\n")
    model, tokenizer = make_toy_prior(seed=0)
    config = TrainerConfig(
        batch_size=64, max_new_tokens=4, lr=3e-3, exact=True, objective=objective,
        prompts=str(tmp_path / "prompts.txt"), samples_per_prompt=8,
    )
    trainer = Trainer(model, tokenizer, Target(pointwise=(HAS_D,)), config)
    trainer.calibrate()
    start = trainer.exact_metrics()
    # by 100 steps, over seeds 0–2: the mean KL at most 0.25 of its start, has_d up by ≥ 0.31
    for _ in range(100):
        metrics = trainer.step()
    end = trainer.exact_metrics()
    assert metrics[m.UNREACHED_CONTEXTS] < 0.5 and math.isfinite(metrics[m.LOG_Z])
    assert end[m.EXACT_KL_TARGET_POLICY] < 0.5 * start[m.EXACT_KL_TARGET_POLICY]
    assert end["exact/constraint/has_d"] > start["exact/constraint/has_d"] + 0.1
