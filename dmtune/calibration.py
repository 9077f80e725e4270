"""Calibration: the prior's own samples before training — base rates, λ fitting, KL(p‖a), and
the first terms of the running ``log Ẑ``. Used by the trainer and by ``load_run`` when a run is
measured against another constraint set.
"""

from __future__ import annotations

from typing import Any

import torch

from dmtune import metrics as m
from dmtune.distributed import World, moved
from dmtune.lm import LM
from dmtune.prompts import join_contexts
from dmtune.sampling import Decoding
from dmtune.target import Target, join_scores


@torch.no_grad()
def calibrate(
    lm: LM,
    target: Target,
    fit_samples: int,
    batch_size: int,
    max_new_tokens: int,
    generator: torch.Generator,
    prompt_generator: torch.Generator | None = None,
    world: World | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Sample the prior ``fit_samples`` times: base rates, λ fitting, and KL(p‖a).

    Returns the calibration record ({"metrics": step-0 metrics of π = a, "lambdas", ...}) and
    the samples' ``log P − log a`` (n,). A pointwise constraint that no prior sample meets is
    an error: every importance weight would be 0. With prompts, each batch draws its contexts
    as training does, and λ is fitted to the mean over contexts of their moments. With a
    ``world`` of several ranks, each draws its share (``batch_size`` is a rank's) and the fit
    is on every rank's samples, the same on each.
    """
    world = world or World()
    decoding = Decoding(max_new_tokens=max_new_tokens)
    batches = []
    for _ in range(-(-fit_samples // (batch_size * world.size))):
        contexts = None
        if lm.prompts is not None:
            contexts = lm.draw_contexts(batch_size, prompt_generator or torch.Generator())
        batches.append(lm.sample(batch_size, decoding, generator, contexts=contexts))
    contexts = join_contexts([s.contexts for s in batches]) if lm.prompts is not None else None
    joined = join_scores([target.score(s) for s in batches])
    if world.size > 1:
        parts = world.gather((joined, contexts))
        device = joined.log_b.device
        joined = moved(join_scores([part[0] for part in parts]), device)
        if contexts is not None:
            contexts = moved(join_contexts([part[1] for part in parts]), device)
    by_name = joined.by_name
    n = joined.log_b.numel()
    for constraint in target.pointwise:
        if by_name[constraint.name].sum() == 0:
            raise ValueError(
                f"pointwise constraint {constraint.name!r} holds for 0 of {n} prior samples: "
                "the target is unreachable by importance sampling; raise train.fit_samples, "
                "relax the constraint, or make it distributional with a small moment"
            )
    if target.pointwise and torch.isneginf(joined.log_b).all():
        names = ", ".join(c.name for c in target.pointwise)
        raise ValueError(
            f"the pointwise constraints {names} never hold together in {n} prior samples "
            "(each holds alone): the target is unreachable by importance sampling; "
            "raise train.fit_samples or drop one"
        )
    # samples of the prior itself: log a − log q = 0, so the base weights are log b
    zeros = torch.zeros(n, dtype=torch.float64, device=joined.log_b.device)
    fit = target.fit(zeros, zeros, joined, contexts) if target.distributional else None
    log_w = target.log_prob(zeros, joined)  # log P − log a
    calibration = {
        "metrics": m.prior_estimates(log_w, by_name, target.moments_by_name(), contexts),
        "fit_samples": n,
        "lambdas": target.lambdas.tolist(),
        "lambda_fit": None
        if fit is None
        else {"achieved": fit.achieved.tolist(), "iterations": fit.iterations, "ess": fit.ess},
    }
    return calibration, log_w
