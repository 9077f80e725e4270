"""Sweeps beyond a local grid: Optuna search, submitit (SLURM) launching, W&B sweep configs."""

from __future__ import annotations

import itertools

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from typer.testing import CliRunner
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from dmtune.cli import app
from dmtune.config import register_configs
from dmtune.jsonl import read_jsonl
from dmtune.overrides import CONF_DIR

runner = CliRunner()
TOY = ["experiment=toy", "train.fit_samples=64", "logger=none", "device.threads=1"]
METRIC = "exact/kl_target_policy"


def _run_dirs(root):
    return sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file())


def test_optuna_searches_a_log_interval_and_reports_the_best_trial(tmp_path):
    pytest.importorskip("optuna")
    result = runner.invoke(app, [
        "sweep", *TOY, "train.steps=20", "hydra/sweeper=optuna", f"hydra.sweeper.metric={METRIC}",
        "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=3",
        "train.lr=tag(log,interval(1e-4,1e-2))", f"hydra.sweep.dir={tmp_path}",
    ])
    assert result.exit_code == 0, result.output
    results = OmegaConf.to_container(OmegaConf.load(tmp_path / "optimization_results.yaml"))
    runs = _run_dirs(tmp_path)
    assert len(runs) == len(results["trials"]) == 3
    for run, trial in zip(runs, results["trials"]):
        lr = OmegaConf.load(run / ".hydra" / "config.yaml").train.lr
        assert trial["state"] == "COMPLETE" and lr == pytest.approx(trial["params"]["train.lr"])
        assert 1e-4 <= lr <= 1e-2
        # the trial's value is the run's own figure: the mean of its last logged values
        logged = [m[METRIC] for m in read_jsonl(run / "metrics.jsonl")[-10:] if METRIC in m]
        assert trial["value"] == pytest.approx(sum(logged) / len(logged))
    assert len({t["params"]["train.lr"] for t in results["trials"]}) == 3
    assert results["best_value"] == min(t["value"] for t in results["trials"])


def test_optuna_settings_fail_in_one_line(tmp_path):
    pytest.importorskip("optuna")
    base = ["sweep", *TOY, "train.steps=2", "hydra/sweeper=optuna", "train.lr=interval(1e-4,1e-2)"]
    result = runner.invoke(app, [*base, f"hydra.sweep.dir={tmp_path / 'a'}"])
    assert result.exit_code == 2 and "needs a metric to optimise" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    # a metric no run logs: the first trial shows the valid names, and its run dir is kept
    result = runner.invoke(app, [
        *base, "hydra.sweeper.metric=constraint/nope", "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'b'}",
    ])
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "constraint/nope" in errors[0]
        and "valid: constraint/has_b" in errors[0]
    )
    assert len(_run_dirs(tmp_path / "b")) == 1


