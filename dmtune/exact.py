"""Exact mode: enumerate every sequence of a small space and compute the truth.

With a vocabulary of V tokens (EOS included) and ``max_new_tokens = T`` the space holds every
string of non-EOS tokens of length < T followed by EOS, plus every length-T string without
EOS (a truncated outcome): ``Σ_{l<T} (V−1)^l + (V−1)^T`` sequences, whose probabilities sum
to 1 under any autoregressive model. On it ``Z``, ``p``, ``KL(p‖π)``, ``KL(π‖a)``, ``E_π[φ]``,
the entropy and exact gradients (autograd through the sums) are computed exactly; tests and
the exact benchmark compare estimators and objectives to these values.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from dmtune import metrics as m
from dmtune.lm import encode_prompts, filler_token_id, sequence_log_probs
from dmtune.lora import using
from dmtune.objectives import Batch
from dmtune.prompts import Contexts
from dmtune.sampling import Samples, decode_texts
from dmtune.sharding import unsharded
from dmtune.target import Target

MAX_ENUMERATED_SEQUENCES = 500_000
_SCORING_CHUNK = 8192


def space_size(vocab_size: int, max_new_tokens: int) -> int:
    """Number of distinct outcomes of ``max_new_tokens`` steps over ``vocab_size`` tokens."""
    other = vocab_size - 1
    return sum(other**length for length in range(max_new_tokens)) + other**max_new_tokens


def enumerate_sequences(
    vocab_size: int, eos_id: int, max_new_tokens: int, filler_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every outcome as (tokens, mask), both (n_sequences, max_new_tokens), right-padded."""
    size = space_size(vocab_size, max_new_tokens)
    if size > MAX_ENUMERATED_SEQUENCES:
        raise ValueError(
            f"exact mode would enumerate {size:,} sequences (vocab {vocab_size}, max_new_tokens "
            f"{max_new_tokens}); the limit is {MAX_ENUMERATED_SEQUENCES:,}: use a smaller toy space"
        )
    others = [t for t in range(vocab_size) if t != eos_id]
    rows: list[list[int]] = []
    lengths: list[int] = []
    for length in range(max_new_tokens + 1):
        for prefix in itertools.product(others, repeat=length):
            ended = length < max_new_tokens
            row = list(prefix) + ([eos_id] if ended else [])
            lengths.append(len(row))
            rows.append(row + [filler_id] * (max_new_tokens - len(row)))
    tokens = torch.tensor(rows, dtype=torch.long)
    mask = (torch.arange(max_new_tokens)[None, :] < torch.tensor(lengths)[:, None]).long()
    return tokens, mask


class ExactSpace:
    """The enumerated continuations of one prompt, ready to score with any model or feature."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerFast,
        max_new_tokens: int,
        prompt: str = "",
    ) -> None:
        vocab_size = model.config.vocab_size
        filler = filler_token_id(tokenizer, vocab_size)
        device = next(model.parameters()).device
        tokens, mask = enumerate_sequences(
            vocab_size, tokenizer.eos_token_id, max_new_tokens, filler
        )
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [prompt], filler, device)
        self.prompt, self.device = prompt, device
        n = tokens.shape[0]
        self.samples = Samples(
            prompt_ids=prompt_ids.expand(n, -1),
            prompt_mask=prompt_mask.expand(n, -1),
            tokens=tokens.to(device),
            mask=mask.to(device),
            log_q=torch.zeros(n, device=device),
            texts=decode_texts(tokenizer, tokens, mask),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def log_probs(self, model: PreTrainedModel) -> torch.Tensor:
        """``log model(x)`` for every sequence: (n,), differentiable when grad is enabled."""
        s = self.samples
        with using(model) as network, unsharded(network):
            chunks = [
                sequence_log_probs(
                    network, s.prompt_ids[i:j], s.prompt_mask[i:j], s.tokens[i:j], s.mask[i:j]
                )
                for i, j in _chunks(len(s), _SCORING_CHUNK)
            ]
        return torch.cat(chunks)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class ExactTruth:
    """The normalised target on the enumerated space: ``log p`` (n,) and ``log Z``."""

    log_p: torch.Tensor
    log_z: torch.Tensor

    @classmethod
    def from_log_target(cls, log_target: torch.Tensor) -> ExactTruth:
        log_z = torch.logsumexp(log_target.double(), 0)
        return cls((log_target.double() - log_z), log_z)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(p‖q) = Σ p (log p − log q)``, with ``0 log 0 = 0``; differentiable in both."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum()


def exact_metrics(
    log_policy: torch.Tensor,
    log_prior: torch.Tensor,
    truth: ExactTruth,
    features: torch.Tensor,
    feature_names: list[str],
    log_proposal: torch.Tensor | None = None,
) -> dict[str, float]:
    """The exact counterparts of the training metrics, named ``exact/...``.

    log_policy, log_prior, log_proposal: (n,) over the space; features: (n, k).
    """
    log_pi = log_policy.detach().double()
    pi = log_pi.exp()
    metrics = {
        m.EXACT_LOG_Z: truth.log_z.item(),
        m.EXACT_KL_TARGET_POLICY: kl(truth.log_p, log_pi).item(),
        m.EXACT_KL_POLICY_PRIOR: kl(log_pi, log_prior.double()).item(),
        m.EXACT_TV_TARGET_POLICY: 0.5 * (pi - truth.log_p.exp()).abs().sum().item(),
        m.EXACT_ENTROPY: -(pi * log_pi).sum().item(),
    }
    if log_proposal is not None:
        metrics[m.EXACT_KL_TARGET_PROPOSAL] = kl(truth.log_p, log_proposal.double()).item()
    for j, name in enumerate(feature_names):
        metrics[m.exact_constraint(name)] = (pi * features[:, j].double()).sum().item()
    return metrics


def target_truth(space: ExactSpace, target: Target, log_prior: torch.Tensor) -> ExactTruth:
    """Exact normalised target on the space (λ must be fitted already for distributional
    targets)."""
    return ExactTruth.from_log_target(target.log_prob(log_prior, target.score(space.samples)))


MAX_EXACT_PROMPTS = 16


def exact_spaces(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    max_new_tokens: int,
    prompts: Sequence[str],
    as_contexts: bool = True,
) -> list[ExactSpace]:
    """One enumerated space per prompt (contexts c of a conditional target); with
    ``as_contexts`` its samples say their prompt, as training's do (scorers may read it)."""
    if len(prompts) > MAX_EXACT_PROMPTS:
        raise ValueError(
            f"exact mode enumerates every prompt's continuations: {len(prompts)} prompts, the "
            f"limit is {MAX_EXACT_PROMPTS}; use fewer prompts with model=toy"
        )
    spaces = [ExactSpace(model, tokenizer, max_new_tokens, prompt) for prompt in prompts]
    if as_contexts:
        for space in spaces:
            n = len(space)
            space.samples.contexts = Contexts(
                (space.prompt,) * n, torch.zeros(n, dtype=torch.long, device=space.device), 1
            )
    return spaces


