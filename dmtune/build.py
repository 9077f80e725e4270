"""Everything a run is made of, built from a composed config: device, prior, target, trainer,
logger.

Settings pass straight from the config to the constructors: the trainer's config is the
``train`` group itself (:class:`~dmtune.trainer.TrainerConfig` inherits its schema), the
objective's hyperparameters go to its loss unchanged, a feature's ``params`` to its kind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dmtune import __version__
from dmtune.config import objective_name_and_params
from dmtune.constraints import build_feature
from dmtune.distributed import World
from dmtune.lm import LM
from dmtune.loggers import JsonlSink, RunLogger, Sink
from dmtune.priors import TOY, load_prior
from dmtune.prompts import prompt_set
from dmtune.rundir import RunDir
from dmtune.target import Target
from dmtune.trainer import Trainer, TrainerConfig
from dmtune.wandb_sink import WANDB_GROUP_MAX, WandbOptions, WandbSink


def resolve_device(cfg: DictConfig, world: World | None = None) -> torch.device:
    """``auto`` is the first GPU when there is one; ``cuda`` without one is a clear error; a
    rank of a data-parallel run takes the device its launcher gave it."""
    name = cfg.device.name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device.name={cfg.device.name} but torch sees no CUDA GPU; "
            "use device=cpu or device=auto"
        )
    if cfg.device.threads > 0:
        torch.set_num_threads(cfg.device.threads)
    if world is not None and world.device is not None:
        name = str(world.device)
    if name.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = cfg.device.tf32
        torch.backends.cudnn.allow_tf32 = cfg.device.tf32
    return torch.device(name)


def is_exact(cfg: DictConfig) -> bool:
    """Exact mode: the toy prior, whose sequence space is enumerated."""
    return cfg.model.name_or_path == TOY


def build_lm(cfg: DictConfig, evaluation: bool = False, world: World | None = None) -> LM:
    """The prior ``a`` on the configured device, with its tokenizer and the run's prompt or
    prompts (with ``evaluation``, the held-out prompts when the config names some)."""
    toy = OmegaConf.to_container(cfg.model.toy, resolve=True)
    device = resolve_device(cfg, world)
    if world is not None and world.sharded:  # whole on the CPU; its shards go to the device
        device = torch.device("cpu")
    prior, tokenizer = load_prior(
        cfg.model.name_or_path, dtype=cfg.device.dtype, device=device, toy=toy
    )
    lm = LM(prior, tokenizer, cfg.train.prompt, prompt_set(cfg.train, evaluation))
    context = getattr(prior.config, "n_positions", None) or getattr(
        prior.config, "max_position_embeddings", None
    )
    needed = lm.prompt_length() + cfg.train.max_new_tokens
    if isinstance(context, int) and needed > context:
        longest = "the longest prompt" if lm.prompts is not None else "the prompt"
        raise ValueError(
            f"train.max_new_tokens={cfg.train.max_new_tokens} after {longest} "
            f"({needed - cfg.train.max_new_tokens} tokens with BOS) needs {needed} positions; "
            f"model {cfg.model.name_or_path} has {context}"
        )
    return lm


def build_target(cfg: DictConfig, tokenizer: Any) -> Target:
    """The EBM of the configured constraint set (features checked against the tokenizer)."""
    roles: dict[str, list] = {"pointwise": [], "distributional": [], "reward": []}
    moments = []
    for name, feature in cfg.constraint.features.items():
        params = OmegaConf.to_container(feature.params, resolve=True)
        roles[feature.role].append(build_feature(name, feature.kind, params, tokenizer))
        if feature.role == "distributional":
            moments.append(feature.moment)
    return Target(
        pointwise=tuple(roles["pointwise"]),
        distributional=tuple(roles["distributional"]),
        moments=torch.tensor(moments, dtype=torch.float64) if moments else None,
        reward=roles["reward"][0] if roles["reward"] else None,
    )


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    """The trainer's config: the ``train`` group as it is, the objective, the seed, exact mode."""
    objective, params = objective_name_and_params(cfg)
    train = OmegaConf.to_container(cfg.train, resolve=True)
    return TrainerConfig(
        **train, objective=objective, objective_params=params, exact=is_exact(cfg), seed=cfg.seed,
        lora=cfg.model.lora if cfg.model.lora.r > 0 else None,
    )


