"""Every bad input is one line on stderr, exit code 2, before a model loads or a run dir exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmtune.cli import app

runner = CliRunner()

# (overrides of `dmtune train`, a fragment of the one error line)
BAD_TRAIN_INPUTS = [
    (["objective=dpgg"], "objective=dpgg is not an option of objective"),
    (["train.stepz=3"], "did you mean 'steps'"),
    (["objectiv=dpg"], "did you mean 'objective'"),
    (["train.steps=abc"], "train.steps"),
    (["seed=abc"], "seed"),
    (["model=gpt3"], "model=gpt3 is not an option of model"),
    (["experiment=smok"], "did you mean 'smoke'"),
    (["objective.beta=0.1"], "dpg_baseline takes no beta"),
    (["objective=kl_control", "objective.betta=0.1"], "did you mean 'beta'"),
    (["objective=kl_control", "objective.beta=-1"], "objective.beta=-1"),
    (["objective=kl_control", "objective.beta=0"], "objective.beta=0"),
    (["objective=kl_control", "objective.beta=abc"], "objective.beta='abc'"),
    (["objective=reinforce", "objective.baseline=median"], "objective.baseline='median'"),
    (["objective=fdpg", "objective.divergence=kl"], "objective.divergence='kl'"),
    (["objective=kl_dpg", "objective.swap_every=0"], "objective.swap_every=0"),
    (["objective=kl_dpg", "objective.swap_every=1.5"], "objective.swap_every=1.5"),
    (["train.steps=-5"], "train.steps=-5"),
    (["train.batch_size=0"], "train.batch_size=0"),
    (["train.max_new_tokens=0"], "train.max_new_tokens=0"),
    (["train.max_new_tokens=100000"], "train.max_new_tokens=100000"),
    (["experiment=toy", "train.max_new_tokens=40"], "context"),
    (["train.log_every=0"], "train.log_every=0"),
    (["train.eval_every=0"], "train.eval_every=0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every=0"),
    (["train.fit_samples=0"], "train.fit_samples=0"),
    (["train.lr=-1"], "train.lr=-1"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1"),
    (["train.warmup_steps=-2"], "train.warmup_steps=-2"),
    (["train.grad_clip=-1"], "train.grad_clip=-1"),
    (["train.logged_samples=-1"], "train.logged_samples=-1"),
    (["train.max_bad_steps=0"], "train.max_bad_steps=0"),
    (["train.micro_batch_size=-1"], "train.micro_batch_size=-1"),
    (["train.sample_micro_batch_size=-4"], "train.sample_micro_batch_size=-4"),
    (["model.lora.r=-1"], "model.lora.r=-1"),
    (["device.num_processes=0"], "device.num_processes=0"),
    (["device=ddp", "device.strategy=zero3"], "device.strategy='zero3'"),
    (["device=fsdp", "model.lora.r=8"], "device.strategy=fsdp with model.lora.r=8"),
    (["device=fsdp", "train.compile_sampler=true"], "train.compile_sampler=true with device"),
    (["device=ddp", "device.num_processes=3"], "train.batch_size=256 is not a multiple"),
    (["device=ddp", "device.timeout_s=0"], "device.timeout_s=0"),
    (["device=ddp", "device.name=cuda:1"], "each rank takes its own GPU"),
    (["model.lora.r=4", "model.lora.alpha=0"], "model.lora.alpha=0"),
    (["model.lora.r=4", "model.lora.dropout=1.5"], "model.lora.dropout=1.5"),
    (["train.betas=[0.9,1.5]"], "train.betas"),
    (["train.betas=[0.9]"], "train.betas"),
    (["device.name=tpu"], "device.name='tpu'"),
    (["device.dtype=float8"], "device.dtype='float8'"),
    (["device.threads=-3"], "device.threads=-3"),
    (["logger.mode=xxx"], "logger.mode='xxx'"),
    (["logger=none", "logger.mode=xxx"], "logger.mode='xxx'"),
    (["logger.sinks=[tensorboard]"], "'tensorboard' is not a sink"),
    (["constraint.features.positive.kind=sentimental"], "is not a feature kind"),
    (["constraint.features.positive.role=sometimes"], "role='sometimes'"),
    (["+constraint.features.positive.params.threshhold=0.3"], "unknown 'threshhold' parameter"),
    (["constraint.features.positive.params.threshold=2"], "threshold"),
    (["constraint=gender", "constraint.features.female.moment=null"], "a moment is required"),
    (["constraint=gender", "constraint.features.female.moment=1.5"], "moment=1.5"),
    (["constraint.features.positive.moment=0.5"], "required for role=distributional and only then"),
    (["constraint=sentiment_half", "objective=reinforce"], "maximises a reward"),
]


@pytest.mark.parametrize(
    "overrides, fragment", BAD_TRAIN_INPUTS, ids=[" ".join(o) for o, _ in BAD_TRAIN_INPUTS]
)
def test_a_bad_training_input_is_one_line_before_anything_runs(tmp_path: Path, overrides, fragment):
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", *overrides, f"hydra.run.dir={run_dir}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert not run_dir.exists()  # Hydra never started: no model was loaded


def test_a_bad_swept_value_is_one_line_before_any_job(tmp_path: Path):
    result = runner.invoke(app, ["sweep", "objective=kl_control", "objective.beta=0.1,-1",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert result.exit_code == 2 and "objective.beta=-1" in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_resuming_a_dir_that_is_not_a_run_is_one_line(tmp_path: Path):
    result = runner.invoke(app, ["train", f"resume={tmp_path}"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "not a dmtune run dir" in result.stderr
