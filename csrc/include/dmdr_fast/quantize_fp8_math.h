// Element math of the row-wise FP8 quantisation (ops/reference.py::quantize_fp8_ref), shared
// verbatim by the C++ CPU kernel and the CUDA kernel so that both compute exactly the reference's
// float32 expressions; only the final cast differs (a bit-exact integer encoder on the CPU,
// cuda_fp8.h's saturating conversion on the GPU), and both round to nearest even.
//
//   amax  = max over the row of |x|, NaN and ±Inf entries counted as 0
//   scale = max(min(amax, amax_ub), eps) / fp8_max            (IEEE division)
//   inv   = 1 / scale                                          (IEEE division, once per row)
//   q     = fp8(clamp(x·inv, −fp8_max, fp8_max))               (NaN stays NaN; ±Inf → ±fp8_max)
#pragma once

#include <cfloat>
#include <cmath>

#include "dmdr_fast/dtype.h"
#include "dmdr_fast/macros.h"

namespace dmdr_fast {
// Internal linkage: the CPU kernels are compiled once per ISA level (base and AVX2), see
// dmd_loss_math.h.
namespace {

constexpr float kFp8E4M3Max = 448.f;    // largest finite float8_e4m3fn
constexpr float kFp8E5M2Max = 57344.f;  // largest finite float8_e5m2

// |x| for finite x, 0 for NaN and ±Inf: one non-finite entry must not decide the scale of its
// whole row. A single comparison (NaN compares false, Inf exceeds FLT_MAX) so the loop vectorises.
DMDR_HD float fp8_finite_abs(float x) {
  const float a = fabsf(x);
  return a <= FLT_MAX ? a : 0.f;
}

// max without NaN rules (its inputs are never NaN); plain comparison so that it vectorises.
DMDR_HD float fp8_max_of(float a, float b) { return a > b ? a : b; }

DMDR_HD float fp8_row_scale(float amax, float amax_ub, float eps, float fp8_max) {
  amax = amax > amax_ub ? amax_ub : amax;
  amax = amax < eps ? eps : amax;
  return amax / fp8_max;
}

// The scaled value before the cast: clamped into the finite fp8 range (±Inf included), NaN
// passes (comparisons with NaN are false).
DMDR_HD float fp8_scaled(float x, float inv_scale, float fp8_max) {
  float v = x * inv_scale;
  v = v > fp8_max ? fp8_max : v;
  return v < -fp8_max ? -fp8_max : v;
}

}  // namespace
}  // namespace dmdr_fast
