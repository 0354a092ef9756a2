#!/usr/bin/env bash
# Train a policy with CLHA on ranked HH-RLHF data.
#   ./train_hh.sh <exp_id> <data_dir_under_data/> <ranking_len>     e.g. ./train_hh.sh 1 hh_train_len2 2
#   ./train_hh.sh                                                   the built-in CPU demo (no downloads)
# Outputs: checkpoints/index_<id>/stage_<len>/ and logs/<id>/<len>/ (train_detail.log, metrics, TensorBoard).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

if [ $# -eq 0 ]; then
  exec python -m clha.demo --out_dir demo_out
fi
if [ $# -ne 3 ]; then
  echo "usage: $0 <exp_id> <data_dir_under_data/> <ranking_len>   (or no arguments for the demo)" >&2
  exit 2
fi
ID=$1; DATA=$2; RANKING_LEN=$3

# ---- hyperparameters (the reference's HH-RLHF setup; edit here) ----
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-train/ds_config.yaml}   # train/ds_config_cpu.yaml, train/ddp_cpu.yaml, ...
MODEL=${MODEL:-huggyllama/llama-7b}
GGUF_FILE=${GGUF_FILE:-}                   # e.g. SmolLM2-135M-Instruct.Q4_1.gguf (MODEL is then its folder)
REWARD_MODEL=${REWARD_MODEL:-OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5}
LOSS_TYPE=${LOSS_TYPE:-clha}               # clha | pro | rrhf | dpo | sft
LEARNING_RATE=${LEARNING_RATE:-5e-6}
EPOCHS=${EPOCHS:-2}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-2}
EVAL_BATCH=${EVAL_BATCH:-28}
GRAD_ACCUM=${GRAD_ACCUM:-8}
BLOCK_SIZE=${BLOCK_SIZE:-512}
SFT_WEIGHT=${SFT_WEIGHT:-0.05}
RANK_MARGIN=${RANK_MARGIN:-3.0}
REWARD_GAP_THRESHOLD=${REWARD_GAP_THRESHOLD:-3.0}
SFT_REWARD_THRESHOLD=${SFT_REWARD_THRESHOLD:-0.0}
CHECKPOINTING_STEP=${CHECKPOINTING_STEP:-600}
LR_SCHEDULER=${LR_SCHEDULER:-constant}
WARMUP_STEPS=${WARMUP_STEPS:-0}
MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-}
SEED=${SEED:-42}
RESUME=${RESUME:-latest}                   # latest: pick up the newest saved state if there is one
EXTRA_ARGS=${EXTRA_ARGS:-}

OUT="checkpoints/index_${ID}/stage_${RANKING_LEN}"
LOGS="logs/${ID}/${RANKING_LEN}"
mkdir -p "$OUT" "$LOGS"
OPTIONAL=()
[ -n "$GGUF_FILE" ] && OPTIONAL+=(--gguf_file "$GGUF_FILE")
[ -n "$MAX_TRAIN_STEPS" ] && OPTIONAL+=(--max_train_steps "$MAX_TRAIN_STEPS")

# The launch: every argument is a field of TrainConfig in clha/config.py (`python train/main.py --help`).
accelerate launch --config_file "$ACCELERATE_CONFIG" train/main.py \
  --task hh --train_file_path "data/${DATA}" \
  --validation_file_path data/hh_dev --validation_file_name sampled_dev.json \
  --output_dir "$OUT" --log_path "$LOGS" --index "$ID" --seed "$SEED" \
  --temperature 1 --sft_weight "$SFT_WEIGHT" --num_train_epochs "$EPOCHS" \
  --training_stage_num "$RANKING_LEN" --block_size "$BLOCK_SIZE" --learning_rate "$LEARNING_RATE" \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size "$EVAL_BATCH" \
  --model_name_or_path "$MODEL" --do_train --do_validation \
  --gradient_accumulation_steps "$GRAD_ACCUM" --checkpointing_step "$CHECKPOINTING_STEP" \
  --loss_type "$LOSS_TYPE" --rank_margin "$RANK_MARGIN" \
  --reward_gap_threshold "$REWARD_GAP_THRESHOLD" --sft_reward_threshold "$SFT_REWARD_THRESHOLD" \
  --reward_model "$REWARD_MODEL" --lr_scheduler_type "$LR_SCHEDULER" --warmup_steps "$WARMUP_STEPS" \
  --resume_from_checkpoint "$RESUME" "${OPTIONAL[@]}" $EXTRA_ARGS \
  2>&1 | tee -a "$LOGS/train_detail.log"
