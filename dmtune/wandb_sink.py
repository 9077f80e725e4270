"""The W&B sink: a W&B run (offline or online) beside the run dir's own files.

:class:`WandbSink` adds a W&B run (``wandb/`` and ``wandb_run_id.txt``, so that a resumed run
continues the same W&B run and gives it each step once) when ``logger.sinks`` names it. A W&B
failure never stops training: W&B's own waits (init, finish) are bounded by
``logger.timeout_s``, and a failure turns the sink off with one line
(:attr:`WandbSink.problem`) that the run's summary shows, with the ``wandb sync`` command that
uploads the local copy later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmtune.jsonl import read_jsonl, to_python
from dmtune.metrics import SAMPLES_SEEN as SAMPLES_SEEN_KEY
from dmtune.rundir import WANDB_RUN_ID_FILE, RunDir
from dmtune.wandb_log import last_step, log_files

if TYPE_CHECKING:
    import wandb

WANDB_MODES = ("auto", "online", "offline", "disabled")
WANDB_TAG_MAX = 64  # W&B refuses a run whose tag is longer
WANDB_GROUP_MAX = 128
WANDB_ARTIFACT_NAME_MAX = 128  # W&B's limit; '/' and ':' are not allowed either
MODEL_ARTIFACT_TYPE = "model"
WHERE_ONLINE, WHERE_OFFLINE = "W&B run: ", "W&B (offline): "  # the lines saying where a run is
RUN_ID_FILE = WANDB_RUN_ID_FILE


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
    timeout_s: float = 60.0  # the longest W&B may make init or finish wait


def short_tag(tag: str) -> str:
    """A W&B tag (1–64 characters): a path becomes its last part, a long name is cut."""
    tag = str(tag).rstrip("/")
    if "/" in tag and len(tag) > WANDB_TAG_MAX:
        tag = tag.rsplit("/", 1)[1]
    return tag if len(tag) <= WANDB_TAG_MAX else tag[: WANDB_TAG_MAX - 1] + "…"


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


def _one_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def init_wandb(
    run_dir: str | Path, options: WandbOptions, config: Mapping[str, Any] | None = None
) -> wandb.Run | None:
    """Start (or resume) the W&B run of ``run_dir``; ``None`` when disabled. Raises on failure.

    The run id lives in ``run_dir/wandb_run_id.txt``, so a resumed run reuses it. Every metric
    is plotted against ``samples_seen`` (runs with different batch sizes compare).
    """
    mode = resolve_wandb_mode(options.mode)
    if mode == "disabled":
        return None
    import wandb

    settings = wandb.Settings(
        silent=True,
        console="off",
        init_timeout=options.timeout_s,
        finish_timeout=options.timeout_s,
        finish_timeout_raises=True,
    )
    wandb.setup(settings=settings)  # also silences the credential messages before init's own
    id_file = Path(run_dir) / RUN_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else None
    run = wandb.init(
        project=options.project,
        entity=options.entity,
        group=options.group,
        job_type=options.job_type,
        tags=list(dict.fromkeys(short_tag(t) for t in options.tags if str(t))),
        name=options.name,
        config=to_python(config or {}),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=mode,
        reinit="create_new",  # several runs per process (tests, in-process sweeps)
        settings=settings,
    )
    id_file.write_text(run.id + "\n", encoding="utf-8")
    run.define_metric(SAMPLES_SEEN_KEY)
    run.define_metric("*", step_metric=SAMPLES_SEEN_KEY)
    return run


def sync_command(run: wandb.Run) -> str:
    """The command that uploads a run's local copy (``wandb/run-*`` or ``offline-run-*``)."""
    local = Path(run.dir).parent  # run.dir is <that dir>/files
    online = "--include-online " if not run.offline else ""
    return f"wandb sync {online}{local}"


