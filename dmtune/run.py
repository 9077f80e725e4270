"""One training run from a composed config: build, calibrate, loop, checkpoint, summarise.

The run dir (Hydra's) ends up holding ``.hydra/`` (the composed config and overrides),
``metrics.jsonl``, ``samples.jsonl``, ``calibration.json``, ``checkpoints/last.pt``,
``policy/`` (the fine-tuned model in Hugging Face format), ``summary.json`` and, with W&B,
``wandb/`` and ``wandb_run_id.txt``.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dmtune import estimators as est
from dmtune.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from dmtune.config import objective_kwargs
from dmtune.constraints import build_feature
from dmtune.loggers import RunLogger, WandbOptions
from dmtune.models import encode_prompts, sequence_log_probs
from dmtune.priors import load_prior
from dmtune.sampling import Decoding, sample
from dmtune.target import Target
from dmtune.trainer import Trainer, TrainerConfig

CALIBRATION_FILE = "calibration.json"
SUMMARY_WINDOW = 10  # the summary's "final" figures average this many last steps
SHOWN = ("divergence/kl_policy_prior", "divergence/kl_target_policy", "diversity/distinct_1", "perf/samples_per_s")


def resolve_device(cfg: DictConfig) -> torch.device:
    """``auto`` is the first GPU when there is one; ``cuda`` without one is a clear error."""
    name = cfg.device.name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device.name={cfg.device.name} but torch sees no CUDA GPU; use device=cpu or device=auto")
    if cfg.device.threads > 0:
        torch.set_num_threads(cfg.device.threads)
    if name.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = cfg.device.tf32
        torch.backends.cudnn.allow_tf32 = cfg.device.tf32
    return torch.device(name)


def build_target(cfg: DictConfig, tokenizer: Any) -> Target:
    """The EBM of the configured constraint set (features checked against the tokenizer)."""
    roles: dict[str, list] = {"pointwise": [], "distributional": [], "reward": []}
    moments = []
    for name, feature in cfg.constraint.features.items():
        params = OmegaConf.to_container(feature.params, resolve=True)
        roles[feature.role].append(build_feature(name, feature.kind, params, tokenizer))
        if feature.role == "distributional":
            moments.append(feature.moment)
    return Target(
        pointwise=tuple(roles["pointwise"]),
        distributional=tuple(roles["distributional"]),
        moments=torch.tensor(moments, dtype=torch.float64) if moments else None,
        reward=roles["reward"][0] if roles["reward"] else None,
    )


def build_trainer(cfg: DictConfig) -> Trainer:
    """Prior, target and trainer from a composed config."""
    device = resolve_device(cfg)
    toy = OmegaConf.to_container(cfg.model.toy, resolve=True)
    toy["words"] = tuple(toy["words"])
    prior, tokenizer = load_prior(cfg.model.name_or_path, dtype=cfg.device.dtype, device=device, toy=toy)
    target = build_target(cfg, tokenizer)
    train = cfg.train
    config = TrainerConfig(
        objective=cfg.objective.name,
        objective_kwargs=objective_kwargs(cfg.objective),
        batch_size=train.batch_size,
        max_new_tokens=train.max_new_tokens,
        prompt=train.prompt,
        lr=train.lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps,
        grad_clip=train.grad_clip,
        swap_every=cfg.objective.swap_every,
        fit_samples=train.fit_samples,
        exact=cfg.model.name_or_path == "toy",
        seed=cfg.seed,
    )
    return Trainer(prior, tokenizer, target, config)


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a checkpoint is saved."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signal = signum


@contextmanager
def _stop_on_signals() -> Iterator[StopRequested]:
    flag = StopRequested()
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) training in ``run_dir``; returns the summary. Exit code 0 unless stopped."""
    trainer = build_trainer(cfg)
    resume_step = None
    if cfg.resume:
        state = load_checkpoint(checkpoint_path(run_dir), map_location=trainer.device)
        trainer.load_state_dict(state)
        resume_step = trainer.step_count
        calibration = json.loads((run_dir / CALIBRATION_FILE).read_text())
    else:
        calibration = trainer.calibrate()
        (run_dir / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=1))

    options = WandbOptions(
        mode=cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or cfg.experiment_name,
        job_type=cfg.logger.job_type,
        tags=(cfg.objective.name, cfg.constraint.name, str(cfg.model.name_or_path), *cfg.logger.tags),
        name=cfg.logger.name or run_dir.name,
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    started, started_at, history = time.perf_counter(), time.time(), []
    with RunLogger(run_dir, options, config=resolved, resume_step=resume_step) as logger, _stop_on_signals() as stop:
        if resume_step is None:
            logger.log({"samples_seen": 0, **calibration["metrics"], **_exact(trainer)}, step=0)
        # disable=None: a live bar on a terminal, nothing in a log file or a pipe
        bar = tqdm(total=cfg.train.steps, initial=trainer.step_count, desc="train", unit="step", dynamic_ncols=True, disable=None)
        while trainer.step_count < cfg.train.steps and stop.signal is None:
            metrics = trainer.step()
            step = trainer.step_count
            history.append(metrics)
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                metrics.update(_exact(trainer))
                metrics["diversity/self_bleu"] = est.self_bleu(trainer.last_samples.texts)
                logger.log_samples(_sample_rows(trainer, cfg.train.logged_samples), step=step)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                logger.log(metrics, step=step)
            if step % cfg.train.checkpoint_every == 0:
                save_checkpoint(trainer.state_dict(), checkpoint_path(run_dir))
            bar.update(1)
            bar.set_postfix(_progress(metrics), refresh=False)
        bar.close()
        save_checkpoint(trainer.state_dict(), checkpoint_path(run_dir))
        summary = _summary(trainer, calibration, history, time.perf_counter() - started, run_dir, stop.signal)
        summary.update(started_at=started_at, finished_at=time.time())
        logger.summary(summary)
    if stop.signal is None:
        trainer.policy.save_pretrained(run_dir / "policy")
        trainer.tokenizer.save_pretrained(run_dir / "policy")
    return summary


def _exact(trainer: Trainer) -> dict[str, float]:
    return trainer.exact_metrics() if trainer.exact_space is not None else {}


def _sample_rows(trainer: Trainer, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of the last batch with their feature values."""
    samples, scores = trainer.last_samples, trainer.last_scores
    columns = {name: values[:n].tolist() for name, values in scores.by_name.items()}
    return [
        {"text": text, "tokens": int(length), **{name: values[i] for name, values in columns.items()}}
        for i, (text, length) in enumerate(zip(samples.texts[:n], samples.mask[:n].sum(-1).tolist()))
    ]


def _progress(metrics: dict[str, float]) -> dict[str, str]:
    shown = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("constraint/") and not k.endswith("_target")}
    shown["kl(π‖a)"] = metrics["divergence/kl_policy_prior"]
    shown["kl(p‖π)"] = metrics["divergence/kl_target_policy"]
    shown["samples/s"] = metrics["perf/samples_per_s"]
    return {k: f"{v:.3g}" for k, v in shown.items()}


def _summary(
    trainer: Trainer, calibration: dict, history: list[dict], wall_s: float, run_dir: Path, stopped_by: int | None
) -> dict[str, Any]:
    """Figures of the last ``SUMMARY_WINDOW`` steps beside the prior's (the one-screen summary)."""
    window = history[-SUMMARY_WINDOW:]

    def final(key: str) -> float | None:
        values = [m[key] for m in window if key in m]
        return statistics.fmean(values) if values else None

    features = [k for k in calibration["metrics"] if k.startswith("constraint/")]
    logged = {k for m in window for k, v in m.items() if isinstance(v, (int, float)) and k not in ("step", "samples_seen")}
    return {
        "run_dir": str(run_dir),
        "objective": trainer.config.objective,
        "steps": trainer.step_count,
        "samples_seen": trainer.samples_seen,
        "stopped_by_signal": stopped_by,
        "wall_s": wall_s,
        "prior": {k: calibration["metrics"][k] for k in features},
        # every logged metric (what a sweeper can optimise), the shown ones first
        "final": {k: final(k) for k in dict.fromkeys((*features, *SHOWN, *sorted(logged)))},
    }


def load_run(run_dir: str | Path, cfg: DictConfig | None = None) -> Trainer:
    """Rebuild a run's trainer from its saved config (or ``cfg``) and last checkpoint.

    With another constraint set in ``cfg`` than the run's, its λ and log Ẑ are fitted anew on
    prior samples (calibration): the policy is then measured against that target.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{run_dir} is not a dmtune run dir (no .hydra/config.yaml)")
    saved = OmegaConf.load(config_file)
    cfg = saved if cfg is None else cfg
    trainer = build_trainer(cfg)
    trainer.load_state_dict(load_checkpoint(checkpoint_path(run_dir), map_location=trainer.device))
    if cfg.constraint != saved.constraint:
        trainer.calibrate()
    return trainer


@torch.no_grad()
def sample_run(
    run_dir: str | Path, *, n: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0
) -> list[dict[str, Any]]:
    """Fresh samples of a run's policy with their feature values and log π (any decoding)."""
    trainer = load_run(run_dir)
    decoding = Decoding(trainer.config.max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    prompt_ids, prompt_mask = encode_prompts(trainer.tokenizer, [trainer.config.prompt] * n, trainer.filler_id, trainer.device)
    generator = torch.Generator(trainer.device).manual_seed(seed)
    samples = sample(trainer.policy, trainer.tokenizer, prompt_ids, prompt_mask, decoding, trainer.filler_id, generator)
    scores = trainer.target.score(samples)
    log_pi = sequence_log_probs(trainer.policy, samples.prompt_ids, samples.prompt_mask, samples.tokens, samples.mask)
    columns = {name: values.tolist() for name, values in scores.by_name.items()}
    return [
        {"text": text, "log_prob": lp, **{name: values[i] for name, values in columns.items()}}
        for i, (text, lp) in enumerate(zip(samples.texts, log_pi.tolist()))
    ]
