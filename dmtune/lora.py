"""LoRA with peft: one base model for the prior, the policy and the proposal.

With ``model.lora.r > 0`` the policy is the prior's own network with low-rank adapters
(`peft <https://github.com/huggingface/peft>`_); the prior is that network with its adapters
disabled, and KL-adaptive DPG's proposal is a second adapter ("proposal") on it: one full copy
of the weights in memory instead of three, and only adapter weights in the optimizer and the
checkpoints. :class:`AdapterView` makes "the network with adapter X (or none) active" usable
wherever a model is (:class:`dmtune.lm.LM` switches adapters once per call, not per token).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

POLICY = "default"  # peft's name for the first adapter: the policy's
PROPOSAL = "proposal"


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:  # an optional dependency
        raise ImportError(
            'model.lora needs peft: pip install "dmtune[lora]" (or pip install peft)'
        ) from error
    return peft


def lora_config(model: torch.nn.Module, options: Any) -> Any:
    """peft's LoraConfig from ``model.lora`` (r, alpha, dropout, target_modules)."""
    peft = _peft()
    targets = list(options.target_modules) if options.target_modules else None
    return peft.LoraConfig(
        r=int(options.r),
        lora_alpha=float(options.alpha),
        lora_dropout=float(options.dropout),
        # None: peft's per-architecture default (GPT-2: c_attn; Llama: q_proj, v_proj, ...)
        target_modules=targets,
        # GPT-2's Conv1D layers store their weight transposed
        fan_in_fan_out=model.config.model_type == "gpt2",
        task_type="CAUSAL_LM",
    )


def wrap(model: torch.nn.Module, options: Any, proposal: bool = False) -> Any:
    """``model`` (modified in place) with a trainable policy adapter and, for KL-adaptive DPG, a
    frozen proposal adapter holding the same initial weights (LoRA's B is 0: both equal the prior
    at first)."""
    peft = _peft()
    config = lora_config(model, options)
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        wrapped = peft.get_peft_model(model, config).eval()
    if proposal:
        wrapped.add_adapter(PROPOSAL, config)
        copy_adapter(wrapped, POLICY, PROPOSAL)
    wrapped.set_adapter(POLICY)
    for name, param in wrapped.named_parameters():
        param.requires_grad_(f".{POLICY}." in name and "lora_" in name)
    return wrapped


def adapter_state(model: Any, adapter: str = POLICY) -> dict[str, torch.Tensor]:
    """The adapter's weights only (what checkpoints hold)."""
    state = _peft().get_peft_model_state_dict(
        model, adapter_name=adapter, save_embedding_layers=False
    )
    return {k: v.detach().clone() for k, v in state.items()}


def load_adapter_state(model: Any, state: dict[str, torch.Tensor], adapter: str = POLICY) -> None:
    result = _peft().set_peft_model_state_dict(model, state, adapter_name=adapter)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the checkpoint's {adapter!r} adapter does not fit model.lora: missing "
            f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}"
        )


@torch.no_grad()
def copy_adapter(model: Any, source: str, target: str) -> None:
    """Copy adapter ``source``'s weights into adapter ``target`` (the proposal swap)."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{target}." in name and "lora_" in name:
            param.copy_(params[name.replace(f".{target}.", f".{source}.")])


def set_dropout(model: Any, active: bool) -> None:
    """LoRA dropout on (the update's forward/backward) or off (sampling and scoring)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" in name:
            module.train(active)


def is_lora(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdapterView:
    """A peft model seen with one adapter active, or with none (``adapter=None``: the prior).

    Quacks like the model for what dmtune asks of one (config, dtype, parameters, a call);
    :meth:`active` switches the adapter for a whole sampling or scoring pass.
    """

    def __init__(self, model: Any, adapter: str | None) -> None:
        self.model = model
        self.adapter = adapter

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_base_model().dtype

    def get_base_model(self) -> torch.nn.Module:
        return self.model.get_base_model()

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    @contextmanager
    def active(self) -> Iterator[Any]:
        """The peft model with this view's adapter active (restored to the policy's after)."""
        if self.adapter is None:
            with self.model.disable_adapter():
                yield self.model
            return
        self.model.set_adapter(self.adapter)
        try:
            yield self.model
        finally:
            self.model.set_adapter(POLICY)
            for name, param in self.model.named_parameters():
                if f".{self.adapter}." in name and self.adapter != POLICY:
                    param.requires_grad_(False)

    def __call__(self, **kwargs: Any) -> Any:
        with self.active() as model:
            return model(**kwargs)


@contextmanager
def using(model: Any) -> Iterator[Any]:
    """The network to run for ``model``: an :class:`AdapterView`'s adapter switched on for the
    whole block, any other model as it is."""
    if isinstance(model, AdapterView):
        with model.active() as active:
            yield active
    else:
        yield model
