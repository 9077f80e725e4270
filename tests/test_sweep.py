"""`dmtune sweep`: Hydra multirun with its real launchers, one W&B group per sweep."""

from __future__ import annotations

import json

from omegaconf import OmegaConf
from typer.testing import CliRunner

from dmtune.build import default_group
from dmtune.cli import app
from dmtune.jsonl import read_jsonl
from dmtune.rundir import RunDir

runner = CliRunner()
TOY = ["experiment=toy", "train.fit_samples=64", "logger=none", "device.threads=1"]


def test_a_2x2_sweep_writes_four_run_dirs_grouped_by_objective(tmp_path):
    result = runner.invoke(app, [
        "sweep", *TOY, "objective=dpg,dpg_baseline", "seed=0,1", "train.steps=3",
        f"hydra.sweep.dir={tmp_path}",
    ])
    assert result.exit_code == 0, result.output
    # each job says which it is, and a table of the jobs closes the sweep
    said = [line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("job ")]
    assert said == ["job 1/4", "job 2/4", "job 3/4", "job 4/4"]
    table = result.stdout[result.stdout.index("\njob "):].splitlines()
    assert [row.split()[0] for row in table[2:6]] == [
        "0_dpg_seed0", "1_dpg_seed1", "2_dpg_baseline_seed0", "3_dpg_baseline_seed1"
    ]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [
        "0_dpg_seed0", "1_dpg_seed1", "2_dpg_baseline_seed0", "3_dpg_baseline_seed1"
    ]
    configs = [OmegaConf.load(p / ".hydra" / "config.yaml") for p in jobs]
    assert [(c.objective.name, c.seed) for c in configs] == [
        ("dpg", 0), ("dpg", 1), ("dpg_baseline", 0), ("dpg_baseline", 1)
    ]
    assert len({c.logger.sweep for c in configs}) == 1 and configs[0].logger.sweep.startswith(
        "sweep_"
    )
    # W&B groups: the jobs that differ only in their seed
    groups = [default_group(c, RunDir(p).saved_overrides()) for c, p in zip(configs, jobs)]
    assert groups[0] == groups[1] != groups[2] == groups[3]
    assert groups[0].startswith("toy:dpg,") and groups[2].startswith("toy:dpg_baseline,")
    histories = [read_jsonl(p / "metrics.jsonl") for p in jobs]
    assert all([m["step"] for m in h] == [0, 1, 2, 3] for h in histories)
    assert histories[0][1]["train/loss"] != histories[1][1]["train/loss"]  # the seeds differ


def test_the_joblib_launcher_runs_jobs_in_parallel(tmp_path):
    result = runner.invoke(app, [
        "sweep", *TOY[:-1], "seed=0,1", "train.steps=150", "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}",
    ])
    assert result.exit_code == 0, result.output
    summaries = [
        json.loads((p / "summary.json").read_text()) for p in sorted(tmp_path.glob("*_seed*"))
    ]
    assert len(summaries) == 2
    (start_a, end_a), (start_b, end_b) = [(s["started_at"], s["finished_at"]) for s in summaries]
    assert start_a < end_b and start_b < end_a  # their training loops overlapped in time
    assert all(
        OmegaConf.load(p / ".hydra" / "config.yaml").device.threads == 1
        for p in tmp_path.glob("*_seed*")
    )


def test_a_typo_in_any_swept_value_fails_before_any_job(tmp_path):
    result = runner.invoke(
        app, ["sweep", *TOY, "objective=dpg,dpgg", f"hydra.sweep.dir={tmp_path}"]
    )
    assert result.exit_code == 2
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip()]
        and "objective=dpgg is not an option" in result.stderr
    )
    assert not any(tmp_path.iterdir())
    result = runner.invoke(app, ["sweep", *TOY, "model=glob(zz*)"])
    assert (
        result.exit_code == 2
        and "selects nothing; options of model: gpt2, smollm2, tiny, toy"
        in result.stderr
    )
