"""Faults and untrusted input: malicious run dirs, divergence, collisions, disk full, kill -9."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmtune import checkpoint
from dmtune.cli import app
from dmtune.jsonl import read_jsonl
from dmtune.priors import TINY_PRIOR_DIR
from dmtune.wandb_log import read_offline_history

runner = CliRunner()
needs_tiny = pytest.mark.skipif(
    not (TINY_PRIOR_DIR / "model.safetensors").is_file(), reason="embedded prior not built"
)
SMOKE = ["experiment=smoke", "device.threads=1", "logger=none"]
TOY = ["experiment=toy", "train.steps=4", "train.batch_size=16", "train.fit_samples=256",
       "device.threads=1", "logger=none"]
SUBPROCESS_TIMEOUT_S = 300


def dmtune(*args: str):
    return runner.invoke(app, list(args))


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _without_perf(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


# --- untrusted run dirs ---


class _Marker:
    """Unpickling this creates a file: what a malicious checkpoint would do with os.system."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    result = dmtune("train", *TOY, f"hydra.run.dir={run_dir}")
    assert result.exit_code == 0, result.output
    return run_dir


def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(toy_run, tmp_path):
    run_dir = tmp_path / "shared"
    subprocess.run(["cp", "-r", str(toy_run), str(run_dir)], check=True)
    marker = tmp_path / "pwned"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    state["payload"] = _Marker(marker)
    torch.save(state, run_dir / "checkpoints" / "last.pt")
    for args in (("sample", str(run_dir), "-n", "2"),
                 ("eval", str(run_dir), "-n", "16", "--wandb", "disabled"),
                 ("train", f"resume={run_dir}")):
        result = dmtune(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "refused" in _one_error_line(result)
        assert not marker.exists(), args


def test_a_run_killed_while_hydra_rewrote_its_files_still_resumes(toy_run, tmp_path):
    """Each resume has Hydra rewrite .hydra/ in place: a kill then can leave hydra.yaml empty
    (found by the random-SIGKILL test below)."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(toy_run), str(run_dir)], check=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text("")
    result = dmtune("train", f"resume={run_dir}", "train.steps=5")
    assert result.exit_code == 0, result.output
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 5


def test_a_genuine_checkpoint_resumes_bit_identically(toy_run, tmp_path):
    more = [*TOY[:1], "train.steps=6", *TOY[2:]]
    straight = tmp_path / "straight"
    assert dmtune("train", *more, f"hydra.run.dir={straight}").exit_code == 0
    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(toy_run), str(resumed)], check=True)
    result = dmtune("train", f"resume={resumed}", "train.steps=6")
    assert result.exit_code == 0, result.output
    resumed_rows = read_jsonl(resumed / "metrics.jsonl")
    straight_rows = read_jsonl(straight / "metrics.jsonl")
    steps = [row["step"] for row in resumed_rows]
    assert steps == [row["step"] for row in straight_rows] == list(range(7))
    for a, b in zip(_without_perf(resumed_rows), _without_perf(straight_rows)):
        # step 4 ended the first run: it also logged its end-of-run extras (self-BLEU, exact)
        assert {k: a[k] for k in a.keys() & b.keys()} == {k: b[k] for k in a.keys() & b.keys()}


# --- numerical faults ---


@needs_tiny
def test_divergence_is_skipped_counted_and_stops_the_run_in_one_line(tmp_path):
    run_dir = tmp_path / "diverged"
    result = dmtune("train", *SMOKE, "train.lr=1e4", "train.steps=20", "train.max_bad_steps=3",
                    f"hydra.run.dir={run_dir}")
    assert result.exit_code == 3, result.output
    line = _one_error_line(result)
    assert "train.lr" in line and "non-finite" in line
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # valid JSON throughout, NaN spelt as a string
    skipped = [row["train/skipped_steps"] for row in rows[1:]]
    assert skipped == sorted(skipped) and skipped[-1] == 3 and skipped[0] == 0
    assert len(rows) - 1 < 20  # it stopped
    state = checkpoint.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["policy"].values())
    assert state["step"] == rows[-1]["step"]


# --- run dirs ---


@needs_tiny
def test_two_runs_started_together_get_their_own_run_dirs(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "dmtune", "train", *SMOKE, "train.steps=2"]
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert process.returncode == 0, stderr
    run_dirs = sorted(p.parent for p in (tmp_path / "outputs").rglob("metrics.jsonl"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]


# --- disk full ---


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_what_was_written(
    tmp_path, monkeypatch
):
    run_dir = tmp_path / "full"
    real_save = torch.save
    calls = {"n": 0}

    def save_until_the_disk_fills(obj, file, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the first checkpoint fits, the second does not
            file.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    result = dmtune("train", *TOY, "train.checkpoint_every=2", f"hydra.run.dir={run_dir}")
    assert result.exit_code == 2, result.output
    assert "No space left on device" in _one_error_line(result)
    state = checkpoint.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 2
    # no partial file
    assert list((run_dir / "checkpoints").iterdir()) == [run_dir / "checkpoints" / "last.pt"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3, 4]


# --- kill -9 ---


def _kill_and_resume(run_dir: Path, args: list[str], rng: random.Random, kills: int) -> int:
    """SIGKILL a run at random moments, resuming it each time; the number of kills that landed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    landed = 0
    for attempt in range(kills + 1):
        # a kill before the run wrote its config (while Python loads) leaves nothing to resume:
        # start it again, as a user would
        started = (run_dir / ".hydra" / "overrides.yaml").exists()
        command = [
            sys.executable, "-m", "dmtune", "train", *([f"resume={run_dir}"] if started else args)
        ]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if attempt < kills:
            _wait_for_a_moment(process, run_dir / "metrics.jsonl", rng, first=attempt == 0)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                landed += 1
        _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert process.returncode in (0, -signal.SIGKILL), stderr
        if process.returncode == 0:
            break
    return landed


def _wait_for_a_moment(
    process: subprocess.Popen, metrics: Path, rng: random.Random, first: bool
) -> None:
    """Until a random moment of the run, by its progress rather than the clock (a fast machine
    finishes the toy in seconds): the first kill while Python loads or calibrates, later ones
    1-8 steps past what is logged, at a random point of the next step (a checkpoint write
    included)."""
    if first:
        time.sleep(rng.uniform(0.5, 2.5))  # importing torch alone takes ~2 s
        return
    target = _lines(metrics) + rng.randint(1, 8)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while _lines(metrics) < target and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.2))


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path):
    args = [*TOY[:1], "train.steps=40", *TOY[2:], "train.checkpoint_every=1"]
    straight = tmp_path / "straight"
    assert dmtune("train", *args, f"hydra.run.dir={straight}").exit_code == 0
    run_dir = tmp_path / "killed"
    landed = _kill_and_resume(
        run_dir, [*args, f"hydra.run.dir={run_dir}"], random.Random(0), kills=3
    )
    assert landed == 3
    assert _without_perf(read_jsonl(run_dir / "metrics.jsonl")) == _without_perf(
        read_jsonl(straight / "metrics.jsonl")
    )


