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

# ---- settings (edit here) ----
MODEL_PATH=${MODEL_PATH:-checkpoints/index_${ID}/stage_${RANKING_LEN}/best_checkpoint}   # any model folder or hub id
GGUF_FILE=${GGUF_FILE:-}                     # a .gguf file inside MODEL_PATH, if that is what it holds
TEST_DIR=${TEST_DIR:-data/hh_test}
SUBSETS=${SUBSETS:-harmless_base helpful_base helpful_online helpful_rejection}
EVAL_REWARD_MODEL=${EVAL_REWARD_MODEL:-OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1}
TRAIN_REWARD_MODEL=${TRAIN_REWARD_MODEL:-}   # default: reward_model in MODEL_PATH/clha_config.json
NUM_PROCESSES=${NUM_PROCESSES:-auto}         # auto: one per GPU, else 1; on a CPU set e.g. 2
GEN_BATCH_SIZE=${GEN_BATCH_SIZE:-28}                 # as the reference; batches are length-sorted
REWARD_BATCH_SIZE=${REWARD_BATCH_SIZE:-16}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
BLOCK_SIZE=${BLOCK_SIZE:-512}
REWARD_MAX_LENGTH=${REWARD_MAX_LENGTH:-1024}
DTYPE=${DTYPE:-auto}                         # auto: bf16 on CUDA, fp32 on CPU
LIMIT=${LIMIT:-0}                            # first N examples per subset (0: all)
OUT_DIR=${OUT_DIR:-eval_hh/inference_res/${ID}_${RANKING_LEN}}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-}     # set when several evaluations share a machine
PYTHON=${PYTHON:-python}                     # the environment's python (with torch) and its accelerate
ACCELERATE=${ACCELERATE:-accelerate}

NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
[ "$NUM_PROCESSES" = auto ] && NUM_PROCESSES=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
LAUNCH=(--num_processes "$NUM_PROCESSES" --num_machines 1 --mixed_precision no --dynamo_backend no)
if [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH+=(--multi_gpu)
  [ "$NUM_GPUS" -eq 0 ] && export ACCELERATE_USE_CPU=true   # DDP over gloo on the CPU
fi
[ -n "$MAIN_PROCESS_PORT" ] && LAUNCH+=(--main_process_port "$MAIN_PROCESS_PORT")
ARGS=(--model_path "$MODEL_PATH" --test_dir "$TEST_DIR" --out_dir "$OUT_DIR" --subsets $SUBSETS
      --eval_reward_model "$EVAL_REWARD_MODEL" --gen_batch_size "$GEN_BATCH_SIZE"
      --reward_batch_size "$REWARD_BATCH_SIZE" --max_new_tokens "$MAX_NEW_TOKENS" --block_size "$BLOCK_SIZE"
      --reward_max_length "$REWARD_MAX_LENGTH" --dtype "$DTYPE" --limit "$LIMIT" --name "${ID}_${RANKING_LEN}")
[ -n "$TRAIN_REWARD_MODEL" ] && ARGS+=(--train_reward_model "$TRAIN_REWARD_MODEL")
[ -n "$GGUF_FILE" ] && ARGS+=(--gguf_file "$GGUF_FILE")

mkdir -p "$OUT_DIR"
for STAGE in generate reward score; do
  "$ACCELERATE" launch "${LAUNCH[@]}" eval_hh/evaluate.py "$STAGE" "${ARGS[@]}" "$@" 2>&1 | tee -a "$OUT_DIR/eval.log"
done
