"""The real CLI end to end: config composition, one-line errors, runs, W&B offline, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmtune.cli import app
from dmtune.jsonl import read_jsonl
from dmtune.objectives import OBJECTIVES
from dmtune.overrides import CONF_DIR
from dmtune.priors import TINY_PRIOR_DIR
from dmtune.wandb_log import read_offline_history

runner = CliRunner()
needs_tiny = pytest.mark.skipif(
    not (TINY_PRIOR_DIR / "model.safetensors").is_file(), reason="embedded prior not built"
)
SMOKE = ["experiment=smoke", "device.threads=1"]


def dmtune(*args: str):
    return runner.invoke(app, list(args))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group, option",
    [
        (g, o)
        for g in ("model", "constraint", "objective", "device", "logger", "experiment", "size")
        for o in _options(g)
    ],
)
def test_every_config_option_composes(group, option):
    result = dmtune("config", f"{group}={option}")
    assert result.exit_code == 0, result.output
    assert "objective:" in result.stdout and "train:" in result.stdout


def test_objective_configs_match_the_registry():
    assert set(_options("objective")) == set(OBJECTIVES)
    for name in OBJECTIVES:
        assert f"name: {name}\n" in dmtune("config", f"objective={name}").stdout


def test_constraints_compose_into_one_set():
    result = dmtune("config", "constraint=[sentiment,word]")
    assert result.exit_code == 0 and "positive:" in result.stdout and "word:" in result.stdout


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "objective=dpgg",
            "objective=dpgg is not an option of objective; valid: dpg, dpg_baseline, fdpg",
        ),
        ("train.stepz=3", "unknown key 'train.stepz'; valid keys of train: batch_size"),
        ("train.stepz=3", "(did you mean 'steps'?)"),
        ("objectiv=dpg", "(did you mean 'objective'?)"),
        ("train.steps=abc", "train.steps"),
        ("objective.beta=0.1", "objective.beta is set but dpg_baseline takes no beta"),
        (
            "constraint.features.positive.kind=sentimental",
            "is not a feature kind; valid: sentiment",
        ),
        ("device.name=tpu", "device.name='tpu'; valid: auto, cpu, cuda"),
        (
            "+constraint.features.positive.params.threshhold=0.3",
            "unknown 'threshhold' parameter(s); valid parameters: threshold",
        ),
    ],
)
def test_bad_overrides_fail_in_one_line_naming_the_choices(override, expected):
    result = dmtune("train", override)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]


def _run(tmp_path: Path, name: str, *overrides: str) -> Path:
    run_dir = tmp_path / name
    result = dmtune("train", *SMOKE, f"hydra.run.dir={run_dir}", *overrides)
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """One finished smoke run without W&B, trained once; a test that changes it takes a copy."""
    return _run(tmp_path_factory.mktemp("smoke"), "run", "logger=none")


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


@needs_tiny
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_runs_end_to_end_on_the_tiny_prior(tmp_path, objective):
    run_dir = _run(tmp_path, objective, f"objective={objective}", "logger.mode=offline")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert [m["samples_seen"] for m in metrics] == [0, 16, 32, 48, 64]
    assert (
        0 <= metrics[0]["constraint/positive"] <= 1
        and metrics[0]["divergence/kl_policy_prior"] == 0
    )
    for key in (
        "train/loss", "divergence/kl_target_policy", "divergence/kl_policy_prior",
        "perf/samples_per_s",
    ):
        assert all(key in m for m in metrics[1:]), key
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len(samples) == 8 and all(
        isinstance(s["text"], str) and "positive" in s for s in samples
    )
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (
        run_dir / "policy" / "model.safetensors"
    ).is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    history = {row["_step"]: row for row in read_offline_history(run_dir) if "train/loss" in row}
    assert sorted(history) == [1, 2, 3, 4]
    for m in metrics[1:]:
        assert history[m["step"]]["train/loss"] == pytest.approx(m["train/loss"], rel=1e-6)
        assert history[m["step"]]["divergence/kl_policy_prior"] == pytest.approx(
            m["divergence/kl_policy_prior"], rel=1e-6
        )


@needs_tiny
def test_sample_prints_scored_samples_and_a_corrupt_checkpoint_is_a_clear_error(
    smoke_run, tmp_path
):
    run_dir = _copy(smoke_run, tmp_path)
    result = dmtune("sample", str(run_dir), "-n", "3")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 3 and "positive=" in result.stdout
    # overrides as for eval: another device, or the samples scored by another constraint set
    result = dmtune("sample", str(run_dir), "-n", "2", "device=cpu", "constraint=word")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 2 and "positive=" not in result.stdout
    result = dmtune("sample", str(run_dir), "objective=dpg")
    assert result.exit_code == 2 and "the model, objective and seed are the run's" in result.stderr
    checkpoint = run_dir / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    for args in (("sample", str(run_dir)), ("train", f"resume={run_dir}")):
        result = dmtune(*args)
        assert result.exit_code == 2
        assert (
            result.stderr.strip().splitlines() == [result.stderr.strip()]
            and "corrupt or truncated" in result.stderr
        )
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # nothing written is lost


@needs_tiny
def test_resume_after_sigterm_reproduces_the_uninterrupted_run(tmp_path):
    steps = ["train.steps=10", "train.checkpoint_every=100", "logger=none"]
    straight = _run(tmp_path, "straight", *steps)

    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dmtune", "train", *SMOKE, *steps, f"hydra.run.dir={interrupted}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    metrics_file = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (
        not metrics_file.is_file() or len(metrics_file.read_text().splitlines()) < 4
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "resume with: dmtune train resume=" in stderr
    stopped_at = read_jsonl(metrics_file)[-1]["step"]
    assert 3 <= stopped_at < 10

    result = dmtune("train", f"resume={interrupted}")
    assert result.exit_code == 0, result.output
    resumed, reference = read_jsonl(metrics_file), read_jsonl(straight / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(11))
    for a, b in zip(reference, resumed):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == {
            k: v for k, v in b.items() if not k.startswith("perf/")
        }


def test_a_prior_that_cannot_be_loaded_is_one_line(tmp_path):
    result = dmtune(
        "train", f"model.name_or_path={tmp_path / 'nothing_here'}",
        f"hydra.run.dir={tmp_path / 'run'}", "logger=none",
    )
    assert result.exit_code == 2
    assert (
        result.stderr.strip().count("\n") == 0
        and "error: " in result.stderr
        and "nothing_here" in result.stderr
    )


def test_a_word_the_tokenizer_cannot_produce_is_one_line(tmp_path):
    result = dmtune(
        "train", "experiment=toy", "constraint=word", f"hydra.run.dir={tmp_path / 'run'}",
        "logger=none",
    )
    assert result.exit_code == 2
    assert (
        result.stderr.strip().count("\n") == 0
        and "'good' cannot be produced by the tokenizer" in result.stderr
    )


@needs_tiny
@pytest.mark.parametrize("option", _options("constraint"))
def test_every_constraint_option_builds_its_target_on_the_tiny_tokenizer(option):
    from transformers import AutoTokenizer

    from dmtune.build import build_target
    from dmtune.cli import compose_config
    from dmtune.priors import make_toy_tokenizer

    toy = option.startswith("toy")  # toy constraints name toy tokens
    cfg = compose_config([f"constraint={option}", *(["model=toy"] if toy else [])])
    tokenizer = make_toy_tokenizer() if toy else AutoTokenizer.from_pretrained(TINY_PRIOR_DIR)
    target = build_target(cfg, tokenizer)
    roles = {name: f.role for name, f in cfg.constraint.features.items()}
    assert [f.name for f in target.pointwise] == [n for n, r in roles.items() if r == "pointwise"]
    assert [f.name for f in target.distributional] == [
        n for n, r in roles.items() if r == "distributional"
    ]


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU"
)
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    result = dmtune(
        "train", "device=cuda", "experiment=toy", f"hydra.run.dir={tmp_path / 'run'}", "logger=none"
    )
    assert result.exit_code == 2 and "torch sees no CUDA GPU; use device=cpu" in result.stderr


@needs_tiny
def test_resuming_a_finished_run_changes_nothing(smoke_run, tmp_path):
    run_dir = _copy(smoke_run, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    result = dmtune("train", f"resume={run_dir}")
    assert result.exit_code == 0, result.output
    assert "4 steps" in result.stdout and "n/a" in result.stdout
    assert (run_dir / "metrics.jsonl").read_text() == before


PAPER_EXPERIMENTS = [o for o in _options("experiment") if o not in ("smoke", "toy")]


@needs_tiny
@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_every_paper_experiment_calibrates_and_steps_on_the_tiny_prior(tmp_path, experiment):
    run_dir = tmp_path / experiment
    result = dmtune(
        "train", f"experiment={experiment}", "train.steps=1", "train.batch_size=64",
        "train.fit_samples=1024", "device.threads=1", "logger=none", f"hydra.run.dir={run_dir}",
    )
    assert result.exit_code == 0, result.output
    calibration = json.loads((run_dir / "calibration.json").read_text())
    assert all(
        0 < v < 1
        for k, v in calibration["metrics"].items()
        if k.startswith("constraint/") and not k.endswith("_target")
    )
    # distributional: λ reaches the moments on the prior's samples
    if calibration["lambda_fit"] is not None:
        targets = [v for k, v in calibration["metrics"].items() if k.endswith("_target")]
        assert calibration["lambda_fit"]["achieved"] == pytest.approx(targets, abs=1e-3)


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_paper_experiments_sweep_only_the_objectives_that_apply(experiment):
    from hydra import compose, initialize_config_dir

    from dmtune.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    objectives = cfg.hydra.sweeper.params.objective.split(",")
    assert set(objectives) <= set(OBJECTIVES)
    distributional = any(f.role == "distributional" for f in cfg.constraint.features.values())
    assert ({"reinforce", "kl_control"} & set(objectives)) == (
        set() if distributional else {"reinforce", "kl_control"}
    )


def test_version_completion_and_config_as_json(monkeypatch):
    from dmtune import __version__

    result = dmtune("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"dmtune {__version__}"
    # Typer's own switch for tests: the shell is named, not detected from the parent processes
    # (a suite started without a shell above it detects none)
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = dmtune("--show-completion", "bash")
    assert result.exit_code == 0 and "complete" in result.stdout and "dmtune" in result.stdout
    result = dmtune("config", "--json", "experiment=toy")
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)
    assert config["model"]["name_or_path"] == "toy" and config["train"]["max_new_tokens"] == 4
    named = ["experiment=toy", "logger.name=${experiment_name}_run"]
    assert "name: ${experiment_name}_run" in dmtune("config", *named).stdout
    assert "name: toy_run" in dmtune("config", "--resolve", *named).stdout