class ExactOracle:
    """Exact metrics of any policy against a target on enumerated spaces, one per prompt.

    With several prompts (contexts c) every metric is the mean over contexts of its exact
    per-context value (``E_c KL(p_c‖π_c)``, ``E_c log Z_c``, ...), prompts weighted equally as
    training draws them. The prior's log-probs are computed once; the normalised targets are
    recomputed only when the target's λ changes (after calibration, or at eval).
    """

    def __init__(self, spaces: Sequence[ExactSpace], prior: PreTrainedModel) -> None:
        self.spaces = list(spaces)
        self.prior = prior
        self._log_priors = [space.log_probs(prior) for space in self.spaces]
        self._truth: tuple[tuple[int, tuple[float, ...]], list[ExactTruth]] | None = None

    @torch.no_grad()
    def metrics(
        self, target: Target, policy: PreTrainedModel, proposal: PreTrainedModel | None = None
    ) -> dict[str, float]:
        key = (id(target), tuple(target.lambdas.tolist()))
        if self._truth is None or self._truth[0] != key:
            truths = [
                target_truth(space, target, log_prior)
                for space, log_prior in zip(self.spaces, self._log_priors)
            ]
            self._truth = (key, truths)
        per_context = []
        for space, log_prior, truth in zip(self.spaces, self._log_priors, self._truth[1]):
            scores = target.score(space.samples)
            names = list(scores.by_name)
            features = (
                torch.stack([scores.by_name[n] for n in names], -1)
                if names
                else torch.zeros(len(space), 0)
            )
            log_proposal = space.log_probs(proposal) if proposal is not None else None
            per_context.append(
                exact_metrics(
                    space.log_probs(policy), log_prior, truth, features, names, log_proposal
                )
            )
        return {key: sum(d[key] for d in per_context) / len(per_context) for key in per_context[0]}


def policy_scores(model: PreTrainedModel, space: ExactSpace) -> torch.Tensor:
    """``∇θ log π(x)`` for every sequence, flattened: (n, n_params).

    One small forward and backward per sequence: cheaper than backpropagating the whole
    space's graph n times.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    s = space.samples
    rows = []
    for i in range(len(space)):
        log_p = sequence_log_probs(
            model,
            s.prompt_ids[i : i + 1],
            s.prompt_mask[i : i + 1],
            s.tokens[i : i + 1],
            s.mask[i : i + 1],
        )
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(log_p.sum(), params)]))
    return torch.stack(rows)


def expected_gradient(
    advantages: torch.Tensor,
    log_policy: torch.Tensor,
    log_proposal: torch.Tensor,
    params: list[torch.Tensor],
) -> torch.Tensor:
    """Exact ``E_q[g(x)]`` of the one-sample estimator ``g(x) = −A(x) ∇log π(x)``, flattened.

    One backward: ``E_q[g] = ∇θ Σ_x −sg(q(x) A(x)) log π(x)``.
    """
    weights = (log_proposal.double().exp() * advantages.double()).detach()
    grads = torch.autograd.grad(-(weights * log_policy).sum(), params, retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


def objective_advantages(
    loss_fn: Callable[..., tuple[torch.Tensor, dict]], batch: Batch, **kwargs: Any
) -> torch.Tensor:
    """The advantage ``A(x)`` an objective applies to each sample, read off its own loss.

    The loss is ``−mean[A · log π]``, so ``A = −n · ∂loss/∂log π``; taking it from the loss
    means the tests check the code that trains, not a restatement of it.
    """
    leaf = batch.log_policy.detach().clone().requires_grad_(True)
    loss, _ = loss_fn(dataclasses.replace(batch, log_policy=leaf), **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return -grad * leaf.numel()


def estimator_variance(
    advantages: torch.Tensor, scores: torch.Tensor, log_proposal: torch.Tensor
) -> torch.Tensor:
    """Exact variance (trace of the covariance) of the one-sample estimator under q.

    ``g(x) = −A(x) ∇log π(x)``, ``x ~ q``; advantages: (n,), scores: (n, n_params) from
    :func:`policy_scores`, log_proposal: (n,) over the whole space.
    """
    q = log_proposal.double().exp()
    per_sample = -advantages.double()[:, None] * scores.double()  # (n, n_params)
    mean = q @ per_sample
    return q @ (per_sample**2).sum(1) - (mean**2).sum()
