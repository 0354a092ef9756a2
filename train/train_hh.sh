#!/usr/bin/env bash
# The seed's `cd train && ./train_hh.sh <id> <data> <len>` still works: it runs the top-level script.
set -euo pipefail
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/train_hh.sh" "$@"
