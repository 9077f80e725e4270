"""``dmtune``: the command line. Overrides use Hydra's own grammar (``key=value``, groups).

Every command composes the config first, so a typo in an override fails in a fraction of a
second with one line naming the bad key or option and the valid ones, before a model loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from dmtune import distributed
from dmtune import metrics as m
from dmtune.overrides import (
    CONF_DIR,
    ConfigError,
    claim_run_dir,
    grid_size,
    group_options,
    resume_overrides,
    run_hydra_main,
    sweep_jobs,
    task_overrides,
    user_config_dirs,
)
from dmtune.overrides import compose_config as _compose
from dmtune.wandb_sink import WHERE_OFFLINE, WHERE_ONLINE

# The CLI shows its own progress bar and summary; transformers' loading/saving bars and
# advice messages would only interleave with them.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_DIVERGED = 3
EXIT_RANK_FAILED = 4  # a process of a data-parallel run died
SWEEP_JOBS_ENV = "DMTUNE_SWEEP_JOBS"  # a sweep's job count, for "job k/n" in each job

app = typer.Typer(
    name="dmtune",
    help="Fine-tune language models toward constraints without catastrophic forgetting: "
    "distribution matching (DPG, GDC++, KL-adaptive DPG, f-DPG) beside reward maximisation "
    "(REINFORCE, KL-control), configured with Hydra and logged to Weights & Biases.",
    no_args_is_help=True,
    add_completion=True,  # dmtune --install-completion / --show-completion
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # Hydra's list syntax [a,b] is not markup
)

OVERRIDES = typer.Argument(
    None,
    help="Hydra overrides, e.g. objective=kl_dpg constraint=sentiment train.steps=100",
    show_default=False,
)


def fail(message: str) -> None:
    """Print one line to stderr and exit with the usage error code."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _remove_if_unstarted(run_dir: Path) -> None:
    """A run that failed before logging anything leaves no dir behind (only Hydra's files)."""
    contents = list(run_dir.iterdir()) if run_dir.is_dir() else []
    if all(p.name == ".hydra" or p.suffix == ".log" for p in contents):
        shutil.rmtree(run_dir, ignore_errors=True)


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

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if total := os.environ.get(SWEEP_JOBS_ENV):  # a sweep: say which job this is
        hidden = ("logger.sweep=", "device.threads=")
        shown = [o for o in hydra_cfg.overrides.task if not o.startswith(hidden)]
        typer.echo(f"job {hydra_cfg.job.num + 1}/{total}: {' '.join(shown)}", err=True)
    # under torchrun / accelerate launch every rank runs this; rank 0 speaks for them
    quiet = distributed.launched() and not distributed.init(cfg).is_main
    try:
        if cfg.device.num_processes > 1 and not distributed.launched():
            summary = distributed.launch(run_dir, cfg)  # the workers train; rank 0 reports
        else:
            summary = train_run(cfg, run_dir)
    except DivergenceError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(EXIT_DIVERGED)
    except distributed.RankFailedError as error:  # a worker died; the others were stopped
        typer.echo(f"error: {error}", err=True)
        sys.exit(EXIT_RANK_FAILED)
    except (ValueError, OSError, PriorUnavailableError) as error:  # CheckpointError: a ValueError
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not quiet:
            typer.echo(f"error: {_first_line(error)}", err=True)
        if not cfg.resume:
            _remove_if_unstarted(run_dir)
        sys.exit(EXIT_USAGE)
    if quiet:
        return summary["final"]
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
    for line in summary.get("logging", []):  # where the W&B run is; a W&B failure once
        if line.startswith((WHERE_ONLINE, WHERE_OFFLINE)) or line in summary["logging_unshown"]:
            lines.append(f"  {line}")
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
      dmtune train device=ddp device.num_processes=4   # data parallel, 4 processes
      dmtune train device=fsdp device.name=cuda device.num_processes=8   # sharded, 8 GPUs
      dmtune train 'constraint=[sentiment,word]'   # quoted: [] is a shell glob
      dmtune train resume=outputs/2026-11-22/10-00-00_default_dpg_baseline
    """
    try:
        overrides = resume_overrides(list(overrides or []))
    except ConfigError as error:
        fail(str(error))
    cfg = compose_config(task_overrides(overrides))
    try:
        if distributed.launched():  # torchrun / accelerate launch: rank 0 names the run dir
            overrides = distributed.init(cfg).first(lambda: claim_run_dir(overrides))
        else:
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
    """Run a grid of trainings (Hydra multirun): one run dir per job, then a table of them.

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
    if not any(o.startswith("logger.sweep=") for o in overrides):
        overrides.append(f"logger.sweep=sweep_{time.strftime('%Y-%m-%d_%H-%M-%S')}")
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
    if not optuna:  # a grid: its size is known (a search's trials are the sweeper's)
        os.environ[SWEEP_JOBS_ENV] = str(grid_size(overrides))  # launchers' workers inherit it
    try:
        run_hydra_main(_train_task, overrides, multirun=True)
    finally:
        os.environ.pop(SWEEP_JOBS_ENV, None)
    sweep_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir="))
    print_sweep_table(Path(sweep_dir))


