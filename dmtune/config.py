"""The structured-config schema (dataclasses in Hydra's ConfigStore) and its validation.

The YAML files under ``conf/`` fill these dataclasses, so a misspelt key or a value of the
wrong type fails while composing, before any model loads. :func:`validate` then checks what
a schema cannot: objective names, feature kinds and roles, moments, device names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

ROLES = ("pointwise", "distributional", "reward")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ToyConfig:
    words: List[str] = field(
        default_factory=lambda: ["a", "b", "c", "d"]
    )  # the toy vocabulary besides EOS
    seed: int = 0  # seeds the toy prior's weights
    n_layer: int = 2
    n_embd: int = 16
    n_head: int = 2


@dataclass
class LoraConfig:
    # LoRA (peft): r > 0 trains low-rank adapters on the prior's own weights (one copy in
    # memory; the prior is the model with adapters off). 0: full fine-tuning
    r: int = 0
    alpha: float = 16.0  # scale alpha / r of the adapters' update
    dropout: float = 0.0  # in the update's forward/backward only (sampling and scoring: none)
    target_modules: Optional[List[str]] = None  # None: peft's default for the architecture
    save_merged: bool = False  # also write policy/merged/, the prior with the adapters merged


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # tiny (embedded), toy, smollm2, a hub name or a local path
    toy: ToyConfig = field(default_factory=ToyConfig)  # used when name_or_path=toy
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class FeatureConfig:
    kind: str = (
        MISSING  # sentiment, word, wordlist, female, token, ... (dmtune.constraints.FEATURE_KINDS)
    )
    role: str = "pointwise"  # pointwise (b ∈ {0,1}), distributional (moment matched) or reward
    moment: Optional[float] = None  # target moment μ̄, required when role=distributional
    params: Dict[str, Any] = field(default_factory=dict)  # the kind's own parameters


@dataclass
class ConstraintConfig:
    name: str = "none"  # a label for run names and W&B tags
    features: Dict[str, FeatureConfig] = field(default_factory=dict)  # feature name → its config


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps (~5.5 min at the defaults on 2 free CPU cores)
    batch_size: int = 256  # samples per step
    max_new_tokens: int = 32  # tokens per sample (EOS included)
    prompt: str = ""  # every sample continues BOS + prompt (when train.prompts is not set)
    # conditional targets (CDPG): a .txt (one prompt per line), a .jsonl (prompt_field), or a
    # datasets dataset (hub name, save_to_disk dir, .json/.csv/.parquet; column prompt_field)
    prompts: Optional[str] = None
    prompt_field: str = "prompt"  # the JSONL key or dataset column holding the prompt
    prompt_split: str = "train"  # the dataset split to train on
    samples_per_prompt: int = 8  # each step draws batch_size / samples_per_prompt prompts
    # samples per forward/backward pass of scoring and the update (in micro-batches, each cut to
    # its longest sequence; the loss and metrics are still the whole batch's): bounds a step's
    # activations and logits. 0: the whole batch in one pass
    micro_batch_size: int = 64
    # samples drawn at once (0: the whole batch; the samples are the same either way): bounds
    # the KV cache, which the whole batch's decoding holds
    sample_micro_batch_size: int = 0
    # decode steps through torch.compile and a static KV cache (ended rows then stay in the batch):
    # for GPUs; on 2 CPU cores it is slower (README, "Speed, memory and scale")
    compile_sampler: bool = False
    eval_prompts: Optional[str] = None  # held-out prompts for dmtune eval (default: train.prompts)
    eval_split: Optional[str] = None  # ... or another split of the same dataset
    lr: float = 3e-4  # tuned on the 2.6M tiny prior (1e-3 diverges); ~1e-5 suits 100M+ priors
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    fit_samples: int = 4096  # prior samples for base rates and λ fitting
    log_every: int = 1  # steps between metrics.jsonl / W&B lines
    eval_every: int = 25  # steps between sample tables, self-BLEU and exact metrics
    checkpoint_every: int = 50  # steps between checkpoints (one is always written at the end)
    logged_samples: int = 16  # samples per table at eval steps
    max_bad_steps: int = 5  # non-finite steps in a row (each skipped) before the run stops
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's moment decay rates


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    dtype: str = "float32"  # float32, bfloat16, float16 (or float64) weights
    tf32: bool = True  # allow TF32 matmuls on Ampere+ GPUs
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    # data parallel (accelerate): processes of one run, each sampling batch_size / N; 1: none.
    # dmtune starts them itself (torch's elastic launcher), or joins torchrun / accelerate launch
    num_processes: int = 1
    # ddp: each rank holds the weights; fsdp: each holds 1/N of weights, gradients, optimizer
    strategy: str = "ddp"
    timeout_s: float = 600.0  # a collective waiting this long for a silent rank fails the run


@dataclass
class LoggerConfig:
    # where metrics go besides the run dir's metrics.jsonl (always written): [] or [wandb]
    sinks: List[str] = field(default_factory=lambda: ["wandb"])
    # W&B settings (also the run's identity on any dashboard: project, group, job type, tags)
    mode: str = "auto"  # auto (online when logged in, else offline), online, offline, disabled
    project: str = "dmtune"
    entity: Optional[str] = None
    # runs that differ only in their seed share a group (W&B plots its mean ± spread); default:
    # the experiment, the objective and every other override but seed, logger.*, device.*
    group: Optional[str] = None
    job_type: str = "train"
    tags: List[str] = field(default_factory=list)
    name: Optional[str] = None  # W&B run name; defaults to the run dir's name
    sweep: Optional[str] = None  # the sweep a run belongs to (dmtune sweep sets it): a W&B tag
    timeout_s: float = 60.0  # the longest W&B may hold the run at start (init) or end (finish)
    # at the end of a run, log policy/ as a W&B artifact of type model (model-<W&B run id>);
    # `dmtune eval` of that checkpoint then declares it as its input (lineage)
    log_model: bool = False


@dataclass
class DmtuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    # name plus the objective's own hyperparameters (the loss's keyword-only parameters,
    # dmtune.objectives.objective_params), checked against its signature by validate()
    objective: Dict[str, Any] = field(default_factory=lambda: {"name": MISSING})
    train: TrainConfig = field(default_factory=TrainConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment_name: str = "default"  # W&B group and run-dir prefix
    seed: int = 0
    resume: Optional[str] = None  # a run dir to continue from its last checkpoint


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (``defaults: [dmtune_schema, ...]``)."""
    store = ConfigStore.instance()
    store.store(name="dmtune_schema", node=DmtuneConfig)


