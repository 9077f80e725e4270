"""SIGKILL a training run at random moments, resume it each time, and compare with an unbroken run.

    python benchmarks/kill_resume.py --kills 20          # ~2 min on 2 CPU cores

Runs the exact toy (checkpoint every step) once straight through, then again under ``--kills``
SIGKILLs at random moments (during loading, calibration, steps, checkpoint writes), resuming
with ``dmtune train resume=RUN_DIR`` after each. Prints the tally: kills that landed, checkpoints
that loaded after each kill, and whether the final metrics.jsonl equals the unbroken run's on
every key but ``perf/*``. Exit code 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmtune.checkpoint import CheckpointError, load_checkpoint
from dmtune.jsonl import read_jsonl
from dmtune.rundir import RunDir

ARGS = [
    "experiment=toy", "train.steps=300", "train.batch_size=16", "train.fit_samples=256",
    "train.checkpoint_every=1", "device.threads=1", "logger=none",
]
TIMEOUT_S = 300
RESULTS = Path(__file__).parent / "results" / "kill_resume.json"


def _dmtune(args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "dmtune", "train", *args]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _without_perf(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-delay", type=float, default=6.0, help="seconds after a start before the kill"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="dmtune-kill-"))
    straight, killed = RunDir(root / "straight"), RunDir(root / "killed")
    if _dmtune([*ARGS, f"hydra.run.dir={straight.path}"]).wait(TIMEOUT_S) != 0:
        print("the unbroken run failed")
        return 1
    landed, loaded, unreadable, starts = 0, 0, 0, 0
    started = time.perf_counter()
    while True:
        first = [*ARGS, f"hydra.run.dir={killed.path}"]
        process = _dmtune(first if starts == 0 else [f"resume={killed.path}"])
        starts += 1
        if landed < args.kills:
            time.sleep(rng.uniform(0.5, args.max_delay))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                landed += 1
        _, stderr = process.communicate(timeout=TIMEOUT_S)
        if process.returncode not in (0, -signal.SIGKILL):
            print(f"start {starts} failed (exit {process.returncode}): {stderr.strip()[-300:]}")
            return 1
        if process.returncode == -signal.SIGKILL and killed.checkpoint.is_file():
            try:
                load_checkpoint(killed.checkpoint)
                loaded += 1
            except CheckpointError as error:
                unreadable += 1
                print(f"kill {landed}: {error}")
        if process.returncode == 0:
            break
    same = _without_perf(read_jsonl(killed.metrics)) == _without_perf(read_jsonl(straight.metrics))
    report = {
        "kills_landed": landed, "starts": starts, "checkpoints_loaded_after_a_kill": loaded,
        "checkpoints_unreadable": unreadable, "metrics_equal_to_unbroken_run": same,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": ARGS, "kills_asked": args.kills, **report}
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if same and unreadable == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
