#!/usr/bin/env bash
# Text-to-image throughput on a GPU (issue 6): an SD3.5-Medium-sized pipeline with random weights
# (2.2B-parameter transformer + SD3 VAE at real size, tiny text encoders; nothing downloaded), then
#   bench step   — a DMDR iteration (LoRA student r64, LoRA critic, CFG, bf16, 1024², batch 2) of our
#                  Trainer vs the paper-style eager step, time and peak memory;
#   bench sample — images/s of the 4-step student vs the same pipeline at 28 steps with CFG 7, and
#                  of the student with FP8 linears + attention.
# Results land in $OUT (default ./gpu_results) for BENCHMARKS.md. About 6–8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
PIPE="${PIPE:-/tmp/sd35m_random}"
[ -f "$PIPE/model_index.json" ] || "$PY" -m dmdr_fast.cli make-pipeline --family sd3 --size sd35-medium --dtype bf16 --out "$PIPE"
# With FP8 frozen weights (issue 14): the run times ours (FP8), the paper-style step (FP8) and ours with
# the teacher in bf16 (a second copy of the pipeline), so one call gives both ratios and both peaks.
"$PY" -m dmdr_fast.cli bench step --pipeline "$PIPE" --preset sd35-large-4step \
  --set model.kwargs.resolution=1024 --set train.batch_size=2 --set train.device=cuda \
  --set model.weights_dtype=fp8 --cycles 3 --warmup 1 --json "$OUT/bench_step_sd35m.json" | tee "$OUT/bench_step_sd35m.txt"
"$PY" -m dmdr_fast.cli bench sample --pipeline "$PIPE" --steps 4 --resolution 1024 --batch 1 --reps 3 --fp8 \
  --json "$OUT/bench_sample_sd35m.json" | tee "$OUT/bench_sample_sd35m.txt"
# Optional (COMPILE=1; inductor compiles the 2.2B transformer for minutes first): the same step with
# train.compile, timed compiled vs eager vs the paper-style step in one run.
if [ "${COMPILE:-0}" = "1" ]; then
  "$PY" -m dmdr_fast.cli bench step --pipeline "$PIPE" --preset sd35-large-4step \
    --set model.kwargs.resolution=1024 --set train.batch_size=2 --set train.device=cuda \
    --set train.compile=true --cycles 3 --warmup 2 --json "$OUT/bench_step_sd35m_compile.json" \
    | tee "$OUT/bench_step_sd35m_compile.txt"
fi