def objective_name_and_params(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The objective's name and its hyperparameters (every other key of ``objective``)."""
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    return objective.pop("name"), objective


# train keys and the smallest valid value (every other numeric key of train is checked below)
AT_LEAST_ONE = (
    "steps", "batch_size", "max_new_tokens", "fit_samples", "log_every", "eval_every",
    "checkpoint_every", "max_bad_steps", "samples_per_prompt",
)
AT_LEAST_ZERO = (
    "lr", "weight_decay", "warmup_steps", "grad_clip", "logged_samples", "micro_batch_size",
    "sample_micro_batch_size",
)


def validate(cfg: DictConfig) -> None:
    """Checks beyond the schema, before any model loads; each failure is one ``ValueError``
    line naming the key, the bad value and what would be valid."""
    _check_objective(cfg)
    _check_constraint(cfg)
    _check_train(cfg)
    _check_lora(cfg)
    _check_device_and_logger(cfg)


def _check_objective(cfg: DictConfig) -> None:
    from dmtune.objectives import OBJECTIVES, check_objective_params, names_of

    name, params = objective_name_and_params(cfg)
    if name not in OBJECTIVES:
        raise ValueError(
            f"objective.name={name!r} is not an objective; valid: {', '.join(OBJECTIVES)}"
        )
    check_objective_params(name, params)
    roles = {feature.role for feature in cfg.constraint.features.values()}
    if OBJECTIVES[name].family == "rm" and not roles & {"pointwise", "reward"}:
        raise ValueError(
            f"objective {name!r} maximises a reward, but constraint {cfg.constraint.name!r} has no "
            f"pointwise or reward feature; use a distribution-matching objective "
            f"({', '.join(names_of('dm'))})"
        )


def _check_constraint(cfg: DictConfig) -> None:
    from dmtune.constraints import BINARY_KINDS, FEATURE_KINDS, check_feature_params

    for feature_name, feature in cfg.constraint.features.items():
        where = f"constraint.features.{feature_name}"
        if feature.kind not in FEATURE_KINDS:
            raise ValueError(
                f"{where}.kind={feature.kind!r} is not a feature kind; "
                f"valid: {', '.join(FEATURE_KINDS)}"
            )
        check_feature_params(feature_name, feature.kind, feature.params)
        if feature.role not in ROLES:
            raise ValueError(f"{where}.role={feature.role!r}; valid: {', '.join(ROLES)}")
        if (feature.role == "distributional") != (feature.moment is not None):
            raise ValueError(
                f"{where}: a moment is required for role=distributional and only then "
                f"(role={feature.role}, moment={feature.moment})"
            )
        binary = feature.kind in BINARY_KINDS
        if feature.role == "distributional" and binary and not 0 < feature.moment < 1:
            raise ValueError(
                f"{where}.moment={feature.moment}: the mean of a 0/1 feature ({feature.kind}) lies "
                "strictly between 0 and 1 (use role=pointwise for 'always')"
            )
    rewards = [n for n, f in cfg.constraint.features.items() if f.role == "reward"]
    if len(rewards) > 1:
        raise ValueError(f"at most one feature may have role=reward; got {', '.join(rewards)}")


def _check_train(cfg: DictConfig) -> None:
    from dmtune.priors import context_length

    train = cfg.train
    for key in AT_LEAST_ONE:
        if train[key] < 1:
            raise ValueError(f"train.{key}={train[key]} must be at least 1")
    for key in AT_LEAST_ZERO:
        if train[key] < 0:
            raise ValueError(f"train.{key}={train[key]} must be at least 0")
    betas = list(train.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(
            f"train.betas={betas}: AdamW needs two decay rates in [0, 1), e.g. [0.9,0.999]"
        )
    if train.prompts is not None:
        from dmtune.prompts import check_prompt_batch, check_prompt_files

        check_prompt_batch(train.batch_size, train.samples_per_prompt)
        check_prompt_files(train)
    context = context_length(cfg.model.name_or_path, OmegaConf.to_container(cfg.model.toy))
    if context is not None and train.max_new_tokens + 1 > context:  # + BOS
        raise ValueError(
            f"train.max_new_tokens={train.max_new_tokens} does not fit the context of "
            f"model {cfg.model.name_or_path} ({context} positions for BOS, prompt and sample); "
            f"use at most {context - 1}"
        )


def _check_lora(cfg: DictConfig) -> None:
    lora = cfg.model.lora
    if lora.r < 0:
        raise ValueError(f"model.lora.r={lora.r} must be at least 0 (0: no LoRA)")
    if lora.r == 0:
        return
    if not lora.alpha > 0:
        raise ValueError(f"model.lora.alpha={lora.alpha} must be positive")
    if not 0 <= lora.dropout < 1:
        raise ValueError(f"model.lora.dropout={lora.dropout} must be in [0, 1)")
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ValueError(
            f"model.lora.r={lora.r} needs peft: pip install \"dmtune[lora]\" (or pip install peft)"
        )


def _check_device_and_logger(cfg: DictConfig) -> None:
    from dmtune.build import SINKS
    from dmtune.priors import DTYPES
    from dmtune.wandb_sink import WANDB_MODES

    device = cfg.device.name
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device.name={device!r}; valid: {', '.join(DEVICES)} or cuda:N")
    if cfg.device.dtype not in DTYPES:
        raise ValueError(f"device.dtype={cfg.device.dtype!r}; valid: {', '.join(DTYPES)}")
    if cfg.device.threads < 0:
        raise ValueError(
            f"device.threads={cfg.device.threads} must be at least 0 (0: torch's default)"
        )
    _check_processes(cfg)
    if not cfg.logger.timeout_s > 0:
        raise ValueError(f"logger.timeout_s={cfg.logger.timeout_s} must be > 0 (seconds)")
    if cfg.logger.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={cfg.logger.mode!r}; valid: {', '.join(WANDB_MODES)}")
    for sink in cfg.logger.sinks:
        if sink not in SINKS:
            raise ValueError(f"logger.sinks: {sink!r} is not a sink; valid: {', '.join(SINKS)}")


def _check_processes(cfg: DictConfig) -> None:
    from dmtune.distributed import STRATEGIES

    device, train = cfg.device, cfg.train
    n = device.num_processes
    if n < 1:
        raise ValueError(f"device.num_processes={n} must be at least 1")
    if device.strategy not in STRATEGIES:
        raise ValueError(f"device.strategy={device.strategy!r}; valid: {', '.join(STRATEGIES)}")
    if device.strategy == "fsdp" and n > 1 and train.compile_sampler:
        raise ValueError(
            "train.compile_sampler=true with device.strategy=fsdp is not supported (the compiled "
            "step would trace FSDP's hooks); drop one of them"
        )
    if device.strategy == "fsdp" and n > 1 and cfg.model.lora.r > 0:
        raise ValueError(
            f"device.strategy=fsdp with model.lora.r={cfg.model.lora.r} is not supported: "
            "LoRA's trainable state is the adapters, small enough for device.strategy=ddp"
        )
    if not device.timeout_s > 0:
        raise ValueError(f"device.timeout_s={device.timeout_s} must be > 0 (seconds)")
    if n > 1 and device.name.startswith("cuda:"):
        raise ValueError(
            f"device.name={device.name} with device.num_processes={n}: each rank takes its own "
            "GPU; use device.name=cuda (or auto)"
        )
    if train.batch_size % n:
        raise ValueError(
            f"train.batch_size={train.batch_size} is not a multiple of device.num_processes={n} "
            "(each rank samples an equal share)"
        )
    if n > 1 and train.prompts and (train.batch_size // n) % train.samples_per_prompt:
        raise ValueError(
            f"train.batch_size={train.batch_size} / device.num_processes={n} = "
            f"{train.batch_size // n} per rank is not a multiple of "
            f"train.samples_per_prompt={train.samples_per_prompt} (each rank draws whole prompts)"
        )
