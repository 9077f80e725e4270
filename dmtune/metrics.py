"""Metric names (an API: W&B panels and ``dmtune compare`` read them) and the estimates behind them.

Every logged key is spelled here once; :data:`GLOSSARY` says what each one means and is the
README's metric glossary (``python -m dmtune.metrics`` prints it; a test keeps the two equal
and checks that every key a run logs is in it). The functions turn per-sample log-probs into
the estimates that training, calibration and evaluation log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Sequence

import torch

from dmtune import estimators as est

if TYPE_CHECKING:
    from dmtune.objectives import Batch
    from dmtune.prompts import Contexts

STEP = "step"
SAMPLES_SEEN = "samples_seen"
LOSS = "train/loss"
GRAD_NORM = "train/grad_norm"
LR = "train/lr"
SKIPPED_STEPS = "train/skipped_steps"
LOG_Z = "target/log_z"
ESS = "target/ess"
UNREACHED_CONTEXTS = "target/unreached_contexts"
KL_TARGET_POLICY = "divergence/kl_target_policy"
KL_TARGET_PROPOSAL = "divergence/kl_target_proposal"
KL_POLICY_PRIOR = "divergence/kl_policy_prior"
TV_TARGET_POLICY = "divergence/tv_target_policy"
REWARD_MEAN = "objective/reward_mean"
ADVANTAGE_STD = "objective/advantage_std"
PROPOSAL_UPDATED = "objective/proposal_updated"
DISTINCT = {n: f"diversity/distinct_{n}" for n in (1, 2, 3)}
SELF_BLEU = "diversity/self_bleu"
ENTROPY = "diversity/entropy"
STEP_S = "perf/step_s"
SAMPLE_S = "perf/sample_s"
SCORE_S = "perf/score_s"
UPDATE_S = "perf/update_s"
SAMPLES_PER_S = "perf/samples_per_s"
TOKENS_PER_S = "perf/tokens_per_s"
GPU_PEAK_GIB = "perf/gpu_peak_gib"
STATE_MIB = "perf/state_mib"
GPU_ONLY = (GPU_PEAK_GIB,)  # logged on a GPU only
EXACT_LOG_Z = "exact/log_z"
EXACT_KL_TARGET_POLICY = "exact/kl_target_policy"
EXACT_KL_TARGET_PROPOSAL = "exact/kl_target_proposal"
EXACT_KL_POLICY_PRIOR = "exact/kl_policy_prior"
EXACT_TV_TARGET_POLICY = "exact/tv_target_policy"
EXACT_ENTROPY = "exact/entropy"
CONSTRAINT = "constraint/"  # constraint/<feature>
EVAL = "eval/"  # eval/<metric>, eval/<metric>_se: dmtune eval's figures


def constraint(feature: str) -> str:
    """``constraint/<feature>``: E_π[φ], the rate (pointwise) or moment (distributional)."""
    return f"{CONSTRAINT}{feature}"


def constraint_target(feature: str) -> str:
    """``constraint/<feature>_target``: the target moment μ̄ of a distributional feature."""
    return f"{CONSTRAINT}{feature}_target"


def exact_constraint(feature: str) -> str:
    return f"exact/{CONSTRAINT}{feature}"


def eval_metric(metric: str) -> str:
    """``eval/<metric>``: ``dmtune eval``'s estimate of a metric (not a training step's)."""
    return f"{EVAL}{metric}"


def eval_error(metric: str) -> str:
    """``eval/<metric>_se``: the standard error of ``dmtune eval``'s estimate."""
    return f"{EVAL}{metric}_se"


def is_constraint_rate(key: str) -> bool:
    """``constraint/<feature>`` but not its ``_target``."""
    return key.startswith(CONSTRAINT) and not key.endswith("_target")


# What the end-of-run summary and the progress bar show beside the constraint rates, and what
# `dmtune compare` plots by default after them.
SHOWN = (KL_POLICY_PRIOR, KL_TARGET_POLICY, DISTINCT[1], SAMPLES_PER_S)
COMPARED = (KL_TARGET_POLICY, KL_POLICY_PRIOR, DISTINCT[2])

