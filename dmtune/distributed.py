"""Data-parallel training: one run over several processes (accelerate's DDP, or torch's FSDP).

Each rank samples ``batch_size / world_size`` sequences and scores them; every per-sample
number a step reduces over (log-probs, features, rewards, contexts, texts) is then gathered
from all ranks, in rank order, so the loss, the running ``log Ẑ``, baselines, λ fitting,
every estimator and the KL-adaptive swap decision are the whole batch's, computed identically
on every rank by the same code as a single-process step. Each rank backpropagates its own
samples, weighted by the whole batch's ``∂loss/∂log π``; DDP sums the gradients. Rank 0 owns
the run dir, the loggers and the checkpoints; each rank's sampling RNG is its own and saved.

With ``device.strategy=fsdp`` the weights, gradients and optimizer state are sharded over the
ranks instead (:mod:`dmtune.sharding`, one group per transformer block): the update gathers
one block at a time, and sampling and scoring gather one whole network for their no-grad
forward passes. Checkpoints and ``policy/`` hold whole tensors, as a single process writes
them.

Processes come from torch's elastic launcher (what ``torchrun`` and ``accelerate launch`` run):
``dmtune train device=ddp`` starts ``device.num_processes`` workers itself, and a run started
under ``torchrun`` or ``accelerate launch`` joins the group they made. A rank that dies stops
the others (the launcher's agent ends them) and the run fails with one line.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from dmtune import sharding

# ddp: each rank holds the whole weights; fsdp: each holds 1/N of weights, gradients, optimizer
STRATEGIES = ("ddp", "fsdp")
# what the elastic launcher (torchrun, accelerate launch, dmtune itself) sets in each worker
WORLD_SIZE_ENV = "WORLD_SIZE"


class RankFailedError(RuntimeError):
    """A worker of a data-parallel run died or failed; the others were stopped."""


@dataclass
class World:
    """This process's place in a data-parallel run (rank 0 of 1 when there is none)."""

    rank: int = 0
    size: int = 1
    accelerator: Any = None  # accelerate.Accelerator when size > 1
    strategy: str = "ddp"
    _mesh: Any = field(default=None, repr=False)  # FSDP's device mesh, made at the first shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the weights are split over the ranks (FSDP) rather than copied (DDP)."""
        return self.size > 1 and self.strategy == "fsdp"

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator is not None else None

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` in rank order (tensors come back on the CPU)."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(values, moved(value, "cpu"))
        return values

    def first(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` run on rank 0 alone, its value (or its exception) on every rank."""
        if self.size == 1:
            return compute()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = (compute(), None)
            except Exception as error:  # every rank raises it
                box[0] = (None, error)
        torch.distributed.broadcast_object_list(box, src=0)
        value, error = box[0]
        if error is not None:
            raise error
        return value

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the update's forward/backward runs (DDP around ``model``; a sharded model
        is its own)."""
        if self.size == 1 or sharding.is_sharded(model):
            return model
        return self.accelerator.prepare_model(model)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` split over this world's ranks (:func:`dmtune.sharding.shard`)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.size,))
        return sharding.shard(model, self._mesh)

    def all(self, value: bool) -> bool:
        """Whether ``value`` holds on every rank."""
        return all(self.gather(bool(value)))


def moved(value: Any, device: torch.device | str) -> Any:
    """``value`` (tensors, or dataclasses, dicts, lists and tuples of them) with its tensors on
    ``device``. What is gathered goes through the CPU: a CUDA tensor unpickled on another rank
    would land on the sender's GPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: moved(getattr(value, f.name), device) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **fields)
    return value


def launched() -> bool:
    """Whether this process is one rank of several (started by an elastic launcher)."""
    return int(os.environ.get(WORLD_SIZE_ENV, "1")) > 1


def rank_seed(seed: int, rank: int) -> int:
    """Rank ``r``'s sampling seed: the run's seed on rank 0 (a single process is rank 0), a
    distinct stream on each other rank: a hash of (seed, rank) whose low 32 bits differ too,
    since a CPU generator (a Mersenne twister) reads only those (``seed + (rank << 32)`` gave
    every CPU rank the same samples)."""
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"dmtune rank seed {seed} {rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: manual_seed takes it


_joined: World | None = None  # this process's world once it joined a group (there is one)


def init(cfg: Any) -> World:
    """Join the process group the launcher set up (a single-process world when there is none);
    later calls return the same world."""
    global _joined
    if not launched():
        return World()
    if _joined is not None:
        return _joined
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    name = cfg.device.name
    cpu = name == "cpu" or (name == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.device.timeout_s))],
    )
    world = World(
        accelerator.process_index, accelerator.num_processes, accelerator, cfg.device.strategy
    )
    if world.size != cfg.device.num_processes:
        raise ValueError(
            f"the launcher started {world.size} processes but device.num_processes="
            f"{cfg.device.num_processes}; set device.num_processes={world.size}"
        )
    _joined = world
    # leave the group before the interpreter's teardown: a process group (with FSDP's mesh)
    # still alive then aborts the process ("terminate called without an active exception")
    atexit.register(_leave)
    return world


def _leave() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_world(state: dict[str, Any], world: World) -> None:
    """A checkpoint resumes exactly only on as many ranks as wrote it (one RNG per rank), and
    with the strategy that wrote it (a sharded run's optimizer state is keyed by name)."""
    saved = state.get("world_size", 1)
    if saved != world.size:
        raise ValueError(
            f"the checkpoint was written by {saved} process(es); resume it with "
            f"device.num_processes={saved} (now {world.size})"
        )
    sharded = state.get("sharded", False)
    if sharded != world.sharded:
        raise ValueError(
            f"the checkpoint was written with device.strategy={'fsdp' if sharded else 'ddp'}; "
            f"resume it with that strategy (now {world.strategy})"
        )


# --- the launcher side: dmtune train device=ddp ------------------------------------------


def launch(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """Run the training of ``run_dir`` (its config already written) on ``device.num_processes``
    workers through torch's elastic launcher; returns the run's summary.

    The agent watches the workers: when one dies or fails, it stops the others and this
    raises :class:`RankFailedError` (or exits with the failed rank's own code for the errors
    a worker already reported: bad input, divergence, a stop).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = int(cfg.device.num_processes)
    settings = {
        "min_nodes": 1,
        "max_nodes": 1,
        "nproc_per_node": n,
        "run_id": str(uuid.uuid4()),
        "rdzv_backend": "c10d",
        "rdzv_endpoint": "localhost:0",  # a free port, as torchrun --standalone
        "max_restarts": 0,
        "monitor_interval": 0.5,
        "shutdown_timeout": 60,  # after SIGTERM, a rank finishes its step and checkpoints
    }
    known = {f.name for f in dataclasses.fields(LaunchConfig)}  # shutdown_timeout: torch 2.6+
    config = LaunchConfig(**{k: v for k, v in settings.items() if k in known})
    env_threads = "OMP_NUM_THREADS" not in os.environ
    if env_threads:  # device.threads, or torchrun's rule: the cores shared between the workers
        threads = cfg.device.threads or max(1, (os.cpu_count() or 1) // n)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    # the agent's own reports (a page on failure, a line per signal); ours is one line
    quiet = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.distributed")
    ]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    started = time.time()
    try:
        elastic_launch(config, sys.executable)("-m", "dmtune.distributed", str(run_dir))
    except ChildFailedError as error:
        codes = {failure.exitcode for failure in error.failures.values()}
        if codes != {EXIT_STOPPED}:  # stopped by a signal: checkpointed, the summary says so
            raise _failure(error, run_dir) from None
    except SignalException as error:
        # Ctrl-C or SLURM's SIGTERM reached the launcher; the agent passed it to the workers,
        # which stopped after the same step and checkpointed (their summary says so)
        summary = _summary(run_dir)
        if summary is None or summary.get("finished_at", 0) < started:
            raise RankFailedError(
                f"stopped by {signal.Signals(error.sigval).name} before the workers saved "
                "anything; the last checkpoint is kept"
            ) from None
        return summary
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        if env_threads:
            del os.environ["OMP_NUM_THREADS"]
    return _summary(run_dir)


def _summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# exit codes a worker uses for what it has already reported in one line (dmtune.cli's)
EXIT_STOPPED = 130
REPORTED_EXITS = (2, 3)


def _failure(error: Any, run_dir: Path) -> BaseException:
    """One line for a failed group, naming the root cause: a rank killed by a signal before one
    that failed (a lost peer fails the others' collectives), before one the agent then stopped
    (SIGTERM); a failure a worker already reported keeps its exit code."""
    failures = error.failures.items()
    for _, failure in failures:
        if failure.exitcode in REPORTED_EXITS:
            return SystemExit(failure.exitcode)

    def cause(item: tuple[int, Any]) -> tuple[int, int]:
        rank, failure = item
        code = failure.exitcode
        return (2 if code == -signal.SIGTERM else 0 if code < 0 else 1), rank

    rank, failure = min(failures, key=cause)
    code = failure.exitcode
    if code < 0 and -code in signal.valid_signals():
        how = f"was killed by {signal.Signals(-code).name}"
    else:
        log = error_log(run_dir, rank)
        last = log.read_text(encoding="utf-8").strip().splitlines()[-1] if log.is_file() else ""
        how = f"failed ({last}; traceback in {log})" if last else f"exited with code {code}"
    return RankFailedError(
        f"rank {rank} (pid {failure.pid}) {how}; the other ranks were stopped; the last "
        f"checkpoint is kept (resume with: dmtune train resume={run_dir})"
    )


def error_log(run_dir: Path, rank: int) -> Path:
    """Where a rank's unexpected error goes (the launcher names it in its one line)."""
    return Path(run_dir) / "errors" / f"rank-{rank}.txt"


def _worker(run_dir: str) -> int:
    """One rank: join the group, train ``run_dir``'s config, report errors on rank 0 only."""
    from dmtune.cli import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USAGE, _first_line
    from dmtune.priors import PriorUnavailableError
    from dmtune.run import DivergenceError, train
    from dmtune.rundir import RunDir

    cfg = RunDir(Path(run_dir)).load_config()
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = train(cfg, Path(run_dir))
    except DivergenceError as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, OSError, PriorUnavailableError) as error:
        if rank == 0:
            print(f"error: {_first_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # a bug, or a rank that lost a peer: the launcher reports the root cause
        log = error_log(Path(run_dir), rank)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc(), encoding="utf-8")
        return 1
    return EXIT_INTERRUPTED if summary["stopped_by_signal"] is not None else 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
