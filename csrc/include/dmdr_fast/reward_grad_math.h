// Math of the reward-gradient combination op (docs/method.md §7), shared verbatim by
// the C++ CPU kernel and the CUDA kernel so that both compute exactly the same float32 expressions.
//
// Per sample (all dimensions after the batch dimension flattened):
//   r   = g_reward with every NaN/±Inf entry replaced by 0     (n = number of such entries)
//   a   = ‖g_dmd‖₂,  b = ‖r‖₂,  dot = ⟨g_dmd, r⟩                (sums accumulated per sample)
//   cos = dot / (a·b) if a·b > 0 else 0
//   w   = weight                                    (fixed)
//       = min(max_weight, ratio·a / (b + eps))      (balanced: ‖w·r‖ ≈ ratio·‖g_dmd‖)
//   g   = g_dmd + w·r
//
// The expressions are written in the same order as ops/reference.py::reward_grad_combine_ref.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dmdr_fast/macros.h"

namespace dmdr_fast {
// Internal linkage: the CPU kernels are compiled once per ISA level (base and AVX2), and an
// out-of-line copy of an `inline` function with external linkage could be merged by the linker
// with the copy of the other ISA level.
namespace {

DMDR_HD uint32_t reward_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

DMDR_HD float reward_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// Finiteness and sanitising are integer tests on the bits (NaN and ±Inf have an all-ones
// exponent), not float comparisons: under -ftrapping-math (GCC's default) GCC does not if-convert a
// float comparison, which would keep the CPU loops scalar; the integer form vectorises.
DMDR_HD bool reward_is_finite(float x) {
  return (reward_float_bits(x) & 0x7f800000u) != 0x7f800000u;
}

// The reward gradient entry with NaN/±Inf replaced by +0 (a bit mask, branch-free).
DMDR_HD float reward_sanitise(float x) {
  const uint32_t keep = reward_is_finite(x) ? 0xffffffffu : 0u;
  return reward_bits_float(reward_float_bits(x) & keep);
}

// One element of the output: g_dmd + w·r (r already sanitised).
DMDR_HD float reward_combine(float dmd, float r, float w) { return dmd + w * r; }

struct RewardGradSampleStats {
  float dmd_norm;
  float reward_norm;
  float cosine;
  float weight;
};

// Per-sample statistics and weight from the sums Σ g_dmd², Σ r², Σ g_dmd·r.
DMDR_HD RewardGradSampleStats reward_grad_sample_stats(float sum_dd, float sum_rr, float sum_dr,
                                                       bool balanced, float weight, float ratio,
                                                       float max_weight, float eps) {
  RewardGradSampleStats s;
  s.dmd_norm = sqrtf(sum_dd);
  s.reward_norm = sqrtf(sum_rr);
  const float ab = s.dmd_norm * s.reward_norm;
  s.cosine = ab > 0.f ? sum_dr / ab : 0.f;
  if (balanced) {
    const float w = ratio * s.dmd_norm / (s.reward_norm + eps);
    s.weight = w > max_weight ? max_weight : w;  // NaN stays NaN, as torch.clamp(max=) does
  } else {
    s.weight = weight;
  }
  return s;
}

}  // namespace
}  // namespace dmdr_fast
