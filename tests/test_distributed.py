"""Data-parallel training on CPU: two gloo processes, as a GPU run would use two GPUs.

Each multi-process run has a timeout: a hang fails the test instead of eating CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmtune.jsonl import read_jsonl

HERE = Path(__file__).parent
TIMEOUT_S = 300
# the toy, batch 16 split over 2 ranks, W&B off; one thread each (2 processes on 2 cores)
TOY_DDP = ["experiment=toy", "device=ddp", "device.num_processes=2", "device.threads=1",
           "train.batch_size=16", "train.fit_samples=256", "logger=none"]
KILL_WITHIN_S = 60


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _dmtune(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmtune", "train", *args],
        capture_output=True, text=True, timeout=timeout, env=_env(),
    )


def _without_perf(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def test_two_ranks_take_the_one_process_step_on_the_whole_batch(tmp_path):
    """Every objective setting, one prompt and several (CDPG), pointwise and distributional:
    2 ranks × 12 samples give 1 process × 24's gradients, update, log Ẑ, baselines and
    metrics, and the same KL-adaptive swap decision (float64 toy)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb c\nd d\n")
    out = tmp_path / "diff.json"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "ddp_step.py"), str(out), str(prompts)],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(),
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 36
    for case, result in results.items():
        assert result["moved"] > 1e-3, case  # the step moves the policy (lr 1e-2)...
        assert result["param_diff"] < 1e-9, case  # ...and both steps move it alike
        assert result["grad_diff"] < 1e-9, case
        worst = max(result["metric_diff"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-9, (case, worst)
        assert result["samples_seen"] == [24, 24], case
        assert result["swap"][0] == result["swap"][1], case
    assert any(r["swap"] == [1.0, 1.0] for r in results.values())  # a swap was decided alike


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """A 2-process run, uninterrupted: 12 steps, a checkpoint every 5; started by ``torchrun``
    (dmtune joins its group; rank 0 names the run dir), where the other tests start theirs
    through dmtune's own launcher."""
    cwd = tmp_path_factory.mktemp("ddp")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "dmtune", "train", *TOY_DDP, "train.steps=12", "train.checkpoint_every=5"],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(), cwd=cwd,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("run dir:") == 1  # rank 0 speaks for both
    (run_dir,) = (cwd / "outputs").glob("*/*")  # one run dir: rank 1 used rank 0's
    return run_dir


def test_a_two_process_run_writes_one_run_dir_counting_both_ranks(ddp_run):
    rows = read_jsonl(ddp_run / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(13))  # one line per step, rank 0's
    assert [row["samples_seen"] for row in rows] == [16 * step for step in range(13)]
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["samples_seen"] == 192 and summary["steps"] == 12
    assert (ddp_run / "policy" / "config.json").is_file()
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["last.pt"]
    import torch

    state = torch.load(ddp_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rank_rngs"]) == 2
    # each rank drew its own samples: their sampling streams differ
    first, second = (rngs["generator"] for rngs in state["rank_rngs"])
    assert not torch.equal(first, second)


def test_a_killed_rank_stops_the_run_in_one_line_and_resume_equals_the_uninterrupted_run(
    ddp_run, tmp_path
):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "dmtune", "train", *TOY_DDP, "train.steps=100000",
         "train.checkpoint_every=5", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _steps_logged(run_dir, 7):  # past the first checkpoint (step 5)
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
        os.kill(_rank_pid(process.pid, rank=1), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = process.communicate(timeout=KILL_WITHIN_S)
        waited = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert waited < KILL_WITHIN_S
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1"), stderr[-3000:]
    assert "SIGKILL" in lines[0] and f"resume={run_dir}" in lines[0]

    resumed = _dmtune(f"resume={run_dir}", "train.steps=12")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _without_perf(read_jsonl(run_dir / "metrics.jsonl"))
    expected = _without_perf(read_jsonl(ddp_run / "metrics.jsonl"))
    assert [row["step"] for row in got] == list(range(13))
    assert got == expected


def _steps_logged(run_dir: Path, n: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and path.read_text().count("\n") > n


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the worker with ``RANK=rank`` among the launcher's descendants."""
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children += [int(c) for c in text]
    return children + [d for c in children for d in _descendants(c)]


def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    """What SLURM sends at a time limit: the agent passes it on, the ranks agree on a last step,
    rank 0 checkpoints it, and the run says how to resume (exit 130)."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "dmtune", "train", *TOY_DDP, "train.steps=100000",
         f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _steps_logged(run_dir, 4):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=KILL_WITHIN_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    import torch

    last = read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == last
    assert stderr.strip().splitlines() == [
        f"stopped at step {last}; checkpoint saved; resume with: dmtune train resume={run_dir}"
    ]