def build_trainer(cfg: DictConfig, world: World | None = None) -> Trainer:
    """Prior, target and trainer from a composed config (one rank's, with a ``world``)."""
    lm = build_lm(cfg, world=world)
    target = build_target(cfg, lm.tokenizer)
    return Trainer(lm.model, lm.tokenizer, target, trainer_config(cfg), world)


@dataclass(frozen=True)
class LogIdentity:
    """What names a logged run beside its config: train or eval, its name and extra tags, the
    overrides it was launched with (they choose its W&B group), and what its W&B config holds
    besides the run's config (an evaluation's settings)."""

    name: str
    job_type: str | None = None  # default: logger.job_type
    tags: tuple[str, ...] = ()
    wandb_mode: str | None = None  # default: logger.mode
    overrides: tuple[str, ...] = ()
    config: Mapping[str, Any] | None = None  # extra top-level W&B config entries


# overrides that do not make another experiment: runs differing only in these share a group
NOT_IN_GROUP = ("seed=", "resume=", "hydra.", "hydra/", "logger", "device", "experiment=",
                "objective=")


def default_group(cfg: DictConfig, overrides: tuple[str, ...] | list[str]) -> str:
    """``<experiment>:<objective>[,<other overrides>]``: the runs that differ only in seed."""
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(NOT_IN_GROUP))
    group = ",".join([f"{cfg.experiment_name}:{cfg.objective.name}", *kept])
    if len(group) > WANDB_GROUP_MAX:  # W&B's limit: keep it readable and still unique
        digest = hashlib.sha1(group.encode()).hexdigest()[:8]
        group = f"{group[: WANDB_GROUP_MAX - 9]}~{digest}"
    return group


def wandb_options(cfg: DictConfig, identity: LogIdentity) -> WandbOptions:
    """The W&B run of a config: grouped with the runs that differ only in seed, tagged with
    what ran (the model by its last path part: tags are at most 64 characters)."""
    logger = cfg.logger
    return WandbOptions(
        mode=identity.wandb_mode or logger.mode,
        project=logger.project,
        entity=logger.entity,
        group=logger.group or default_group(cfg, identity.overrides),
        job_type=identity.job_type or logger.job_type,
        tags=(
            cfg.objective.name,
            cfg.constraint.name,
            Path(str(cfg.model.name_or_path)).name or str(cfg.model.name_or_path),
            *([logger.sweep] if logger.sweep else []),
            *logger.tags,
            *identity.tags,
        ),
        name=logger.name or identity.name,
        timeout_s=logger.timeout_s,
    )


def _wandb_sink(
    cfg: DictConfig, run_dir: Path, identity: LogIdentity, resume_step: int | None
) -> Sink:
    config = OmegaConf.to_container(cfg, resolve=True)
    config["dmtune"] = {"version": __version__, "overrides": list(identity.overrides)}
    config.update(identity.config or {})
    return WandbSink(run_dir, wandb_options(cfg, identity), config, resume_step=resume_step)


# logger.sinks: name → builder (metrics.jsonl is always written: it is the run's own record)
SINKS: dict[str, Callable[[DictConfig, Path, LogIdentity, int | None], Sink]] = {
    "wandb": _wandb_sink
}


def build_logger(
    cfg: DictConfig, run_dir: str | Path, identity: LogIdentity, resume_step: int | None = None
) -> RunLogger:
    """The run dir's JSONL files, then each sink of ``logger.sinks``; ``resume_step``: the
    checkpoint a resumed run continues from (each sink keeps what it has up to it)."""
    names = list(cfg.logger.sinks)
    if (
        identity.wandb_mode is not None
    ):  # an explicit W&B mode (dmtune eval --wandb) turns its sink on or off
        names = [n for n in names if n != "wandb"] + (
            [] if identity.wandb_mode == "disabled" else ["wandb"]
        )
    sinks = [JsonlSink(RunDir(run_dir), resume_step=resume_step)]
    sinks += [SINKS[name](cfg, Path(run_dir), identity, resume_step) for name in names]
    return RunLogger(sinks)
