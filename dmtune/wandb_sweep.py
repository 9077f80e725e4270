"""A W&B sweep config for users who prefer ``wandb sweep`` / ``wandb agent`` to Hydra's launchers.

The agent runs ``dmtune train <fixed overrides> key=value ...`` (``${args_no_hyphens}``: Hydra's
override grammar), so a W&B sweep composes exactly the configs ``dmtune sweep`` would.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, Override, RangeSweep

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
# Hydra settings of the launch itself mean nothing to a W&B agent
LAUNCH_KEYS = ("hydra/launcher", "hydra/sweeper", "hydra.launcher.", "hydra.sweeper.")


def wandb_sweep_config(
    overrides: list[str],
    group_options: Any,
    metric: str | None = None,
    goal: str = "maximize",
    method: str | None = None,
    project: str | None = None,
) -> dict[str, Any]:
    """The sweep config (a dict to dump as YAML) of a ``dmtune sweep`` command line.

    Sweeps become ``parameters`` (a,b,c / choice / range / glob → values; interval → uniform,
    tag(log, interval) → log-uniform); other overrides stay on the agent's command line as typed.
    ``group_options(group)`` lists a config group's options, for ``glob()``.
    """
    if goal not in GOALS:
        raise ValueError(f"goal {goal!r}; valid: {', '.join(GOALS)}")
    if method is not None and method not in METHODS:
        raise ValueError(f"method {method!r}; valid: {', '.join(METHODS)}")
    parameters: dict[str, Any] = {}
    fixed: list[str] = []
    for override in OverridesParser.create().parse_overrides(overrides):
        line = override.input_line
        if line.startswith(LAUNCH_KEYS):
            continue
        key = line.split("=", 1)[0]
        if override.is_sweep_override():
            parameters[key] = _parameter(override, key, group_options)
        else:
            fixed.append(line)
    if not parameters:
        raise ValueError(
            "nothing is swept; sweep a value, e.g. objective=dpg,dpg_baseline seed=0,1,2"
        )
    searched = any("distribution" in p for p in parameters.values())
    method = method or ("bayes" if searched and metric else "random" if searched else "grid")
    if method == "grid" and searched:
        raise ValueError(
            "method grid cannot search an interval(); "
            "list values (a,b,c) or use --method random/bayes"
        )
    if method == "bayes" and not metric:
        raise ValueError(
            "method bayes needs a metric to optimise, e.g. --metric constraint/positive"
        )
    config: dict[str, Any] = {"program": "dmtune", "method": method}
    if project:
        config["project"] = project
    if metric:
        config["metric"] = {"name": metric, "goal": goal}
    config["parameters"] = parameters
    config["command"] = ["${env}", "dmtune", "train", *fixed, "${args_no_hyphens}"]
    return config


def _parameter(override: Override, key: str, group_options: Any) -> dict[str, Any]:
    value = override.value()
    if isinstance(value, Glob):
        return {"values": value.filter(group_options(key))}
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        return {
            "distribution": "log_uniform_values" if log else "uniform",
            "min": float(value.start),
            "max": float(value.end),
        }
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return {"values": [_plain(v) for v in override.sweep_iterator()]}
    raise ValueError(f"{override.input_line} cannot be written as a W&B sweep parameter")


def _plain(value: Any) -> Any:
    """YAML-friendly scalars: numbers and booleans as they are, anything else as Hydra's string."""
    return value if isinstance(value, (int, float, bool, str)) else str(value)
