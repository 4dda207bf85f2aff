#!/usr/bin/env bash
# The main job: install dmdr_fast, then show what was built and benchmark the fused DMD loss.
# (Switches to the digits DMDR preset when the Trainer lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install.sh
"$PY" -m dmdr_fast.cli env
"$PY" -m dmdr_fast.cli bench dmd-loss "$@"
