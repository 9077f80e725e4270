"""The target EBM ``P`` (normalised ``p = P / Z``), λ fitting and the running ``log Ẑ``.

- pointwise:      log P(x) = log a(x) + Σ_i log b_i(x)            (−inf where a constraint fails)
- distributional: log P(x) = log a(x) + λ·φ(x), λ fitted so that E_p[φ] = μ̄
- hybrid:         both at once
KL-control's own target ``log P_β = log a + r/β`` is :func:`kl_control_log_target`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dmtune import estimators as est
from dmtune.constraints import Feature
from dmtune.prompts import Contexts
from dmtune.sampling import Samples

LAMBDA_TOLERANCE = 1e-4  # |E_p[φ] − μ̄| at which λ fitting stops
LAMBDA_MAX_ITERATIONS = 100
LAMBDA_MAX_ABS = 50.0  # |λ| beyond this means the moment sits on the edge of what samples show
_HESSIAN_JITTER = 1e-9


class UnreachableMomentError(ValueError):
    """The target moments cannot be matched by reweighting the samples at hand."""


@dataclass
class Scores:
    """Everything the target and the objectives need to know about a batch of samples.

    features: (batch, k) distributional features φ; log_b: (batch,) Σ log b_i (0 or −inf);
    reward: (batch,) r(x) for reward-maximisation objectives.
    """

    features: torch.Tensor
    log_b: torch.Tensor
    reward: torch.Tensor
    by_name: dict[str, torch.Tensor]


def join_scores(parts: list[Scores]) -> Scores:
    """The scores of several batches as one, in order."""
    if len(parts) == 1:
        return parts[0]
    return Scores(
        features=torch.cat([s.features for s in parts]),
        log_b=torch.cat([s.log_b for s in parts]),
        reward=torch.cat([s.reward for s in parts]),
        by_name={name: torch.cat([s.by_name[name] for s in parts]) for name in parts[0].by_name},
    )


@dataclass
class Target:
    """An EBM over sequences built from the prior and a constraint set.

    pointwise: constraints every sample must meet; distributional: features whose moments
    under p must equal ``moments``; ``lambdas`` are fitted by :meth:`fit`. The reward of RM
    objectives is the product of the pointwise constraints (1 when all hold) when there are
    any; otherwise ``reward`` must be given.
    """

    pointwise: Sequence[Feature] = ()
    distributional: Sequence[Feature] = ()
    moments: torch.Tensor | None = None  # (k,) μ̄
    reward: Feature | None = None
    lambdas: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    fitted: bool = False

    def __post_init__(self) -> None:
        k = len(self.distributional)
        if k and (self.moments is None or self.moments.shape != (k,)):
            raise ValueError(
                f"{k} distributional features need {k} target moments, got {self.moments}"
            )
        if self.lambdas.numel() != k:
            self.lambdas = torch.zeros(k, dtype=torch.float64)
        self.fitted = self.fitted or k == 0

    def moments_by_name(self) -> dict[str, float]:
        """Distributional feature name → its target moment μ̄."""
        moments = [] if self.moments is None else self.moments.tolist()
        return {feature.name: moment for feature, moment in zip(self.distributional, moments)}

    def score(self, samples: Samples) -> Scores:
        """Evaluate every feature once on a batch."""
        device = samples.tokens.device
        batch = len(samples)
        by_name = {}
        for feature in (
            *self.pointwise,
            *self.distributional,
            *((self.reward,) if self.reward else ()),
        ):
            by_name[feature.name] = feature(samples).to(device)
        features = (
            torch.stack([by_name[f.name] for f in self.distributional], -1)
            if self.distributional
            else torch.zeros(batch, 0, device=device)
        )
        log_b = torch.zeros(batch, device=device)
        for constraint in self.pointwise:
            log_b = log_b + torch.log(by_name[constraint.name].clamp(0, 1))
        if self.reward is not None:
            reward = by_name[self.reward.name]
        else:
            reward = log_b.exp()
        return Scores(features, log_b, reward, by_name)

    def log_prob(self, log_prior: torch.Tensor, scores: Scores) -> torch.Tensor:
        """Unnormalised ``log P(x)``: (batch,)."""
        log_p = log_prior + scores.log_b
        if self.distributional:
            log_p = log_p + scores.features.double() @ self.lambdas.to(scores.features.device)
        return log_p.to(log_prior.dtype)

    def fit(
        self,
        log_prior: torch.Tensor,
        log_proposal: torch.Tensor,
        scores: Scores,
        contexts: Contexts | None = None,
    ) -> LambdaFit:
        """Fit λ on samples of a proposal (pass log_proposal = 0 over an enumerated space);
        with contexts, one λ shared by every context: ``E_c E_{p_c}[φ] = μ̄``."""
        fit = fit_lambdas(
            scores.features,
            self.moments,
            log_prior + scores.log_b - log_proposal,
            groups=contexts,
        )
        self.lambdas, self.fitted = fit.lambdas.cpu(), True
        return fit


def context_log_z(
    log_weights: torch.Tensor, contexts: Contexts
) -> tuple[torch.Tensor, torch.Tensor]:
    """CDPG's ``log Ẑ_c``: the log-mean-exp of ``log P − log q`` over context c's own samples.

    Returns (each sample's ``log Ẑ_c`` (batch,), every context's (n_contexts,)). A context none
    of whose samples meets the pointwise constraints has ``Ẑ_c = 0``: its per-sample value is
    set to 0 (its weights ``P/q`` are all 0 whatever it is) and its entry stays −inf.
    Self-normalised: consistent in the samples per context, biased at few (``E[1/Ẑ_c] > 1/Z_c``).
    """
    per_context = est.group_log_mean_exp(
        log_weights.detach().double(), contexts.index, contexts.n_groups
    )
    per_sample = torch.where(torch.isneginf(per_context), 0.0, per_context)[contexts.index]
    return per_sample, per_context


def kl_control_log_target(
    log_prior: torch.Tensor, reward: torch.Tensor, beta: float
) -> torch.Tensor:
    """KL-control's implicit target: ``log P_β(x) = log a(x) + r(x)/β`` (2206.00761, Thm 1)."""
    return log_prior + reward / beta


