#!/usr/bin/env bash
# The main job: install dmdr_fast, then run the digits preset end to end — train (or reuse) a
# flow-matching DiT teacher on scikit-learn's digits, distil it with DMDR into a 1-step student,
# evaluate both and write runs/digits/report.md. Extra arguments go to `dmdr-fast train`,
# e.g. `bash scripts/quickstart.sh --set student.num_steps=4`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install.sh
"$PY" -m dmdr_fast.cli train --preset digits --out "${OUT:-runs/digits}" "$@"
