"""Every objective on the same exact toy target, same sample budget, several seeds.

Prints a table of exact figures (KL(p‖π), KL(π‖a), E_π[b], entropy, the exact variance of the
objective's own one-sample gradient estimator, and KL(p_β‖π) for KL-control) at three sample
budgets, mean ± std over seeds, and writes the same figures as JSON.

    python benchmarks/exact_toy.py                      # 3 seeds, 300 steps of 64 samples
    python benchmarks/exact_toy.py --seeds 5 --steps 600 --out benchmarks/results/exact_toy.json

The papers predict: DPG+baseline reaches lower KL(p‖π) than DPG for the same samples;
REINFORCE collapses (entropy → 0, KL(π‖a) grows); KL-control converges to its own target
p_β = a·exp(b/β)/Z_β, not to p.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dmtune.constraints import TokenPresent
from dmtune.exact import estimator_variance, kl, objective_advantages, policy_scores, target_truth
from dmtune.objectives import Batch
from dmtune.priors import make_toy_prior
from dmtune.target import Target, kl_control_log_target
from dmtune.trainer import Trainer, TrainerConfig

CONSTRAINT = TokenPresent(2, "has_b")  # 7.5% of the toy prior's samples
MAX_NEW_TOKENS = 4
BETA = 0.5  # KL-control's β
VARIANTS = {  # label: (objective, kwargs)
    "reinforce": ("reinforce", {"baseline": "mean"}),
    "kl_control": ("kl_control", {"beta": BETA}),
    "dpg": ("dpg", {}),
    "dpg_baseline": ("dpg_baseline", {}),
    "kl_dpg": ("kl_dpg", {}),
    "fdpg_forward_kl": ("fdpg", {"divergence": "forward_kl"}),
    "fdpg_js": ("fdpg", {"divergence": "js"}),
    "fdpg_tv": ("fdpg", {"divergence": "tv"}),
}
COLUMNS = [
    "kl_target_policy", "kl_policy_prior", "constraint", "entropy", "grad_variance",
    "kl_p_beta_policy",
]


@torch.no_grad()
def _exact_figures(trainer: Trainer, objective: str, kwargs: dict) -> dict[str, float]:
    (space,) = trainer.exact.spaces  # one prompt: one enumerated space
    log_prior = space.log_probs(trainer.prior).double()
    log_pi = space.log_probs(trainer.policy).double()
    truth = target_truth(space, trainer.target, log_prior)
    log_q = space.log_probs(trainer.proposal).double() if trainer.proposal is not None else log_pi
    reward = CONSTRAINT(space.samples).double()
    batch = Batch(log_pi, log_q, log_prior, truth.log_p + truth.log_z, truth.log_z, reward)
    with torch.enable_grad():
        scores = policy_scores(trainer.policy, space)
        advantages = objective_advantages(trainer.spec.loss, batch, **kwargs)
    log_p_beta = kl_control_log_target(log_prior, reward, BETA)
    return {
        "kl_target_policy": kl(truth.log_p, log_pi).item(),
        "kl_policy_prior": kl(log_pi, log_prior).item(),
        "constraint": (log_pi.exp() @ reward).item(),
        "entropy": -(log_pi.exp() @ log_pi).item(),
        "grad_variance": estimator_variance(advantages, scores, log_q).item(),
        "kl_p_beta_policy": kl(log_p_beta - torch.logsumexp(log_p_beta, 0), log_pi).item(),
    }


def run(
    label: str, seed: int, steps: int, batch_size: int, lr: float, checkpoints: list[int]
) -> dict:
    objective, kwargs = VARIANTS[label]
    prior, tokenizer = make_toy_prior(seed=0)
    config = TrainerConfig(
        objective=objective, objective_params=kwargs, batch_size=batch_size,
        max_new_tokens=MAX_NEW_TOKENS, lr=lr, exact=True, seed=seed,
    )
    trainer = Trainer(prior, tokenizer, Target(pointwise=(CONSTRAINT,)), config)
    figures = {0: _exact_figures(trainer, objective, kwargs)}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.step()
        if step in checkpoints:
            figures[step * batch_size] = _exact_figures(trainer, objective, kwargs)
    return {
        "label": label, "seed": seed, "seconds": time.perf_counter() - started,
        "by_samples": figures,
    }


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g}±{std:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--only", nargs="*", choices=list(VARIANTS), help="run only these objectives"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/exact_toy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 7k-parameter model: threads only add overhead
    checkpoints = sorted({max(1, args.steps // 10), args.steps // 3, args.steps})
    runs = [
        run(label, seed, args.steps, args.batch_size, args.lr, checkpoints)
        for label in (args.only or VARIANTS)
        for seed in range(args.seeds)
    ]

    budgets = sorted(runs[0]["by_samples"])
    print(f"target: {CONSTRAINT.name} on the toy prior (max_new_tokens={MAX_NEW_TOKENS}), "
          f"β={BETA}, {args.seeds} seeds, batch {args.batch_size}, lr {args.lr}; "
          "mean±std over seeds")
    header = f"{'objective':<16} {'samples':>7} " + " ".join(f"{c:>16}" for c in COLUMNS)
    print(header + "\n" + "-" * len(header))
    summary: dict = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        for budget in budgets:
            cells = {c: [r["by_samples"][budget][c] for r in mine] for c in COLUMNS}
            summary.setdefault(label, {})[budget] = {
                c: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                for c, v in cells.items()
            }
            print(
                f"{label:<16} {budget:>7} "
                + " ".join(f"{_mean_std(cells[c]):>16}" for c in COLUMNS)
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(
        {"config": vars(args) | {"out": str(args.out)}, "summary": summary, "runs": runs},
        indent=1,
    ))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