@dataclass
class LambdaFit:
    """The result of λ fitting: λ, the moments reached, iterations and effective sample size."""

    lambdas: torch.Tensor
    achieved: torch.Tensor
    iterations: int
    ess: float


def _softmax(logits: torch.Tensor, groups: Contexts | None) -> torch.Tensor:
    """Self-normalised weights (n,): one softmax, or with groups the mean over groups of each
    group's softmax (groups whose weights are all 0 left out)."""
    if groups is None:
        return torch.softmax(logits, 0)
    per_group = est.group_log_mean_exp(logits, groups.index, groups.n_groups)
    seen = torch.isfinite(per_group)
    counts = torch.zeros(groups.n_groups, dtype=logits.dtype, device=logits.device).index_add_(
        0, groups.index, torch.ones_like(logits)
    )
    log_norm = torch.where(seen, per_group + counts.log(), 0.0)[groups.index]
    weights = torch.where(seen[groups.index], (logits - log_norm).exp(), 0.0)
    return weights / seen.sum()


def _dual(
    logits: torch.Tensor, lam: torch.Tensor, target: torch.Tensor, groups: Contexts | None
) -> torch.Tensor:
    """The convex dual ``mean_c log Σ_{x∈c} exp(logits) − λ·μ̄`` (one group without groups)."""
    if groups is None:
        return torch.logsumexp(logits, 0) - lam @ target
    per_group = est.group_log_mean_exp(logits, groups.index, groups.n_groups)
    return per_group[torch.isfinite(per_group)].mean() - lam @ target


