"""One training run from a composed config: build, calibrate, loop, checkpoint, summarise.

What lands where in the run dir is :mod:`dmtune.rundir`'s business; what is built from the
config is :mod:`dmtune.build`'s; this module is the loop.
"""

from __future__ import annotations

import json
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig
from tqdm import tqdm

from dmtune import distributed
from dmtune import estimators as est
from dmtune import metrics as m
from dmtune.build import LogIdentity, build_logger, build_trainer
from dmtune.checkpoint import load_checkpoint, save_checkpoint
from dmtune.loggers import RunLogger, merge_summary
from dmtune.rundir import RunDir, atomic_write_text
from dmtune.trainer import Trainer

SUMMARY_WINDOW = 10  # the summary's "final" figures average this many last steps
NOTHING_KEPT = -1  # resume_step of a run resumed before its first checkpoint: every line goes


class DivergenceError(RuntimeError):
    """Training stopped after ``train.max_bad_steps`` non-finite steps in a row."""


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
    """Run (or resume) training in ``run_dir``; returns the summary. Exit code 0 unless stopped.

    As one rank of a data-parallel run (:mod:`dmtune.distributed`), every rank runs this loop
    in step; rank 0 alone writes the run dir, logs and checkpoints.
    """
    run = RunDir(run_dir)
    world = distributed.init(cfg)
    trainer = build_trainer(cfg, world)
    resume_step = None
    if cfg.resume and run.checkpoint.is_file():
        trainer.load_state_dict(load_checkpoint(run.checkpoint, map_location=trainer.device))
        resume_step = trainer.step_count
        calibration = run.read_calibration()
    else:
        if cfg.resume:  # stopped before its first checkpoint: start over, dropping what it logged
            resume_step = NOTHING_KEPT
        calibration = trainer.calibrate()
        if world.is_main:
            atomic_write_text(run.calibration, json.dumps(calibration, indent=1))

    train_cfg = cfg.train
    started, started_at, history = time.perf_counter(), time.time(), []
    identity = LogIdentity(name=run.name, overrides=run.launch_overrides())
    if world.is_main:
        logger = build_logger(cfg, run_dir, identity, resume_step=resume_step)
    else:
        logger = RunLogger([])
    _show(logger.new_notes())  # where the W&B run is (or why there is none)
    with logger, _stop_on_signals() as stop:
        if resume_step in (None, NOTHING_KEPT):
            logger.log({m.SAMPLES_SEEN: 0, **calibration["metrics"], **_exact(trainer)}, step=0)
        # disable=None: a live bar on a terminal, nothing in a log file or a pipe
        bar = tqdm(
            total=train_cfg.steps,
            initial=trainer.step_count,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None if world.is_main else True,
        )
        diverged, stopped_by = False, None
        while trainer.step_count < train_cfg.steps and not diverged:
            # a signal to any rank stops them all after the same step
            stopped_by = next((s for s in world.gather(stop.signal) if s is not None), None)
            if stopped_by is not None:
                break
            metrics = trainer.step()
            diverged = trainer.bad_steps >= train_cfg.max_bad_steps
            step = trainer.step_count
            history.append(metrics)
            if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                metrics.update(_exact(trainer))  # every rank: a sharded policy's pass gathers
                if world.is_main:
                    metrics[m.SELF_BLEU] = est.self_bleu(trainer.last_samples.texts)
                    logger.log_samples(_sample_rows(trainer, train_cfg.logged_samples), step=step)
            if step % train_cfg.log_every == 0 or step == train_cfg.steps or diverged:
                logger.log(metrics, step=step)
            if step % train_cfg.checkpoint_every == 0 and not diverged:
                _save(trainer, run.checkpoint)
            bar.update(1)
            bar.set_postfix(_progress(metrics), refresh=False)
        bar.close()
        # skipped steps never update the weights, but an update can overflow them: keep the last
        # checkpoint then, so that what is saved is always a finite policy
        kept = trainer.weights_are_finite()
        if kept:
            _save(trainer, run.checkpoint)
        summary = _summary(
            trainer, calibration, history, time.perf_counter() - started, run_dir, stopped_by
        )
        summary.update(started_at=started_at, finished_at=time.time(), diverged=diverged)
        logger.summary(summary)
        finished = not diverged and kept and stopped_by is None
        if finished:  # the policy, for transformers (rank 0 writes it)
            trainer.save_policy(run.policy)
        if finished and world.is_main:
            if cfg.logger.log_model:  # what `dmtune eval` of this checkpoint declares as input
                metadata = {k: summary[k] for k in ("objective", "steps", "samples_seen")}
                logged = logger.log_model(run.policy, metadata)
                step = {"step": trainer.step_count}
                summary["model_artifact"] = {**logged, **step} if logged else None
    # closed: a W&B server that did not answer in logger.timeout_s is one line, not a hang
    summary["logging"] = logger.notes()  # where the W&B run is, its model, any W&B failure
    summary["logging_unshown"] = logger.new_notes()  # the failures at the end
    if world.is_main:
        kept_keys = ("logging", "model_artifact")
        merge_summary(run, {k: summary[k] for k in kept_keys if k in summary})

    if diverged or not kept:
        saved = f"step {trainer.step_count}'s" if kept else "the previous checkpoint's"
        raise DivergenceError(
            f"training diverged: {trainer.bad_steps} steps in a row had a non-finite loss or "
            f"gradient (skipped; train/skipped_steps={trainer.skipped_steps}); {run.checkpoint} "
            f"holds {saved} finite weights; lower train.lr (now {train_cfg.lr:g}) or keep "
            f"device.dtype=float32 (now {cfg.device.dtype})"
        )
    return summary


