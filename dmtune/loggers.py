"""Run logging: sinks behind one small protocol, fanned out by :class:`RunLogger`.

:class:`JsonlSink` writes the run dir's own record — ``metrics.jsonl`` (one JSON object per
logged step), ``samples.jsonl``, ``summary.json`` — and is always on (its format:
:mod:`dmtune.jsonl`); :class:`dmtune.wandb_sink.WandbSink` adds a W&B run when
``logger.sinks`` names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from dmtune.jsonl import JsonlWriter, encode_nonfinite, to_python
from dmtune.rundir import RunDir, atomic_write_text
from dmtune.wandb_sink import WandbOptions, WandbSink

if TYPE_CHECKING:
    import wandb
    from typing_extensions import Self


class Sink(Protocol):
    """Where a run's records go. Every method is called from the training loop, in order."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One step's metrics (plain Python values, ``step`` not among them)."""

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """A table of samples with their scores."""

    def summary(self, values: dict[str, Any]) -> None:
        """The run's summary, merged into what is there."""

    def close(self) -> None:
        """Flush and release (idempotent)."""


class JsonlSink:
    """The run dir's own record: ``metrics.jsonl``, ``samples.jsonl`` and ``summary.json``.

    resume_step: on resume, the checkpoint's step; lines logged after it are dropped.
    """

    def __init__(self, run_dir: RunDir, resume_step: int | None = None) -> None:
        self.run_dir = run_dir
        run_dir.path.mkdir(parents=True, exist_ok=True)
        self.metrics = JsonlWriter(run_dir.metrics)
        self.samples = JsonlWriter(run_dir.samples)
        if resume_step is not None:
            self.metrics.truncate_after_step(resume_step)
            self.samples.truncate_after_step(resume_step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.metrics.write({"step": step, **metrics})

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for row in rows:
            self.samples.write({"step": step, **row})

    def summary(self, values: dict[str, Any]) -> None:
        merge_summary(self.run_dir, values)

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


def merge_summary(run_dir: RunDir, values: Mapping[str, Any]) -> None:
    """Merge ``values`` into the run dir's ``summary.json`` (written whole or not at all)."""
    path = run_dir.summary
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    merged = {**previous, **to_python(values)}
    atomic_write_text(path, json.dumps(encode_nonfinite(merged), indent=2) + "\n")


class RunLogger:
    """The one object the loop logs through: it converts values once and fans out to its sinks.

    ``RunLogger.open(run_dir, wandb_options)`` is the usual pair (JSONL, then W&B when options
    are given); :func:`dmtune.build.build_logger` builds the sinks a config names.
    """

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self._shown: set[str] = set()

    def notes(self) -> list[str]:
        """Where each remote run lives, the model artifact it logged or used, and each failure
        of a remote sink (one line each)."""
        lines = []
        for sink in self.sinks:
            lines += [getattr(sink, k, None) for k in ("where", "model", "problem")]
        return [line for line in lines if line]

    def new_notes(self) -> list[str]:
        """The :meth:`notes` not returned by an earlier call (so each is shown once)."""
        fresh = [line for line in self.notes() if line not in self._shown]
        self._shown.update(fresh)
        return fresh

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        wandb_options: WandbOptions | None = None,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> RunLogger:
        sinks: list[Sink] = [JsonlSink(RunDir(run_dir), resume_step=resume_step)]
        if wandb_options is not None:
            sinks.append(WandbSink(run_dir, wandb_options, config, resume_step=resume_step))
        return cls(sinks)

    @property
    def wandb_run(self) -> wandb.Run | None:
        """The live W&B run, if a W&B sink has one."""
        return next(
            (s.run for s in self.sinks if isinstance(s, WandbSink) and s.run is not None), None
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one step: a line in ``metrics.jsonl`` and one ``wandb.log`` call."""
        values = to_python(metrics)
        values.pop("step", None)
        for sink in self.sinks:
            sink.log(values, step)

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Samples with their scores: ``samples.jsonl`` and a ``wandb.Table``."""
        rows = [to_python(row) for row in rows]
        for sink in self.sinks:
            sink.log_samples(rows, step)

    def log_model(self, path: Path, metadata: Mapping[str, Any]) -> dict[str, Any] | None:
        """Log ``path`` (the trained policy) as a W&B model artifact; what names it, or None."""
        logged = [s.log_model(path, metadata) for s in self.sinks if isinstance(s, WandbSink)]
        return next((record for record in logged if record), None)

    def use_model(self, path: Path, logged: Mapping[str, Any]) -> None:
        """Declare the model artifact ``logged`` (of ``path``) as this run's input (W&B)."""
        for sink in self.sinks:
            if isinstance(sink, WandbSink):
                sink.use_model(path, logged)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into ``summary.json`` and the W&B run summary."""
        values = to_python(values)
        for sink in self.sinks:
            sink.summary(values)

    def close(self) -> None:
        """Close every sink, the remote ones first (idempotent)."""
        for sink in reversed(self.sinks):
            sink.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
