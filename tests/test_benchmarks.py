"""The benchmarks' smoke modes: the scripts a user runs for the README's figures still run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_smoke_prints_every_row_with_consistent_ratios(tmp_path, capsys):
    out = tmp_path / "step_time.json"
    result = _load("step_time").main(["--smoke", "--out", str(out)])
    seconds = result["seconds"]
    for row in ("HF generate", "naive fwd/bwd", "naive floor", "dmtune sample",
                "dmtune step (micro-batch 64)", "  sample", "  score", "  update",
                "dmtune step (one pass)"):
        assert seconds[row] > 0 and math.isfinite(seconds[row]), row
    assert math.isclose(seconds["naive floor"], seconds["HF generate"] + seconds["naive fwd/bwd"])
    assert math.isclose(result["vs_floor"]["naive floor"], 1.0)
    assert json.loads(out.read_text())["seconds"] == seconds
    assert "| dmtune sample |" in capsys.readouterr().out


def test_step_time_trl_rloo_row_takes_the_same_batch_when_trl_is_installed(tmp_path):
    pytest.importorskip("trl")  # not a dependency of dmtune: benchmarks/trl_rloo.py says how
    result = _load("step_time").main(["--smoke", "--out", str(tmp_path / "step_time.json")])
    seconds, settings = result["seconds"], result["trl_rloo"]
    assert seconds["TRL RLOO step"] > 0 and settings["steps_timed"] == 1
    assert (settings["num_generations"], settings["max_completion_length"]) == (16, 4)
    assert settings["beta"] == 0.05 and settings["gradient_checkpointing"] is False
    assert math.isclose(
        result["dmtune_step_vs_trl_rloo"],
        seconds["dmtune step (micro-batch 64)"] / seconds["TRL RLOO step"],
    )


def test_step_memory_smoke_measures_each_micro_batch_in_its_own_process(tmp_path):
    out = tmp_path / "memory.json"
    result = _load("step_time").main(["--smoke", "--memory", "0,4", "--out", str(out)])
    assert set(result["peak_mib"]) == {0, 4} and all(v > 0 for v in result["peak_mib"].values())


def test_scaling_smoke_runs_two_processes(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    result = _load("scaling").main(["--smoke", "--out", str(out), "--processes", "2",
                                    "--strategies", "ddp,fsdp", "--override", "device.threads=1"])
    rows = {row["strategy"]: row for row in result["rows"]}
    assert set(rows) == {"ddp", "fsdp"}
    for row in rows.values():
        assert row["processes"] == 2
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_mib"] > 0
        assert math.isclose(row["samples_per_s"], 16 / row["step_s"])
    # an FSDP rank holds about half of the training state a DDP rank holds
    assert 0.4 < rows["fsdp"]["state_mib"] / rows["ddp"]["state_mib"] < 0.6
    assert json.loads(out.read_text())["rows"] == result["rows"]
    shown = capsys.readouterr().out
    assert "| 2 | ddp | - |" in shown and "| 2 | fsdp | - |" in shown
