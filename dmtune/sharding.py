"""Sharded networks (torch's FSDP2, ``device.strategy=fsdp``): splitting a network over the
ranks, gathering it whole for no-grad passes, and whole-tensor state dicts.

Past :func:`shard`, every helper takes any module: on one that is not sharded it is the plain
operation (``state_dict()``, ``load_state_dict()``, a no-op context), so callers need no
branch.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def shard(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """``model`` (in place) with its weights split over ``mesh``: one group per transformer
    block (the architecture's ``_no_split_modules``), one for the rest (embeddings, final norm,
    head: tied weights stay together). Weights move to the mesh's device; an optimizer must be
    built after."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:  # fully_shard is public from torch 2.6 on
        raise ValueError(
            f"device.strategy=fsdp needs torch>=2.6 (torch {torch.__version__} is "
            "installed); use device.strategy=ddp"
        ) from error
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: Any) -> bool:
    """Whether ``model`` is an FSDP-sharded module (its parameters are DTensors)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: nothing can be
        return False
    return isinstance(model, FSDPModule)


_gathered: weakref.WeakSet = weakref.WeakSet()  # sharded networks whose weights are whole now


@contextmanager
def unsharded(model: Any) -> Iterator[None]:
    """A sharded ``model``'s whole weights, gathered once for the no-grad forward passes inside
    (sampling, scoring): each forward would otherwise gather every block again, and ranks whose
    decode loops end after different numbers of tokens would issue different numbers of
    collectives and wait for each other forever. Its memory is one whole network, freed on
    exit. A no-op for an unsharded model, with grad enabled, or inside another ``unsharded``."""
    if not is_sharded(model) or torch.is_grad_enabled() or model in _gathered:
        yield
        return
    groups = [module for module in model.modules() if is_sharded(module)]
    for module in groups:  # a collective each, in the same order on every rank
        module.unshard()
    model.set_reshard_after_forward(False)
    _gathered.add(model)
    try:
        yield
    finally:
        _gathered.discard(model)
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP's default for the root
        for module in groups:
            module.reshard()


def unsharded_class(model: torch.nn.Module) -> str:
    """The name of the class FSDP subclassed to make a sharded ``model`` (FSDP<name>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded value (a collective); any other tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded value; any other tensor as it is."""
    return value.to_local() if hasattr(value, "to_local") else value


def _whole(cpu_offload: bool = True) -> Any:
    """Whole tensors (gathered to rank 0's CPU when written, sliced when loaded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``; of a sharded model, whole tensors on rank 0's CPU and nothing on
    the others (a collective: call it on every rank)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_whole())


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``; a sharded model takes its shards of the whole tensors."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_whole(cpu_offload=False))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()``; of a sharded model's optimizer, whole tensors keyed by
    parameter name, on rank 0 (a collective)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_whole())


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_whole(cpu_offload=False))