def print_sweep_table(sweep_dir: Path) -> None:
    """The jobs' end-of-run figures side by side (``dmtune compare`` has seeds' means ± std)."""
    rows = []
    for summary_file in sorted(sweep_dir.glob("*/summary.json"), key=_job_number):
        summary = json.loads(summary_file.read_text())
        final = summary.get("final", {})
        figures = {k: v for k, v in final.items() if m.is_constraint_rate(k)}
        figures.update({k: final.get(k) for k in m.SHOWN[:2]})
        rows.append((summary_file.parent.name, figures))
    if not rows:
        return
    keys = list(dict.fromkeys(k for _, figures in rows for k in figures))
    width = max(len(name) for name, _ in rows)
    short = [k.split("/", 1)[1] for k in keys]
    lines = [f"\n{'job':<{width}}  " + "  ".join(f"{s:>18}" for s in short)]
    for name, figures in rows:
        cells = [figures.get(k) for k in keys]
        lines.append(
            f"{name:<{width}}  "
            + "  ".join(f"{'n/a' if v is None else f'{v:.3f}':>18}" for v in cells)
        )
    lines.append(f"compare them: dmtune compare {sweep_dir}")
    typer.echo("\n".join(lines))


def _job_number(path: Path) -> tuple[int, str]:
    head = path.parent.name.split("_", 1)[0]
    return (int(head), path.parent.name) if head.isdigit() else (1 << 30, path.parent.name)


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
            overrides, lambda group: group_options(group, overrides),
            metric=metric, goal=goal, method=method,
        )
    except ValueError as error:
        fail(str(error))
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    typer.echo(
        f"wrote {path}; run it with: wandb sweep {path}  then: wandb agent <the sweep id it prints>"
    )


def _version(value: bool) -> None:
    if value:
        from dmtune import __version__

        typer.echo(f"dmtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fine-tune language models toward constraints without catastrophic forgetting."""


@app.command("config")
def show_config(
    overrides: Optional[List[str]] = OVERRIDES,
    resolve: bool = typer.Option(
        False, "--resolve", help="Resolve interpolations (${...}) as the run would see them."
    ),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of YAML (implies --resolve)."),
) -> None:
    """Print the composed config for these overrides (nothing is run).

    \b
    Examples:
      dmtune config objective=kl_control objective.beta=0.05
      dmtune config experiment=conditional --resolve
      dmtune config --json | jq .train
    """
    cfg = compose_config(list(overrides or []))
    if as_json:
        typer.echo(json.dumps(OmegaConf.to_container(cfg, resolve=True), indent=1))
    else:
        typer.echo(OmegaConf.to_yaml(cfg, resolve=resolve), nl=False)


SEARCHPATH_HELP = "Your own config groups: a folder holding e.g. constraint/mine.yaml."


@app.command("ls")
def list_options(
    group: Optional[str] = typer.Argument(None, help="A config group, e.g. constraint (all: none)"),
    config_dir: Optional[List[Path]] = typer.Option(None, "--config-dir", help=SEARCHPATH_HELP),
) -> None:
    """List every option of the config groups, built-in and yours, with its one-line comment.

    \b
    Examples:
      dmtune ls constraint
      dmtune ls --config-dir ./conf      # with your own options (hydra.searchpath=[file://./conf])
    """
    overrides = _searchpath(config_dir)
    dirs = [CONF_DIR, *user_config_dirs(overrides)]
    groups = [group] if group else _groups(dirs)
    for name in groups:
        options = group_options(name, overrides)
        if not options:
            fail(f"{name} is not a config group; groups: {', '.join(_groups(dirs))}")
        typer.echo(f"{name}:")
        for option in options:
            # a built-in option wins over a file of the same name in a search-path folder (Hydra)
            path = next(f for d in dirs if (f := d / name / f"{option}.yaml").is_file())
            where = "" if path.is_relative_to(CONF_DIR) else f"  [{path.parent.parent}]"
            typer.echo(f"  {option:<16} {_first_comment(path)}{where}")


@app.command("cp")
def copy_option(
    option: str = typer.Argument(..., help="GROUP/OPTION, e.g. constraint/sentiment."),
    dest: Path = typer.Argument(
        Path("conf"), help="A config dir (the file goes to DEST/GROUP/) or a .yaml path."
    ),
) -> None:
    """Copy a built-in option to edit under a new name; use it with hydra.searchpath=[file://DIR].

    A built-in option shadows a file of the same name, so a copy into a folder is named
    my_OPTION.yaml (give a .yaml path to choose the name).

    \b
    Example:
      dmtune cp constraint/sentiment conf      # writes conf/constraint/my_sentiment.yaml
      dmtune train 'hydra.searchpath=[file://conf]' constraint=my_sentiment
    """
    group, _, name = option.partition("/")
    source = CONF_DIR / group / f"{name}.yaml"
    if not source.is_file():
        valid = ", ".join(group_options(group)) or "none"
        fail(f"{option} is not a built-in option; options of {group}: {valid}")
    target = dest if dest.suffix == ".yaml" else dest / group / f"my_{source.name}"
    if target.stem in group_options(group):
        fail(f"{target.name} would be hidden by the built-in {group}/{target.stem}; rename it")
    if target.exists():
        fail(f"{target} exists; remove it or give another DEST")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source.read_text())
    typer.echo(f"wrote {target}")


def _searchpath(config_dirs: list[Path] | None) -> list[str]:
    try:
        folders = ",".join(f"file://{d.resolve()}" for d in config_dirs or [])
        overrides = [f"hydra.searchpath=[{folders}]"] if config_dirs else []
        user_config_dirs(overrides)
    except ConfigError as error:
        fail(str(error))
    return overrides


def _groups(dirs: list[Path]) -> list[str]:
    return sorted({p.name for d in dirs for p in d.iterdir() if p.is_dir()} - {"hydra"})


def _first_comment(path: Path) -> str:
    """The first comment line of an option's YAML (its one-line description)."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


# the commands that read run dirs live beside this module; imported last (they use fail())
from dmtune import cli_runs  # noqa: E402

app.command("eval")(cli_runs.evaluate)
app.command()(cli_runs.sample)
app.command()(cli_runs.compare)


def main() -> None:  # pragma: no cover - console-script entry
    app()
