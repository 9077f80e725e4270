"""``dmtune eval``: the papers' metrics on fresh samples of a trained policy.

Samples come from the decoding the user asks for (ancestral by default); every estimate of a
property of π is importance-weighted by ``π/q`` when the decoding warps π, so what is reported
is always about the policy itself. ``log Z``, ``KL(p‖π)`` and ``TV(p, π)`` are estimated on a
second set of samples, of the prior, where the target's importance weights are bounded. Each
estimate carries its standard error; in exact mode
(``model=toy``) the exact values are reported beside them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dmtune import estimators as est
from dmtune import metrics as m
from dmtune.build import LogIdentity, build_logger, is_exact
from dmtune.exact import ExactOracle, exact_spaces
from dmtune.prompts import Contexts, join_contexts
from dmtune.rundir import LoadedRun, RunDir, eval_name, load_run, micro_batch_sizes
from dmtune.sampling import Decoding

DECODING_OPTIONS = ("temperature", "top_k", "top_p")  # what eval may change in the sampler


@torch.no_grad()
def _draw(
    run: LoadedRun, model: torch.nn.Module, n: int, decoding: Decoding, seed: int
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor], Contexts | None]:
    """``n`` samples of ``model`` in batches of the run's batch size: texts, features,
    log-probs, and with prompts which prompt each continues (``samples_per_prompt`` each)."""
    lm, target = run.lm, run.target
    generator = torch.Generator(lm.device).manual_seed(seed)
    prompt_generator = torch.Generator().manual_seed(seed)
    texts, parts = [], {"log_q": [], "log_pi": [], "log_prior": [], "log_target": []}
    by_name: dict[str, list[torch.Tensor]] = {}
    contexts = []
    micro, sample_micro = micro_batch_sizes(run.cfg)
    for start in range(0, n, run.cfg.train.batch_size):
        size = min(run.cfg.train.batch_size, n - start)
        context = lm.draw_contexts(size, prompt_generator)
        batch = lm.sample(
            size, decoding, generator, model=model, contexts=context, micro_batch_size=sample_micro
        )
        if context is not None:
            contexts.append(context.to("cpu"))
        log_prior = lm.log_probs(batch, micro_batch_size=micro).double()
        log_pi = lm.log_probs(batch, model=run.policy, micro_batch_size=micro).double()
        scores = target.score(batch)
        parts["log_q"].append(batch.log_q.double())
        parts["log_pi"].append(log_pi)
        parts["log_prior"].append(log_prior)
        parts["log_target"].append(target.log_prob(log_prior, scores).double())
        for name, values in scores.by_name.items():
            by_name.setdefault(name, []).append(values.double())
        texts += batch.texts
    logs = {k: torch.cat(v) for k, v in parts.items()}
    joined = join_contexts(contexts) if contexts else None
    return texts, {k: torch.cat(v) for k, v in by_name.items()}, logs, joined


def _target_terms(
    terms_fn: Any,
    log_target: torch.Tensor,
    log_q: torch.Tensor,
    log_pi: torch.Tensor,
    contexts: Contexts | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample terms of a target-side estimate and ``log Ẑ``, each context with its own
    ``log Ẑ_c`` (returned per context; −inf where no sample meets the constraints)."""
    if contexts is None:
        return est.terms_with_log_z_error(terms_fn, log_target, log_q, log_pi)
    terms = torch.zeros_like(log_target)
    log_zs = []
    for group in range(contexts.n_groups):
        rows = contexts.index == group
        if torch.isneginf(log_target[rows]).all():  # Z_c = 0 as far as the samples show
            log_zs.append(torch.tensor(float("-inf"), dtype=log_target.dtype))
            continue
        terms[rows], log_z = est.terms_with_log_z_error(
            terms_fn, log_target[rows], log_q[rows], log_pi[rows]
        )
        log_zs.append(log_z)
    return terms, torch.stack(log_zs)


