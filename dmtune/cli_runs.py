"""The commands that read run dirs: ``dmtune eval``, ``dmtune sample``, ``dmtune compare``.

Registered on the app by :mod:`dmtune.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from omegaconf import DictConfig

from dmtune.cli import fail
from dmtune.overrides import ConfigError, eval_config

# shared by the commands that read a run and sample from it (sample, eval)
RUN_DIR = typer.Argument(
    ..., help="A run dir written by `dmtune train`.", exists=True, file_okay=False
)
TEMPERATURE = typer.Option(1.0, help="Sampling temperature (1 = the policy's own distribution).")
TOP_P = typer.Option(1.0, help="Nucleus sampling mass (1 = off).")
TOP_K = typer.Option(0, help="Top-k sampling (0 = off).")



def _run_config(run_dir: Path, overrides: list[str]) -> DictConfig | None:
    """The run's config with ``overrides`` applied (None without any), or one ``error:`` line."""
    try:
        return eval_config(run_dir, overrides) if overrides else None
    except ConfigError as error:
        fail(str(error))


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
    Logged to W&B as job_type=eval in the run's group: the settings in its config (eval.*),
    figures under eval/<metric>, standard errors under eval/<metric>_se; with the run's
    policy logged as a model artifact (logger.log_model=true), the eval run uses it (lineage).
    Each setting has its own report: a decoding other than ancestral sampling, or overrides
    of the run's config (with another constraint set its λ is fitted anew), write
    eval-<setting>.json, e.g. eval-top_p=0.9.json; eval.json, the run's own, is kept.
    Another -n or --seed re-estimates the same setting (same file).
    \b
    Examples:
      dmtune eval outputs/2026-11-22/10-00-00_default_dpg_baseline
      dmtune eval RUN_DIR -n 4096 --top-p 0.9
      dmtune eval RUN_DIR constraint=gender      # the same policy against another target
    """
    from dmtune.evaluate import eval_setting, evaluate_run
    from dmtune.priors import PriorUnavailableError
    from dmtune.rundir import RunDir

    overrides = list(overrides or [])
    cfg = _run_config(run_dir, overrides)
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
    for line in report["logging"]:  # where the W&B eval run is, and any W&B failure
        typer.echo(line, err=True)
    setting = eval_setting(temperature, top_k, top_p, overrides)
    typer.echo(f"wrote {RunDir(run_dir).eval_report(setting)}")


def sample(
    run_dir: Path = RUN_DIR,
    n: int = typer.Option(8, "--n", "-n", help="How many samples."),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    seed: int = typer.Option(0, help="Seed of the sampler."),
    overrides: Optional[List[str]] = typer.Argument(
        None,
        help="Overrides of the run's config, e.g. device=cpu (a GPU run on a laptop).",
        show_default=False,
    ),
) -> None:
    """Print samples of a trained policy with their feature scores.

    \b
    Examples:
      dmtune sample outputs/2026-11-22/10-00-00_default_dpg_baseline -n 16
      dmtune sample RUN_DIR device=cpu constraint=gender   # scored by another constraint set
    """
    from dmtune.priors import PriorUnavailableError
    from dmtune.rundir import sample_run

    overrides = list(overrides or [])
    cfg = _run_config(run_dir, overrides)
    try:
        rows = sample_run(
            run_dir, n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, cfg=cfg
        )
    except (ValueError, PriorUnavailableError) as error:  # CheckpointError is a ValueError
        fail(str(error).splitlines()[0])
    for row in rows:
        shown = ("prompt", "text", "log_prob")
        scores = "  ".join(f"{k}={v:.3g}" for k, v in row.items() if k not in shown)
        prompt = f"{row['prompt']} ‖" if "prompt" in row else ""
        typer.echo(f"[{scores}  log π={row['log_prob']:.2f}]  {prompt}{row['text']}")


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