# (keys of one glossary row, meaning). <feature> stands for a feature's name.
GLOSSARY: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        (STEP, SAMPLES_SEEN),
        "optimizer steps taken and samples drawn so far (the x-axis of `dmtune compare`)",
    ),
    ((LOSS, GRAD_NORM, LR), "the objective's loss, gradient norm before clipping, learning rate"),
    (
        (SKIPPED_STEPS,),
        "steps so far whose loss or gradient was not finite: skipped (no update); the run stops "
        "after `train.max_bad_steps` in a row",
    ),
    (
        (LOG_Z,),
        "running `log Ẑ`: log-mean-exp of `log P − log q` over every sample so far, the "
        "calibration's `train.fit_samples` prior samples included; with `train.prompts`, the mean "
        "over the step's prompts of `log Ẑ_c` (each from its own samples)",
    ),
    (
        (ESS,),
        "effective sample size `(Σw)²/Σw²` of the batch's target weights (out of `batch_size`; "
        "0 when no sample meets the pointwise constraints)",
    ),
    (
        (UNREACHED_CONTEXTS,),
        "with `train.prompts`: the fraction of the step's prompts none of whose samples met the "
        "pointwise constraints (`Ẑ_c = 0`: they teach nothing); `target/log_z` is then the mean "
        "of `log Ẑ_c` over the other prompts",
    ),
    (
        (KL_TARGET_POLICY,),
        "`KL(p‖π) ≈ mean_q[w (log P − log Ẑ − log π)]`: distance to the target (lower is "
        "better). Estimated on q's samples, it cannot see target mass that q never samples: "
        "after a collapse (REINFORCE) it reads ≈ 0 while the true value is large. Read it beside "
        "`kl_policy_prior` and diversity; exact mode gives the truth",
    ),
    ((KL_TARGET_PROPOSAL,), "`KL(p‖q)`, KL-adaptive DPG only"),
    ((KL_POLICY_PRIOR,), "`KL(π‖a) ≈ mean_q[ρ (log π − log a)]`: forgetting"),
    ((TV_TARGET_POLICY,), "`TV(p,π) ≈ ½ mean_q[abs(ρ − w)]`"),
    (
        (constraint("<feature>"),),
        "`E_π[φ]`: the constraint rate (pointwise) or moment (distributional)",
    ),
    ((constraint_target("<feature>"),), "the target moment `μ̄` of a distributional feature"),
    ((REWARD_MEAN,), "mean reward of the batch (RM objectives)"),
    ((ADVANTAGE_STD,), "spread of the advantages (a proxy for gradient variance)"),
    ((PROPOSAL_UPDATED,), "1 when KL-adaptive DPG replaced q by π at this check, else 0"),
    (tuple(DISTINCT.values()), "unique n-grams / all n-grams over the batch"),
    ((SELF_BLEU,), "mean BLEU of each sample against the others (eval steps; high = repetitive)"),
    ((ENTROPY,), "sequence entropy `H(π) ≈ mean_q[ρ (−log π)]` in nats"),
    ((STEP_S, SAMPLE_S, SCORE_S, UPDATE_S), "wall time of the step and its parts"),
    ((SAMPLES_PER_S, TOKENS_PER_S), "throughput (the whole batch's, over every process)"),
    ((GPU_PEAK_GIB,), "peak GPU memory of rank 0 so far (`torch.cuda.max_memory_allocated`; GPUs)"),
    (
        (STATE_MIB,),
        "MiB of the policy's trainable weights (LoRA: the adapters), their gradients and "
        "optimizer state, held by rank 0 (its shards with `device=fsdp`)",
    ),
    (
        (
            EXACT_LOG_Z,
            EXACT_KL_TARGET_POLICY,
            EXACT_KL_TARGET_PROPOSAL,
            EXACT_KL_POLICY_PRIOR,
            EXACT_TV_TARGET_POLICY,
            EXACT_ENTROPY,
            exact_constraint("<feature>"),
        ),
        "with `model=toy`: the same quantities computed exactly by enumeration (eval steps)",
    ),
    (
        (eval_metric("<metric>"), eval_error("<metric>")),
        "`dmtune eval`: a metric above on fresh samples of the checkpoint, and its standard error "
        "where it has one (the eval run's own keys; its settings are in its W&B config under "
        "`eval`)",
    ),
)


def glossary_names() -> list[str]:
    """Every glossary key, ``<feature>`` left as a placeholder."""
    return [name for names, _ in GLOSSARY for name in names]


def glossary_pattern(name: str) -> re.Pattern[str]:
    """The logged keys a glossary name stands for (``<feature>`` matches any feature name,
    ``<metric>`` any other glossary name)."""
    return re.compile(_glossary_regex(name) + r"\Z")


