#!/usr/bin/env bash
# The method comparison in one command (see experiments/compare.py --help and the README, "Comparing methods"):
#   experiments/run_comparison.sh                       # CPU preset: every method and seed, then the table
#   experiments/run_comparison.sh --preset gpu          # full-size settings on GPUs
#   experiments/run_comparison.sh --dry-run             # settings and which runs are done / pending
# Interrupt it at any time and run it again: finished runs are skipped, a killed training resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
exec "$PY" "$ROOT/experiments/compare.py" "$@"
