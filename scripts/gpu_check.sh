#!/usr/bin/env bash
# One run on a GPU machine (DESIGN §3): build from source against the machine's torch, run the GPU
# tests, and benchmark; results land in $OUT (default ./gpu_results) for BENCHMARKS.md.
# Such a machine has no network: diffusers etc. must already be installed or carried as wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi | tee "$OUT/nvidia-smi.txt" || true
DMDR_FAST_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
"$PY" -m dmdr_fast.cli env | tee "$OUT/env.txt"
"$PY" -m pytest -q -m "gpu or cuda_ext" tests/ops 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -5
for dt in bfloat16 float32; do
  "$PY" -m dmdr_fast.cli bench dmd-loss --device cuda --dtype "$dt" --json "$OUT/bench_dmd_loss_$dt.json" \
    | tee "$OUT/bench_dmd_loss_$dt.txt"
done
# reward-grad: its GPU tests (also in the run above), then the bench in both dtypes.
"$PY" -m pytest -q -m gpu tests/ops/test_reward_grad.py 2>&1 | tee "$OUT/pytest_gpu_reward_grad.txt" | tail -3
for dt in bfloat16 float32; do
  "$PY" -m dmdr_fast.cli bench reward-grad --device cuda --dtype "$dt" --json "$OUT/bench_reward_grad_$dt.json" \
    | tee "$OUT/bench_reward_grad_$dt.txt"
done
"$PY" -m dmdr_fast.cli bench step --set train.device=cuda --json "$OUT/bench_step.json" | tee "$OUT/bench_step.txt"
