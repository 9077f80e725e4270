"""Run logging against real wandb in offline mode, read back from the run's ``.wandb`` log."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dmtune.jsonl import JsonlWriter, read_jsonl, to_python
from dmtune.loggers import JsonlSink, RunLogger
from dmtune.rundir import RunDir
from dmtune.wandb_log import read_offline_history
from dmtune.wandb_sink import RUN_ID_FILE, WandbOptions, resolve_wandb_mode

OFFLINE = WandbOptions(mode="offline", project="dmtune-test", group="g", tags=("unit",))
CONFIG = {"objective": {"name": "dpg", "lr": 1e-3}, "seed": 0}
# What the trainer would log, as tensors and numpy values; NaN and inf on purpose.
STEPS = {
    0: {"train/loss": torch.tensor(1.5), "divergence/kl_target_policy": np.float32(0.25)},
    1: {"train/loss": 1.25, "divergence/kl_target_policy": math.nan, "target/ess": math.inf},
    2: {"train/loss": torch.tensor(0.5, requires_grad=True), "divergence/kl_target_policy": 0.125},
}
SAMPLES = [{"text": "a happy day", "sentiment": 0.8}, {"text": "rain", "sentiment": -0.2}]


def _isolate_wandb(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Keep wandb's files under ``root`` and away from any real account."""
    mp.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(root / var.lower()))
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.setenv("NETRC", str(root / "no-netrc"))


