"""The training loop's one step: sample → score → target → objective → update → metrics.

:class:`Trainer` owns the policy π, the frozen prior a, the proposal q (π itself on-policy, a
frozen copy for KL-adaptive DPG), the optimizer, the running ``log Ẑ`` and the sampling RNG.
It works with any Hugging Face causal LM; the CLI builds one from a config.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from dmtune import estimators as est
from dmtune.exact import ExactSpace, ExactTruth, exact_metrics, target_truth
from dmtune.models import encode_prompts, filler_token_id, frozen_copy, sequence_log_probs
from dmtune.objectives import Batch, get_objective
from dmtune.sampling import Decoding, Samples, check_ancestral, sample
from dmtune.target import RunningLogZ, Scores, Target


@dataclass
class TrainerConfig:
    """Hyperparameters of the loop (the Hydra schema mirrors these fields)."""

    objective: str = "dpg_baseline"
    objective_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"beta": 0.1}
    batch_size: int = 256  # samples per step
    max_new_tokens: int = 32
    prompt: str = ""  # every sample continues BOS + prompt
    lr: float = 1e-4
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warm-up, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    swap_every: int = 10  # KL-adaptive DPG: steps between proposal-swap checks
    fit_samples: int = 4096  # prior samples used to fit λ of distributional constraints
    exact: bool = False  # enumerate the sequence space so exact_metrics() works (toy priors only)
    seed: int = 0


class Trainer:
    """Fine-tunes a copy of ``prior`` toward ``target`` with the configured objective."""

    def __init__(
        self,
        prior: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        target: Target,
        config: TrainerConfig,
    ) -> None:
        self.config = config
        self.spec = get_objective(config.objective)
        if self.spec.family == "rm" and not target.pointwise and target.reward is None:
            raise ValueError(
                f"objective {config.objective!r} maximises a reward, but the constraint set has only "
                "distributional features; use a distribution-matching objective (dpg, dpg_baseline, "
                "kl_dpg, fdpg) or add a pointwise constraint or reward"
            )
        torch.manual_seed(config.seed)
        self.device = next(prior.parameters()).device
        self.tokenizer = tokenizer
        self.target = target
        self.decoding = Decoding(max_new_tokens=config.max_new_tokens)
        check_ancestral(self.decoding)
        self.prior = frozen_copy(prior)
        # A half-precision prior (device.dtype=bfloat16/float16) runs under autocast, but the
        # policy keeps float32 weights: AdamW steps of lr ~1e-5 are below bfloat16's resolution
        # (2^-8 relative) and would round away in pure half-precision weights.
        self.compute_dtype = prior.dtype
        # eval mode: no dropout, so π is the same distribution we sample from and score
        self.policy = frozen_copy(prior).float().requires_grad_(True)
        self.proposal = frozen_copy(self.policy) if self.spec.proposal == "frozen" else None
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        warmup = max(config.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.log_z = RunningLogZ()
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.filler_id = filler_token_id(tokenizer, prior.config.vocab_size)
        self.prompt_ids, self.prompt_mask = encode_prompts(
            tokenizer, [config.prompt] * config.batch_size, self.filler_id, self.device
        )
        self.step_count = 0
        self.samples_seen = 0
        self.last_samples: Samples | None = None
        self.last_scores: Scores | None = None
        self.exact_space = ExactSpace(prior, tokenizer, config.max_new_tokens, config.prompt) if config.exact else None
        self._exact_truth: ExactTruth | None = None

    # --- setup -----------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self) -> dict[str, Any]:
        """Sample the prior ``fit_samples`` times: base rates, λ fitting, and KL(p‖a).

        Returns {"metrics": step-0 metrics of π = a, "lambdas", "fit": ...}. A pointwise
        constraint that no prior sample meets is an error: every importance weight would be 0.
        """
        n_batches = -(-self.config.fit_samples // self.config.batch_size)
        batches = [self._sample(self.prior) for _ in range(n_batches)]
        scores = [self.target.score(s) for s in batches]
        by_name = {name: torch.cat([s.by_name[name] for s in scores]) for name in scores[0].by_name}
        joined = Scores(
            features=torch.cat([s.features for s in scores]),
            log_b=torch.cat([s.log_b for s in scores]),
            reward=torch.cat([s.reward for s in scores]),
            by_name=by_name,
        )
        n = joined.log_b.numel()
        for constraint in self.target.pointwise:
            if by_name[constraint.name].sum() == 0:
                raise ValueError(
                    f"pointwise constraint {constraint.name!r} holds for 0 of {n} prior samples: the target "
                    "is unreachable by importance sampling; raise train.fit_samples, relax the constraint, or "
                    "make it distributional with a small moment"
                )
        if self.target.pointwise and torch.isneginf(joined.log_b).all():
            names = ", ".join(c.name for c in self.target.pointwise)
            raise ValueError(
                f"the pointwise constraints {names} never hold together in {n} prior samples (each holds "
                "alone): the target is unreachable by importance sampling; raise train.fit_samples or drop one"
            )
        fit = None
        if self.target.distributional:
            # samples of the prior itself: log a − log q = 0, so the base weights are log b
            zeros = torch.zeros(n, dtype=torch.float64, device=joined.log_b.device)
            fit = self.target.fit(zeros, zeros, joined)
        log_w = self.target.log_prob(torch.zeros(n, dtype=torch.float64, device=joined.log_b.device), joined)
        log_z = est.log_mean_exp(log_w)  # log w = log P − log a
        # prior samples are draws of q = a: they start the running log Ẑ, finite from step 1 on
        self.log_z.update(log_w)
        metrics = {f"constraint/{name}": values.double().mean().item() for name, values in by_name.items()}
        for feature, moment in zip(self.target.distributional, self._moments()):
            metrics[f"constraint/{feature.name}_target"] = float(moment)
        metrics.update({
            "target/log_z": log_z.item(),
            "target/ess": est.effective_sample_size(log_w).item(),
            "divergence/kl_target_policy": est.kl_target_model(log_w, torch.zeros_like(log_w), torch.zeros_like(log_w), log_z).item(),
            "divergence/kl_policy_prior": 0.0,
        })
        return {
            "metrics": metrics,
            "fit_samples": n,
            "lambdas": self.target.lambdas.tolist(),
            "lambda_fit": None if fit is None else {"achieved": fit.achieved.tolist(), "iterations": fit.iterations, "ess": fit.ess},
        }

    def _moments(self) -> list[float]:
        return [] if self.target.moments is None else self.target.moments.tolist()

    # --- one step ----------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One update; returns the step's metrics (plain floats, namespaced as in the glossary)."""
        if not self.target.fitted:
            raise RuntimeError("distributional constraints need λ: call calibrate() before step()")
        started = time.perf_counter()

        # --- sample x ~ q ---
        sampler = self.proposal if self.proposal is not None else self.policy
        samples = self._sample(sampler)
        sampled = time.perf_counter()

        # --- score: features, prior, target, running log Ẑ ---
        scores = self.target.score(samples)
        with torch.no_grad():
            log_prior = self._log_probs(self.prior, samples)
        log_target = self.target.log_prob(log_prior, scores)  # (batch,), −inf where b(x) = 0
        scored = time.perf_counter()

        # --- loss: one forward + backward of the policy ---
        log_policy = self._log_probs(self.policy, samples)  # (batch,) with grad
        log_proposal = samples.log_q if self.proposal is not None else log_policy.detach()
        log_z = self.log_z.update(log_target - log_proposal)
        batch = Batch(log_policy, log_proposal, log_prior, log_target, log_z, scores.reward)
        loss, objective_metrics = self.spec.loss(batch, **self.config.objective_kwargs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        self.samples_seen += len(samples)

        # --- metrics (estimates for π before this update) ---
        metrics = {"train/loss": loss.detach(), "train/grad_norm": grad_norm, **objective_metrics}
        metrics.update(self._estimates(batch, scores))
        if self.proposal is not None and self.step_count % self.config.swap_every == 0:
            metrics["objective/proposal_updated"] = self._maybe_swap_proposal(samples, batch)
        self.last_samples, self.last_scores = samples, scores

        values = dict(zip(metrics, torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in metrics.values()]).tolist()))
        finished = time.perf_counter()
        n_tokens = int(samples.mask.sum())
        values.update({
            "train/lr": lr,
            "step": self.step_count,
            "samples_seen": self.samples_seen,
            "diversity/distinct_1": est.distinct_n(samples.texts, 1),
            "diversity/distinct_2": est.distinct_n(samples.texts, 2),
            "diversity/distinct_3": est.distinct_n(samples.texts, 3),
            "perf/step_s": finished - started,
            "perf/sample_s": sampled - started,
            "perf/score_s": scored - sampled,
            "perf/update_s": finished - scored,
            "perf/samples_per_s": len(samples) / (finished - started),
            "perf/tokens_per_s": n_tokens / (finished - started),
        })
        return values

    def _estimates(self, batch: Batch, scores: Scores) -> dict[str, torch.Tensor]:
        """Divergences, moments and ESS of the policy that drew (or was scored on) this batch."""
        log_pi = batch.log_policy.detach()
        args = (batch.log_target, batch.log_proposal)
        metrics = {
            "target/log_z": batch.log_z,
            "target/ess": est.effective_sample_size(batch.log_target - batch.log_proposal),
            "divergence/kl_target_policy": est.kl_target_model(*args, log_pi, batch.log_z),
            "divergence/tv_target_policy": est.tv_target_model(*args, log_pi, batch.log_z),
            "divergence/kl_policy_prior": est.kl_model_prior(log_pi, batch.log_prior, batch.log_proposal),
            "diversity/entropy": est.entropy(log_pi, batch.log_proposal),
        }
        if self.proposal is not None:
            metrics["divergence/kl_target_proposal"] = est.kl_target_model(*args, batch.log_proposal, batch.log_z)
        for name, values in scores.by_name.items():
            metrics[f"constraint/{name}"] = est.moments(values, log_pi, batch.log_proposal)
        for feature, moment in zip(self.target.distributional, self._moments()):
            metrics[f"constraint/{feature.name}_target"] = torch.tensor(moment)
        return metrics

    @torch.no_grad()
    def _maybe_swap_proposal(self, samples: Samples, batch: Batch) -> torch.Tensor:
        """KL-adaptive DPG: copy π into q when ``KL(p‖π) < KL(p‖q)`` on the same q-samples."""
        log_pi_now = self._log_probs(self.policy, samples)  # π after this step's update
        args = (batch.log_target, batch.log_proposal)
        kl_policy = est.kl_target_model(*args, log_pi_now, batch.log_z)
        kl_proposal = est.kl_target_model(*args, batch.log_proposal, batch.log_z)
        swap = bool(kl_policy < kl_proposal)
        if swap:
            self.proposal.load_state_dict(self.policy.state_dict())
        return torch.tensor(float(swap))

    # --- exact mode --------------------------------------------------------------------------

    @torch.no_grad()
    def exact_metrics(self) -> dict[str, float]:
        """Exact KL(p‖π), KL(π‖a), TV, entropy, moments over the enumerated space."""
        space = self.exact_space
        if space is None:
            raise RuntimeError("exact metrics need TrainerConfig(exact=True) and a toy-sized space")
        log_prior = space.log_probs(self.prior)
        if self._exact_truth is None:
            self._exact_truth = target_truth(space, self.target, log_prior)
        scores = self.target.score(space.samples)
        names = list(scores.by_name)
        features = torch.stack([scores.by_name[n] for n in names], -1) if names else torch.zeros(len(space), 0)
        log_proposal = space.log_probs(self.proposal) if self.proposal is not None else None
        return exact_metrics(space.log_probs(self.policy), log_prior, self._exact_truth, features, names, log_proposal)

    # --- helpers -----------------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        """Mixed precision when the prior is half precision (float32 weights, half matmuls)."""
        if self.compute_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return nullcontext()

    def _sample(self, model: PreTrainedModel) -> Samples:
        with self.autocast():
            return sample(model, self.tokenizer, self.prompt_ids, self.prompt_mask, self.decoding, self.filler_id, self.generator)

    def _log_probs(self, model: PreTrainedModel, samples: Samples) -> torch.Tensor:
        with self.autocast():
            log_probs = sequence_log_probs(model, samples.prompt_ids, samples.prompt_mask, samples.tokens, samples.mask)
        return log_probs.float() if log_probs.dtype in (torch.bfloat16, torch.float16) else log_probs

    # --- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimizer, log Ẑ, λ, RNG states, counters."""
        return {
            "policy": self.policy.state_dict(),
            "proposal": self.proposal.state_dict() if self.proposal is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "log_z": self.log_z.state_dict(),
            "lambdas": self.target.lambdas.clone(),
            "target_fitted": self.target.fitted,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "step": self.step_count,
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        if self.proposal is not None:
            self.proposal.load_state_dict(state["proposal"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.log_z.load_state_dict(state["log_z"])
        self.target.lambdas, self.target.fitted = state["lambdas"], state["target_fitted"]
        self._exact_truth = None
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step_count, self.samples_seen = state["step"], state["samples_seen"]
