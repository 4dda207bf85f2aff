#!/usr/bin/env bash
# Install dmdr_fast into the current Python environment (editable), building dmdr_fast._C.
# Usage: bash scripts/install.sh [--test]
# torch is installed only if missing: a CPU machine gets torch 2.13.0 (a GPU machine keeps its
# own CUDA build). The CUDA kernels are compiled when nvcc is found (DMDR_FAST_CUDA=AUTO|ON|OFF).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
# Build requirements installed up front so the editable build can reuse its build folder.
pip_install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.30" "ninja>=1.11" numpy triton
pip_install --no-build-isolation -e ".${extras}"
"$PY" -c "import dmdr_fast, dmdr_fast._C as C; print('dmdr_fast', dmdr_fast.__version__, C.build_info())"
