"""Objectives side by side: each is a loss whose gradient is the estimator of its paper.

Every objective takes the same :class:`Batch` and keyword hyperparameters and returns
``(loss, metrics)``. The loss is always ``−mean[A(x) · log π(x)]`` with a detached advantage
``A``; the objectives differ only in ``A``. They are pure: state (running ``log Ẑ``, the
proposal) comes in through the batch; nothing is logged or synchronised here.

Papers: Korbak et al. 2022 (2206.00761) for REINFORCE, KL-control and DPG; Khalifa et al. 2021
(2012.11635) and Korbak et al. 2022 for GDC++ and KL-adaptive DPG; Go et al. 2023 for f-DPG.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import torch
import torch.nn.functional as F

from dmtune import estimators as est
from dmtune import metrics as m
from dmtune.prompts import Contexts

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """One batch of sequences ``x ~ q`` and everything known about them. All (batch,).

    log_policy: log π(x), the only tensor that carries gradient.
    log_proposal: log q(x) (equal to sg(log π) on-policy).
    log_prior: log a(x).  log_target: unnormalised log P(x), −inf where b(x) = 0.
    log_z: running log Ẑ, 0-d; with contexts, each sample's ``log Ẑ_c`` (batch,).
    reward: r(x) for reward-maximisation objectives.
    contexts: with several prompts, which samples share one; baselines are then per context.
    """

    log_policy: torch.Tensor
    log_proposal: torch.Tensor
    log_prior: torch.Tensor
    log_target: torch.Tensor
    log_z: torch.Tensor
    reward: torch.Tensor
    contexts: Contexts | None = None

    def context_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Each sample's sum of ``values`` over its context (over the batch without contexts)."""
        if self.contexts is None:
            return values.sum().expand_as(values)
        return est.group_sum(values, self.contexts.index, self.contexts.n_groups)

    @property
    def log_rho(self) -> torch.Tensor:
        """log ρ = sg(log π) − log q: importance ratio of the policy to the proposal."""
        return self.log_policy.detach() - self.log_proposal

    @property
    def log_weight(self) -> torch.Tensor:
        """log w = log P − log q − log Ẑ: importance weight of the normalised target.

        Exactly −inf where P = 0, even while log Ẑ is still −inf (no satisfying sample seen yet).
        """
        return torch.where(
            torch.isneginf(self.log_target),
            float("-inf"),
            self.log_target - self.log_proposal - self.log_z,
        )


def policy_gradient_loss(advantage: torch.Tensor, log_policy: torch.Tensor) -> torch.Tensor:
    """``−mean[sg(A) · log π]``: its gradient is the score-function estimator
    ``−mean[A ∇log π]``."""
    return -(advantage.detach() * log_policy).mean()


BASELINES = ("none", "mean", "loo")
SWAP_EVERY = "swap_every"  # the one hyperparameter the trainer reads, not the loss


def _baseline(values: torch.Tensor, kind: str | float, batch: Batch) -> torch.Tensor:
    """A baseline for REINFORCE-style advantages: none, the mean, leave-one-out (both over the
    batch, or over each sample's context when there are several prompts), or a constant."""
    if kind == "none":
        return torch.zeros_like(values)
    if kind in ("mean", "loo"):
        if batch.contexts is None and kind == "mean":
            return values.mean().expand_as(values)
        if batch.contexts is None and values.numel() < 2:
            raise ValueError("a leave-one-out baseline needs a batch of at least 2 samples")
        total, count = batch.context_sum(values), batch.context_sum(torch.ones_like(values))
        return total / count if kind == "mean" else (total - values) / (count - 1)
    if isinstance(kind, (int, float)):
        return torch.full_like(values, float(kind))
    raise ValueError(f"unknown baseline {kind!r}; valid: 'none', 'mean', 'loo' or a number")


def _metrics(advantage: torch.Tensor, **extra: torch.Tensor) -> Metrics:
    return {m.ADVANTAGE_STD: advantage.detach().std(), **{k: v.detach() for k, v in extra.items()}}


