"""``dmtune compare``: runs side by side without any server.

Reads each run's ``metrics.jsonl`` (and ``eval.json`` when present), groups runs by objective,
and reports mean ± std over the runs of a group (seeds): a terminal table of final values, a
PNG of chosen metrics against ``samples_seen``, a self-contained HTML page and the numbers as
JSON.
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dmtune import metrics as m
from dmtune.jsonl import read_jsonl
from dmtune.rundir import RunDir

_MISSING = object()


@dataclass
class Run:
    path: Path
    group: str
    history: list[dict[str, Any]]
    evaluation: dict[str, float] | None


def find_runs(paths: list[Path], by: list[str] | None = None) -> list[Run]:
    """Every run dir (one holding metrics.jsonl and .hydra/) at or below the given paths.

    Runs are grouped by objective, or by the values of the config keys ``by`` (e.g. train.lr).
    """
    candidates = {*paths, *(f.parent for p in paths for f in p.rglob(RunDir(p).metrics.name))}
    found = sorted((c for c in candidates if RunDir(c).is_run()), key=_natural)
    if not found:
        raise ValueError(
            "no run dirs (metrics.jsonl with .hydra/config.yaml) under "
            f"{', '.join(map(str, paths))}"
        )
    return [_load(run_dir, by or []) for run_dir in found]


def _natural(path: Path) -> list:
    """Sort key: numbers by value (a sweep's job 10 after job 9), the rest as text."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _load(run_dir: Path, by: list[str]) -> Run:
    run = RunDir(run_dir)
    cfg = run.load_config()
    group = cfg.objective.name + (
        f":{cfg.objective.divergence}" if cfg.objective.get("divergence") else ""
    )
    if by:
        values = {key: OmegaConf.select(cfg, key, default=_MISSING) for key in by}
        missing = [key for key, value in values.items() if value is _MISSING]
        if missing:
            raise ValueError(
                f"--by {missing[0]}: {run_dir} has no config key {missing[0]!r} "
                "(keys look like objective.beta, train.lr, constraint.name)"
            )
        group = ", ".join(f"{key}={value}" for key, value in values.items())
    return Run(run_dir, group, read_jsonl(run.metrics), run.read_eval())


def default_metrics(runs: list[Run]) -> list[str]:
    """The constraint rates, then the divergences and diversity of the glossary."""
    keys = {k for run in runs for row in run.history for k in row}
    constraints = sorted(k for k in keys if m.is_constraint_rate(k))
    return [*constraints, *(k for k in m.COMPARED if k in keys)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[Run], metrics: list[str]) -> dict[str, Any]:
    """Per group: final values (eval.json when there is one, else the last logged step) and
    curves."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    summary: dict[str, Any] = {}
    for group, members in groups.items():
        final, curves = {}, {}
        for metric in metrics:
            values = [_final(run, metric) for run in members]
            values = [v for v in values if v is not None]
            if values:
                final[metric] = _mean_std(values)
            curves[metric] = _curve(members, metric)
        summary[group] = {"runs": [str(r.path) for r in members], "final": final, "curves": curves}
    return summary


def _final(run: Run, metric: str) -> float | None:
    if run.evaluation is not None and metric in run.evaluation:
        return run.evaluation[metric]
    logged = [row[metric] for row in run.history if metric in row]
    return logged[-1] if logged else None


def _curve(members: list[Run], metric: str) -> list[tuple[int, float, float]]:
    """(samples_seen, mean, std) at the sample counts every run of the group logged."""
    per_run = [
        {row[m.SAMPLES_SEEN]: row[metric] for row in run.history if metric in row}
        for run in members
    ]
    common = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    return [(x, *_mean_std([r[x] for r in per_run])) for x in common]


def format_table(summary: dict[str, Any], metrics: list[str]) -> str:
    """A plain-text table: one row per group, mean ± std of each final metric."""
    header = ["group", "runs", *metrics]
    rows = [
        [group, str(len(s["runs"])), *(_cell(s["final"].get(m)) for m in metrics)]
        for group, s in summary.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _cell(value: tuple[float, float] | None) -> str:
    return "n/a" if value is None else f"{value[0]:.4g} ± {value[1]:.2g}"


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (the first points average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(summary: dict[str, Any], metrics: list[str], path: Path, smooth: int = 1) -> None:
    """One panel per metric: mean over seeds against samples seen, ± std shaded.

    ``smooth`` > 1 draws trailing moving averages over that many logged points (per-step
    estimates such as KL(p‖π) are noisy); the table and JSON keep the raw values.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        for group, s in summary.items():
            curve = s["curves"][metric]
            if not curve:
                continue
            x, mean, std = zip(*curve)
            mean, std = _smoothed(list(mean), smooth), _smoothed(list(std), smooth)
            axis.plot(x, mean, label=group)
            axis.fill_between(
                x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.2
            )
        axis.set_title(
            metric + (f" (moving average of {smooth})" if smooth > 1 else ""), fontsize=10
        )
        axis.set_xlabel("samples seen")
    for axis in list(axes.flat)[len(metrics) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_html(summary: dict[str, Any], metrics: list[str], png: Path, path: Path) -> None:
    """A page with the table and the plot embedded (base64), readable with no server or files
    beside it."""
    head = "".join(f"<th>{html.escape(m)}</th>" for m in ["group", "runs", *metrics])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(c)}</td>"
            for c in [g, str(len(s["runs"])), *(_cell(s["final"].get(m)) for m in metrics)]
        )
        + "</tr>"
        for g, s in summary.items()
    )
    image = base64.b64encode(png.read_bytes()).decode()
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>dmtune compare</title>"
        "<style>body{font-family:sans-serif}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ccc;text-align:left}</style>"
        f"<h1>dmtune compare</h1><p>Final values: mean ± std over the runs of each group "
        f"(eval.json when present).</p>"
        f"<table><tr>{head}</tr>{body}</table>"
        f"<img alt='metrics against samples seen' src='data:image/png;base64,{image}'>"
    )


def compare(
    paths: list[Path],
    metrics: list[str] | None,
    out: Path,
    by: list[str] | None = None,
    smooth: int = 1,
) -> tuple[str, dict[str, Any]]:
    """Table, PNG, HTML and JSON for the runs under ``paths``; returns the table and the numbers."""
    runs = find_runs(paths, by)
    metrics = metrics or default_metrics(runs)
    summary = summarise(runs, metrics)
    out.mkdir(parents=True, exist_ok=True)
    plot(summary, metrics, out / "compare.png", smooth)
    write_html(summary, metrics, out / "compare.png", out / "compare.html")
    (out / "compare.json").write_text(json.dumps({"metrics": metrics, "groups": summary}, indent=1))
    return format_table(summary, metrics), summary
