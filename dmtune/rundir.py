"""A run dir: every path in it, and reading a finished (or interrupted) run back.

```
<run dir>/
  .hydra/config.yaml overrides.yaml   the composed config and the command's overrides (Hydra's)
  calibration.json                    prior base rates, λ, KL(p‖a) from train.fit_samples
                                      prior samples
  metrics.jsonl                       one JSON object per logged step (step 0 = the prior)
  samples.jsonl                       texts with their scores at eval steps
  checkpoints/last.pt                 policy, proposal, optimizer, log Ẑ, λ, RNG states (atomic)
  policy/                             the fine-tuned model, loadable with transformers
  summary.json                        the prior's rates and every metric's mean over the last
                                      10 steps; the W&B lines and model artifact
  wandb/  wandb_run_id.txt            the W&B run, when the wandb sink is on
  eval.json  eval/                    `dmtune eval`: metrics ± standard errors, the W&B eval run
  eval-<setting>.json  eval-<setting>/  `dmtune eval` with a warped decoding (--top-p 0.9) or
                                      overrides (constraint=...): one report per setting
```

:func:`load_run` rebuilds what a run trained — prior, policy, proposal, target with its λ —
from the saved config and the last checkpoint, without an optimizer: what ``eval`` and
``sample`` need.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # loading a run needs torch; reading its files does not
    import torch
    from transformers import PreTrainedModel

    from dmtune.lm import LM
    from dmtune.target import RunningLogZ, Target

EVAL_NAME = "eval"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
_UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9._=,-]+")
_MAX_EVAL_NAME = 120


class RunDirError(ValueError):
    """A path that is not a dmtune run dir, or lacks what the command needs."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one run dir (nothing is created or read on construction)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / ".hydra" / "config.yaml"

    @property
    def overrides_file(self) -> Path:
        return self.path / ".hydra" / "overrides.yaml"

    @property
    def calibration(self) -> Path:
        return self.path / "calibration.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def policy(self) -> Path:
        return self.path / "policy"

    @property
    def wandb_run_id(self) -> Path:
        return self.path / WANDB_RUN_ID_FILE

    def eval_report(self, setting: list[str] | None = None) -> Path:
        """``eval.json`` for the run's own evaluation, ``eval-<setting>.json`` for another
        setting (:func:`dmtune.evaluate.eval_setting`: decoding options and overrides)."""
        return self.path / f"{eval_name(setting or [])}.json"

    def eval_dir(self, setting: list[str] | None = None) -> Path:
        """Where an evaluation's own logs (``metrics.jsonl``, its W&B run) go."""
        return self.path / eval_name(setting or [])

    # --- reading ---

    def is_run(self) -> bool:
        return self.config_file.is_file() and self.metrics.is_file()

    def load_config(self) -> DictConfig:
        if not self.config_file.is_file():
            raise RunDirError(f"{self.path} is not a dmtune run dir (no .hydra/config.yaml)")
        return OmegaConf.load(self.config_file)

    def saved_overrides(self) -> list[str]:
        """The overrides the run was launched with, less its own ``resume=`` and run dir."""
        if not self.overrides_file.is_file():
            raise RunDirError(
                f"{self.path} is not a dmtune run dir (no .hydra/overrides.yaml there)"
            )
        saved = list(OmegaConf.load(self.overrides_file))
        hydra_file = self.overrides_file.with_name("hydra.yaml")
        if hydra_file.is_file():  # the user's config dirs, saved among Hydra's own overrides
            # Hydra rewrites it at each resume, in place: a kill then can leave it empty
            loaded = OmegaConf.load(hydra_file) or {}
            hydra = OmegaConf.select(OmegaConf.create(loaded), "hydra.overrides.hydra") or []
            saved = [o for o in hydra if o.startswith("hydra.searchpath=")] + saved
        return [o for o in saved if not o.startswith(("resume=", "hydra.run.dir="))]

    def launch_overrides(self) -> tuple[str, ...]:
        """:meth:`saved_overrides`, or none for a run started from Python (no ``.hydra/``)."""
        return tuple(self.saved_overrides()) if self.overrides_file.is_file() else ()

    def read_calibration(self) -> dict[str, Any]:
        return json.loads(self.calibration.read_text())

    def model_artifact(self) -> dict[str, Any] | None:
        """The W&B model artifact ``policy/`` was logged as (``logger.log_model=true``): name,
        version (None until W&B assigns it), digest and the checkpoint's step; or None."""
        if not self.summary.is_file():
            return None
        return json.loads(self.summary.read_text()).get("model_artifact")

    def read_eval(self) -> dict[str, Any] | None:
        """The run's own ``eval.json`` metrics, or None before ``dmtune eval``."""
        path = self.eval_report()
        return json.loads(path.read_text())["metrics"] if path.is_file() else None


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (calibration.json, summary.json) whole or not at all: a kill
    mid-write leaves the previous version."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def eval_name(setting: list[str]) -> str:
    """``eval`` for the run's own evaluation, ``eval-<setting>`` (file-name safe) otherwise; a
    long setting is cut and ends with a digest of the whole, so two settings never share a name."""
    if not setting:
        return EVAL_NAME
    name = _UNSAFE_IN_NAMES.sub("_", "_".join(setting))
    if len(name) > _MAX_EVAL_NAME:
        digest = hashlib.sha1("\0".join(setting).encode()).hexdigest()[:8]
        name = f"{name[: _MAX_EVAL_NAME - 9]}~{digest}"
    return f"{EVAL_NAME}-{name}"