def reinforce(batch: Batch, *, baseline: str | float = "mean") -> tuple[torch.Tensor, Metrics]:
    """REINFORCE (Williams 1992): maximise E_π[r]. ``A = r − B``, on-policy."""
    advantage = batch.reward - _baseline(batch.reward, baseline, batch)
    loss = policy_gradient_loss(advantage, batch.log_policy)
    return loss, _metrics(advantage, **{m.REWARD_MEAN: batch.reward.mean()})


def kl_control(
    batch: Batch, *, beta: float = 0.1, baseline: str | float = "mean"
) -> tuple[torch.Tensor, Metrics]:
    """KL-control: maximise ``E_π[r] − β KL(π‖a)``, i.e. minimise ``KL(π‖p_β)``.

    ``R = r − β·sg(log π − log a)``, ``A = R − B``, on-policy (2206.00761 §2).
    """
    shaped = batch.reward - beta * (batch.log_policy.detach() - batch.log_prior)
    advantage = shaped - _baseline(shaped, baseline, batch)
    loss = policy_gradient_loss(advantage, batch.log_policy)
    return loss, _metrics(advantage, **{m.REWARD_MEAN: batch.reward.mean()})


def dpg(batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """DPG: minimise ``KL(p‖π)``. ``A = w = P/(Ẑ q)`` (Parshakova et al. 2019; q = π on-policy)."""
    advantage = batch.log_weight.exp()
    return policy_gradient_loss(advantage, batch.log_policy), _metrics(advantage)


def dpg_baseline(batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """DPG with baseline (GDC++): ``A = w − ρ``, unbiased since ``E_q[ρ ∇log π] = 0``."""
    advantage = batch.log_weight.exp() - batch.log_rho.exp()
    return policy_gradient_loss(advantage, batch.log_policy), _metrics(advantage)


def kl_dpg(batch: Batch) -> tuple[torch.Tensor, Metrics]:
    """KL-adaptive DPG: the GDC++ estimator on samples of a frozen proposal ``q``.

    The trainer owns ``q``: every K steps it estimates ``KL(p‖π)`` and ``KL(p‖q)`` on the same
    q-samples and copies π into q when π is closer to p (Khalifa et al. 2021, Algorithm 1).
    """
    return dpg_baseline(batch)


Divergence = Literal["forward_kl", "reverse_kl", "js", "tv"]
DIVERGENCES = get_args(Divergence)


def _minus_f_prime(log_t: torch.Tensor, divergence: Divergence) -> torch.Tensor:
    """Pseudo-reward ``−f′(t)`` at ``t = π/p`` for ``D_f(π‖p) = E_p[f(π/p)]``, from log t.

    forward_kl: f = −log t (KL(p‖π)); reverse_kl: f = t log t (KL(π‖p));
    js: f = ½[t log t − (1+t) log((1+t)/2)] (Jensen–Shannon); tv: f = ½|t − 1|.
    """
    if divergence == "forward_kl":
        return torch.exp(-log_t)
    if divergence == "reverse_kl":
        return -log_t - 1.0
    if divergence == "js":
        # ½ log((1+t)/(2t)) = ½ (softplus(−log t) − log 2): finite even where p = 0 (t = ∞)
        return 0.5 * (F.softplus(-log_t) - math.log(2.0))
    if divergence == "tv":
        return -0.5 * torch.sign(log_t)
    raise ValueError(f"unknown divergence {divergence!r}; valid: forward_kl, reverse_kl, js, tv")


def fdpg(
    batch: Batch, *, divergence: Divergence = "forward_kl", baseline: str | float = "mean"
) -> tuple[torch.Tensor, Metrics]:
    """f-DPG (Go et al. 2023): minimise ``D_f(π‖p)``. ``A = ρ (−f′(π/p) − B)``.

    ``∇ D_f(π‖p) = E_π[f′(π/p) ∇log π]``; forward KL gives DPG, reverse KL gives KL-control
    with β = 1 (up to a constant in the pseudo-reward), plus Jensen–Shannon and total variation.
    The "mean" baseline is the importance-weighted batch mean of the pseudo-reward under π.
    Where P = 0 the pseudo-reward of reverse KL is infinite, so pointwise targets need forward
    KL, Jensen–Shannon or TV.
    """
    log_rho = batch.log_rho
    log_t = batch.log_policy.detach() - (batch.log_target - batch.log_z)  # log π/p
    pseudo_reward = _minus_f_prime(log_t, divergence)
    rho = log_rho.exp()
    if baseline == "mean":
        if batch.contexts is None:
            offset = (rho * pseudo_reward).sum() / rho.sum()
        else:
            offset = batch.context_sum(rho * pseudo_reward) / batch.context_sum(rho)
    else:
        offset = _baseline(pseudo_reward, baseline, batch)
    advantage = rho * (pseudo_reward - offset)
    return policy_gradient_loss(advantage, batch.log_policy), _metrics(advantage)


@dataclass(frozen=True)
class ObjectiveSpec:
    """How the trainer uses an objective.

    family: "rm" (needs a reward) or "dm" (needs a target); proposal: "policy" samples from π
    (on-policy), "frozen" from a frozen copy of π swapped in by the trainer every
    ``swap_every`` steps (KL-adaptive).
    """

    loss: Callable[..., tuple[torch.Tensor, Metrics]]
    family: Literal["rm", "dm"]
    proposal: Literal["policy", "frozen"] = "policy"
    swap_every: int | None = None  # frozen proposal: default steps between swap checks


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "reinforce": ObjectiveSpec(reinforce, "rm"),
    "kl_control": ObjectiveSpec(kl_control, "rm"),
    "dpg": ObjectiveSpec(dpg, "dm"),
    "dpg_baseline": ObjectiveSpec(dpg_baseline, "dm"),
    "kl_dpg": ObjectiveSpec(kl_dpg, "dm", proposal="frozen", swap_every=10),
    "fdpg": ObjectiveSpec(fdpg, "dm"),
}


def get_objective(name: str) -> ObjectiveSpec:
    """Look an objective up by name, with the valid names in the error."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def names_of(family: str) -> list[str]:
    """The objectives of a family ("rm" or "dm"), for error messages."""
    return [name for name, spec in OBJECTIVES.items() if spec.family == family]


def objective_params(name: str) -> dict[str, Any]:
    """Every hyperparameter of an objective and its default: the loss's keyword-only
    parameters, plus ``swap_every`` when the trainer swaps a frozen proposal."""
    spec = get_objective(name)
    params = {
        p.name: p.default
        for p in inspect.signature(spec.loss).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    if spec.proposal == "frozen":
        params[SWAP_EVERY] = spec.swap_every
    return params


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# hyperparameter → (is the value valid?, what is valid), checked before a model loads
PARAM_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "beta": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "baseline": (lambda v: v in BASELINES or _is_number(v), f"{', '.join(BASELINES)} or a number"),
    "divergence": (lambda v: v in DIVERGENCES, ", ".join(DIVERGENCES)),
    SWAP_EVERY: (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "an integer ≥ 1",
    ),
}


def check_objective_params(name: str, params: Mapping[str, Any]) -> None:
    """One-line ``ValueError`` naming a parameter the objective does not take (and those it
    does), or a value out of its range."""
    accepted = objective_params(name)
    for key, value in params.items():
        if key not in accepted:
            raise ValueError(
                f"objective.{key} is set but {name} takes no {key}; "
                f"it takes: {', '.join(accepted) or 'nothing'}"
            )
        is_valid, valid = PARAM_VALUES.get(key, (lambda _: True, ""))
        if not is_valid(value):
            raise ValueError(f"objective.{key}={value!r} is not valid for {name}; valid: {valid}")


def split_objective_params(
    name: str, params: Mapping[str, Any]
) -> tuple[dict[str, Any], int | None]:
    """(keyword arguments of the loss, swap_every) from an objective's hyperparameters."""
    check_objective_params(name, params)
    loss_kwargs = {k: v for k, v in params.items() if k != SWAP_EVERY}
    return loss_kwargs, params.get(SWAP_EVERY, get_objective(name).swap_every)