def last_step_before(run: wandb.Run, run_dir: RunDir) -> int:
    """The last step W&B has of ``run`` from before this process (−1: none): online, the step
    before W&B's own resume point (``run.starting_step``: the server's last step + 1); offline,
    the last step in the run's earlier local logs (``wandb sync`` uploads exactly those)."""
    if not run.offline:
        return run.starting_step - 1
    current = Path(run.dir).parent  # this process's log dir
    return last_step([f for f in log_files(run_dir.path, run.id) if f.parent != current])


def model_artifact_name(run_id: str) -> str:
    """``model-<W&B run id>``: one name per run, the same after a resume, within W&B's rules."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"model-{run_id}")[:WANDB_ARTIFACT_NAME_MAX]


def _model_artifact(
    path: Path, name: str, metadata: Mapping[str, Any] | None = None, copy: bool = True
) -> wandb.Artifact:
    """A draft model artifact of the files under ``path``; ``copy=False`` keeps W&B from
    staging a copy (the files are read where they are when it uploads them)."""
    import wandb

    artifact = wandb.Artifact(name, type=MODEL_ARTIFACT_TYPE, metadata=dict(metadata or {}))
    artifact.add_dir(str(path), policy="mutable" if copy else "immutable")
    return artifact


class WandbSink:
    """A W&B run (offline or online). Any W&B failure turns this sink off and is kept as one
    line in :attr:`problem`; :attr:`where` says where the run can be seen or how to upload it.

    resume_step: on resume, the checkpoint's step. W&B keeps every step it was given and a
    SIGKILL loses the tail of its buffer, so the resumed run first sends W&B the steps up to the
    checkpoint that W&B lacks (from ``metrics.jsonl`` and ``samples.jsonl``), then only the
    steps after the last one W&B has: each step reaches W&B once, with the run dir's values.
    """

    def __init__(
        self,
        run_dir: str | Path,
        options: WandbOptions,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.options = options
        self.problem: str | None = None
        self.where: str | None = None
        self.has_through = -1  # W&B already has every step up to this one (resume)
        self.model: str | None = None  # the model artifact this run logged or used, one line
        try:
            self.run = init_wandb(run_dir, options, config)
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            self.run = None
            self.problem = f"W&B init failed ({_one_line(error)}); this run is only in its run dir"
        if self.run is not None:
            url = self.run.url if not self.run.offline else None
            offline = f"{WHERE_OFFLINE}{sync_command(self.run)}"
            self.where = f"{WHERE_ONLINE}{url}" if url else offline
        if resume_step is not None:
            self._call("resume", lambda run: self._catch_up(run, RunDir(run_dir), resume_step))

    def _catch_up(self, run: wandb.Run, run_dir: RunDir, resume_step: int) -> None:
        """Send W&B the logged steps up to ``resume_step`` it lacks, samples before metrics as
        when they were logged, and skip from then on every step W&B has."""
        last = last_step_before(run, run_dir)
        samples: dict[int, list[dict[str, Any]]] = {}
        for row in read_jsonl(run_dir.samples) if run_dir.samples.is_file() else []:
            samples.setdefault(row.pop("step"), []).append(row)
        for row in read_jsonl(run_dir.metrics) if run_dir.metrics.is_file() else []:
            step = row.pop("step")
            if last < step <= resume_step:
                self.log_samples(samples.get(step, []), step)
                self.log(row, step)
        self.has_through = max(last, resume_step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if step > self.has_through:
            self._call("log", lambda run: run.log(metrics, step=step))

    def log_samples(self, rows: list[dict[str, Any]], step: int, key: str = "samples") -> None:
        """The rows as a ``wandb.Table`` under ``key``; W&B merges it into the history row of
        ``step``, so it must come before the next step's ``log``."""
        if not rows or step <= self.has_through:
            return
        columns = list(dict.fromkeys(column for row in rows for column in row))

        columns = ["step", *(c for c in columns if c != "step")]

        def log_table(run: wandb.Run) -> None:
            import wandb

            data = [[row.get(column, step) for column in columns] for row in rows]
            run.log(
                {key: wandb.Table(columns=columns, data=data, allow_mixed_types=True)}, step=step
            )

        self._call("table", log_table)

    def log_model(self, path: Path, metadata: Mapping[str, Any]) -> dict[str, Any] | None:
        """Log the files under ``path`` as this run's model artifact; its name, version (online,
        once W&B has it within ``timeout_s``; offline, ``wandb sync`` assigns it) and digest,
        or None when W&B is off or failed."""
        logged: dict[str, Any] = {}

        def log(run: wandb.Run) -> None:
            artifact = run.log_artifact(
                _model_artifact(path, model_artifact_name(run.id), metadata)
            )
            logged.update(name=artifact.name, version=None, digest=artifact.digest)
            if not run.offline:
                try:
                    logged["version"] = artifact.wait(timeout=self.options.timeout_s).version
                except Exception:  # noqa: BLE001 - still uploading: finish waits for it
                    pass
            if logged["version"]:
                version = f":{logged['version']}"
            elif run.offline:
                version = " (its version is assigned by wandb sync)"
            else:
                version = f" (its version was not known within {self.options.timeout_s:g} s)"
            self.model = f"W&B model artifact: {logged['name']}{version}, of {path}"

        self._call("model artifact", log)
        return logged or None

    def use_model(self, path: Path, logged: Mapping[str, Any]) -> None:
        """Declare the model artifact ``logged`` (:meth:`log_model`'s record) as this run's
        input: W&B's lineage from the training run to this one.

        ``Run.use_artifact`` refuses offline runs and waits without bound on a draft artifact;
        what it does with one — log it with ``use_after_commit`` — works offline too (recorded
        in the local log, sent by ``wandb sync``) and is what this does. W&B keeps one version
        per content, so the draft rebuilt from ``path`` is the version the training run logged;
        when ``path`` no longer matches its digest, one line says so and nothing is declared.
        A failure here is one line and leaves the run's logging on."""
        if self.run is None:
            return
        try:
            artifact = _model_artifact(path, logged["name"], copy=False)
            if artifact.digest != logged["digest"]:
                self.model = (
                    f"W&B: {path} changed since it was logged as {logged['name']}; "
                    "this run does not declare it as its input"
                )
                return
            self.run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
            self.model = f"W&B input: model artifact {logged['name']} ({path})"
        except Exception as error:  # noqa: BLE001 - lineage is a nicety; the figures matter
            self.model = f"W&B could not declare {logged['name']} as input ({_one_line(error)})"

    def summary(self, values: dict[str, Any]) -> None:
        """Nested dicts flattened: ``{"final": {"a/b": 1}}`` is ``final/a/b`` (W&B's panels and
        sweeps read flat keys)."""
        self._call("summary", lambda run: run.summary.update(flatten(values)))

    def close(self) -> None:
        """Finish the W&B run, waiting at most ``timeout_s`` for the server (idempotent)."""
        if self.run is None:
            return
        run, self.run = self.run, None
        sync = sync_command(run)
        try:
            run.finish()
        except TimeoutError:
            self.problem = (
                f"W&B did not receive the end of the run (no answer in "
                f"{self.options.timeout_s:g} s); upload the local copy with: {sync}"
            )
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            self.problem = f"W&B finish failed ({_one_line(error)}); upload with: {sync}"

    def _call(self, what: str, call: Callable[[wandb.Run], object]) -> None:
        """Run ``call(run)``; on any error keep one line and go on without W&B."""
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            run, self.run = self.run, None
            self.problem = (
                f"W&B {what} failed ({_one_line(error)}); W&B logging stopped there, the run dir "
                f"has every step; upload the local copy later with: {sync_command(run)}"
            )
            try:
                run.finish()
            except Exception:  # noqa: BLE001 - already failing: the line above says so
                pass


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """One level of keys: nested dicts joined with ``/``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
