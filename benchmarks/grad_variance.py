"""Gradient variance of DPG and DPG + baseline (GDC++) on real text: the tiny prior.

At a policy π (the prior, then the last checkpoint of each run given), draws K minibatches of B
samples x ~ π and computes, on the same samples, the gradient of each objective's loss. Prints the
total variance of the minibatch gradient (trace of its covariance, summed over every weight),
the norm of the mean gradient and the signal-to-noise ratio ‖E g‖² / tr Cov g, and writes
them as JSON. log Z is held at the policy's estimate so that only the estimator differs.

    python benchmarks/grad_variance.py                                   # at the prior, sentiment
    python benchmarks/grad_variance.py --run outputs/reproduction/sentiment/2_dpg_seed0
    python benchmarks/grad_variance.py --overrides experiment=gender \\
        --out benchmarks/results/gv.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dmtune.build import build_trainer
from dmtune.lm import LM
from dmtune.objectives import OBJECTIVES, Batch
from dmtune.overrides import compose_config
from dmtune.rundir import load_run
from dmtune.sampling import Decoding
from dmtune.target import Target

OBJECTIVES_COMPARED = ("dpg", "dpg_baseline")


def gradient_moments(
    lm: LM, policy: torch.nn.Module, target: Target, log_z: torch.Tensor, decoding: Decoding,
    generator: torch.Generator, minibatches: int, batch_size: int,
) -> dict[str, dict[str, float]]:
    """Per objective: tr Cov[g], ‖E g‖ and the SNR over ``minibatches`` draws of ``batch_size``."""
    params = [p for p in policy.parameters() if p.requires_grad]
    sums = {
        name: [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for name in OBJECTIVES_COMPARED
    }
    squares = {
        name: [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for name in OBJECTIVES_COMPARED
    }
    for _ in range(minibatches):
        with torch.no_grad():
            samples = lm.sample(batch_size, decoding, generator, model=policy)
            scores = target.score(samples)
            log_prior = lm.log_probs(samples)
            log_target = target.log_prob(log_prior, scores)
        for name in OBJECTIVES_COMPARED:
            log_policy = lm.log_probs(samples, model=policy)
            batch = Batch(
                log_policy, log_policy.detach(), log_prior, log_target, log_z, scores.reward
            )
            loss, _ = OBJECTIVES[name].loss(batch)
            grads = torch.autograd.grad(loss, params)
            for s, q, g in zip(sums[name], squares[name], grads):
                g = g.double()
                s += g
                q += g * g
    results = {}
    for name in OBJECTIVES_COMPARED:
        mean_sq = sum(float((s / minibatches).pow(2).sum()) for s in sums[name])
        second = sum(float(q.sum()) / minibatches for q in squares[name])
        variance = (second - mean_sq) * minibatches / (minibatches - 1)  # unbiased trace of Cov
        results[name] = {
            "trace_cov": variance, "mean_grad_norm": mean_sq ** 0.5, "snr": mean_sq / variance
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, action="append", default=[],
        help="a run dir (repeatable), measured after the prior",
    )
    parser.add_argument(
        "--overrides", nargs="*", default=["experiment=sentiment"], help="config of the prior case"
    )
    parser.add_argument("--minibatches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg = compose_config([*args.overrides, "logger=none"])
    trainer = build_trainer(cfg)
    trainer.calibrate()
    cases = [("prior (" + " ".join(args.overrides) + ")", trainer.lm, trainer.policy,
              trainer.target, trainer.log_z.value, cfg.train.max_new_tokens)]
    for run_dir in args.run:
        run = load_run(run_dir)
        policy = run.policy.requires_grad_(True)
        cases.append((
            str(run_dir), run.lm, policy, run.target, run.log_z.value,
            run.cfg.train.max_new_tokens,
        ))
    rows, report = [], {}
    for label, lm, policy, target, log_z, max_new_tokens in cases:
        generator = torch.Generator(lm.device).manual_seed(args.seed)
        started = time.perf_counter()
        result = gradient_moments(
            lm, policy, target, log_z, Decoding(max_new_tokens), generator, args.minibatches,
            args.batch_size,
        )
        report[label] = result
        ratio = result["dpg_baseline"]["trace_cov"] / result["dpg"]["trace_cov"]
        rows.append((label, result, ratio, time.perf_counter() - started))
    print(f"{args.minibatches} minibatches of {args.batch_size} samples; "
          "log Z fixed at the policy's estimate\n")
    print(f"{'policy':<48} {'objective':<13} {'tr Cov[g]':>11} {'‖E g‖':>9} {'SNR':>9}")
    for label, result, ratio, seconds in rows:
        for name in OBJECTIVES_COMPARED:
            r = result[name]
            print(f"{label[-48:]:<48} {name:<13} {r['trace_cov']:>11.4g} "
                  f"{r['mean_grad_norm']:>9.3g} {r['snr']:>9.3g}")
        print(f"{'':<48} {'ratio':<13} {ratio:>11.3f}   (GDC++ / DPG variance, {seconds:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(
            {"minibatches": args.minibatches, "batch_size": args.batch_size, "results": report},
            indent=2,
        ))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