def _save(trainer: Trainer, path: Path) -> None:
    """A checkpoint: every rank's state is gathered (a collective), rank 0 writes it."""
    state = trainer.state_dict()
    if trainer.world.is_main:
        save_checkpoint(state, path)


def _show(lines: list[str]) -> None:
    for line in lines:
        tqdm.write(line, file=sys.stderr)


def _exact(trainer: Trainer) -> dict[str, float]:
    return trainer.exact_metrics() if trainer.exact is not None else {}


def _sample_rows(trainer: Trainer, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of the last batch with their feature values."""
    samples, scores = trainer.last_samples, trainer.last_scores
    columns = {name: values[:n].tolist() for name, values in scores.by_name.items()}
    prompts = samples.contexts.prompts if samples.contexts is not None else None
    return [
        {
            "samples_seen": trainer.samples_seen,  # the x-axis, beside the step W&B adds
            **({"prompt": prompts[i]} if prompts else {}),
            "text": text,
            "tokens": int(length),
            **{name: values[i] for name, values in columns.items()},
        }
        for i, (text, length) in enumerate(
            zip(samples.texts[:n], samples.mask[:n].sum(-1).tolist())
        )
    ]


def _progress(metrics: dict[str, float]) -> dict[str, str]:
    shown = {k.split("/", 1)[1]: v for k, v in metrics.items() if m.is_constraint_rate(k)}
    shown["kl(π‖a)"] = metrics[m.KL_POLICY_PRIOR]
    shown["kl(p‖π)"] = metrics[m.KL_TARGET_POLICY]
    shown["samples/s"] = metrics[m.SAMPLES_PER_S]
    return {k: f"{v:.3g}" for k, v in shown.items()}


def _summary(
    trainer: Trainer,
    calibration: dict,
    history: list[dict],
    wall_s: float,
    run_dir: Path,
    stopped_by: int | None,
) -> dict[str, Any]:
    """Figures of the last ``SUMMARY_WINDOW`` steps beside the prior's (the one-screen summary)."""
    window = history[-SUMMARY_WINDOW:]

    def final(key: str) -> float | None:
        values = [row[key] for row in window if key in row]
        return statistics.fmean(values) if values else None

    features = [k for k in calibration["metrics"] if k.startswith(m.CONSTRAINT)]
    logged = {
        k
        for row in window
        for k, v in row.items()
        if isinstance(v, (int, float)) and k not in (m.STEP, m.SAMPLES_SEEN)
    }
    return {
        "run_dir": str(run_dir),
        "objective": trainer.config.objective,
        "steps": trainer.step_count,
        "samples_seen": trainer.samples_seen,
        "stopped_by_signal": stopped_by,
        "skipped_steps": trainer.skipped_steps,
        "wall_s": wall_s,
        "prior": {k: calibration["metrics"][k] for k in features},
        # every logged metric (what a sweeper can optimise), the shown ones first
        "final": {k: final(k) for k in dict.fromkeys((*features, *m.SHOWN, *sorted(logged)))},
    }
