"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

For every objective setting of tests/test_micro_batches.py, on the float64 toy, each rank
builds two trainers from the same seed: one alone (a world of 1) that takes a step on the whole
batch, and one rank of the 2-process world (argv[3]: ddp, or fsdp with sharded weights) that
takes the same step on its half. Rank 0 writes what differs between the two (parameters,
gradients, loss, every metric) to the JSON file named by argv[1].
"""

from __future__ import annotations

import json
import math
import sys

import torch
from omegaconf import OmegaConf
from test_micro_batches import OBJECTIVES, _target

from dmtune import distributed
from dmtune import metrics as m
from dmtune.prompts import Contexts
from dmtune.sharding import full_tensor, local_tensor
from dmtune.trainer import Trainer, TrainerConfig

BATCH, PER_PROMPT = 24, 4


def trainer(objective, kwargs, kind, world, prompts) -> Trainer:
    from dmtune.priors import make_toy_prior

    model, tokenizer = make_toy_prior(seed=0)
    config = TrainerConfig(
        batch_size=BATCH, max_new_tokens=4, lr=1e-2, objective=objective,
        objective_params=dict(kwargs), micro_batch_size=5, fit_samples=256, seed=5,
        prompts=prompts, samples_per_prompt=PER_PROMPT,
    )
    built = Trainer(model.double(), tokenizer, _target(kind), config, world)
    if world.sharded:  # a single process's π (below), split over the ranks as a checkpoint is
        single = trainer(objective, kwargs, kind, distributed.World(), prompts)
        built.networks.load("policy", single.networks.state("policy"))
        return built
    generator = torch.Generator().manual_seed(1)  # π away from a (as test_micro_batches)
    with torch.no_grad():
        for param in built.policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return built


def half(samples, rank: int):
    """Rank ``rank``'s half of the batch, its prompt groups numbered from 0 as its own draw."""
    rows = torch.arange(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    part = samples.select(rows)
    if part.contexts is not None:
        groups = BATCH // 2 // PER_PROMPT
        index = part.contexts.index - rank * groups
        assert sorted(set(index.tolist())) == list(range(groups))
        part.contexts = Contexts(part.contexts.prompts, index, groups)
    return part


def compare(objective, kwargs, kind, world, prompts) -> dict:
    alone = trainer(objective, kwargs, kind, distributed.World(), prompts)
    ranked = trainer(objective, kwargs, kind, world, prompts)
    alone.calibrate()
    # the same λ and running log Ẑ (calibration draws differ: each rank samples its own)
    ranked.target.lambdas, ranked.target.fitted = alone.target.lambdas, alone.target.fitted
    ranked.log_z.load_state_dict(alone.log_z.state_dict())
    samples = alone.sample()
    expected = alone.update(samples)
    got = ranked.update(half(samples, world.rank))
    param_diff = max(
        (a - full_tensor(b)).abs().max().item()
        for a, b in zip(alone.policy.parameters(), ranked.policy.parameters())
    )
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(alone.policy.parameters(), trainer(
            objective, kwargs, kind, distributed.World(), prompts).policy.parameters())
    )
    grad_diff = max(
        (a.grad - full_tensor(b.grad)).abs().max().item()
        for a, b in zip(alone.policy.parameters(), ranked.policy.parameters())
    )
    # the share of the policy's weights and AdamW moments this rank holds (FSDP: half)
    held = [
        sum(local_tensor(t).numel() for t in tensors)
        / sum(t.numel() for t in tensors)
        for tensors in (
            list(ranked.policy.parameters()),
            [s["exp_avg"] for s in ranked.optimizer.state.values()],
        )
    ]
    metric_diff = {}
    for key, value in expected.items():
        if key.startswith("perf/"):  # timings, and memory held (FSDP: half)
            continue
        other = got[key]
        if math.isnan(value) and math.isnan(other):
            continue
        metric_diff[key] = abs(value - other) / max(1.0, abs(value))
    return {
        "param_diff": param_diff,
        "grad_diff": grad_diff,
        "moved": moved,
        "metric_diff": metric_diff,
        "held": held,
        "samples_seen": [expected[m.SAMPLES_SEEN], got[m.SAMPLES_SEEN]],
        "swap": [expected.get(m.PROPOSAL_UPDATED), got.get(m.PROPOSAL_UPDATED)],
    }


def main(out: str, prompts_file: str, strategy: str) -> None:
    cfg = OmegaConf.create(
        {"device": {"name": "cpu", "strategy": strategy, "timeout_s": 60, "num_processes": 2}}
    )
    world = distributed.init(cfg)
    torch.set_num_threads(1)
    results = {}
    for objective, kwargs in OBJECTIVES:
        if objective == "kl_dpg":
            kwargs = tuple(sorted({**dict(kwargs), "swap_every": 1}.items()))
        for kind in ("pointwise", "distributional"):
            if objective in ("reinforce", "kl_control") and kind == "distributional":
                continue
            if dict(kwargs).get("baseline") == 0.3 and kind == "distributional":
                continue
            if dict(kwargs).get("divergence") == "reverse_kl" and kind == "pointwise":
                continue
            for prompts in (None, prompts_file):
                name = f"{objective}{dict(kwargs)}/{kind}/{'prompts' if prompts else 'one'}"
                results[name] = compare(objective, kwargs, kind, world, prompts)
    if world.is_main:
        with open(out, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
