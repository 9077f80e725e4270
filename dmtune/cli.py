"""``dmtune``: the command line. Overrides use Hydra's own grammar (``key=value``, groups).

Every command composes the config first, so a typo in an override fails in a fraction of a
second with one line naming the bad key or option and the valid ones, before a model loads.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from dmtune import metrics as m
from dmtune.overrides import (
    ConfigError,
    claim_run_dir,
    eval_config,
    group_options,
    resume_overrides,
    run_hydra_main,
    sweep_jobs,
)
from dmtune.overrides import compose_config as _compose

# The CLI shows its own progress bar and summary; transformers' loading/saving bars and
# advice messages would only interleave with them.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_DIVERGED = 3

app = typer.Typer(
    name="dmtune",
    help="Fine-tune language models toward constraints without catastrophic forgetting: "
    "distribution matching (DPG, GDC++, KL-adaptive DPG, f-DPG) beside reward maximisation "
    "(REINFORCE, KL-control), configured with Hydra and logged to Weights & Biases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # Hydra's list syntax [a,b] is not markup
)

OVERRIDES = typer.Argument(
    None,
    help="Hydra overrides, e.g. objective=kl_dpg constraint=sentiment train.steps=100",
    show_default=False,
)


# shared by the commands that read a run and sample from it (sample, eval)
RUN_DIR = typer.Argument(
    ..., help="A run dir written by `dmtune train`.", exists=True, file_okay=False
)
TEMPERATURE = typer.Option(1.0, help="Sampling temperature (1 = the policy's own distribution).")
TOP_P = typer.Option(1.0, help="Nucleus sampling mass (1 = off).")
TOP_K = typer.Option(0, help="Top-k sampling (0 = off).")


def fail(message: str) -> None:
    """Print one line to stderr and exit with the usage error code."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _first_line(error: BaseException) -> str:
    """An error as one line (an OSError as its reason and file)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed, validated config; a bad override is one line on stderr and exit code 2."""
    try:
        return _compose(overrides)
    except ConfigError as error:
        fail(str(error))


def _train_task(cfg: DictConfig) -> dict[str, float | None]:
    """One Hydra job: train in Hydra's run dir, print the summary; a job's return value is what
    hydra/sweeper=optuna optimises."""
    from hydra.core.hydra_config import HydraConfig

    from dmtune.priors import PriorUnavailableError
    from dmtune.run import DivergenceError
    from dmtune.run import train as train_run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train_run(cfg, run_dir)
    except DivergenceError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(EXIT_DIVERGED)
    except (ValueError, OSError, PriorUnavailableError) as error:  # CheckpointError: a ValueError
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        typer.echo(f"error: {_first_line(error)}", err=True)
        sys.exit(EXIT_USAGE)
    print_summary(summary)
    if summary["stopped_by_signal"] is not None:
        typer.echo(
            f"stopped at step {summary['steps']}; checkpoint saved; "
            f"resume with: dmtune train resume={run_dir}",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    return summary["final"]


def print_summary(summary: dict[str, Any]) -> None:
    """The one-screen end-of-run summary ("n/a" where no step ran, e.g. resuming a finished run)."""
    final = summary["final"]

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"\n{summary['objective']}: {summary['steps']} steps, "
        f"{summary['samples_seen']} samples in {summary['wall_s']:.0f} s"
    ]
    for key, base in summary["prior"].items():
        if key.endswith("_target"):
            continue
        goal = summary["prior"].get(f"{key}_target")
        goal_text = f"  (target {goal:.3g})" if goal is not None else ""
        lines.append(f"  {key:<34} prior {base:.3f} → {shown(final.get(key))}{goal_text}")
    for key in m.SHOWN:
        lines.append(f"  {key:<34} {shown(final.get(key))}")
    if summary.get("skipped_steps"):
        lines.append(f"  skipped steps (non-finite loss or gradient): {summary['skipped_steps']}")
    lines.append(f"  run dir: {summary['run_dir']}")
    typer.echo("\n".join(lines))


