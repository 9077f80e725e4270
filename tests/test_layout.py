"""One owner per concept: defaults, metric names, the glossary, imports and paths cannot drift."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from dmtune import metrics
from dmtune.build import trainer_config
from dmtune.cli import app
from dmtune.jsonl import read_jsonl
from dmtune.objectives import OBJECTIVES, objective_params
from dmtune.overrides import CONF_DIR, compose_config
from dmtune.rundir import RunDir
from dmtune.trainer import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_python_defaults_are_the_composed_default_config():
    assert asdict(TrainerConfig()) == asdict(trainer_config(compose_config([])))


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_yaml_sets_every_hyperparameter_to_the_loss_default(name):
    composed = OmegaConf.to_container(compose_config([f"objective={name}"]).objective)
    assert composed == {"name": name, **objective_params(name)}


def test_loading_a_model_does_not_import_the_losses():
    code = "import dmtune.priors, dmtune.lm, sys; print('dmtune.objectives' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_root_conf_is_the_packaged_config_dir():
    assert (ROOT / "conf").resolve() == CONF_DIR.resolve()
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
    assert {"model", "constraint", "objective", "device", "logger", "experiment"} <= groups


def test_relative_links_in_the_docs_exist():
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"]
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (doc.parent / target).exists(), (
                    f"{doc.name} links to {target}, which does not exist"
                )


def test_readme_glossary_is_the_code_glossary():
    readme = (ROOT / "README.md").read_text()
    assert metrics.glossary_markdown() in readme, (
        "README glossary is stale: paste `python -m dmtune.metrics`"
    )


def _train(tmp_path: Path, name: str, *overrides: str) -> RunDir:
    run_dir = tmp_path / name
    args = ["train", "experiment=toy", "train.steps=2", "train.batch_size=32",
            "train.fit_samples=64", "train.eval_every=2", "logger=none", "device.threads=1",
            f"hydra.run.dir={run_dir}", *overrides]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return RunDir(run_dir)


def test_logged_keys_and_the_glossary_name_the_same_metrics(tmp_path):
    distributional = [
        "constraint.features.has_b.role=distributional", "constraint.features.has_b.moment=0.5"
    ]
    runs = [
        _train(tmp_path, "kl_dpg", "objective=kl_dpg", "objective.swap_every=1", *distributional),
        _train(tmp_path, "reinforce", "objective=reinforce"),
        _train(tmp_path, "prompts", "train.prompts=builtin:toy.txt", "train.samples_per_prompt=4"),
    ]
    result = runner.invoke(app, ["eval", str(runs[0].path), "-n", "64", "--wandb", "disabled"])
    assert result.exit_code == 0, result.output
    logged = {key for run in runs for row in read_jsonl(run.metrics) for key in row}
    logged |= {key for row in read_jsonl(runs[0].eval_dir() / "metrics.jsonl") for key in row}
    patterns = {name: metrics.glossary_pattern(name) for name in metrics.glossary_names()}
    undocumented = sorted(k for k in logged if not any(p.match(k) for p in patterns.values()))
    never_logged = sorted(
        n for n, p in patterns.items()
        if not any(p.match(k) for k in logged) and n not in metrics.GPU_ONLY
    )
    assert undocumented == [] and never_logged == []
