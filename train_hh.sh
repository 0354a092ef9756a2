#!/usr/bin/env bash
# Train a policy with CLHA on ranked HH-RLHF data.
#   ./train_hh.sh <exp_id> <data_dir_under_data/> <ranking_len>     e.g. ./train_hh.sh 1 hh_train_len2 2
#   ./train_hh.sh                                                   the built-in CPU demo (no downloads)
# Outputs: checkpoints/index_<id>/stage_<len>/ and logs/<id>/<len>/ (train_detail.log, metrics, TensorBoard).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

if [ $# -eq 0 ]; then
  exec python -m clha.testing.demo --out_dir demo_out
fi
if [ $# -ne 3 ]; then
  echo "usage: $0 <exp_id> <data_dir_under_data/> <ranking_len>   (or no arguments for the demo)" >&2
  exit 2
fi
ID=$1; DATA=$2; RANKING_LEN=$3

# ---- settings ----
# Every option of train/main.py is a field of TrainConfig (clha/config.py; `python train/main.py --help` lists them
# with their defaults). The variables below pass an option only when they are set, so each default is written once,
# in the config. The reference's HH-RLHF setup differs from the config's defaults only in these five:
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-train/ds_config.yaml}   # train/ds_config_cpu.yaml, train/ddp_cpu.yaml, ...
MODEL=${MODEL:-huggyllama/llama-7b}
REWARD_MODEL=${REWARD_MODEL:-OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5}
GRAD_ACCUM=${GRAD_ACCUM:-8}
RESUME=${RESUME:-latest}                   # latest: pick up the newest saved state if there is one
# Optional settings, VARIABLE=option (unset: the config's default), e.g. LOSS_TYPE=dpo LEARNING_RATE=1e-6 ./train_hh.sh ...
OPTIONAL_SETTINGS=(
  LOSS_TYPE=loss_type LEARNING_RATE=learning_rate EPOCHS=num_train_epochs PER_DEVICE_BATCH=per_device_train_batch_size
  EVAL_BATCH=per_device_eval_batch_size BLOCK_SIZE=block_size SFT_WEIGHT=sft_weight RANK_MARGIN=rank_margin
  REWARD_GAP_THRESHOLD=reward_gap_threshold SFT_REWARD_THRESHOLD=sft_reward_threshold
  CHECKPOINTING_STEP=checkpointing_step LR_SCHEDULER=lr_scheduler_type WARMUP_STEPS=warmup_steps
  MAX_TRAIN_STEPS=max_train_steps SEED=seed GGUF_FILE=gguf_file   # GGUF_FILE: a .gguf file inside the MODEL folder
)
EXTRA_ARGS=${EXTRA_ARGS:-}                 # any other options, passed as they are

OUT="checkpoints/index_${ID}/stage_${RANKING_LEN}"
LOGS="logs/${ID}/${RANKING_LEN}"
mkdir -p "$OUT" "$LOGS"
OPTIONAL=()
for SETTING in "${OPTIONAL_SETTINGS[@]}"; do
  VAR=${SETTING%%=*}
  if [ -n "${!VAR:-}" ]; then OPTIONAL+=("--${SETTING#*=}" "${!VAR}"); fi
done

accelerate launch --config_file "$ACCELERATE_CONFIG" train/main.py \
  --task hh --train_file_path "data/${DATA}" \
  --validation_file_path data/hh_dev --validation_file_name sampled_dev.json \
  --output_dir "$OUT" --log_path "$LOGS" --index "$ID" --training_stage_num "$RANKING_LEN" \
  --model_name_or_path "$MODEL" --reward_model "$REWARD_MODEL" --do_train --do_validation \
  --gradient_accumulation_steps "$GRAD_ACCUM" --resume_from_checkpoint "$RESUME" "${OPTIONAL[@]}" $EXTRA_ARGS \
  2>&1 | tee -a "$LOGS/train_detail.log"