def evaluate_run(
    run_dir: str | Path,
    *,
    n: int = 1024,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 1234,
    wandb_mode: str | None = None,
    cfg: DictConfig | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a run's last checkpoint; writes its report in the run dir and returns it.

    ``cfg`` (the run's config with ``overrides`` applied, e.g. another constraint set) changes
    what is measured. Each setting has its own report (:func:`eval_setting`): ``eval.json`` for
    ancestral sampling against the run's own target, ``eval-<setting>.json`` otherwise.
    """
    run_dir = RunDir(run_dir)
    overrides = list(overrides or [])
    setting = eval_setting(temperature, top_k, top_p, overrides)
    run = load_run(run_dir.path, cfg)
    max_new_tokens = run.cfg.train.max_new_tokens
    if run.lm.prompts is not None:  # whole prompts: samples_per_prompt samples each
        per_prompt = run.lm.prompts.samples_per_prompt
        n = -(-n // per_prompt) * per_prompt
    decoding = Decoding(max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    texts, features, logs, _ = _draw(run, run.policy, n, decoding, seed)
    # the policy, not the sampler, is what is evaluated: weight by ρ = π/q (= 1 when ancestral)
    log_pi, log_q, log_prior = logs["log_pi"], logs["log_q"], logs["log_prior"]
    rho = (log_pi - log_q).exp()
    # target-side quantities on samples of the prior, whose weights P/(Z a) = b·exp(λ·φ)/Z are
    # bounded; on the policy's samples they are heavy-tailed wherever π under-covers p
    _, _, prior_logs, contexts = _draw(run, run.lm.model, n, Decoding(max_new_tokens), seed + 1)
    a_target, a_q, a_pi = prior_logs["log_target"], prior_logs["log_q"], prior_logs["log_pi"]
    # standard errors include log Ẑ's own (it is estimated on the same samples; with prompts,
    # log Ẑ_c on each prompt's own)
    target_args = (a_target, a_q, a_pi, contexts)
    kl_terms, log_z = _target_terms(est.kl_target_model_terms, *target_args)
    tv_terms, _ = _target_terms(est.tv_target_model_terms, *target_args)
    if contexts is None:
        log_z_metrics = {m.LOG_Z: log_z.item()}
        a_log_z = log_z
    else:
        log_z_metrics = {k: v.item() for k, v in m.context_estimates(log_z).items()}
        a_log_z = torch.where(torch.isneginf(log_z), 0.0, log_z)[contexts.index]
    terms = {
        m.KL_TARGET_POLICY: kl_terms,
        m.KL_POLICY_PRIOR: est.kl_model_prior_terms(log_pi, log_prior, log_q),
        m.TV_TARGET_POLICY: tv_terms,
        m.ENTROPY: rho * -log_pi,
        **{m.constraint(name): rho * values for name, values in features.items()},
    }
    metrics = {key: t.mean().item() for key, t in terms.items()}
    errors = {key: est.standard_error(t).item() for key, t in terms.items()}
    metrics.update(
        {
            **log_z_metrics,
            m.ESS: est.effective_sample_size(a_target - a_q - a_log_z).item(),
            **m.diversity(texts),
            m.SELF_BLEU: est.self_bleu(texts),
        }
    )
    if is_exact(run.cfg):
        prompts = run.lm.prompts.prompts if run.lm.prompts else (run.cfg.train.prompt,)
        spaces = exact_spaces(
            run.lm.model, run.lm.tokenizer, max_new_tokens, prompts, run.lm.prompts is not None
        )
        metrics.update(
            ExactOracle(spaces, run.lm.model).metrics(run.target, run.policy, run.proposal)
        )
    report = {
        "step": run.step,
        "samples_seen": run.samples_seen,
        "n": n,
        "decoding": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed},
        "overrides": overrides,
        "metrics": metrics,
        "standard_errors": errors,
        "examples": texts[:8],
    }
    path = run_dir.eval_report(setting)
    path.write_text(json.dumps(report, indent=1, allow_nan=True))
    # then the W&B eval run (its waits bounded): where it is and any W&B failure, one line each
    report["logging"] = _log(run_dir, run.cfg, report, wandb_mode, eval_name(setting))
    path.write_text(json.dumps(report, indent=1, allow_nan=True))
    return report


def eval_setting(temperature: float, top_k: int, top_p: float, overrides: list[str]) -> list[str]:
    """What tells one evaluation's files from another's: the decoding options that differ from
    ancestral sampling's, then the overrides (``[]``: ancestral, the run's own target). ``n``
    and the seed are not in it: another ``-n`` or ``--seed`` re-estimates the same setting."""
    decoding = Decoding(temperature=temperature, top_k=top_k, top_p=top_p)
    ancestral = Decoding()
    changed = [
        f"{name}={getattr(decoding, name):g}"
        for name in DECODING_OPTIONS
        if getattr(decoding, name) != getattr(ancestral, name)
    ]
    return [*changed, *overrides]


def _log(
    run_dir: RunDir, cfg: DictConfig, report: dict[str, Any], mode: str | None, name: str
) -> list[str]:
    """The evaluation's own log dir (``eval/``, ``eval-<setting>/``): a ``job_type=eval`` run in
    the training run's group, its settings in its config, every figure under ``eval/<metric>``
    and each standard error under ``eval/<metric>_se``; its input, the policy's model artifact
    when the run logged one of this checkpoint."""
    settings = {"n": report["n"], **report["decoding"], "overrides": report["overrides"]}
    identity = LogIdentity(
        name=f"{run_dir.name}-{name}",
        job_type="eval",
        tags=("eval",),
        wandb_mode=mode,
        overrides=run_dir.launch_overrides(),  # the training run's: an eval joins its group
        config={"eval": settings},
    )
    figures = {m.eval_metric(k): v for k, v in report["metrics"].items()}
    figures |= {m.eval_error(k): v for k, v in report["standard_errors"].items()}
    finite = {k: v for k, v in figures.items() if math.isfinite(v)}
    model = run_dir.model_artifact()  # policy/ as logged by the run (logger.log_model=true)
    with build_logger(cfg, run_dir.path / name, identity) as logger:
        if model is not None and model["step"] == report["step"]:  # the policy measured here
            logger.use_model(run_dir.policy, model)
        logger.log({m.SAMPLES_SEEN: report["samples_seen"], **finite}, step=report["step"])
        logger.summary(finite)
    return logger.notes()
