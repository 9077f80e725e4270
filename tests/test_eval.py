"""`dmtune eval`: every metric on fresh samples, within a few standard errors of the exact
values."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dmtune.cli import app
from dmtune.wandb_log import read_offline_history, read_offline_records

runner = CliRunner()
Z_SCORE = 4.0


@pytest.fixture(scope="module")
def trained_toy(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    result = runner.invoke(app, [
        "train", "experiment=toy", "train.steps=60", "logger=none", "device.threads=1",
        f"hydra.run.dir={run_dir}",
    ])
    assert result.exit_code == 0, result.output
    return run_dir


def test_eval_matches_the_exact_values_and_logs_an_eval_run(trained_toy):
    result = runner.invoke(app, ["eval", str(trained_toy), "-n", "4096", "--wandb", "offline"])
    assert result.exit_code == 0, result.output
    report = json.loads((trained_toy / "eval.json").read_text())
    metrics, errors = report["metrics"], report["standard_errors"]
    assert report["step"] == 60 and report["n"] == 4096
    for key in ("diversity/distinct_1", "diversity/distinct_2", "diversity/distinct_3",
                "diversity/self_bleu", "target/log_z", "target/ess"):
        assert key in metrics, key
    for key in ("divergence/kl_target_policy", "divergence/kl_policy_prior",
                "divergence/tv_target_policy", "diversity/entropy", "constraint/has_b"):
        exact = metrics[
            f"exact/{key.split('/', 1)[1]}" if not key.startswith("constraint") else f"exact/{key}"
        ]
        assert abs(metrics[key] - exact) < Z_SCORE * errors[key] + 1e-6, (
            key, metrics[key], errors[key], exact
        )
        assert errors[key] > 0
    # the W&B eval run: its own keys (eval/<metric>, eval/<metric>_se), its settings in its config
    (row,) = [row for row in read_offline_history(trained_toy / "eval") if row["_step"] == 60]
    for key, value in metrics.items():
        assert row[f"eval/{key}"] == pytest.approx(value), key
    for key, value in errors.items():
        assert row[f"eval/{key}_se"] == pytest.approx(value), key
    assert {k for k in row if not k.startswith("_")} == {
        "samples_seen", *(f"eval/{k}" for k in metrics), *(f"eval/{k}_se" for k in errors)
    }
    (run,) = read_offline_records(trained_toy / "eval", "run")
    assert run["run"]["config"]["update"]["eval"] == {
        "n": 4096, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 1234, "overrides": []
    }
    assert _model_artifacts(trained_toy / "eval") == []  # the run logged no model artifact


def test_eval_of_a_dir_that_is_not_a_run_is_one_line(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert (
        result.exit_code == 2
        and result.stderr.strip().count("\n") == 0
        and "is not a dmtune run dir" in result.stderr
    )


def test_eval_against_another_target_keeps_the_runs_own_evaluation(trained_toy):
    """`dmtune eval RUN_DIR OVERRIDES`: λ is fitted for the new target, exact values still match."""
    own = trained_toy / "eval.json"
    before = own.read_bytes() if own.is_file() else None
    overrides = [
        "constraint.features.has_b.role=distributional", "constraint.features.has_b.moment=0.5"
    ]
    result = runner.invoke(
        app, ["eval", str(trained_toy), "-n", "4096", "--wandb", "disabled", *overrides]
    )
    assert result.exit_code == 0, result.output
    written = sorted(trained_toy.glob("eval-constraint*.json"))
    assert len(written) == 1 and "moment=0.5" in written[0].name
    report = json.loads(written[0].read_text())
    metrics, errors = report["metrics"], report["standard_errors"]
    assert report["overrides"] == overrides
    # the distributional target, λ > 0 fitted: Z = E_a[exp(λ·φ)] > 1
    assert metrics["exact/log_z"] > 0
    for key in ("divergence/kl_target_policy", "divergence/tv_target_policy"):
        exact = metrics[f"exact/{key.split('/', 1)[1]}"]
        assert abs(metrics[key] - exact) < Z_SCORE * errors[key] + 1e-6, (
            key, metrics[key], errors[key], exact
        )
    # the policy was trained toward "always b", so it is far from the 50% target
    assert metrics["exact/kl_target_policy"] > 0.2
    assert (own.read_bytes() if own.is_file() else None) == before


def test_eval_overrides_fail_in_one_line(trained_toy):
    result = runner.invoke(app, ["eval", str(trained_toy), "constraint=toy_tokn"])
    assert (
        result.exit_code == 2
        and result.stderr.strip().count("\n") == 0
        and "did you mean 'toy_token'" in result.stderr
    )
    result = runner.invoke(app, ["eval", str(trained_toy), "objective=dpg"])
    assert result.exit_code == 2 and "the run's own policy" in result.stderr


def test_each_eval_setting_writes_its_own_report(trained_toy):
    """Another decoding is another setting: its own eval-*.json and log dir, nothing overwritten;
    another -n re-estimates the same setting."""
    own = trained_toy / "eval.json"
    before = own.read_bytes() if own.is_file() else None
    settings = {
        "eval-top_p=0.9": ["--top-p", "0.9"],
        "eval-temperature=0.5_top_k=3": ["--temperature", "0.5", "--top-k", "3"],
    }
    for name, options in settings.items():
        for n in ("128", "256"):
            result = runner.invoke(
                app, ["eval", str(trained_toy), "-n", n, "--wandb", "disabled", *options]
            )
            assert result.exit_code == 0, result.output
            assert result.output.strip().endswith(f"{name}.json")
    for name, options in settings.items():
        report = json.loads((trained_toy / f"{name}.json").read_text())
        decoding = dict(zip([o.lstrip("-").replace("-", "_") for o in options[::2]],
                            map(float, options[1::2])))
        assert {k: report["decoding"][k] for k in decoding} == decoding
        assert report["n"] == 256  # the second estimate of the setting replaced the first
        assert (trained_toy / name / "metrics.jsonl").is_file()
    assert (own.read_bytes() if own.is_file() else None) == before


def test_the_policy_is_a_model_artifact_and_eval_declares_it_as_its_input(tmp_path, monkeypatch):
    """logger.log_model=true: policy/ is a W&B model artifact named after the run, recorded in
    summary.json; `dmtune eval` of that checkpoint declares it as its input, offline too (the
    record `wandb sync` sends; W&B dedupes the draft to the logged version by its digest)."""
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # W&B's staging copies
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    run_dir = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "experiment=toy", "train.steps=3", "train.batch_size=16", "train.fit_samples=64",
        "device.threads=1", "logger=wandb", "logger.mode=offline", "logger.log_model=true",
        f"hydra.run.dir={run_dir}",
    ])
    assert result.exit_code == 0, result.output
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    summary = json.loads((run_dir / "summary.json").read_text())
    model = summary["model_artifact"]
    assert (model["name"], model["version"], model["step"]) == (f"model-{run_id}", None, 3)
    assert any(line.startswith(f"W&B model artifact: {model['name']}") for line in
               summary["logging"])
    (logged,) = _model_artifacts(run_dir)
    assert (logged["name"], logged["digest"]) == (model["name"], model["digest"])
    files = {entry["path"] for entry in logged["manifest"]["contents"]}
    assert {"config.json", "model.safetensors"} <= files
    assert files == {p.name for p in (run_dir / "policy").iterdir()}

    result = runner.invoke(app, ["eval", str(run_dir), "-n", "64", "--wandb", "offline"])
    assert result.exit_code == 0, result.output
    assert f"W&B input: model artifact model-{run_id}" in result.output
    (used,) = _model_artifacts(run_dir / "eval")
    assert used["use_after_commit"] is True and used["run_id"] != run_id  # the eval run's input
    assert (used["name"], used["digest"]) == (model["name"], model["digest"])

    # policy/ is no longer what was logged: no lineage claimed, one line says why
    (run_dir / "policy" / "generation_config.json").write_text("{}")
    result = runner.invoke(app, ["eval", str(run_dir), "-n", "64", "--wandb", "offline",
                                 "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert f"changed since it was logged as {model['name']}" in result.output
    assert _model_artifacts(run_dir / "eval-top_k=2") == []


def _model_artifacts(path) -> list[dict]:
    """The model artifacts a W&B run's local logs record (not its sample tables)."""
    records = read_offline_records(path, "artifact")
    return [r["artifact"] for r in records if r["artifact"]["type"] == "model"]
