#!/usr/bin/env bash
# One-shot GPU check (docs/gpu_check.md): run from anywhere on a machine with one CUDA GPU, torch, transformers and
# accelerate; nothing is installed or downloaded. Results go to $OUT (default bench/results/gpu_check):
# gpu_check.log, gpu_check.json, gpu_check.md, gpu_check_pytest.log. Extra arguments go to bench/gpu_check.py
# (e.g. --sections step_time,generation). The whole run is capped at 470 s (--budget 450 for the sections, the
# rest for start-up and the final table; under 8 minutes in all); each section has its own limit and the files are
# rewritten after every section, so a cut-short run keeps what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT="${OUT:-$PWD/bench/results/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
timeout -k 10 470 "$PY" bench/gpu_check.py --budget 450 --out "$OUT" "$@"
rc=$?
echo "gpu_check exit code $rc; results in $OUT"
exit $rc
