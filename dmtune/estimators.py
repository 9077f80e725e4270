"""Monte-Carlo estimators from samples ``x ~ q``: pure functions, all in log space.

Each divergence estimator takes per-sample log-probabilities (batch,) and returns a 0-d
tensor; the ``*_terms`` variants return the per-sample terms, whose standard error is
``std / sqrt(n)``. ``log_z`` is the running estimate (or the exact value in exact mode).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import torch


def log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    """``log mean exp(x)`` without overflow: ``logsumexp(x) − log n``."""
    return torch.logsumexp(x, 0) - math.log(x.numel())


def group_log_mean_exp(x: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``log mean exp(x)`` within each group: (n_groups,); −inf for a group whose x are all
    −inf. ``index`` (batch,) gives each element's group."""
    shift = torch.full((n_groups,), float("-inf"), dtype=x.dtype, device=x.device)
    shift = shift.scatter_reduce(0, index, x, reduce="amax")
    finite_shift = torch.where(torch.isfinite(shift), shift, 0.0)
    sums = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(
        0, index, (x - finite_shift[index]).exp()
    )
    counts = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(
        0, index, torch.ones_like(x)
    )
    return sums.log() + finite_shift - counts.log()


def group_sum(x: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """The sum of ``x`` (batch,) over each element's group, broadcast back to (batch,)."""
    sums = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)
    return sums[index]


def log_z(log_target: torch.Tensor, log_proposal: torch.Tensor) -> torch.Tensor:
    """``log Ẑ = log mean_q[P/q]`` on one batch."""
    return log_mean_exp(log_target - log_proposal)


