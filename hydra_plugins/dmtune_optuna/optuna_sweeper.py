"""A Hydra sweeper that searches hyperparameters with Optuna, on a metric of dmtune's runs.

Written for current Optuna (3.6 and later); Hydra's own ``hydra-optuna-sweeper`` pins
``optuna<3``. Search spaces use Hydra's sweep grammar, on the command line or in
``hydra.sweeper.params``:

    a,b,c / choice(a,b,c)           categorical
    range(0,5) / range(0.1,0.5,0.1)  integers / a float grid (the stop is excluded, as in Hydra)
    interval(0.01,1)                 uniform float
    tag(log,interval(1e-5,1e-3))     log-uniform float

Each trial is one ``dmtune train`` job through the configured launcher (``n_jobs`` at a time);
its value is ``hydra.sweeper.metric`` from the run's summary (the mean of the last logged steps).
The best trial is written to ``<sweep dir>/optimization_results.yaml``.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")


class SweepError(CompactHydraException):
    """A bad search setting: Hydra prints the message alone (one line), no traceback."""


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.dmtune_optuna.optuna_sweeper.OptunaSweeper"
    # required: a key of the run summary's "final", e.g. constraint/positive
    metric: Optional[str] = None
    direction: str = "maximize"  # maximize or minimize
    n_trials: int = 8  # trials in all
    # trials launched together (the launcher runs them; joblib runs them in parallel)
    n_jobs: int = 1
    sampler: str = "tpe"  # tpe, random or grid (grid: categorical and range() spaces only)
    seed: Optional[int] = 0  # the sampler's seed
    study_name: Optional[str] = None
    storage: Optional[str] = None  # e.g. sqlite:///optuna.db to keep and resume the study
    params: Dict[str, str] = field(default_factory=dict)  # key → sweep expression


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="dmtune"
)


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override (ValueError for what Optuna cannot search)."""
    import optuna.distributions as d

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return d.CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(x, int) for x in (start, stop, step)):
            count = len(range(start, stop, step))
            if count == 0 or step < 0:
                raise ValueError(
                    f"{override.input_line} is empty; "
                    "use range(start,stop[,step]) with start < stop"
                )
            return d.IntDistribution(start, start + (count - 1) * step, step=step)
        values = [float(v) for v in override.sweep_string_iterator()]
        if not values:
            raise ValueError(
                f"{override.input_line} is empty; use range(start,stop,step) with start < stop"
            )
        return d.CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if log_scale and value.start <= 0:
            raise ValueError(f"{override.input_line}: a log interval needs start > 0")
        return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(
        f"{key}: {override.input_line} cannot be searched by Optuna; "
        "use a,b,c / choice(), range() or interval()"
    )


class OptunaSweeper(Sweeper):
    def __init__(self, metric: str, direction: str, n_trials: int, n_jobs: int, sampler: str,
                 seed: Optional[int], study_name: Optional[str], storage: Optional[str],
                 params: Optional[Dict[str, str]] = None) -> None:
        self.metric, self.direction = metric, direction
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler_name, self.seed = sampler, seed
        self.study_name, self.storage = study_name, storage
        self.params = dict(params or {})
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        # Sweeper.validate_batch_is_legal composes with its loader
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def check(self) -> None:
        """The sweeper's own settings, before any trial runs."""
        if self.metric in ("???", "", None):
            raise SweepError(
                "error: hydra/sweeper=optuna needs a metric to optimise, "
                "e.g. hydra.sweeper.metric=constraint/positive"
            )
        if self.direction not in ("maximize", "minimize"):
            raise SweepError(
                f"error: hydra.sweeper.direction={self.direction!r}; valid: maximize, minimize"
            )
        if self.sampler_name not in SAMPLERS:
            raise SweepError(
                f"error: hydra.sweeper.sampler={self.sampler_name!r}; "
                f"valid: {', '.join(SAMPLERS)}"
            )
        if self.n_trials < 1 or self.n_jobs < 1:
            raise SweepError(
                f"error: hydra.sweeper.n_trials={self.n_trials} and n_jobs={self.n_jobs} "
                "must be at least 1"
            )

    def search_space(self, arguments: List[str]) -> tuple[dict[str, Any], list[str]]:
        """Distributions by key and the fixed overrides, from hydra.sweeper.params then the
        command line."""
        parser = OverridesParser.create()
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        space: dict[str, Any] = {}
        fixed: dict[str, str] = {}
        for override in parser.parse_overrides(lines):
            key = override.get_key_element()
            if override.is_sweep_override():
                space[key] = distribution(override)
                fixed.pop(key, None)
            else:
                fixed[key] = override.input_line
                space.pop(key, None)
        if not space:
            raise ValueError(
                "hydra/sweeper=optuna has nothing to search; sweep a value, "
                "e.g. 'train.lr=tag(log,interval(1e-5,1e-3))'"
            )
        return space, list(fixed.values())

    def _sampler(self, space: dict[str, Any]) -> Any:
        import optuna

        if self.sampler_name == "random":
            return optuna.samplers.RandomSampler(seed=self.seed)
        if self.sampler_name == "grid":
            grid = {}
            for key, dist in space.items():
                if isinstance(dist, optuna.distributions.CategoricalDistribution):
                    grid[key] = list(dist.choices)
                elif isinstance(dist, optuna.distributions.IntDistribution):
                    grid[key] = list(range(dist.low, dist.high + 1, dist.step))
                else:
                    raise ValueError(
                        f"{key}: sampler=grid needs choice() or range(), not an interval"
                    )
            return optuna.samplers.GridSampler(grid, seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed)

    def sweep(self, arguments: List[str]) -> Any:
        import optuna

        assert self.config is not None and self.launcher is not None
        self.check()
        try:
            space, fixed = self.search_space(arguments)
            sampler = self._sampler(space)
        except ValueError as error:
            raise SweepError(f"error: {error}") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=self.study_name, storage=self.storage,
            load_if_exists=self.storage is not None, direction=self.direction, sampler=sampler,
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(
            "Optuna: %d trials of %s (%s), space %s",
            self.n_trials, self.metric, self.direction, space,
        )
        done = 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [[*fixed, *(f"{k}={_format(v)}" for k, v in t.params.items())] for t in trials]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                value = self._value(ret)
                if value is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
            done += len(trials)
        results = self._results(study)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info(
            "Optuna best %s = %s with %s",
            self.metric, results.get("best_value"), results.get("best_params"),
        )
        return results

    def _value(self, ret: Any) -> Optional[float]:
        try:
            summary = ret.return_value  # the task's return: the run summary's final metrics
        except Exception as error:  # the job failed; Hydra re-raises its exception here
            log.warning(
                "trial failed: %s",
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
            return None
        if not isinstance(summary, dict):
            return None
        if self.metric not in summary:
            raise SweepError(
                f"error: hydra.sweeper.metric={self.metric!r} is not a run metric; "
                f"valid: {', '.join(sorted(summary))}"
            )
        value = summary[self.metric]
        return None if value is None or not math.isfinite(value) else float(value)

    def _results(self, study: Any) -> dict[str, Any]:
        import optuna

        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        results: dict[str, Any] = {
            "name": "optuna", "metric": self.metric, "direction": self.direction,
            "trials": [
                {"number": t.number, "state": t.state.name, "value": t.value,
                 "params": dict(t.params)}
                for t in study.trials
            ],
        }
        if complete:
            results["best_value"] = study.best_value
            results["best_params"] = dict(study.best_params)
        return results


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
