"""Run logging: sinks behind one small protocol, fanned out by :class:`RunLogger`.

:class:`JsonlSink` writes the run dir's own record — ``metrics.jsonl`` (one JSON object per
logged step), ``samples.jsonl``, ``summary.json`` — and is always on; :class:`WandbSink` adds a
W&B run (``wandb/`` and ``wandb_run_id.txt``, so that a resumed run continues the same W&B
run) when ``logger.sinks`` names it. Non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (W&B's own spelling) so that every line is valid JSON;
:func:`read_jsonl` turns them back into floats. A W&B failure never stops training: it warns
once (:class:`WandbWarning`) and the run carries on with the local files.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from dmtune.rundir import WANDB_RUN_ID_FILE, RunDir, atomic_write_text

if TYPE_CHECKING:
    import wandb
    from typing_extensions import Self

WANDB_MODES = ("auto", "online", "offline", "disabled")
RUN_ID_FILE = WANDB_RUN_ID_FILE
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INSPECT_TIMEOUT_S = 120


class WandbWarning(RuntimeWarning):
    """W&B failed; logging goes on to the local JSONL files only."""


def to_python(value: Any) -> Any:
    """Plain Python (float, int, str, list, dict) from tensors, numpy values and containers."""
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays/scalars: a CPU sync point
        return to_python(value.tolist())
    return str(value)


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """Apply ``leaf`` to every non-container value of nested dicts and lists."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_leaves(v, leaf) for v in value]
    return leaf(value)


def _encode_nonfinite(value: Any) -> Any:
    """NaN/±inf floats as W&B spells them, so that the JSON is valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode_nonfinite(value: Any) -> Any:
    """Inverse of :func:`_encode_nonfinite`."""
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, non-finite strings back as floats; a torn last line is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(_map_leaves(json.loads(line), _decode_nonfinite))
        except json.JSONDecodeError:
            continue
    return records


class JsonlWriter:
    """Appends one JSON object per line to a file, flushed at every write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line (tensors and numpy values become Python numbers)."""
        line = json.dumps(_map_leaves(to_python(record), _encode_nonfinite), allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()

    def truncate_after_step(self, step: int) -> int:
        """Drop the lines with ``step > step`` (and torn lines); return how many were dropped.

        Used on resume: what was logged after the checkpoint is logged again.
        """
        self._file.close()
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _step_of(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        return len(lines) - len(kept)

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()


def _step_of(line: str) -> float:
    """The ``step`` of a JSONL line; infinite when the line is torn or has none."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


@dataclass(frozen=True)
class WandbOptions:
    """What ``wandb.init`` gets besides the config; mirrors the ``logger`` config group."""

    mode: str = "auto"  # auto | online | offline | disabled; the WANDB_MODE env var wins
    project: str = "dmtune"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = "train"
    tags: tuple[str, ...] = ()
    name: str | None = None