@pytest.fixture(autouse=True)
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_wandb(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One offline run, shared: three steps, a samples table and a summary."""
    root = tmp_path_factory.mktemp("offline")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_wandb(mp, root)
        with RunLogger.open(root / "run", OFFLINE, config=CONFIG) as logger:
            for step, metrics in STEPS.items():
                logger.log({**metrics, "samples_seen": 4 * (step + 1)}, step=step)
            logger.log_samples(SAMPLES, step=2)
            logger.summary({"final/kl": 0.1})
    yield root / "run"


def _same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b)


def _assert_logged(row: dict[str, Any], step: int) -> None:
    for key, value in to_python(STEPS[step]).items():
        assert _same(row[key], value), (step, key, row[key], value)


def test_metrics_jsonl_holds_every_step(offline_run: Path) -> None:
    rows = read_jsonl(offline_run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert [row["samples_seen"] for row in rows] == [4, 8, 12]
    for row in rows:
        _assert_logged(row, row["step"])


def test_jsonl_is_strict_json(offline_run: Path) -> None:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    lines = (offline_run / "metrics.jsonl").read_text().splitlines()
    second = json.loads(lines[1], parse_constant=refuse)
    assert second["divergence/kl_target_policy"] == "NaN"
    assert second["target/ess"] == "Infinity"


def test_wandb_history_matches_what_was_logged(offline_run: Path) -> None:
    history = read_offline_history(offline_run)
    assert [row["_step"] for row in history] == [0, 1, 2]
    for row in history:
        _assert_logged(row, row["_step"])
        assert row["samples_seen"] == 4 * (row["_step"] + 1)
    # the table is merged into step 2's row, not a history row of its own
    assert history[2]["samples._type"] == "table-file"
    assert (history[2]["samples.nrows"], history[2]["samples.ncols"]) == (2, 3)  # + step


def test_samples_table_and_jsonl(offline_run: Path) -> None:
    assert read_jsonl(offline_run / "samples.jsonl") == [{"step": 2, **row} for row in SAMPLES]
    (table_file,) = (offline_run / "wandb").glob("offline-run-*/files/media/table/samples_*.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "text", "sentiment"]
    assert table["data"] == [[2, row["text"], row["sentiment"]] for row in SAMPLES]


def test_config_tags_and_summary_reach_wandb(offline_run: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json"]
        + [str(next((offline_run / "wandb").glob("offline-run-*/run-*.wandb")))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    summary = json.loads(out)
    run_id = (offline_run / RUN_ID_FILE).read_text().strip()
    assert (summary["run_id"], summary["project"], summary["tags"]) == (
        run_id,
        "dmtune-test",
        ["unit"],
    )
    assert summary["config"]["objective"] == CONFIG["objective"]
    assert summary["summary"]["final/kl"] == 0.1
    assert json.loads((offline_run / "summary.json").read_text()) == {"final/kl": 0.1}


def test_resume_reuses_run_id_and_sends_wandb_no_step_twice(
    offline_run: Path, tmp_path: Path
) -> None:
    run_dir = shutil.copytree(offline_run, tmp_path / "run")
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    with RunLogger.open(run_dir, OFFLINE, config=CONFIG, resume_step=1) as logger:
        assert logger.wandb_run is not None and logger.wandb_run.id == run_id
        assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1]
        assert read_jsonl(run_dir / "samples.jsonl") == []
        logger.log({**STEPS[2], "samples_seen": 12}, step=2)  # recomputed: W&B has it already
        logger.log({"train/loss": 0.25, "samples_seen": 16}, step=3)
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(seg.name.split("-")[3] == run_id for seg in segments)
    history = read_offline_history(run_dir)
    assert [row["_step"] for row in history] == [0, 1, 2, 3]
    assert history[-1]["train/loss"] == 0.25


def test_resume_sends_wandb_the_steps_its_log_lost(tmp_path: Path) -> None:
    """A SIGKILL loses what W&B still buffered: the resumed run sends those steps (and their
    samples) from the run dir, then carries on."""
    run_dir = tmp_path / "run"
    with RunLogger.open(run_dir, OFFLINE, config=CONFIG) as logger:
        for step in (0, 1):
            logger.log({**STEPS[step], "samples_seen": 4 * (step + 1)}, step=step)
    with RunLogger([JsonlSink(RunDir(run_dir))]) as lost:  # in metrics.jsonl, lost by W&B
        lost.log_samples(SAMPLES, step=2)
        lost.log({**STEPS[2], "samples_seen": 12}, step=2)
    with RunLogger.open(run_dir, OFFLINE, config=CONFIG, resume_step=2) as logger:
        logger.log({"train/loss": 0.25, "samples_seen": 16}, step=3)
    history = read_offline_history(run_dir)
    local = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["_step"] for row in history] == [row["step"] for row in local] == [0, 1, 2, 3]
    for row, line in zip(history, local):
        assert all(_same(row[key], value) for key, value in line.items() if key != "step")
    assert (history[2]["samples._type"], history[2]["samples.nrows"]) == ("table-file", 2)


def test_disabled_writes_no_wandb_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    with RunLogger.open(tmp_path / "run", WandbOptions(mode="disabled")) as logger:
        logger.log({"train/loss": 1.0}, step=0)
        logger.log_samples(SAMPLES, step=0)
    assert logger.wandb_run is None
    assert not (tmp_path / "run" / "wandb").exists()
    assert not (tmp_path / "run" / RUN_ID_FILE).exists()
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == [{"step": 0, "train/loss": 1.0}]


def _problems(logger: RunLogger) -> list[str]:
    return [line for line in logger.notes() if "failed" in line or "did not" in line]


def test_wandb_init_failure_is_one_line_and_jsonl_carries_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("a file where wandb wants its directory")
    logger = RunLogger.open(run_dir, OFFLINE)
    with logger:
        assert logger.wandb_run is None
        logger.log({"train/loss": 1.0}, step=0)
        logger.log_samples(SAMPLES, step=0)
    problems = _problems(logger)
    assert len(problems) == 1 and problems[0].startswith("W&B init failed (")
    assert "\n" not in problems[0]
    assert read_jsonl(run_dir / "metrics.jsonl") == [{"step": 0, "train/loss": 1.0}]


def test_invalid_wandb_mode_env_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with RunLogger.open(tmp_path / "run", OFFLINE) as logger:
        logger.log({"train/loss": 1.0}, step=0)
    assert [p.split(" (")[0] for p in _problems(logger)] == ["W&B init failed"]
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1


def test_wandb_failure_mid_run_is_one_line_with_the_sync_command(tmp_path: Path) -> None:
    logger = RunLogger.open(tmp_path / "run", OFFLINE)
    logger.log({"train/loss": 1.0}, step=0)
    assert logger.wandb_run is not None
    where = logger.new_notes()
    assert len(where) == 1 and where[0].startswith("W&B (offline): wandb sync ")
    logger.wandb_run.finish()  # the W&B run dies under the trainer: log() now raises
    logger.log({"train/loss": 0.5}, step=1)
    logger.log({"train/loss": 0.25}, step=2)
    logger.close()
    problems = _problems(logger)
    assert len(problems) == 1 and problems[0].startswith("W&B log failed (")
    assert "wandb sync " in problems[0] and logger.new_notes() == problems  # shown once
    losses = [row["train/loss"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert losses == [1.0, 0.5, 0.25]


def test_tags_fit_wandb_and_nested_summaries_are_flat() -> None:
    from dmtune.wandb_sink import flatten, short_tag

    assert short_tag("/data/models/" + "x" * 80 + "/smollm2-135m") == "smollm2-135m"
    assert len(short_tag("y" * 100)) == 64 and short_tag("gpt2") == "gpt2"
    assert flatten({"final": {"constraint/positive": 0.5}, "steps": 3}) == {
        "final/constraint/positive": 0.5, "steps": 3,
    }


def test_auto_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("disabled") == "disabled"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the env var wins
    assert resolve_wandb_mode("online") == "offline"
    with pytest.raises(ValueError):
        monkeypatch.delenv("WANDB_MODE")
        resolve_wandb_mode("onlin")


def test_jsonl_truncate_after_step(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path / "m.jsonl")
    for step in range(5):
        writer.write({"step": step, "x": np.float64(step) / 2})
    writer.close()
    with (tmp_path / "m.jsonl").open("a") as file:
        file.write('{"step": 5, "x": ')  # a line torn by a crash
    writer = JsonlWriter(tmp_path / "m.jsonl")
    assert writer.truncate_after_step(2) == 3
    writer.write({"step": 3, "x": torch.tensor([1.0, 2.0])})
    writer.close()
    assert read_jsonl(tmp_path / "m.jsonl") == [
        {"step": 0, "x": 0.0},
        {"step": 1, "x": 0.5},
        {"step": 2, "x": 1.0},
        {"step": 3, "x": [1.0, 2.0]},
    ]
