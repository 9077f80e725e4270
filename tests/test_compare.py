"""`dmtune compare`: a table, a PNG and an HTML page whose numbers match the runs' files."""

from __future__ import annotations

import json
import statistics

from typer.testing import CliRunner

from dmtune.cli import app
from dmtune.jsonl import read_jsonl

runner = CliRunner()
METRIC = "divergence/kl_policy_prior"


def test_compare_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = runner.invoke(app, [
        "sweep", "experiment=toy", "objective=dpg,kl_control", "seed=0,1", "train.steps=4",
        "train.fit_samples=64", "logger=none", "device.threads=1", f"hydra.sweep.dir={sweep}",
    ])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [
        "compare", str(sweep), "-m", METRIC, "-m", "constraint/has_b",
        "--out", str(tmp_path / "cmp"),
    ])
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "cmp" / "compare.json").read_text())["groups"]
    assert set(numbers) == {"dpg", "kl_control"}
    for group, pattern in (("dpg", "*_dpg_seed*"), ("kl_control", "*_kl_control_seed*")):
        finals = [
            read_jsonl(run / "metrics.jsonl")[-1][METRIC] for run in sorted(sweep.glob(pattern))
        ]
        mean, std = numbers[group]["final"][METRIC]
        assert (
            len(finals) == 2
            and mean == statistics.fmean(finals)
            and std == statistics.stdev(finals)
        )
        assert [x for x, _, _ in numbers[group]["curves"][METRIC]] == [0, 64, 128, 192, 256]
        assert f"{mean:.4g} ± {std:.2g}" in result.stdout
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data:image/png;base64," in page and f"{numbers['dpg']['final'][METRIC][0]:.4g}" in page

    # grouped by config values instead of the objective
    result = runner.invoke(app, [
        "compare", str(sweep), "-m", METRIC, "--by", "seed", "--smooth", "3",
        "--out", str(tmp_path / "by"),
    ])
    assert result.exit_code == 0, result.output
    by_seed = json.loads((tmp_path / "by" / "compare.json").read_text())["groups"]
    assert sorted(by_seed) == ["seed=0", "seed=1"] and all(
        len(g["runs"]) == 2 for g in by_seed.values()
    )
    seed0 = [read_jsonl(run / "metrics.jsonl")[-1][METRIC] for run in sorted(sweep.glob("*_seed0"))]
    assert by_seed["seed=0"]["final"][METRIC][0] == statistics.fmean(seed0)
    result = runner.invoke(
        app, ["compare", str(sweep), "--by", "train.nope", "--out", str(tmp_path / "by")]
    )
    assert (
        result.exit_code == 2
        and "no config key 'train.nope'" in result.stderr
        and result.stderr.strip().count("\n") == 0
    )

    # eval.json, when present, is what a run is compared by
    run = sorted(sweep.glob("*_dpg_seed0"))[0]
    assert runner.invoke(app, ["eval", str(run), "-n", "256", "--wandb", "disabled"]).exit_code == 0
    result = runner.invoke(app, ["compare", str(run), "-m", METRIC, "--out", str(tmp_path / "one")])
    evaluated = json.loads((run / "eval.json").read_text())["metrics"][METRIC]
    assert (
        json.loads((tmp_path / "one" / "compare.json").read_text())["groups"]["dpg"]["final"][
            METRIC
        ][0]
        == evaluated
    )


def test_compare_without_runs_is_one_line(tmp_path):
    result = runner.invoke(app, ["compare", str(tmp_path)])
    assert (
        result.exit_code == 2
        and "no run dirs" in result.stderr
        and result.stderr.strip().count("\n") == 0
    )


def test_plots_can_smooth_noisy_curves_with_a_trailing_mean():
    from dmtune.compare import _smoothed

    assert _smoothed([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert _smoothed([4.0, 0.0, 8.0], 1) == [4.0, 0.0, 8.0]
    assert _smoothed([3.0, 6.0, 9.0], 10) == [3.0, 4.5, 6.0]