@app.command(context_settings={"allow_interspersed_args": False})
def train(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Train a policy. Writes a run dir under outputs/ (metrics.jsonl, samples, checkpoints).

    \b
    Examples:
      dmtune train                          # GDC++, positive sentiment, tiny prior
      dmtune train objective=kl_dpg constraint=sentiment
      dmtune train objective=reinforce train.steps=50 logger=none
      dmtune train experiment=toy           # exact KL(p‖π) in metrics.jsonl
      dmtune train 'constraint=[sentiment,word]'   # quoted: [] is a shell glob
      dmtune train resume=outputs/2026-11-22/10-00-00_default_dpg_baseline
    """
    try:
        overrides = resume_overrides(list(overrides or []))
    except ConfigError as error:
        fail(str(error))
    compose_config([o for o in overrides if not o.startswith("hydra.")])
    try:
        overrides = claim_run_dir(overrides)
    except ConfigError as error:
        fail(str(error))
    run_hydra_main(_train_task, overrides)


@app.command(context_settings={"allow_interspersed_args": False})
def sweep(
    wandb_yaml: Optional[Path] = typer.Option(
        None,
        "--wandb-yaml",
        help=(
            "Write a W&B sweep config here instead of running "
            "(then: wandb sweep FILE; wandb agent ID)."
        ),
    ),
    metric: Optional[str] = typer.Option(
        None,
        help="With --wandb-yaml: the metric W&B optimises or reports, e.g. constraint/positive.",
    ),
    goal: str = typer.Option(
        "maximize", help="With --wandb-yaml: maximize or minimize the metric."
    ),
    method: Optional[str] = typer.Option(
        None,
        help=(
            "With --wandb-yaml: grid, random or bayes "
            "(default: grid, or bayes/random when an interval() is searched)."
        ),
    ),
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Run a grid of trainings (Hydra multirun): one run dir per job, one W&B group per sweep.

    \b
    Sweep syntax is Hydra's: a,b,c lists, range(start,stop), glob(pattern) over a group;
    interval(a,b) and tag(log,interval(a,b)) with the Optuna sweeper.
    Jobs land in outputs/multirun/<date>/<time>_<experiment>/<n>_<objective>_seed<seed>/.
    Launchers: basic (one job after another), joblib (parallel local jobs, one torch thread
    each), slurm (submitit; pip install 'dmtune[slurm]').
    \b
    Examples:
      dmtune sweep objective=dpg,dpg_baseline seed=0,1,2
      dmtune sweep 'objective=glob(dpg*)' seed='range(0,3)' train.steps=50
      dmtune sweep objective=dpg,kl_dpg hydra/launcher=joblib hydra.launcher.n_jobs=2
      dmtune sweep experiment=sentiment size=paper hydra/launcher=slurm hydra.launcher.partition=gpu
      dmtune sweep hydra/sweeper=optuna hydra.sweeper.metric=constraint/positive \\
          hydra.sweeper.n_trials=20 'train.lr=tag(log,interval(1e-5,1e-3))'
      dmtune sweep --wandb-yaml sweep.yaml --metric constraint/positive \\
          objective=dpg,dpg_baseline seed=0,1,2
    """
    overrides = list(overrides or [])
    if wandb_yaml is not None:
        _write_wandb_sweep(wandb_yaml, overrides, metric, goal, method)
        return
    if any(o.startswith("resume=") for o in overrides):
        fail("a sweep cannot resume; resume each job with: dmtune train resume=RUN_DIR")
    launcher = next(
        (o.split("=", 1)[1] for o in overrides if o.startswith("hydra/launcher=")), "basic"
    )
    if launcher == "slurm" or launcher.startswith("submitit"):
        _require(
            "hydra_plugins.hydra_submitit_launcher",
            f"hydra/launcher={launcher} needs submitit: pip install 'dmtune[slurm]'",
        )
    optuna = "hydra/sweeper=optuna" in overrides
    if optuna:
        _require("optuna", "hydra/sweeper=optuna needs Optuna: pip install 'dmtune[optuna]'")
        if not any(o.startswith("hydra.sweeper.metric=") for o in overrides):
            fail(
                "hydra/sweeper=optuna needs a metric to optimise, "
                "e.g. hydra.sweeper.metric=constraint/positive"
            )
    for job in _sweep_jobs(overrides, searching=optuna):
        compose_config(job)
    if not any(o.startswith("logger.group=") for o in overrides):
        overrides.append(f"logger.group=sweep_{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    if "hydra/launcher=joblib" in overrides and not any(
        o.startswith("device.threads=") for o in overrides
    ):
        overrides.append(
            "device.threads=1"
        )  # parallel workers share the cores: one torch thread each
    try:
        overrides = claim_run_dir(overrides, multirun=True)
    except ConfigError as error:
        fail(str(error))
    run_hydra_main(_train_task, overrides, multirun=True)


def _sweep_jobs(overrides: list[str], searching: bool) -> list[list[str]]:
    try:
        return sweep_jobs(overrides, searching=searching)
    except ConfigError as error:
        fail(str(error))


def _require(module: str, message: str) -> None:
    """One line naming the extra to install when an optional plugin is missing."""
    if (
        importlib.util.find_spec(module.split(".")[0]) is None
        or importlib.util.find_spec(module) is None
    ):
        fail(message)


def _write_wandb_sweep(
    path: Path, overrides: list[str], metric: str | None, goal: str, method: str | None
) -> None:
    from dmtune.wandb_sweep import wandb_sweep_config

    for job in _sweep_jobs(overrides, searching=True):
        compose_config(job)
    try:
        config = wandb_sweep_config(
            overrides, group_options, metric=metric, goal=goal, method=method
        )
    except ValueError as error:
        fail(str(error))
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    typer.echo(
        f"wrote {path}; run it with: wandb sweep {path}  then: wandb agent <the sweep id it prints>"
    )


@app.command("eval")
def evaluate(
    run_dir: Path = RUN_DIR,
    n: int = typer.Option(1024, "--n", "-n", help="Fresh samples to draw."),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    seed: int = typer.Option(1234, help="Seed of the sampler."),
    wandb_mode: Optional[str] = typer.Option(
        None,
        "--wandb",
        help="W&B mode for the eval run: online, offline, disabled (default: the run's).",
    ),
    overrides: Optional[List[str]] = typer.Argument(
        None,
        help=(
            "Overrides of the run's config, e.g. constraint=gender (another target) "
            "or device=cpu."
        ),
        show_default=False,
    ),
) -> None:
    """Evaluate a run's last checkpoint on fresh samples; writes RUN_DIR/eval.json.

    \b
    Metrics (with standard errors): E_π[φ] per feature, KL(p‖π), KL(π‖a), TV(p,π),
    entropy, distinct-1/2/3, self-BLEU, and exact values in exact mode (model=toy).
    With a warped decoding, estimates about π are importance-weighted by π/q;
    KL(p‖π), TV and log Z use n more samples, of the prior (bounded weights).
    Logged to W&B as job_type=eval in the run's group.
    Overrides apply to the run's config: with another constraint set its λ is fitted anew and
    the report goes to eval-<overrides>.json (eval.json, the run's own, is kept).
    \b
    Examples:
      dmtune eval outputs/2026-11-22/10-00-00_default_dpg_baseline
      dmtune eval RUN_DIR -n 4096 --top-p 0.9
      dmtune eval RUN_DIR constraint=gender      # the same policy against another target
    """
    from dmtune.evaluate import evaluate_run
    from dmtune.priors import PriorUnavailableError
    from dmtune.rundir import RunDir

    overrides = list(overrides or [])
    try:
        cfg = eval_config(run_dir, overrides) if overrides else None
    except ConfigError as error:
        fail(str(error))
    try:
        report = evaluate_run(
            run_dir,
            n=n,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            wandb_mode=wandb_mode,
            cfg=cfg,
            overrides=overrides,
        )
    except (ValueError, PriorUnavailableError) as error:  # CheckpointError is a ValueError
        fail(str(error).splitlines()[0])
    errors = report["standard_errors"]
    typer.echo(f"step {report['step']}, {report['n']} fresh samples:")
    for key, value in report["metrics"].items():
        error = f" ± {errors[key]:.3g}" if key in errors else ""
        typer.echo(f"  {key:<36} {value:.4g}{error}")
    typer.echo(f"wrote {RunDir(run_dir).eval_report(overrides)}")


@app.command()
def compare(
    paths: List[Path] = typer.Argument(
        ..., help="Run dirs or sweep dirs (searched recursively).", exists=True
    ),
    metric: Optional[List[str]] = typer.Option(
        None,
        "--metric",
        "-m",
        help=(
            "A metric to show (repeatable); default: constraint rates, KL(p‖π), KL(π‖a), "
            "distinct-2."
        ),
    ),
    out: Optional[Path] = typer.Option(
        None, help="Where to write compare.png/.html/.json (default: the first path)."
    ),
    by: Optional[List[str]] = typer.Option(
        None,
        "--by",
        help="Group runs by this config key instead of the objective (repeatable), e.g. train.lr.",
    ),
    smooth: int = typer.Option(
        1, min=1, help="Plot moving averages over this many logged points (the table stays raw)."
    ),
) -> None:
    """Compare runs offline: a table of final values (mean ± std over seeds, per objective or --by
    value) and plots against samples seen, as PNG and a self-contained HTML page.

    \b
    Examples:
      dmtune compare outputs/multirun/2026-11-22/10-00-00_default
      dmtune compare RUN_A RUN_B -m constraint/positive -m divergence/kl_policy_prior
      dmtune compare outputs/multirun/2026-11-22/10-00-00_default --by objective.name --by train.lr
    """
    from dmtune.compare import compare as compare_runs

    target_dir = out or (paths[0] if paths[0].is_dir() else paths[0].parent)
    try:
        table, _ = compare_runs(
            list(paths), list(metric or []), target_dir, by=list(by or []), smooth=smooth
        )
    except ValueError as error:
        fail(str(error).splitlines()[0])
    typer.echo(table)
    typer.echo(f"wrote {target_dir / 'compare.png'}, compare.html, compare.json")


@app.command("config")
def show_config(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Print the composed config for these overrides (nothing is run).

    \b
    Example:
      dmtune config objective=kl_control objective.beta=0.05
    """
    typer.echo(OmegaConf.to_yaml(compose_config(list(overrides or []))), nl=False)


@app.command()
def sample(
    run_dir: Path = RUN_DIR,
    n: int = typer.Option(8, "--n", "-n", help="How many samples."),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    seed: int = typer.Option(0, help="Seed of the sampler."),
) -> None:
    """Print samples of a trained policy with their feature scores.

    \b
    Example:
      dmtune sample outputs/2026-11-22/10-00-00_default_dpg_baseline -n 16
    """
    from dmtune.priors import PriorUnavailableError
    from dmtune.rundir import sample_run

    try:
        rows = sample_run(
            run_dir, n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
    except (ValueError, PriorUnavailableError) as error:  # CheckpointError is a ValueError
        fail(str(error).splitlines()[0])
    for row in rows:
        scores = "  ".join(f"{k}={v:.3g}" for k, v in row.items() if k not in ("text", "log_prob"))
        typer.echo(f"[{scores}  log π={row['log_prob']:.2f}]  {row['text']}")


def main() -> None:  # pragma: no cover - console-script entry
    app()
