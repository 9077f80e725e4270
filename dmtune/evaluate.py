"""``dmtune eval``: the papers' metrics on fresh samples of a trained policy.

Samples come from the decoding the user asks for (ancestral by default); every estimate of a
property of π is importance-weighted by ``π/q`` when the decoding warps π, so what is reported
is always about the policy itself. ``log Z``, ``KL(p‖π)`` and ``TV(p, π)`` are estimated on a
second set of samples, of the prior, where the target's importance weights are bounded. Each estimate carries its standard error; in exact mode
(``model=toy``) the exact values are reported beside them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dmtune import estimators as est
from dmtune.loggers import RunLogger, WandbOptions
from dmtune.models import encode_prompts, sequence_log_probs
from dmtune.run import load_run
from dmtune.sampling import Decoding, sample
from dmtune.trainer import Trainer

EVAL_FILE = "eval.json"


@torch.no_grad()
def _draw(
    trainer: Trainer, model: torch.nn.Module, n: int, decoding: Decoding, seed: int
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``n`` samples of ``model`` in batches of the run's batch size: texts, features, log-probs."""
    generator = torch.Generator(trainer.device).manual_seed(seed)
    texts, parts = [], {"log_q": [], "log_pi": [], "log_prior": [], "log_target": []}
    by_name: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, trainer.config.batch_size):
        size = min(trainer.config.batch_size, n - start)
        prompt_ids, prompt_mask = encode_prompts(trainer.tokenizer, [trainer.config.prompt] * size, trainer.filler_id, trainer.device)
        with trainer.autocast():  # mixed precision for a half-precision run
            batch = sample(model, trainer.tokenizer, prompt_ids, prompt_mask, decoding, trainer.filler_id, generator)
            args = (batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.mask)
            log_prior = sequence_log_probs(trainer.prior, *args).double()
            log_pi = sequence_log_probs(trainer.policy, *args).double()
        scores = trainer.target.score(batch)
        parts["log_q"].append(batch.log_q.double())
        parts["log_pi"].append(log_pi)
        parts["log_prior"].append(log_prior)
        parts["log_target"].append(trainer.target.log_prob(log_prior, scores).double())
        for name, values in scores.by_name.items():
            by_name.setdefault(name, []).append(values.double())
        texts += batch.texts
    logs = {k: torch.cat(v) for k, v in parts.items()}
    return texts, {k: torch.cat(v) for k, v in by_name.items()}, logs


def evaluate_run(
    run_dir: str | Path, *, n: int = 1024, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    seed: int = 1234, wandb_mode: str | None = None, cfg: DictConfig | None = None, overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a run's last checkpoint; writes ``eval.json`` in the run dir and returns it.

    ``cfg`` (the run's config with ``overrides`` applied, e.g. another constraint set) changes
    what is measured; the report then goes to ``eval-<overrides>.json`` and ``eval.json``, the
    run's own evaluation, is left as it is.
    """
    run_dir = Path(run_dir)
    trainer = load_run(run_dir, cfg)
    report_name = eval_name(overrides or [])
    decoding = Decoding(trainer.config.max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    texts, features, logs = _draw(trainer, trainer.policy, n, decoding, seed)
    # the policy, not the sampler, is what is evaluated: weight by ρ = π/q (= 1 when ancestral)
    log_pi, log_q, log_prior = logs["log_pi"], logs["log_q"], logs["log_prior"]
    rho = (log_pi - log_q).exp()
    # target-side quantities on samples of the prior, whose weights P/(Z a) = b·exp(λ·φ)/Z are
    # bounded; on the policy's samples they are heavy-tailed wherever π under-covers p
    _, _, prior_logs = _draw(trainer, trainer.prior, n, Decoding(trainer.config.max_new_tokens), seed + 1)
    a_target, a_q, a_pi = prior_logs["log_target"], prior_logs["log_q"], prior_logs["log_pi"]
    # standard errors include log Ẑ's own (it is estimated on the same samples)
    kl_terms, log_z = est.terms_with_log_z_error(est.kl_target_model_terms, a_target, a_q, a_pi)
    tv_terms, _ = est.terms_with_log_z_error(est.tv_target_model_terms, a_target, a_q, a_pi)
    terms = {
        "divergence/kl_target_policy": kl_terms,
        "divergence/kl_policy_prior": est.kl_model_prior_terms(log_pi, log_prior, log_q),
        "divergence/tv_target_policy": tv_terms,
        "diversity/entropy": rho * -log_pi,
        **{f"constraint/{name}": rho * values for name, values in features.items()},
    }
    metrics = {key: t.mean().item() for key, t in terms.items()}
    errors = {key: est.standard_error(t).item() for key, t in terms.items()}
    metrics.update({
        "target/log_z": log_z.item(),
        "target/ess": est.effective_sample_size(a_target - a_q).item(),
        "diversity/distinct_1": est.distinct_n(texts, 1),
        "diversity/distinct_2": est.distinct_n(texts, 2),
        "diversity/distinct_3": est.distinct_n(texts, 3),
        "diversity/self_bleu": est.self_bleu(texts),
    })
    if trainer.exact_space is not None:
        metrics.update(trainer.exact_metrics())
    report = {
        "step": trainer.step_count,
        "samples_seen": trainer.samples_seen,
        "n": n,
        "decoding": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed},
        "overrides": list(overrides or []),
        "metrics": metrics,
        "standard_errors": errors,
        "examples": texts[:8],
    }
    (run_dir / f"{report_name}.json").write_text(json.dumps(report, indent=1, allow_nan=True))
    _log_to_wandb(run_dir, report, wandb_mode, report_name, cfg)
    return report


def eval_name(overrides: list[str]) -> str:
    """``eval`` for the run's own evaluation, ``eval-<overrides>`` (file-name safe) otherwise."""
    if not overrides:
        return EVAL_FILE.removesuffix(".json")
    return "eval-" + re.sub(r"[^A-Za-z0-9._=,-]+", "_", "_".join(overrides))[:120]


def _log_to_wandb(run_dir: Path, report: dict[str, Any], mode: str | None, name: str, cfg: DictConfig | None) -> None:
    """A W&B run of ``job_type=eval`` in the training run's group (or nothing when disabled)."""
    cfg = cfg if cfg is not None else OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    options = WandbOptions(
        mode=mode or cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or cfg.experiment_name,
        job_type="eval",
        tags=(cfg.objective.name, cfg.constraint.name, str(cfg.model.name_or_path), "eval"),
        name=f"{run_dir.name}-{name}",
    )
    eval_dir = run_dir / name
    with RunLogger(eval_dir, options, config=OmegaConf.to_container(cfg, resolve=True)) as logger:
        finite = {k: v for k, v in report["metrics"].items() if math.isfinite(v)}
        logger.log({"samples_seen": report["samples_seen"], **finite}, step=report["step"])
        logger.summary(finite)