def test_sigkill_then_resume_gives_wandb_each_step_once_as_in_metrics_jsonl(tmp_path, monkeypatch):
    """W&B loses what it still buffered at a SIGKILL, and keeps what it wrote: the resumed run
    sends it exactly the steps it lacks, with the run dir's values."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "killed"
    args = [*TOY[:1], "train.steps=60", *TOY[2:-1], "train.checkpoint_every=30",
            "train.eval_every=5", "logger=wandb", f"hydra.run.dir={run_dir}"]
    # its own W&B service: one inherited from this process (WANDB_SERVICE) outlives the kill
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    process = subprocess.Popen([sys.executable, "-m", "dmtune", "train", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 45):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = read_jsonl(metrics)[-1]["step"]
    assert killed_at < 60 and checkpoint.load_checkpoint(run_dir / "checkpoints" / "last.pt")

    result = dmtune("train", f"resume={run_dir}")
    assert result.exit_code == 0, result.output
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # one log per attempt
    history, local = read_offline_history(run_dir), read_jsonl(metrics)
    assert [row["_step"] for row in history] == [row["step"] for row in local] == list(range(61))
    for row, line in zip(history, _without_perf(local)):  # perf/: the recomputed steps' timings
        assert {k: row[k] for k in line if k != "step"} == {k: v for k, v in line.items()
                                                             if k != "step"}, line["step"]
    assert sum("samples._type" in row for row in history) == 12  # every sample table, once


@needs_tiny
def test_the_smoke_experiment_calibrates_for_any_seed(tmp_path):
    result = dmtune("sweep", "experiment=smoke", "seed=0,1,2", "train.steps=1", "device.threads=1",
                    "logger=none", f"hydra.sweep.dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 3
