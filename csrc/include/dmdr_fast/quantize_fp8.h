// Host-side interface of the row-wise FP8 quantisation op. Python validates every argument
// (shapes, dtypes, devices, contiguity, scalar ranges) before calling; these functions trust their
// inputs.
#pragma once

#include <cmath>
#include <cstdint>

#include "dmdr_fast/dtype.h"

namespace dmdr_fast {

// x is a contiguous (rows, K) row-major view of the op's (..., K) input.
struct QuantizeFp8Params {
  const void* x = nullptr;  // (rows, K) input, element type `dtype`
  uint8_t* q = nullptr;     // out (rows, K): fp8 codes of type `fp8_dtype`, one byte each
  float* scale = nullptr;   // out (rows,): dequantisation scale, x ≈ q·scale
  int64_t rows = 0;
  int64_t row_size = 0;                  // K >= 1
  float eps = 1e-12f;                    // floor of the row amax (> 0)
  float amax_ub = HUGE_VALF;             // cap of the row amax (+Inf: none)
  DType dtype = DType::kFloat32;         // float32, float16 or bfloat16
  DType fp8_dtype = DType::kFloat8E4M3;  // kFloat8E4M3 or kFloat8E5M2
};

namespace cpu {
// One pass over each row for the amax, a second (from cache) for the codes; OpenMP over rows
// with `num_threads` threads; runs the copy compiled for the best ISA level of this CPU.
void quantize_fp8_fwd(const QuantizeFp8Params& p, int num_threads);
}  // namespace cpu

namespace cuda {
// One kernel launch on `stream` (a cudaStream_t); a warp per row.
void quantize_fp8_fwd(const QuantizeFp8Params& p, int device, void* stream);
}  // namespace cuda

}  // namespace dmdr_fast
