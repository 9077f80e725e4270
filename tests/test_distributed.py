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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_take_the_one_process_step_on_the_whole_batch(tmp_path, strategy):
    """Every objective setting, one prompt and several (CDPG), pointwise and distributional:
    2 ranks × 12 samples give 1 process × 24's gradients, update, log Ẑ, baselines and
    metrics, and the same KL-adaptive swap decision (float64 toy); with FSDP, each rank holding
    half of the weights, gradients and optimizer state."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb c\nd d\n")
    out = tmp_path / "diff.json"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "ddp_step.py"), str(out), str(prompts), strategy],
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
        if strategy == "fsdp":  # each rank holds about half (uneven rows: up to one row more)
            assert all(0.4 < share < 0.6 for share in result["held"]), (case, result["held"])
        else:
            assert result["held"] == [1.0, 1.0], case
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
    # each rank drew its own samples: their sampling streams differ...
    first, second = (rngs["generator"] for rngs in state["rank_rngs"])
    assert not torch.equal(first, second)
    # ...and so do the samples (the logged rows of a step: 8 of rank 0's, then 8 of rank 1's)
    tables = {}
    for row in read_jsonl(ddp_run / "samples.jsonl"):
        tables.setdefault(row["step"], []).append(row["text"])
    assert tables and all(texts[:8] != texts[8:16] for texts in tables.values())


def test_each_rank_draws_its_own_stream_and_rank_0_the_single_process_one():
    """A CPU generator reads only the low 32 bits of its seed: rank seeds must differ there."""
    import torch

    from dmtune.distributed import rank_seed

    def draws(seed: int) -> tuple[float, ...]:
        return tuple(torch.rand(4, generator=torch.Generator().manual_seed(seed)).tolist())

    streams = {draws(rank_seed(seed, rank)) for seed in range(3) for rank in range(4)}
    assert len(streams) == 12
    assert all(rank_seed(seed, 0) == seed for seed in range(3))


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


# the tiny prior, 2 samples per rank: each rank's longest sample, hence its number of decode
# steps, differs (rank 0 / rank 1: 16 / 18 tokens at step 1, 32 / 11 at step 2)
TINY_2 = ["device.num_processes=2", "device.threads=1", "train.batch_size=4",
          "train.fit_samples=8", "train.micro_batch_size=1",
          "train.eval_every=2", "train.checkpoint_every=2", "logger=none"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, Path]:
    """4 steps of the same run with DDP and with FSDP; FSDP again stopped after 2 and resumed."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {name: root / name for name in ("ddp", "fsdp", "resumed")}
    for name, args in (
        ("ddp", ["device=ddp", "train.steps=4"]),
        ("fsdp", ["device=fsdp", "train.steps=4"]),
        ("resumed", ["device=fsdp", "train.steps=2"]),
    ):
        done = _dmtune(*TINY_2, *args, f"hydra.run.dir={runs[name]}")
        assert done.returncode == 0, (name, done.stderr[-3000:])
    resumed = _dmtune(f"resume={runs['resumed']}", "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return runs


def test_an_fsdp_run_takes_the_ddp_runs_steps(fsdp_runs):
    """The same samples on each rank (its own RNG stream), the same whole-batch step: sharding
    changes where the weights live, not the run (float32: summation order aside). Ranks whose
    samples end at different lengths sample from the gathered network, not block by block."""
    ddp = read_jsonl(fsdp_runs["ddp"] / "metrics.jsonl")
    fsdp = read_jsonl(fsdp_runs["fsdp"] / "metrics.jsonl")
    assert [row["step"] for row in fsdp] == [row["step"] for row in ddp] == list(range(5))
    for expected, got in zip(_without_perf(ddp), _without_perf(fsdp)):
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            if isinstance(value, float):
                # float32: a KL is a mean of differences of ~60-nat log-probs (resolution 4e-6)
                assert got[key] == pytest.approx(value, rel=1e-4, abs=2e-5), (expected["step"], key)
            else:
                assert got[key] == value, key


def test_an_fsdp_run_resumes_exactly_and_saves_whole_tensors(fsdp_runs):
    import torch
    from transformers import AutoModelForCausalLM

    got = _without_perf(read_jsonl(fsdp_runs["resumed"] / "metrics.jsonl"))
    assert got == _without_perf(read_jsonl(fsdp_runs["fsdp"] / "metrics.jsonl"))
    state = torch.load(fsdp_runs["fsdp"] / "checkpoints" / "last.pt", weights_only=True)
    assert state["sharded"] and state["world_size"] == 2
    # whole tensors, as a single process's checkpoint holds: the AdamW moments of a weight
    # have its shape, and policy/ (a plain transformers model) holds the checkpoint's weights
    policy = AutoModelForCausalLM.from_pretrained(fsdp_runs["fsdp"] / "policy")
    assert type(policy).__name__ == "GPT2LMHeadModel"
    weights = policy.state_dict()
    for name, tensor in state["policy"].items():
        assert torch.equal(weights[name], tensor), name
    moments = state["optimizer"]["state"]["transformer.h.0.attn.c_attn.weight"]["exp_avg"]
    assert moments.shape == weights["transformer.h.0.attn.c_attn.weight"].shape
