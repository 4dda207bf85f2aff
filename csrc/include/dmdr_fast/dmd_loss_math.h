// Element math of the DMD score-difference op (docs/method.md §5.4), shared verbatim by the C++ CPU
// kernel and the CUDA kernel so that both compute exactly the same float32 expressions.
//
//   v_real  = v_uncond + w·(v_cond − v_uncond)      (v_cond when there is no v_uncond)
//   x̂0_real = x_t − t·v_real,   x̂0_fake = x_t − t·v_fake
//   a       = |x0 − x̂0_real|                         (summed per sample → normaliser)
//   d       = x̂0_fake − x̂0_real                      (direction before normalisation)
//   g       = nan_to_num(d / (mean(a) + eps))
//
// The expressions are written in the same order as ops/reference.py so that fused kernels agree
// with the reference up to summation order, including which inputs turn into NaN/Inf.
#pragma once

#include <cfloat>
#include <cmath>

#include "dmdr_fast/macros.h"

namespace dmdr_fast {
// Internal linkage: the CPU kernels are compiled once per ISA level (base and AVX2), and an
// out-of-line copy of an `inline` function with external linkage could be merged by the linker
// with the copy of the other ISA level.
namespace {

struct DmdElem {
  float abs_residual;  // |x0 − x̂0_real|
  float diff;          // x̂0_fake − x̂0_real
};

template <bool kHasUncond>
DMDR_HD float dmd_real_velocity(float v_cond, float v_uncond, float guidance) {
  if constexpr (kHasUncond) {
    return v_uncond + guidance * (v_cond - v_uncond);
  } else {
    return v_cond;
  }
}

template <bool kHasUncond>
DMDR_HD float dmd_abs_residual(float x0, float x_t, float t, float v_cond, float v_uncond,
                               float guidance) {
  const float x0_real = x_t - t * dmd_real_velocity<kHasUncond>(v_cond, v_uncond, guidance);
  return fabsf(x0 - x0_real);
}

template <bool kHasUncond>
DMDR_HD float dmd_diff(float x_t, float t, float v_fake, float v_cond, float v_uncond,
                       float guidance) {
  const float x0_real = x_t - t * dmd_real_velocity<kHasUncond>(v_cond, v_uncond, guidance);
  const float x0_fake = x_t - t * v_fake;
  return x0_fake - x0_real;
}

// Clamp into [-max_finite, max_finite] (callers remove NaN first). Plain comparisons, not
// fminf/fmaxf: those must honour NaN rules, so GCC calls libm for them instead of emitting
// min/max instructions.
DMDR_HD float clamp_finite(float x, float max_finite) {
  x = x > max_finite ? max_finite : x;
  return x < -max_finite ? -max_finite : x;
}

// torch.nan_to_num semantics for float32: NaN → 0, ±Inf → ±FLT_MAX. Branch-free (a select and
// min/max) so that the CPU loop vectorises; must not be compiled with -ffast-math, which would
// fold the NaN test away.
DMDR_HD float nan_to_num_f32(float x) { return clamp_finite(x == x ? x : 0.f, FLT_MAX); }

DMDR_HD float dmd_direction(float diff, float normaliser) {
  return nan_to_num_f32(diff / normaliser);
}

}  // namespace
}  // namespace dmdr_fast