def wandb_logged_in() -> bool:
    """Whether W&B credentials are configured (env, netrc, settings file), without network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # the lookup `wandb.api.api_key` (deprecated) and `wandb.init` do, minus the prompt
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        return bool(wbauth.read_netrc_auth(host=settings.base_url) or settings.api_key)
    except Exception:  # noqa: BLE001 - a broken netrc means "not logged in"
        return False


def resolve_wandb_mode(mode: str) -> str:
    """The W&B mode to run in: ``WANDB_MODE`` if set, else ``auto`` -> online iff logged in."""
    if env_mode := os.environ.get("WANDB_MODE"):
        return env_mode
    if mode not in WANDB_MODES:
        raise ValueError(f"W&B mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "auto":
        return "online" if wandb_logged_in() else "offline"
    return mode


def _warn(what: str, error: BaseException) -> None:
    warnings.warn(
        f"W&B {what} failed ({type(error).__name__}: {error}); logging to local JSONL only.",
        WandbWarning,
        stacklevel=3,
    )


def init_wandb(
    run_dir: str | Path, options: WandbOptions, config: Mapping[str, Any] | None = None
) -> wandb.Run | None:
    """Start (or resume) the W&B run of ``run_dir``; ``None`` when disabled or on failure.

    The run id lives in ``run_dir/wandb_run_id.txt``, so a resumed run reuses it.
    """
    try:
        mode = resolve_wandb_mode(options.mode)
        if mode == "disabled":
            return None
        import wandb

        quiet = wandb.Settings(silent=True, console="off")
        wandb.setup(settings=quiet)  # also silences the credential messages before init's own
        id_file = Path(run_dir) / RUN_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else None
        run = wandb.init(
            project=options.project,
            entity=options.entity,
            group=options.group,
            job_type=options.job_type,
            tags=list(options.tags),
            name=options.name,
            config=to_python(config or {}),
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=mode,
            reinit="create_new",  # several runs per process (tests, in-process sweeps)
            settings=quiet,
        )
        id_file.write_text(run.id + "\n", encoding="utf-8")
        return run
    except Exception as error:  # noqa: BLE001 - W&B must never stop training
        _warn("init", error)
        return None


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
        path = self.run_dir.summary
        previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        merged = {**previous, **values}
        atomic_write_text(path, json.dumps(_map_leaves(merged, _encode_nonfinite), indent=2) + "\n")

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


class WandbSink:
    """A W&B run (offline or online); any W&B failure warns once and turns this sink off."""

    def __init__(
        self, run_dir: str | Path, options: WandbOptions, config: Mapping[str, Any] | None = None
    ) -> None:
        self.run = init_wandb(run_dir, options, config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._call("log", lambda run: run.log(metrics, step=step))

    def log_samples(self, rows: list[dict[str, Any]], step: int, key: str = "samples") -> None:
        """The rows as a ``wandb.Table`` under ``key``; W&B merges it into the history row of
        ``step``, so it must come before the next step's ``log``."""
        if not rows:
            return
        columns = list(dict.fromkeys(column for row in rows for column in row))

        def log_table(run: wandb.Run) -> None:
            import wandb

            data = [[row.get(column) for column in columns] for row in rows]
            run.log(
                {key: wandb.Table(columns=columns, data=data, allow_mixed_types=True)}, step=step
            )

        self._call("table", log_table)

    def summary(self, values: dict[str, Any]) -> None:
        self._call("summary", lambda run: run.summary.update(values))

    def close(self) -> None:
        self._call("finish", lambda run: run.finish())
        self.run = None

    def _call(self, what: str, call: Callable[[wandb.Run], object]) -> None:
        """Run ``call(run)``; on any error warn once and go on without W&B."""
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            self.run = None
            _warn(what, error)


class RunLogger:
    """The one object the loop logs through: it converts values once and fans out to its sinks.

    ``RunLogger.open(run_dir, wandb_options)`` is the usual pair (JSONL, then W&B when options
    are given); :func:`dmtune.build.build_logger` builds the sinks a config names.
    """

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

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
            sinks.append(WandbSink(run_dir, wandb_options, config))
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


def _natural_key(path: Path) -> list[Any]:
    """Sort key putting ``...-id`` before ``...-id-1`` before ``...-id-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.parent.name)]


def read_offline_history(path: str | Path) -> list[dict[str, Any]]:
    """History rows of the local W&B run logs under ``path``, in logging order.

    ``path`` is a run dir, a ``wandb/`` dir, one W&B run dir or a ``.wandb`` file. Each
    ``.wandb`` transaction log (offline runs, and the local copy of online ones; a resumed run
    has one per segment) is read with ``wandb leet inspect --json``. Rows hold the logged keys
    plus ``_step``, ``_runtime``, ``_timestamp``; nested values such as tables are flattened
    with dots (``samples._type``); non-finite values come back as floats.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        base = path / "wandb" if (path / "wandb").is_dir() else path
        files = sorted(base.glob("*run-*/run-*.wandb"), key=_natural_key) or sorted(
            base.glob("run-*.wandb")
        )
    rows = []
    for file in files:
        out = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(file)],
            capture_output=True,
            text=True,
            check=True,
            timeout=_INSPECT_TIMEOUT_S,
        ).stdout
        for line in out.splitlines():
            record = json.loads(line)
            if record.get("type") == "history":
                rows.append(_map_leaves(record["history"]["item"], _decode_nonfinite))
    return rows