def _xlogy_terms(log_weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``w · log_ratio`` with 0 where w = 0 (a failed pointwise constraint makes log_ratio −inf).

    The masked entries are made finite before the product too, so that gradients through it
    (``terms_with_log_z_error``) are 0 there rather than NaN.
    """
    masked = torch.isneginf(log_weight)
    safe_weight = torch.where(masked, 0.0, log_weight)
    safe_ratio = torch.where(masked, 0.0, log_ratio)
    return torch.where(masked, 0.0, safe_weight.exp() * safe_ratio)


def kl_target_model_terms(
    log_target: torch.Tensor,
    log_proposal: torch.Tensor,
    log_model: torch.Tensor,
    log_z: torch.Tensor,
) -> torch.Tensor:
    """Per-sample terms of ``KL(p‖m) ≈ mean_q[(P/(Ẑq)) (log P − log Ẑ − log m)]``."""
    log_p = log_target - log_z
    return _xlogy_terms(log_p - log_proposal, log_p - log_model)


def kl_target_model(
    log_target: torch.Tensor,
    log_proposal: torch.Tensor,
    log_model: torch.Tensor,
    log_z: torch.Tensor,
) -> torch.Tensor:
    """``KL(p‖m)`` for any model m (the policy π, or the proposal q) on samples of q."""
    return kl_target_model_terms(log_target, log_proposal, log_model, log_z).mean()


def tv_target_model_terms(
    log_target: torch.Tensor,
    log_proposal: torch.Tensor,
    log_model: torch.Tensor,
    log_z: torch.Tensor,
) -> torch.Tensor:
    """Per-sample terms of ``TV(p, m) ≈ ½ mean_q |m/q − P/(Ẑq)|``."""
    weight = torch.where(torch.isneginf(log_target), 0.0, (log_target - log_z - log_proposal).exp())
    return 0.5 * ((log_model - log_proposal).exp() - weight).abs()


def tv_target_model(
    log_target: torch.Tensor,
    log_proposal: torch.Tensor,
    log_model: torch.Tensor,
    log_z: torch.Tensor,
) -> torch.Tensor:
    """Total variation distance ``TV(p, m)`` on samples of q."""
    return tv_target_model_terms(log_target, log_proposal, log_model, log_z).mean()


def kl_model_prior_terms(
    log_model: torch.Tensor, log_prior: torch.Tensor, log_proposal: torch.Tensor
) -> torch.Tensor:
    """Per-sample terms of ``KL(m‖a) ≈ mean_q[(m/q)(log m − log a)]`` (= mean_m[...] when q = m)."""
    return (log_model - log_proposal).exp() * (log_model - log_prior)


def kl_model_prior(
    log_model: torch.Tensor, log_prior: torch.Tensor, log_proposal: torch.Tensor
) -> torch.Tensor:
    """``KL(m‖a)``, importance-weighted when the samples come from q ≠ m."""
    return kl_model_prior_terms(log_model, log_prior, log_proposal).mean()


def moments(
    values: torch.Tensor, log_model: torch.Tensor, log_proposal: torch.Tensor
) -> torch.Tensor:
    """``E_m[φ] ≈ mean_q[(m/q) φ]`` for (batch,) or (batch, k) values."""
    rho = (log_model - log_proposal).exp()
    return (rho.view(-1, *([1] * (values.dim() - 1))) * values).mean(0)


def entropy(log_model: torch.Tensor, log_proposal: torch.Tensor) -> torch.Tensor:
    """Sequence-level entropy ``H(m) ≈ mean_q[(m/q)(−log m)]`` in nats."""
    return ((log_model - log_proposal).exp() * -log_model).mean()


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """``(Σw)² / Σw²`` from log-weights; between 1 and n, and 0 when every weight is 0 (no
    sample of the batch meets a pointwise constraint)."""
    log_sum = torch.logsumexp(log_weights, 0)
    ess = torch.exp(2 * log_sum - torch.logsumexp(2 * log_weights, 0))
    return torch.where(torch.isneginf(log_sum), torch.zeros_like(ess), ess)


def terms_with_log_z_error(
    terms_fn: Callable[..., torch.Tensor],
    log_target: torch.Tensor,
    log_proposal: torch.Tensor,
    log_model: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample terms of a target-side estimate that uses ``log Ẑ`` of the same samples, and
    ``log Ẑ``.

    The terms' mean is the estimate; their spread also carries the error of ``log Ẑ`` (delta
    method: each sample moves ``log Ẑ`` by ``w_i − 1``, with ``w = P/(Ẑq)``), so
    :func:`standard_error` of them is honest. Plain terms treat ``log Ẑ`` as exact and
    understate it.
    """
    log_z_hat = log_z(log_target, log_proposal).detach().requires_grad_(True)
    with torch.enable_grad():
        terms = terms_fn(log_target, log_proposal, log_model, log_z_hat)
        (slope,) = torch.autograd.grad(terms.mean(), log_z_hat)
    weight = torch.where(
        torch.isneginf(log_target), 0.0, (log_target - log_proposal - log_z_hat.detach()).exp()
    )
    return terms.detach() + slope * (weight - 1.0), log_z_hat.detach()


def standard_error(terms: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean of per-sample terms."""
    return terms.std() / math.sqrt(terms.numel())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over the batch (whitespace
    words)."""
    grams = [g for text in texts for g in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _ngram_counts(words: Sequence[str], max_n: int) -> list[Counter]:
    """Counts of the 1..max_n-grams of one text."""
    return [Counter(_ngrams(words, n)) for n in range(1, max_n + 1)]


def _bleu_from_counts(
    hyp: list[Counter], hyp_len: int, refs: Sequence[list[Counter]], ref_lens: Sequence[int]
) -> float:
    if hyp_len == 0:
        return 0.0
    log_precision = 0.0
    for n, hyp_counts in enumerate(hyp, start=1):
        clipped = sum(
            min(count, max(ref[n - 1][gram] for ref in refs)) for gram, count in hyp_counts.items()
        )
        smoothing = 1 if n > 1 else 0
        if clipped + smoothing == 0:
            return 0.0
        log_precision += math.log(
            (clipped + smoothing) / (sum(hyp_counts.values()) + smoothing)
        ) / len(hyp)
    closest = min((abs(length - hyp_len), length) for length in ref_lens)[1] if ref_lens else 0
    return math.exp(log_precision + min(0.0, 1 - closest / hyp_len))


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU+1 (Lin & Och 2004): add-one smoothing of the n ≥ 2 precisions."""
    refs = [_ngram_counts(r, max_n) for r in references]
    return _bleu_from_counts(
        _ngram_counts(hypothesis, max_n), len(hypothesis), refs, [len(r) for r in references]
    )


def self_bleu(texts: Sequence[str], max_n: int = 4, max_hypotheses: int = 64) -> float:
    """Self-BLEU (Zhu et al. 2018): mean BLEU of each text against the others; high = repetitive.

    Only the first ``max_hypotheses`` texts are scored (each against all others) to bound the
    quadratic cost; every text's n-gram counts are computed once.
    """
    words = [text.split() for text in texts]
    if len(words) < 2:
        return 0.0
    counts = [_ngram_counts(w, max_n) for w in words]
    lengths = [len(w) for w in words]
    scores = [
        _bleu_from_counts(
            counts[i], lengths[i], counts[:i] + counts[i + 1 :], lengths[:i] + lengths[i + 1 :]
        )
        for i in range(min(len(words), max_hypotheses))
    ]
    return sum(scores) / len(scores)