def test_an_interval_needs_a_searching_sweeper(tmp_path):
    result = runner.invoke(
        app, ["sweep", *TOY, "train.lr=interval(1e-4,1e-2)", f"hydra.sweep.dir={tmp_path}"]
    )
    assert result.exit_code == 2 and "add hydra/sweeper=optuna" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_submitit_launches_the_jobs_of_a_sweep(tmp_path):
    """The SLURM launcher's own machinery (submitit), with its local executor: jobs run in
    subprocesses."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = runner.invoke(app, [
        "sweep", *TOY, "train.steps=3", "seed=0,1", "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={tmp_path}",
    ])
    assert result.exit_code == 0, result.output
    runs = _run_dirs(tmp_path)
    assert [p.name for p in runs] == ["0_dpg_baseline_seed0", "1_dpg_baseline_seed1"]
    assert all([m["step"] for m in read_jsonl(p / "metrics.jsonl")] == [0, 1, 2, 3] for p in runs)
    assert len({OmegaConf.load(p / ".hydra" / "config.yaml").logger.sweep for p in runs}) == 1
    # each job went through submitit
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 2


def _compose_with_hydra(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_the_slurm_launcher_config_points_at_a_partition():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose_with_hydra(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "size=paper"]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)
    assert (cfg.model.name_or_path, cfg.device.name) == ("gpt2", "cuda")


def test_a_wandb_sweep_config_runs_the_same_jobs_through_the_agents_command(tmp_path):
    path = tmp_path / "sweep.yaml"
    result = runner.invoke(app, [
        "sweep", "--wandb-yaml", str(path), "--metric", METRIC, "--goal", "minimize",
        *TOY, "train.steps=2", "objective=dpg,kl_control", "seed=range(0,2)",
        "hydra/launcher=joblib",
    ])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(path.read_text())
    assert config["method"] == "grid" and config["metric"] == {"name": METRIC, "goal": "minimize"}
    assert config["parameters"] == {
        "objective": {"values": ["dpg", "kl_control"]}, "seed": {"values": [0, 1]}
    }
    assert config["command"] == [
        "${env}", "dmtune", "train", *TOY, "train.steps=2", "${args_no_hyphens}"
    ]
    # one grid point as a W&B agent formats it (W&B's own code), run through the CLI
    grid = list(itertools.product(*(p["values"] for p in config["parameters"].values())))
    assert len(grid) == 4
    point = dict(zip(config["parameters"], grid[-1]))
    args = create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in point.items()}}
    )["args_no_hyphens"]
    assert args == ["objective=kl_control", "seed=1"]
    command = config["command"][2:-1] + args + [f"hydra.run.dir={tmp_path / 'run'}"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    cfg = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert (cfg.objective.name, cfg.seed, cfg.train.steps) == ("kl_control", 1, 2)


def test_wandb_sweep_configs_search_intervals_and_refuse_what_wandb_cannot_do(tmp_path):
    path = tmp_path / "sweep.yaml"
    result = runner.invoke(app, [
        "sweep", "--wandb-yaml", str(path), "--metric", "constraint/positive",
        "train.lr=tag(log,interval(1e-5,1e-3))",
    ])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(path.read_text())
    assert config["method"] == "bayes"
    assert config["parameters"]["train.lr"] == {
        "distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3
    }
    result = runner.invoke(app, [
        "sweep", "--wandb-yaml", str(tmp_path / "b.yaml"), "--method", "grid",
        "train.lr=interval(1e-5,1e-3)",
    ])
    assert result.exit_code == 2 and "grid cannot search an interval" in result.stderr
    result = runner.invoke(app, [
        "sweep", "--wandb-yaml", str(tmp_path / "c.yaml"), "--method", "bayes", "seed=0,1"
    ])
    assert result.exit_code == 2 and "bayes needs a metric" in result.stderr
    assert not (tmp_path / "b.yaml").exists() and not (tmp_path / "c.yaml").exists()


def test_a_data_parallel_job_under_submitit_starts_its_own_process_group(tmp_path):
    """What a SLURM job holding N GPUs runs: the job (a submitit subprocess here) starts
    device.num_processes ranks itself; one run dir counts every rank's samples."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = runner.invoke(app, [
        "sweep", *TOY, "train.steps=3", "train.batch_size=16", "seed=0", "device=ddp",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
        f"hydra.sweep.dir={tmp_path}",
    ])
    assert result.exit_code == 0, result.output
    (run,) = _run_dirs(tmp_path)
    assert [m["samples_seen"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 16, 32, 48]
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 1
    import torch

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rank_rngs"]) == 2  # two ranks sampled


def test_the_slurm_launcher_composes_a_several_gpu_job():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                               "device=ddp", "device.name=cuda", "device.num_processes=4",
                               "size=paper"])
    assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.tasks_per_node) == (4, 1)
    assert (cfg.device.name, cfg.device.num_processes, cfg.device.strategy) == ("cuda", 4, "ddp")