def _glossary_regex(name: str) -> str:
    regex = re.escape(name).replace(re.escape("<feature>"), r"[^/]+")
    if "<metric>" in name:
        metrics = "|".join(_glossary_regex(n) for n in glossary_names() if "<metric>" not in n)
        regex = regex.replace(re.escape("<metric>"), f"(?:{metrics})")
    return regex


def glossary_markdown() -> str:
    """The glossary as the README's markdown table."""
    lines = ["| metric | meaning |", "|---|---|"]
    for names, meaning in GLOSSARY:
        lines.append(f"| {', '.join(f'`{n}`' for n in names)} | {meaning} |")
    return "\n".join(lines)


# --- estimates ---


def policy_estimates(
    batch: Batch,
    features: Mapping[str, torch.Tensor],
    moments: Mapping[str, float],
    has_proposal: bool,
) -> dict[str, torch.Tensor]:
    """Divergences, moments and ESS of the policy that drew (or was scored on) a batch of q.

    features: feature name → (batch,) values; moments: distributional feature → μ̄. Tensors
    stay on the device: the caller moves them to the host once, together.
    """
    log_pi = batch.log_policy.detach()
    args = (batch.log_target, batch.log_proposal)
    metrics = {
        # with contexts log Ẑ is per context: context_estimates() gives target/log_z
        **({LOG_Z: batch.log_z} if batch.contexts is None else {}),
        ESS: est.effective_sample_size(
            # with contexts, each weight normalised by its own context's Ẑ_c
            batch.log_target - batch.log_proposal - (0 if batch.contexts is None else batch.log_z)
        ),
        KL_TARGET_POLICY: est.kl_target_model(*args, log_pi, batch.log_z),
        TV_TARGET_POLICY: est.tv_target_model(*args, log_pi, batch.log_z),
        KL_POLICY_PRIOR: est.kl_model_prior(log_pi, batch.log_prior, batch.log_proposal),
        ENTROPY: est.entropy(log_pi, batch.log_proposal),
    }
    if has_proposal:
        metrics[KL_TARGET_PROPOSAL] = est.kl_target_model(*args, batch.log_proposal, batch.log_z)
    for name, values in features.items():
        metrics[constraint(name)] = est.moments(values, log_pi, batch.log_proposal)
    for name, moment in moments.items():
        metrics[constraint_target(name)] = torch.tensor(moment)
    return metrics


def context_estimates(log_z_per_context: torch.Tensor) -> dict[str, torch.Tensor]:
    """``target/log_z`` (the mean of ``log Ẑ_c`` over the contexts some sample reached) and
    the fraction of contexts none did."""
    reached = torch.isfinite(log_z_per_context)
    mean = torch.where(reached, log_z_per_context, 0.0).sum() / reached.sum()
    return {LOG_Z: mean, UNREACHED_CONTEXTS: 1 - reached.double().mean()}


def prior_estimates(
    log_weights: torch.Tensor,
    features: Mapping[str, torch.Tensor],
    moments: Mapping[str, float],
    contexts: Contexts | None = None,
) -> dict[str, float]:
    """Step 0: the prior's rates, ``log Z`` and ``KL(p‖a)`` from samples of the prior itself.

    log_weights: (n,) ``log P − log a`` (= log q, so π = q = a and every ρ is 1). With
    contexts, ``log Z`` and ``KL(p‖a)`` are per context (means over contexts).
    """
    metrics = {constraint(name): values.double().mean().item() for name, values in features.items()}
    for name, moment in moments.items():
        metrics[constraint_target(name)] = float(moment)
    if contexts is None:
        log_z = est.log_mean_exp(log_weights)
        metrics[LOG_Z] = log_z.item()
    else:
        from dmtune.target import context_log_z

        log_z, per_context = context_log_z(log_weights, contexts)
        metrics.update({k: v.item() for k, v in context_estimates(per_context).items()})
    zeros = torch.zeros_like(log_weights)
    metrics.update(
        {
            # per-context weights with prompts (a shift by one log Z changes nothing without)
            ESS: est.effective_sample_size(
                log_weights if contexts is None else log_weights - log_z
            ).item(),
            KL_TARGET_POLICY: est.kl_target_model(log_weights, zeros, zeros, log_z).item(),
            KL_POLICY_PRIOR: 0.0,
        }
    )
    return metrics


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """Distinct-1/2/3 of a batch of texts."""
    return {key: est.distinct_n(texts, n) for n, key in DISTINCT.items()}


if __name__ == "__main__":  # python -m dmtune.metrics: the README's glossary table
    print(glossary_markdown())
