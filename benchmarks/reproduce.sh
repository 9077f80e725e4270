#!/usr/bin/env bash
# Regenerates the runs behind docs/reproduction.md: eight sweeps on the tiny prior (54 runs), a
# fresh-sample `dmtune eval` of every run, and a `dmtune compare` table + plot per sweep, copied
# to docs/reproduction/.
#   bash benchmarks/reproduce.sh                      # ~2h15 on 2 CPU cores
#   SEEDS=0,1,2,3,4 JOBS=8 bash benchmarks/reproduce.sh
#   EXTRA="size=paper" OUT=outputs/reproduction_gpt2 bash benchmarks/reproduce.sh   # a GPU and GPT-2
# A sweep whose dir exists is not re-run (delete it to redo it); missing evals are filled in.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/reproduction}
SEEDS=${SEEDS:-0,1,2}
JOBS=${JOBS:-2}
EVAL_N=${EVAL_N:-1024}
EXTRA=${EXTRA:-}
DOCS=${DOCS:-docs/reproduction}   # where each sweep's table (.txt), plot (.png) and numbers (.json) are copied
DMTUNE=${DMTUNE:-dmtune}

sweep() {  # sweep NAME OVERRIDES... : one sweep, its evals, its comparison (BY: compare --by keys)
  local name=$1; shift
  if [ ! -d "$OUT/$name" ]; then
    # shellcheck disable=SC2086
    $DMTUNE sweep "$@" $EXTRA "seed=$SEEDS" hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" \
      "hydra.sweep.dir=$OUT/$name" "logger.sweep=reproduction_$name"
  fi
  for run in "$OUT/$name"/*/; do
    [ -f "$run/eval.json" ] || $DMTUNE eval "$run" -n "$EVAL_N" --wandb offline
  done
  # shellcheck disable=SC2086
  $DMTUNE compare "$OUT/$name" ${COMPARE_WITH:-} --out "$OUT/$name" --smooth 10 ${BY:-} \
    -m "${METRIC:?}" -m divergence/kl_target_policy -m divergence/kl_policy_prior \
    -m diversity/distinct_2 -m diversity/self_bleu -m diversity/entropy | tee "$OUT/$name/compare.txt"
  mkdir -p "$DOCS"
  for ext in txt png json; do cp "$OUT/$name/compare.$ext" "$DOCS/$name.$ext"; done
}

# The prior itself, for reference: one step at lr 0 leaves the policy equal to the prior.
METRIC=constraint/positive sweep prior_sentiment experiment=sentiment objective=dpg_baseline train.steps=1 train.lr=0.0
METRIC=constraint/female sweep prior_gender experiment=gender objective=dpg_baseline train.steps=1 train.lr=0.0
# Pointwise sentiment: every objective (RM and DM) on the same target.
METRIC=constraint/positive sweep sentiment experiment=sentiment
# Distributional gender (50% of samples mention women): only DM objectives express it ...
METRIC=constraint/female sweep gender experiment=gender
# ... RM objectives can only be given the feature as a reward to maximise.
METRIC=constraint/female sweep gender_reward experiment=gender constraint=female_reward objective=reinforce,kl_control
# Conditional (CDPG): 36 prompts, each continuation positive; per-prompt log Ẑ_c and baselines,
# evaluated on 9 held-out prompts.
METRIC=constraint/positive sweep conditional experiment=conditional
# KL-control with β = 1/λ (λ: the DM target's, fitted by calibration) has the DM target as its
# optimum: p_β ∝ a·exp(φ/β) = a·exp(λφ) (2206.00761).
LAMBDA=$(python -c "import glob, json; print(json.load(open(sorted(glob.glob('$OUT/gender/*/calibration.json'))[0]))['lambdas'][0])")
BETA=$(python -c "print(round(1 / $LAMBDA, 4))")
METRIC=constraint/female sweep gender_kl_control_beta experiment=gender constraint=female_reward objective=kl_control "objective.beta=$BETA"
# The learning rate of the DM runs: 3e-4 (the experiments' default, above) against smaller steps.
METRIC=constraint/positive BY="--by train.lr" COMPARE_WITH="$(ls -d "$OUT"/sentiment/*_dpg_baseline_seed*)" \
  sweep lr experiment=sentiment objective=dpg_baseline train.lr=3e-5,1e-4
