"""Hydra overrides: compose and validate, explain a failure in one line, sweeps, resume, eval.

Everything here raises :class:`ConfigError` (one line, naming the bad value and the valid
ones) and never exits: the CLI prints the line, library code and benchmarks catch it.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep, Override
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from dmtune.config import register_configs, validate
from dmtune.rundir import RunDir, RunDirError

CONF_DIR = Path(__file__).parent / "conf"
CONFIG_NAME = "config"
# what `dmtune eval` cannot change: it measures the run's own policy
FIXED_AT_EVAL = ("model", "objective", "seed")
_MAX_NAME_ATTEMPTS = 1000
SEARCHPATH = "hydra.searchpath="  # hydra.searchpath=[file://DIR]: the user's own config groups


class ConfigError(ValueError):
    """A config that cannot be composed or is invalid; the message is one line."""


def user_config_dirs(overrides: list[str]) -> list[Path]:
    """The folders of ``hydra.searchpath=[file://DIR,...]``: the user's own config groups."""
    dirs = []
    for line in overrides:
        if line.startswith(SEARCHPATH):
            for entry in line[len(SEARCHPATH) :].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if not entry.startswith("file://"):
                    raise ConfigError(f"hydra.searchpath: {entry!r}; give folders as file://DIR")
                path = Path(entry.removeprefix("file://")).expanduser()
                if not path.is_dir():
                    raise ConfigError(f"hydra.searchpath: {path} is not a folder")
                dirs.append(path)
    return dirs


def task_overrides(overrides: list[str]) -> list[str]:
    """What composes the job's config: everything but Hydra's own settings, the search path
    (the user's config groups) kept."""
    return [
        o for o in overrides if not o.lstrip("+~").startswith("hydra") or o.startswith(SEARCHPATH)
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose and validate, turning Hydra's and our errors into one line each."""
    _check_group_options(overrides)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(CONFIG_NAME, overrides=overrides)
        except HydraException as error:
            raise ConfigError(explain_compose_error(error, overrides)) from error
    try:
        validate(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return cfg


def _check_group_options(overrides: list[str]) -> None:
    """Every option chosen for a config group exists: Hydra silently skips a missing option of an
    ``optional`` group (``experiment=smok`` would run the default experiment)."""
    for line in overrides:
        key, _, value = line.lstrip("+~").partition("=")
        if not value or not (CONF_DIR / key).is_dir() or "(" in value:  # sweeps are checked per job
            continue
        options = group_options(key, overrides)
        for option in value.strip("[]").split(","):
            option = option.strip()
            if option and option != "null" and option not in options:
                raise ConfigError(
                    f"{key}={option} is not an option of {key}; valid: {', '.join(options)}"
                    f"{_did_you_mean(option, options)}"
                )


def group_options(group: str, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The options of a config group (its YAML file stems), built-in and the user's."""
    dirs = [CONF_DIR, *user_config_dirs(list(overrides))]
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def explain_compose_error(error: Exception, overrides: list[str]) -> str:
    """One line for a failed composition: the bad key or option and what would be valid."""
    text = str(error)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = group_options(group, overrides)
        return (
            f"{group}={option} is not an option of {group}; "
            f"valid: {', '.join(options)}{_did_you_mean(option, options)}"
        )
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        parent, _, leaf = key.rpartition(".")
        others = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
        if parent == "objective":  # the objective's hyperparameters are its loss's keywords
            return _objective_param_error(leaf, others)
        valid = _keys_at(parent, others)
        where = f"keys of {parent}" if parent else "top-level keys and groups"
        return f"unknown key {key!r}; valid {where}: {', '.join(valid)}{_did_you_mean(leaf, valid)}"
    cause = error.__cause__
    detail = (
        str(cause).strip().splitlines()[0]
        if cause is not None and str(cause).strip()
        else text.splitlines()[0]
    )
    return f"{text.splitlines()[0]}: {detail}" if detail not in text else text.splitlines()[0]


def _composed_or_default(overrides: list[str]) -> DictConfig:
    try:
        return compose(CONFIG_NAME, overrides=overrides)
    except HydraException:
        return compose(CONFIG_NAME)


def _keys_at(path: str, overrides: list[str]) -> list[str]:
    cfg = _composed_or_default(overrides)
    node = OmegaConf.select(cfg, path) if path else cfg
    keys = set(node.keys()) if isinstance(node, DictConfig) else set()
    if not path:  # config groups such as experiment leave no node of their own
        keys |= {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    return sorted(keys)


def _objective_param_error(param: str, overrides: list[str]) -> str:
    from dmtune.objectives import check_objective_params, objective_params

    name = _composed_or_default(overrides).objective.name
    try:
        check_objective_params(name, {param: None})
    except ValueError as error:
        return f"{error}{_did_you_mean(param, list(objective_params(name)))}"
    # a hyperparameter the objective takes but its YAML leaves at the default: add it with +
    return f"objective.{param} is not in {name}'s config; set it with +objective.{param}=VALUE"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- resume and eval: a run's own overrides, then the new ones ---


def resume_overrides(overrides: list[str]) -> list[str]:
    """``resume=RUN_DIR``: the run's own overrides, then the new ones, in the same run dir."""
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if not resume:
        return overrides
    run_dir = Path(resume[-1]).resolve()
    try:
        saved = RunDir(run_dir).saved_overrides()
    except RunDirError:
        raise ConfigError(
            f"resume={resume[-1]} is not a dmtune run dir (no .hydra/overrides.yaml there)"
        ) from None
    new = [o for o in overrides if not o.startswith("resume=")]
    return [*saved, *new, f"resume={run_dir}", f"hydra.run.dir={run_dir}"]


def eval_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's config recomposed from its own overrides, then these (validated, one-line
    errors)."""
    fixed = [
        o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] in FIXED_AT_EVAL
    ]
    if fixed:
        raise ConfigError(
            f"{fixed[0]}: eval measures the run's own policy; the model, objective and seed are "
            "the run's (override constraint, train, device, logger)"
        )
    try:
        saved = RunDir(run_dir).saved_overrides()
    except RunDirError as error:
        raise ConfigError(str(error)) from None
    return compose_config([*task_overrides(saved), *overrides])


# --- sweeps ---


def sweep_jobs(overrides: list[str], searching: bool = False) -> list[list[str]]:
    """Override lists that check every swept value once: each with the others at their first value.

    Comma lists, ``range()`` and ``glob()`` (over a group's options) are expanded as Hydra
    would; ``interval()`` (only for a searching sweeper) by its two ends; ``hydra...``
    overrides are left to Hydra.
    """
    base, swept = _swept(overrides, searching)
    jobs = [base]
    for index, key, values in swept:
        jobs += [[*base[:index], f"{key}={value}", *base[index + 1 :]] for value in values[1:]]
    return jobs


def grid_size(overrides: list[str]) -> int:
    """How many jobs a grid sweep runs: the product of each swept key's number of values."""
    return math.prod(len(values) for _, _, values in _swept(overrides, False)[1])


def _swept(
    overrides: list[str], searching: bool
) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """(every override at its first value, [(position, key, values)] of the swept ones)."""
    try:
        parsed = [
            o
            for o in OverridesParser.create().parse_overrides(task_overrides(overrides))
        ]
    except OverrideParseException as error:
        raise ConfigError(str(error).strip().splitlines()[0]) from None
    base: list[str] = []
    swept: list[tuple[int, str, list[str]]] = []
    for override in parsed:
        key = override.input_line.split("=", 1)[0]
        if override.is_sweep_override():
            if isinstance(override.value(), IntervalSweep) and not searching:
                raise ConfigError(
                    f"{override.input_line} is a search interval: add hydra/sweeper=optuna, "
                    "or list values (a,b,c) or range()"
                )
            values = _sweep_values(override, key, overrides)
            if not values:
                raise ConfigError(
                    f"{override.input_line} selects nothing; "
                    f"options of {key}: {', '.join(group_options(key, overrides))}"
                )
            swept.append((len(base), key, values))
            base.append(f"{key}={values[0]}")
        else:
            base.append(override.input_line)
    return base, swept


def _sweep_values(override: Override, key: str, overrides: list[str]) -> list[str]:
    value = override.value()
    if isinstance(value, Glob):
        return value.filter(group_options(key, overrides))
    if isinstance(value, IntervalSweep):  # hydra/sweeper=optuna searches it; check both ends
        return [repr(float(value.start)), repr(float(value.end))]
    return list(override.sweep_string_iterator())


# --- run dirs that no other run shares ---


def claim_run_dir(overrides: list[str], multirun: bool = False) -> list[str]:
    """The overrides plus ``hydra.run.dir`` (``hydra.sweep.dir``) set to a dir this process made.

    The configured pattern has one-second resolution: two runs started in the same second
    (a shell loop, a job array) would share it. The dir is created exclusively here, with
    ``-2``, ``-3``... appended while the name is taken. An explicit dir is left as given.
    """
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(o.startswith(f"{key}=") for o in overrides):
        return overrides
    task = task_overrides(overrides)
    if multirun:  # the sweep dir does not depend on the swept values: compose the first job
        task = sweep_jobs(task)[0]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(CONFIG_NAME, overrides=task, return_hydra_config=True)
        except HydraException as error:
            raise ConfigError(explain_compose_error(error, task)) from error
    base = Path(OmegaConf.select(cfg, key))
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, _MAX_NAME_ATTEMPTS + 1):
        path = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return [*overrides, f"{key}={path}"]
    raise ConfigError(f"{base}: {_MAX_NAME_ATTEMPTS} run dirs of that name exist; set {key}=...")


# --- handing over to Hydra's own main ---


def run_hydra_main(
    task: Callable[[DictConfig], Any], overrides: list[str], multirun: bool = False
) -> None:
    """Run ``task(cfg)`` through Hydra's own main (run dirs, ``.hydra/``, launchers, sweepers).

    Hydra's main reads its overrides from ``sys.argv``: it is set for the call and restored.
    """
    import hydra

    register_configs()
    main = hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")(task)
    argv = sys.argv
    sys.argv = ["dmtune", *(["--multirun"] if multirun else []), *overrides]
    try:
        main()
    finally:
        sys.argv = argv