@dataclass
class LoadedRun:
    """A run's models and target at its last checkpoint: enough to sample and evaluate."""

    cfg: DictConfig
    lm: LM  # the prior, with the run's tokenizer and prompt
    policy: PreTrainedModel
    proposal: PreTrainedModel | None
    target: Target
    log_z: RunningLogZ  # the running log Ẑ at the checkpoint
    step: int
    samples_seen: int
    generator_state: torch.Tensor  # the sampler's RNG at the checkpoint


def micro_batch_sizes(cfg: DictConfig) -> tuple[int, int]:
    """(scoring, sampling) micro-batch sizes of a run's config; runs saved before dmtune had
    them score and sample whole batches."""
    return (
        OmegaConf.select(cfg, "train.micro_batch_size", default=0),
        OmegaConf.select(cfg, "train.sample_micro_batch_size", default=0),
    )


def load_run(run_dir: str | Path, cfg: DictConfig | None = None) -> LoadedRun:
    """Rebuild a run's policy, prior and target from its saved config (or ``cfg``) and checkpoint.

    With another constraint set in ``cfg`` than the run's, its λ is fitted anew on prior
    samples (calibration): the policy is then measured against that target.
    """
    import torch

    from dmtune.build import build_lm, build_target
    from dmtune.calibration import calibrate
    from dmtune.checkpoint import load_checkpoint
    from dmtune.lm import Networks
    from dmtune.target import RunningLogZ

    run = RunDir(run_dir)
    saved = run.load_config()
    cfg = saved if cfg is None else cfg
    lm = build_lm(cfg, evaluation=True)
    target = build_target(cfg, lm.tokenizer)
    state = load_checkpoint(run.checkpoint, map_location=lm.device)
    with_proposal = state.get("proposal") is not None
    networks = Networks.build(lm.model, OmegaConf.select(cfg, "model.lora"), with_proposal)
    networks.load("policy", state["policy"])
    if with_proposal:
        networks.load("proposal", state["proposal"])
    lm.model, policy, proposal = networks.prior, networks.policy, networks.proposal
    target.lambdas, target.fitted = state["lambdas"], state["target_fitted"]
    log_z = RunningLogZ()
    log_z.load_state_dict(state["log_z"])
    if cfg.constraint != saved.constraint:
        generator = torch.Generator(lm.device)
        generator.set_state(state["generator"])
        _, log_w = calibrate(
            lm,
            target,
            cfg.train.fit_samples,
            cfg.train.batch_size,
            cfg.train.max_new_tokens,
            generator,
        )
        log_z = RunningLogZ()
        log_z.update(log_w)
    return LoadedRun(
        cfg,
        lm,
        policy,
        proposal,
        target,
        log_z,
        state["step"],
        state["samples_seen"],
        state["generator"],
    )


def sample_run(
    run_dir: str | Path,
    *,
    n: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    cfg: DictConfig | None = None,
) -> list[dict[str, Any]]:
    """Fresh samples of a run's policy with their feature values and log π (any decoding);
    ``cfg``: the run's config with overrides (another device or constraint set)."""
    import torch

    from dmtune.sampling import Decoding

    run = load_run(run_dir, cfg)
    lm = run.lm
    decoding = Decoding(
        run.cfg.train.max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    generator = torch.Generator(lm.device).manual_seed(seed)
    # with prompts, each sample continues a prompt drawn from the run's (held-out) prompts
    contexts = None
    if lm.prompts is not None:
        contexts = lm.prompts.draw(n, torch.Generator().manual_seed(seed), samples_per_prompt=1)
    micro, sample_micro = micro_batch_sizes(run.cfg)
    samples = lm.sample(
        n, decoding, generator, model=run.policy, contexts=contexts, micro_batch_size=sample_micro
    )
    scores = run.target.score(samples)
    with torch.no_grad():
        log_pi = lm.log_probs(samples, model=run.policy, micro_batch_size=micro)
    columns = {name: values.tolist() for name, values in scores.by_name.items()}
    prompts = contexts.prompts if contexts is not None else None
    return [
        {
            **({"prompt": prompts[i]} if prompts else {}),
            "text": text,
            "log_prob": lp,
            **{name: values[i] for name, values in columns.items()},
        }
        for i, (text, lp) in enumerate(zip(samples.texts, log_pi.tolist()))
    ]
