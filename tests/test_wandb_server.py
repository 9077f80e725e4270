"""W&B online, against a W&B-compatible server on loopback (openwandb), and with none at all.

openwandb stores runs, tags, config, summaries and numeric history, which its REST API returns;
it does not store groups or job types and ``wandb.Api`` cannot query it, so those are checked
where dmtune computes them (tests/test_loggers.py). CI installs openwandb in its own virtual
environment and points ``OPENWANDB`` at its executable; without it the live tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dmtune.jsonl import read_jsonl

TOY = ["experiment=toy", "train.fit_samples=64", "train.batch_size=16", "device.threads=1"]
API_KEY = "local" + "0" * 40  # openwandb takes any key; the W&B SDK wants 40+ characters
SERVER_START_S = 60
RUN_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture()
def server(tmp_path):
    """A fresh openwandb on a free loopback port: (process, base URL)."""
    executable = os.environ.get("OPENWANDB") or shutil.which("openwandb")
    if not executable:
        pytest.skip("openwandb is not installed (CI installs it; see .ci/run)")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [executable, "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(tmp_path / "server"), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            _get(f"{url}/api/v2/projects/default/dmtune/runs")
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"openwandb did not start on {url} in {SERVER_START_S} s")
            time.sleep(0.2)
    yield process, url
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _env(tmp_path: Path, base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    wandb_home = tmp_path / "wandb_home"
    return {
        **env,
        "WANDB_BASE_URL": base_url,
        "WANDB_API_KEY": API_KEY,
        "WANDB_MODE": "online",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(wandb_home / "config"),
        "WANDB_CACHE_DIR": str(wandb_home / "cache"),
        "WANDB_DATA_DIR": str(wandb_home / "data"),
        "WANDB_X_DISABLE_VIEWER": "true",  # no identity lookup: a dead server fails fast
        "PYTHONUNBUFFERED": "1",
    }


def _dmtune(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dmtune", *args], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_a_run_logged_online_is_on_the_server_as_in_its_run_dir(server, tmp_path):
    _, url = server
    run_dir = tmp_path / "run"
    process = _dmtune(_env(tmp_path, url), "train", *TOY, "train.steps=3", "logger.mode=online",
                      "logger.timeout_s=30", "logger.log_model=true", f"hydra.run.dir={run_dir}")
    output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, output
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    where = [line for line in output.splitlines() if line.strip().startswith("W&B run: ")]
    assert len(where) == 2 and all(line.strip().endswith(run_id) for line in where)  # start, end
    remote = _get(f"{url}/api/v2/runs/{run_id}")["run"]
    assert remote["state"] == "finished" and remote["tags"] == ["dpg_baseline", "toy_token", "toy"]
    assert remote["config"]["dmtune"]["value"]["overrides"][0] == "experiment=toy"
    local = read_jsonl(run_dir / "metrics.jsonl")
    for key in ("train/loss", "divergence/kl_target_policy", "samples_seen"):
        history = _get(f"{url}/api/v2/runs/{run_id}/metrics?key={key}")["metrics"]
        logged = [(row["step"], row[key]) for row in local if key in row]
        assert [(h["step"], h["value"]) for h in history] == logged
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    summary = remote["summary"]
    assert {k: summary[f"final/{k}"] for k in final if final[k] is not None} == {
        k: v for k, v in final.items() if v is not None
    }
    assert remote["config"]["_wandb"]["value"]["m"][0]["1"] == "samples_seen"  # the x-axis
    # the policy as a model artifact (openwandb stores what was logged; it has no lineage API)
    artifacts = _get(f"{url}/api/v2/runs/{run_id}/artifacts")["artifacts"]
    models = [a for a in artifacts if a["artifact_type"] == "model"]
    name = json.loads((run_dir / "summary.json").read_text())["model_artifact"]["name"]
    assert [a["name"] for a in models] == [name] == [f"model-{run_id}"]
    assert models[0]["metadata"] == {"objective": "dpg_baseline", "steps": 3, "samples_seen": 48}


def test_a_server_that_dies_mid_run_costs_a_bounded_wait_and_one_line(server, tmp_path):
    process_server, url = server
    run_dir = tmp_path / "run"
    timeout_s = 10
    process = _dmtune(
        _env(tmp_path, url), "train", *TOY, "train.steps=400", "train.eval_every=1000",
        "logger.mode=online", f"logger.timeout_s={timeout_s}", f"hydra.run.dir={run_dir}",
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 10):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.2)
    os.killpg(process_server.pid, signal.SIGKILL)
    process_server.wait()
    output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, output
    assert (run_dir / "policy" / "config.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 400
    told = [line for line in output.splitlines() if "wandb sync" in line]
    assert len(told) == 1, output
    assert "W&B" in told[0] and str(run_dir / "wandb") in told[0]
    assert summary["logging"][-1] == told[0].strip()


def test_an_unreachable_server_is_one_line_and_a_complete_local_run(tmp_path):
    run_dir = tmp_path / "run"
    env = _env(tmp_path, "http://127.0.0.1:9")  # nothing listens on the discard port
    process = _dmtune(env, "train", *TOY, "train.steps=2", "logger.mode=online",
                      "logger.timeout_s=3", f"hydra.run.dir={run_dir}")
    output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, output
    failed = [line for line in output.splitlines() if "W&B" in line]
    assert len(failed) == 1 and failed[0].startswith("W&B init failed ("), output
    assert (run_dir / "policy" / "config.json").is_file()
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