def fit_lambdas(
    features: torch.Tensor,
    moments: torch.Tensor,
    log_base_weights: torch.Tensor,
    tolerance: float = LAMBDA_TOLERANCE,
    max_iterations: int = LAMBDA_MAX_ITERATIONS,
    groups: Contexts | None = None,
) -> LambdaFit:
    """Find λ with ``E_{p_λ}[φ] = μ̄`` where ``p_λ ∝ exp(log_base_weights + λ·φ)``.

    features: (n, k); moments: (k,); log_base_weights: (n,) — for samples of q this is
    ``log a + log b − log q`` (self-normalised importance sampling), for an enumerated space
    ``log a + log b``. Newton's method on the convex dual ``log Σ exp(lw + λ·φ) − λ·μ̄``, whose
    gradient is ``E_λ[φ] − μ̄`` and Hessian ``Cov_λ[φ]``, with a backtracking line search; all
    weights stay in log space. With ``groups`` (contexts), λ is shared and the moment matched is
    the mean over contexts of each context's self-normalised moment: the dual is the mean of
    the contexts' log-sum-exps, the Hessian the mean of their covariances.
    """
    phi = features.double()
    target = moments.double().to(phi.device)
    log_w0 = log_base_weights.double()
    usable = torch.isfinite(log_w0)
    _check_reachable(phi[usable], target)

    if groups is not None:
        groups = groups.to(phi.device)

    def dual(lam: torch.Tensor) -> torch.Tensor:
        return _dual(log_w0 + phi @ lam, lam, target, groups)

    lam = torch.zeros(phi.shape[1], dtype=torch.float64, device=phi.device)
    for iteration in range(1, max_iterations + 1):
        weights = _softmax(log_w0 + phi @ lam, groups)  # (n,)
        mean = weights @ phi
        gap = mean - target
        if gap.abs().max() < tolerance:
            return LambdaFit(lam, mean, iteration, _ess(log_w0 + phi @ lam))
        if groups is None:
            centred = phi - mean
        else:  # each sample about its own context's mean
            group_means = torch.zeros(
                groups.n_groups, phi.shape[1], dtype=phi.dtype, device=phi.device
            ).index_add_(0, groups.index, weights[:, None] * phi)
            group_weights = torch.zeros(
                groups.n_groups, dtype=phi.dtype, device=phi.device
            ).index_add_(0, groups.index, weights)
            safe = torch.where(group_weights > 0, group_weights, 1.0)
            centred = phi - (group_means / safe[:, None])[groups.index]
        hessian = (centred * weights[:, None]).T @ centred
        hessian = hessian + _HESSIAN_JITTER * torch.eye(
            len(lam), dtype=torch.float64, device=phi.device
        )
        step = torch.linalg.solve(hessian, gap)
        step_size, current = 1.0, dual(lam)
        while (
            dual(lam - step_size * step) > current - 1e-4 * step_size * (gap @ step)
            and step_size > 1e-8
        ):
            step_size /= 2
        lam = lam - step_size * step
        if lam.abs().max() > LAMBDA_MAX_ABS:
            break
    weights = _softmax(log_w0 + phi @ lam, groups)
    raise UnreachableMomentError(
        f"λ fitting did not reach the target moments {target.tolist()} "
        f"(got {(weights @ phi).tolist()} "
        f"with λ={lam.tolist()}): the moments lie on or outside the edge of what "
        f"{int(usable.sum())} samples show; draw more samples or move the target inside"
    )


def _check_reachable(phi: torch.Tensor, target: torch.Tensor) -> None:
    """Each μ̄_j must lie strictly between the smallest and largest φ_j the samples show."""
    if phi.shape[0] == 0:
        raise UnreachableMomentError(
            "no sample has non-zero weight under the prior and pointwise constraints"
        )
    low, high = phi.min(0).values, phi.max(0).values
    for j in range(phi.shape[1]):
        if not low[j] < target[j] < high[j]:
            raise UnreachableMomentError(
                f"distributional feature #{j}: target moment {target[j].item():g} is not "
                f"strictly inside [{low[j].item():g}, {high[j].item():g}], the range seen on "
                f"{phi.shape[0]} samples; "
                "use a pointwise constraint for a moment of 0 or 1, or draw more samples"
            )


def _ess(log_w: torch.Tensor) -> float:
    """Effective sample size ``(Σw)² / Σw²`` of log-weights."""
    return math.exp(2 * torch.logsumexp(log_w, 0).item() - torch.logsumexp(2 * log_w, 0).item())


class RunningLogZ:
    """``log Ẑ``: log-mean-exp of ``log P − log q`` over every sample drawn so far (any q).

    Kept as a log-sum and a count, so it is exact to accumulate and cheap to checkpoint.
    """

    def __init__(self) -> None:
        self.log_sum = torch.tensor(float("-inf"), dtype=torch.float64)
        self.count = 0

    def update(self, log_weights: torch.Tensor) -> torch.Tensor:
        """Add a batch of ``log P − log q``; return the new ``log Ẑ`` (a 0-d float64 tensor)."""
        # on the weights' device: no host sync per step on a GPU (state_dict() syncs, rarely)
        batch_sum = torch.logsumexp(log_weights.detach().double(), 0)
        self.log_sum = torch.logaddexp(self.log_sum.to(batch_sum.device), batch_sum)
        self.count += log_weights.numel()
        return self.value

    def updated(self, log_weights: torch.Tensor) -> RunningLogZ:
        """A copy with a batch added, this one unchanged (commit it by assignment)."""
        copy = RunningLogZ()
        copy.log_sum, copy.count = self.log_sum, self.count
        copy.update(log_weights)
        return copy

    @property
    def value(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("log Ẑ is undefined before any sample has been seen")
        return self.log_sum - math.log(self.count)

    def state_dict(self) -> dict:
        return {"log_sum": self.log_sum.item(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.log_sum = torch.tensor(state["log_sum"], dtype=torch.float64)
        self.count = int(state["count"])
