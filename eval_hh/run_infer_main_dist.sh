#!/usr/bin/env bash
# Evaluate a checkpoint on the HH-RLHF test subsets: generate -> reward -> score (docs/evaluation.md).
#   ./eval_hh/run_infer_main_dist.sh <id> <ranking_len> [--force] [--allow_same_reward_model]
# evaluates checkpoints/index_<id>/stage_<len>/best_checkpoint (or MODEL_PATH) and writes
# eval_hh/inference_res/<id>_<len>/{report.md,report.json,examples.jsonl,reward_by_subset.png}.
# Every variable below can also be set in the environment. A rerun resumes; --force redoes every stage.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ $# -lt 2 ]; then
  echo "usage: $0 <id> <ranking_len> [--force] [--allow_same_reward_model]" >&2
  exit 2
fi
ID=$1; RANKING_LEN=$2; shift 2

# ---- settings ----
# Every option of eval_hh/evaluate.py is a field of EvalConfig (clha/eval/config.py; `python eval_hh/evaluate.py
# --help` lists them with their defaults). The optional variables below pass an option only when they are set, so
# each default is written once, in the config.
MODEL_PATH=${MODEL_PATH:-checkpoints/index_${ID}/stage_${RANKING_LEN}/best_checkpoint}   # any model folder or hub id
OUT_DIR=${OUT_DIR:-eval_hh/inference_res/${ID}_${RANKING_LEN}}
NUM_PROCESSES=${NUM_PROCESSES:-auto}         # auto: one per GPU, else 1; on a CPU set e.g. 2
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-}     # set when several evaluations share a machine
PYTHON=${PYTHON:-python}                     # the environment's python (with torch) and its accelerate
ACCELERATE=${ACCELERATE:-accelerate}
# Optional settings, VARIABLE=option (unset: the config's default), e.g. LIMIT=10 DTYPE=float32 ...
OPTIONAL_SETTINGS=(
  TEST_DIR=test_dir EVAL_REWARD_MODEL=eval_reward_model TRAIN_REWARD_MODEL=train_reward_model
  GGUF_FILE=gguf_file GEN_BATCH_SIZE=gen_batch_size REWARD_BATCH_SIZE=reward_batch_size
  MAX_NEW_TOKENS=max_new_tokens BLOCK_SIZE=block_size REWARD_MAX_LENGTH=reward_max_length DTYPE=torch_dtype
  LIMIT=limit
)
SUBSETS=${SUBSETS:-}                         # space-separated test-file stems (default: all four)

NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
[ "$NUM_PROCESSES" = auto ] && NUM_PROCESSES=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
LAUNCH=(--num_processes "$NUM_PROCESSES" --num_machines 1 --mixed_precision no --dynamo_backend no)
if [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH+=(--multi_gpu)
  [ "$NUM_GPUS" -eq 0 ] && export ACCELERATE_USE_CPU=true   # DDP over gloo on the CPU
fi
[ -n "$MAIN_PROCESS_PORT" ] && LAUNCH+=(--main_process_port "$MAIN_PROCESS_PORT")
ARGS=(--model_path "$MODEL_PATH" --out_dir "$OUT_DIR" --name "${ID}_${RANKING_LEN}")
for SETTING in "${OPTIONAL_SETTINGS[@]}"; do
  VAR=${SETTING%%=*}
  if [ -n "${!VAR:-}" ]; then ARGS+=("--${SETTING#*=}" "${!VAR}"); fi
done
if [ -n "$SUBSETS" ]; then ARGS+=(--subsets $SUBSETS); fi

mkdir -p "$OUT_DIR"
for STAGE in generate reward score; do
  "$ACCELERATE" launch "${LAUNCH[@]}" eval_hh/evaluate.py "$STAGE" "${ARGS[@]}" "$@" 2>&1 | tee -a "$OUT_DIR/eval.log"
done
