"""The default `dmtune train` learns on the embedded prior: the sentiment rate rises well above
the prior's base rate, with KL(π‖a) reported. Minutes on 2 CPU cores: marked slow, run in CI."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
from typer.testing import CliRunner

from dmtune.cli import app
from dmtune.jsonl import read_jsonl
from dmtune.priors import TINY_PRIOR_DIR

LEARNING_STEPS = 80
WINDOW = 10  # steps averaged for the final rate: 2,560 samples at the default batch of 256


@pytest.mark.slow
@pytest.mark.skipif(
    not (TINY_PRIOR_DIR / "model.safetensors").is_file(), reason="embedded prior not built"
)
def test_default_train_raises_the_sentiment_rate_well_above_the_prior(tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train", f"train.steps={LEARNING_STEPS}", "logger=none", f"hydra.run.dir={run_dir}",
            # every core: tests before this one, in this process, may have set torch to 1 thread
            f"device.threads={os.cpu_count() or 1}",
        ],
    )
    assert result.exit_code == 0, result.output
    calibration = json.loads((run_dir / "calibration.json").read_text())
    base_rate = calibration["metrics"]["constraint/positive"]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    final = [m["constraint/positive"] for m in metrics[-WINDOW:]]
    final_rate = statistics.fmean(final)
    n = WINDOW * 256
    standard_error = math.sqrt(
        final_rate * (1 - final_rate) / n
        + base_rate * (1 - base_rate) / calibration["fit_samples"]
    )
    assert final_rate > 2 * base_rate and final_rate - base_rate > 5 * standard_error, (
        base_rate, final
    )
    kl_prior = [m["divergence/kl_policy_prior"] for m in metrics[-WINDOW:]]
    assert all(math.isfinite(k) and k > 0 for k in kl_prior)
    assert "prior" in result.stdout and "divergence/kl_policy_prior" in result.stdout  # the summary
