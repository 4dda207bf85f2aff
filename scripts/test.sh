#!/usr/bin/env bash
# Install dmdr_fast (editable, with its test extras) into the current Python environment and run
# the test-suite. Usage: bash scripts/test.sh [pytest args...]
#   PYTHON=python3.12 bash scripts/test.sh     # pick the interpreter
#   DMDR_FAST_CUDA=OFF bash scripts/test.sh    # skip compiling the CUDA kernels
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install.sh --test
exec "$PY" -m pytest "$@"
