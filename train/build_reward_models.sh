#!/usr/bin/env bash
# Rebuild the project's two reward models from the shared HH-RLHF data, on the CPU (2 cores: under 60 minutes):
#
#   train/build_reward_models.sh [data_dir]          # data_dir defaults to ../shared/data
#
#   resources/reward_models/train_rm   ranks the policy's training data and scores dev generations (CLHA's training RM)
#   resources/reward_models/eval_rm    judges the test generations (CLHA's evaluation RM)
#
# Both are all-MiniLM-L6-v2 sequence classifiers trained with the pairwise loss plus distillation onto the stored
# OpenAssistant rewards, subset-balanced, on DISJOINT prompt-grouped partitions of clha.data.splits (seed 42,
# the preprocessing default): train_rm on `rm_train` (1653 pairs), eval_rm on `policy_train` (4724 pairs; the
# paper's judge was likewise trained on the policy's training split). Neither sees a prompt of the policy's dev or
# test partitions; each is evaluated on dev + test, and eval_rm reports how often the two agree. Figures and the
# routes tried: docs/reward_model_training.md. Not part of CI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -x .venv/bin/python ] && export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

export DATA_DIR=${1:-../shared/data}
OUT=${OUT:-resources/reward_models}
# shared settings of both models (see train/train_reward_model.sh for the rest)
export MAX_LENGTH=${MAX_LENGTH:-256} EPOCHS=${EPOCHS:-2} LEARNING_RATE=${LEARNING_RATE:-1e-4}
export PAIRWISE_WEIGHT=${PAIRWISE_WEIGHT:-1.0} DISTILL_WEIGHT=${DISTILL_WEIGHT:-1.0}

START=$(date +%s)
SEED=1 TRAIN_PARTITIONS=rm_train train/train_reward_model.sh "$OUT/train_rm" --balance_subsets
SEED=2 TRAIN_PARTITIONS=policy_train train/train_reward_model.sh "$OUT/eval_rm" --balance_subsets \
    --compare_with "$OUT/train_rm"
echo "built $OUT/train_rm and $OUT/eval_rm in $(( ($(date +%s) - START) / 60 )) min; figures in */eval_results.json"
