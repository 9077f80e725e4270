"""The training loop's one step: sample → score → target → objective → update → metrics.

:class:`Trainer` owns the policy π, the frozen prior a, the proposal q (π itself on-policy, a
frozen copy for KL-adaptive DPG), the optimizer, the running ``log Ẑ`` and the sampling RNG.
It works with any Hugging Face causal LM; :func:`dmtune.build.build_trainer` builds one from a
composed config.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from dmtune import estimators as est
from dmtune import lora, sharding
from dmtune import metrics as m
from dmtune.calibration import calibrate
from dmtune.config import TrainConfig
from dmtune.distributed import World, check_world, moved, rank_seed
from dmtune.exact import ExactOracle, exact_spaces
from dmtune.lm import LM, Networks
from dmtune.objectives import Batch, get_objective, names_of, split_objective_params
from dmtune.prompts import join_contexts, prompt_set
from dmtune.sampling import Decoding, Samples, check_ancestral, join_samples
from dmtune.target import RunningLogZ, Scores, Target, context_log_z, join_scores


@dataclass
class TrainerConfig(TrainConfig):
    """What the trainer reads: the ``train`` group (its defaults, inherited) plus the objective.

    The CLI builds it from a composed config (:func:`dmtune.build.trainer_config`); from Python
    give only what differs from the defaults.
    """

    objective: str = "dpg_baseline"  # the default of conf/config.yaml
    objective_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"beta": 0.1}
    exact: bool = False  # enumerate the sequence space so exact_metrics() works (toy priors only)
    seed: int = 0
    lora: Any = None  # model.lora (r, alpha, dropout, target_modules, save_merged); None: no LoRA


class Trainer:
    """Fine-tunes a copy of ``prior`` toward ``target`` with the configured objective.

    With a ``world`` of several ranks (:mod:`dmtune.distributed`), each rank samples
    ``batch_size / world.size`` and the step is the whole batch's: ranks gather each other's
    per-sample numbers and compute the same loss and metrics; gradients are summed by DDP (or,
    with ``world.sharded``, reduce-scattered by FSDP onto the ranks' shards).
    """

    def __init__(
        self,
        prior: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        target: Target,
        config: TrainerConfig,
        world: World | None = None,
    ) -> None:
        self.config = config
        self.world = world or World()
        if config.batch_size % self.world.size:
            raise ValueError(
                f"train.batch_size={config.batch_size} is not a multiple of "
                f"device.num_processes={self.world.size} (each rank samples an equal share)"
            )
        self.local_batch_size = config.batch_size // self.world.size
        self.spec = get_objective(config.objective)
        self.loss_kwargs, self.swap_every = split_objective_params(
            config.objective, config.objective_params
        )
        if self.spec.family == "rm" and not target.pointwise and target.reward is None:
            raise ValueError(
                f"objective {config.objective!r} maximises a reward, but the constraint set has "
                "only distributional features; use a distribution-matching objective "
                f"({', '.join(names_of('dm'))}) or add a pointwise constraint or reward"
            )
        if (
            config.objective == "fdpg"
            and self.loss_kwargs.get("divergence") == "reverse_kl"
            and target.pointwise
        ):
            raise ValueError(
                "objective fdpg with divergence=reverse_kl is infinite with a pointwise "
                "constraint (π puts mass where p = 0); use divergence=forward_kl, js or tv"
            )
        torch.manual_seed(config.seed)
        self.target = target
        self.decoding = Decoding(max_new_tokens=config.max_new_tokens)
        check_ancestral(self.decoding)
        self.lora = config.lora if config.lora is not None and config.lora.r > 0 else None
        frozen_proposal = self.spec.proposal == "frozen"
        self.networks = Networks.build(prior, self.lora, proposal=frozen_proposal)
        if self.world.sharded:  # before the optimizer: it holds the shards
            self.networks.shard(self.world)
        self.prior = self.networks.prior
        self.policy = self.networks.policy
        self.proposal = self.networks.proposal
        self.lm = LM(self.prior, tokenizer, config.prompt, prompt_set(config))
        self._trained: torch.nn.Module | None = None  # see trained
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=config.lr,
            betas=tuple(config.betas),
            weight_decay=config.weight_decay,
        )
        warmup = max(config.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup)
        )
        self.log_z = RunningLogZ()
        seed = rank_seed(config.seed, self.world.rank)  # each rank draws its own samples
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # which prompts each step draws (on the CPU: it only picks indices)
        self.prompt_generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.samples_seen = 0
        self.skipped_steps = 0  # steps whose loss or gradient was not finite (no update)
        self.bad_steps = 0  # of them, how many in a row up to now
        self.last_samples: Samples | None = None
        self.last_scores: Scores | None = None
        self.exact = None
        if config.exact:
            prompts = self.lm.prompts.prompts if self.lm.prompts else (config.prompt,)
            spaces = exact_spaces(
                self.prior, tokenizer, config.max_new_tokens, prompts, self.lm.prompts is not None
            )
            self.exact = ExactOracle(spaces, self.prior)

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.lm.tokenizer

    @property
    def trained(self) -> torch.nn.Module:
        """What the update's forward/backward runs: the policy, or DDP around it (wrapped at the
        first update, so that the policy can still be moved or cast before)."""
        if self._trained is None:
            self._trained = self.world.prepare(self.policy)
        return self._trained

    # --- setup -----------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self) -> dict[str, Any]:
        """Sample the prior ``fit_samples`` times: base rates, λ fitting, and KL(p‖a).

        Returns {"metrics": step-0 metrics of π = a, "lambdas", "fit": ...}; the prior samples
        start the running log Ẑ (they are draws of q = a), so it is finite from step 1 on.
        """
        calibration, log_w = calibrate(
            self.lm,
            self.target,
            self.config.fit_samples,
            self.local_batch_size,
            self.config.max_new_tokens,
            self.generator,
            self.prompt_generator,
            self.world,
        )
        self.log_z.update(log_w)
        return calibration

    # --- one step ----------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One update; returns the step's metrics (plain floats, namespaced as in the glossary)."""
        if not self.target.fitted:
            raise RuntimeError("distributional constraints need λ: call calibrate() before step()")
        started = time.perf_counter()
        samples = self.sample()
        return self.update(samples, started)

    @torch.no_grad()
    def sample(self) -> Samples:
        """A batch ``x ~ q`` (the policy, or the frozen proposal of KL-adaptive DPG)."""
        sampler = self.proposal if self.proposal is not None else self.policy
        contexts = self.lm.draw_contexts(self.local_batch_size, self.prompt_generator)
        return self.lm.sample(
            self.local_batch_size,
            self.decoding,
            self.generator,
            model=sampler,
            contexts=contexts,
            micro_batch_size=self.config.sample_micro_batch_size,
            compile=self.config.compile_sampler,
        )

    def update(self, samples: Samples, started: float | None = None) -> dict[str, float]:
        """Score ``samples`` (this rank's), take one optimizer step on the whole batch's, and
        return the step's metrics."""
        started = time.perf_counter() if started is None else started
        sampled = time.perf_counter()
        micro = self.config.micro_batch_size
        own, offset = samples, 0  # this rank's samples, where they start in the whole batch

        # --- score: features, prior, target, running log Ẑ ---
        scores = self.target.score(samples)
        with torch.no_grad():
            log_prior = self.lm.log_probs(samples, micro_batch_size=micro)
            log_pi = None  # on-policy: the sampler already computed log π(x)
            if self.proposal is not None:
                log_pi = self.lm.log_probs(samples, model=self.policy, micro_batch_size=micro)
        if self.world.size > 1:  # every rank's samples: the step below is the whole batch's
            offset = self.world.rank * len(own)  # every rank holds an equal share
            samples, scores, log_prior, log_pi = self._gather(samples, scores, log_prior, log_pi)
        contexts = samples.contexts
        log_target = self.target.log_prob(log_prior, scores)  # (batch,), −inf where b(x) = 0
        scored = time.perf_counter()

        # --- loss: of log π as a leaf; its gradient then flows into π micro-batch by micro-batch
        if log_pi is None:
            log_pi = samples.log_q.detach()
        log_policy = log_pi.to(log_prior.dtype).requires_grad_(True)
        log_proposal = samples.log_q if self.proposal is not None else log_policy.detach()
        if contexts is None:  # log Ẑ with this batch: committed below only if the step is finite
            running_log_z = self.log_z.updated(log_target - log_proposal)
            log_z = running_log_z.value
        else:  # CDPG: each context's log Ẑ_c from its own samples in this batch
            running_log_z = self.log_z
            log_z, log_z_per_context = context_log_z(log_target - log_proposal, samples.contexts)
        batch = Batch(
            log_policy, log_proposal, log_prior, log_target, log_z, scores.reward, samples.contexts
        )
        loss, objective_metrics = self.spec.loss(batch, **self.loss_kwargs)
        (weights,) = torch.autograd.grad(loss, log_policy)
        batch = dataclasses.replace(batch, log_policy=log_policy.detach())
        self.optimizer.zero_grad(set_to_none=True)
        dropout = self.lora is not None and self.lora.dropout > 0
        if dropout:
            lora.set_dropout(self.policy, True)
        # this rank's samples; DDP averages the ranks' gradients, so each weighs world.size ×
        rows = slice(offset, offset + len(own))
        own_weights = weights[rows] * self.world.size
        self.lm.backward(own, own_weights, model=self.trained, micro_batch_size=micro)
        if dropout:
            lora.set_dropout(self.policy, False)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip)
        grad_norm = sharding.full_tensor(grad_norm)  # FSDP: the norm of every rank's shards
        lr = self.scheduler.get_last_lr()[0]
        # A diverged policy (NaN logits, an overflowing loss) must not reach the weights, the
        # optimizer's moments or log Ẑ: such a step is skipped and counted. One host sync.
        finite = (
            torch.isfinite(loss.detach()) & torch.isfinite(grad_norm) & ~torch.isnan(log_z).any()
        )
        if bool(finite):
            self.log_z = running_log_z
            self.optimizer.step()
            self.scheduler.step()
            self.bad_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_steps += 1
        self.step_count += 1
        self.samples_seen += len(samples)

        # --- metrics (estimates for π before this update) ---
        metrics = {m.LOSS: loss.detach(), m.GRAD_NORM: grad_norm, **objective_metrics}
        metrics.update(
            m.policy_estimates(
                batch, scores.by_name, self.target.moments_by_name(), self.proposal is not None
            )
        )
        if contexts is not None:
            metrics.update(m.context_estimates(log_z_per_context))
        if self.proposal is not None and self.step_count % self.swap_every == 0:
            metrics[m.PROPOSAL_UPDATED] = self._maybe_swap_proposal(own, batch)
        self.last_samples, self.last_scores = samples, scores

        # one host transfer for every tensor metric (a sync point on a GPU)
        on_host = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64).cpu() for v in metrics.values()]
        )
        values = dict(zip(metrics, on_host.tolist()))
        finished = time.perf_counter()
        n_tokens = int(samples.mask.sum())
        values.update(
            {
                m.LR: lr,
                m.SKIPPED_STEPS: self.skipped_steps,
                m.STEP: self.step_count,
                m.SAMPLES_SEEN: self.samples_seen,
                **m.diversity(samples.texts),
                m.STEP_S: finished - started,
                m.SAMPLE_S: sampled - started,
                m.SCORE_S: scored - sampled,
                m.UPDATE_S: finished - scored,
                m.SAMPLES_PER_S: len(samples) / (finished - started),
                m.TOKENS_PER_S: n_tokens / (finished - started),
            }
        )
        values[m.STATE_MIB] = self._state_bytes() / 2**20
        if self.device.type == "cuda":
            values[m.GPU_PEAK_GIB] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return values

    def _state_bytes(self) -> int:
        """Bytes of the policy's weights, gradients and optimizer state on this rank (the
        trainable part: with LoRA, the adapters; with FSDP, this rank's shards)."""
        tensors = [p for p in self.policy.parameters() if p.requires_grad]
        tensors += [p.grad for p in tensors if p.grad is not None]
        tensors += [
            value
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        ]
        return sum(
            sharding.local_tensor(t).numel() * t.element_size() for t in tensors
        )

    def _gather(
        self,
        samples: Samples,
        scores: Scores,
        log_prior: torch.Tensor,
        log_pi: torch.Tensor | None,
    ) -> tuple[Samples, Scores, torch.Tensor, torch.Tensor | None]:
        """Every rank's samples, scores and log-probs, in rank order, on this device."""
        parts = self.world.gather((samples, scores, log_prior, log_pi))
        joined = join_samples([part[0] for part in parts], self.lm.filler_id)
        if samples.contexts is not None:  # each rank drew its own prompt groups
            joined.contexts = join_contexts([part[0].contexts for part in parts])
        values = (
            joined,
            join_scores([part[1] for part in parts]),
            torch.cat([part[2] for part in parts]),
            None if log_pi is None else torch.cat([part[3] for part in parts]),
        )
        return moved(values, self.device)

    @torch.no_grad()
    def _maybe_swap_proposal(self, samples: Samples, batch: Batch) -> torch.Tensor:
        """KL-adaptive DPG: copy π into q when ``KL(p‖π) < KL(p‖q)`` on the same q-samples
        (``samples``: this rank's; the decision is the whole batch's, the same on every rank)."""
        micro = self.config.micro_batch_size
        # π after this step's update
        log_pi_now = self.lm.log_probs(samples, model=self.policy, micro_batch_size=micro)
        if self.world.size > 1:
            log_pi_now = torch.cat(self.world.gather(log_pi_now)).to(self.device)
        args = (batch.log_target, batch.log_proposal)
        kl_policy = est.kl_target_model(*args, log_pi_now, batch.log_z)
        kl_proposal = est.kl_target_model(*args, batch.log_proposal, batch.log_z)
        swap = bool(kl_policy < kl_proposal)
        if swap:
            self.networks.copy_policy_to_proposal()
        return torch.tensor(float(swap))

    # --- exact mode --------------------------------------------------------------------------

    @torch.no_grad()
    def exact_metrics(self) -> dict[str, float]:
        """Exact ``exact/...`` metrics of the current policy by enumeration (exact mode only)."""
        if self.exact is None:
            raise RuntimeError("exact metrics need TrainerConfig(exact=True) and a toy-sized space")
        return self.exact.metrics(self.target, self.policy, self.proposal)

    # --- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimizer, log Ẑ, λ, RNG states,
        counters."""
        # every rank's RNG states (a collective: call it on every rank); rank 0's are the
        # top-level ones, as a single process's
        rank_rngs = self.world.gather(self._rng_states())
        return {
            "policy": self.networks.state("policy"),
            "proposal": self.networks.state("proposal") if self.proposal is not None else None,
            "optimizer": sharding.optimizer_state(self.policy, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "log_z": self.log_z.state_dict(),
            "lambdas": self.target.lambdas.clone(),
            "target_fitted": self.target.fitted,
            **self._rng_states(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "world_size": self.world.size,
            "sharded": self.world.sharded,
            "rank_rngs": rank_rngs if self.world.size > 1 else [],
            "step": self.step_count,
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "bad_steps": self.bad_steps,
        }

    def _rng_states(self) -> dict[str, Any]:
        """This rank's sampling, prompt and torch RNG states."""
        return {
            "generator": self.generator.get_state(),
            "prompt_generator": self.prompt_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def save_policy(self, directory: Path) -> None:
        """The policy as a Hugging Face model dir (with LoRA: the adapter, and on request the
        merged model under ``merged/``), with the tokenizer; rank 0 writes it (call it on every
        rank: a sharded policy's weights are gathered first)."""
        if self.world.sharded:
            state = sharding.model_state(self.policy)  # whole tensors, on rank 0
            if self.world.is_main:
                self.policy.save_pretrained(directory, state_dict=state)
                # FSDP subclasses the model (FSDPGPT2LMHeadModel): record the class it loads as
                self.policy.config.architectures = [sharding.unsharded_class(self.policy)]
                self.policy.config.save_pretrained(directory)
                self.tokenizer.save_pretrained(directory)
            return
        if not self.world.is_main:
            return
        self.policy.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.lora is not None and self.lora.save_merged:
            merged = copy.deepcopy(self.policy).merge_and_unload()
            merged.save_pretrained(directory / "merged")
            self.tokenizer.save_pretrained(directory / "merged")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_world(state, self.world)
        self.networks.load("policy", state["policy"])
        if self.proposal is not None:
            self.networks.load("proposal", state["proposal"])
        sharding.load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.log_z.load_state_dict(state["log_z"])
        self.target.lambdas, self.target.fitted = state["lambdas"], state["target_fitted"]
        # this rank's own streams (a single process's are the top-level ones)
        own = state["rank_rngs"][self.world.rank] if self.world.size > 1 else state
        self.generator.set_state(own["generator"])
        if "prompt_generator" in own:  # checkpoints of dmtune 0.1.0 predate prompts
            self.prompt_generator.set_state(own["prompt_generator"])
        torch.set_rng_state(own["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step_count, self.samples_seen = state["step"], state["samples_seen"]
        # checkpoints of dmtune 0.1.0 predate skipped steps
        self.skipped_steps, self.bad_steps = (
            state.get("skipped_steps", 0),
            state.get("bad_steps", 0),
        )

    def weights_are_finite(self) -> bool:
        """Whether every weight of the policy (and proposal) is finite."""
        models = [self.policy] + ([self.proposal] if self.proposal is not None else [])
        finite = all(
            bool(torch.isfinite(sharding.local_tensor(p)).all())
            for model in models
            for p in model.parameters()
        )
        return self.world.all(finite) if self.world.sharded else finite
