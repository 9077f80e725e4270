"""The fast step against the plain one: micro-batches, length buckets, the sampler's own log π.

The trainer scores and updates in micro-batches, each cut to its longest sequence, and on-policy
takes log π(x) from the sampler instead of a second forward pass; the loss is a function of the
whole batch's log π, whose partials weight each micro-batch's backward pass. These tests hold
that to the plain step — one forward with grad over the whole batch, ``loss.backward()`` — on the
float64 toy, for every objective, with and without prompts.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_objectives import CASES

from dmtune import metrics as m
from dmtune.constraints import TokenCount, TokenPresent
from dmtune.lm import LM
from dmtune.objectives import Batch
from dmtune.priors import make_toy_prior
from dmtune.sampling import Decoding
from dmtune.target import Target, context_log_z
from dmtune.trainer import Trainer, TrainerConfig

HAS_D = TokenPresent(4, "has_d")
# every objective with each of its settings in test_objectives, once
OBJECTIVES = list(dict.fromkeys((name, tuple(sorted(k.items()))) for name, k, *_ in CASES))


def _target(kind: str) -> Target:
    if kind == "pointwise":
        return Target(pointwise=(HAS_D,))
    return Target(distributional=(TokenCount(4, "n_d"),), moments=torch.tensor([1.2]))


def _trainer(objective, kwargs, kind, micro, prompts=None) -> Trainer:
    model, tokenizer = make_toy_prior(seed=0)
    config = TrainerConfig(
        batch_size=24, max_new_tokens=4, lr=1e-2, objective=objective,
        objective_params=dict(kwargs), micro_batch_size=micro, fit_samples=256,
        prompts=prompts, samples_per_prompt=4, seed=5,
    )
    trainer = Trainer(model.double(), tokenizer, _target(kind), config)
    trainer.policy.double()
    if trainer.proposal is not None:
        trainer.proposal.double()
    # π away from a (and from q): at π = a, log π/p ties at log Z and TV's sign is rounding
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in trainer.policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    trainer.calibrate()
    return trainer


def _plain_update(trainer: Trainer, samples) -> torch.Tensor:
    """The step as written before micro-batches: one graph over the whole batch."""
    scores = trainer.target.score(samples)
    with torch.no_grad():
        log_prior = trainer.lm.log_probs(samples)
    log_target = trainer.target.log_prob(log_prior, scores)
    log_policy = trainer.lm.log_probs(samples, model=trainer.policy)
    log_proposal = samples.log_q if trainer.proposal is not None else log_policy.detach()
    if samples.contexts is None:
        log_z = trainer.log_z.updated(log_target - log_proposal).value
    else:
        log_z, _ = context_log_z(log_target - log_proposal, samples.contexts)
    batch = Batch(
        log_policy, log_proposal, log_prior, log_target, log_z, scores.reward, samples.contexts
    )
    loss, _ = trainer.spec.loss(batch, **trainer.loss_kwargs)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.policy.parameters(), trainer.config.grad_clip)
    trainer.optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("kind", ["pointwise", "distributional"])
@pytest.mark.parametrize("with_prompts", [False, True])
@pytest.mark.parametrize("objective, kwargs", OBJECTIVES)
def test_a_micro_batched_step_updates_the_policy_as_the_plain_step_does(
    tmp_path, objective, kwargs, kind, with_prompts
):
    prompts = None
    if with_prompts:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a\nb c\nd d\n")
    if dict(kwargs).get("baseline") == 0.3 and kind == "distributional":
        pytest.skip("a constant baseline is for rewards")
    if objective in ("reinforce", "kl_control") and kind == "distributional":
        pytest.skip("reward maximisation needs a pointwise constraint")
    if dict(kwargs).get("divergence") == "reverse_kl" and kind == "pointwise":
        with pytest.raises(ValueError, match="reverse_kl is infinite with a pointwise"):
            _trainer(objective, kwargs, kind, micro=5)
        return
    fast = _trainer(objective, kwargs, kind, micro=5, prompts=prompts and str(prompts))
    plain = _trainer(objective, kwargs, kind, micro=0, prompts=prompts and str(prompts))
    samples = fast.sample()
    lengths = samples.mask.sum(-1)
    assert lengths.min() < lengths.max()  # the length buckets have something to cut

    metrics = fast.update(samples)
    loss = _plain_update(plain, samples)

    assert metrics[m.LOSS] == pytest.approx(loss.item(), rel=1e-9, abs=1e-12)
    for (name, p_fast), p_plain in zip(
        fast.policy.named_parameters(), plain.policy.parameters()
    ):
        assert torch.allclose(p_fast.grad, p_plain.grad, rtol=1e-7, atol=1e-12), name
        # Adam divides by |g| + 1e-8: gradients that are 0 up to rounding (the key biases) move a
        # weight by ~1e-10 of noise; a real difference moves it by ~lr = 1e-2
        assert torch.allclose(p_fast, p_plain, rtol=0, atol=1e-9), name
    assert math.isfinite(metrics[m.GRAD_NORM])


def test_micro_batched_sampling_draws_the_same_samples(toy):
    model, tokenizer = toy
    lm = LM(model, tokenizer)
    decoding = Decoding(max_new_tokens=4)
    whole = lm.sample(40, decoding, torch.Generator().manual_seed(3))
    parts = lm.sample(40, decoding, torch.Generator().manual_seed(3), micro_batch_size=7)
    assert torch.equal(whole.tokens, parts.tokens) and torch.equal(whole.mask, parts.mask)
    assert whole.texts == parts.texts
    assert torch.allclose(whole.log_q, parts.log_q, atol=1e-12)
    assert torch.allclose(lm.log_probs(whole), lm.log_probs(whole, micro_batch_size=6), atol=1e-12)
