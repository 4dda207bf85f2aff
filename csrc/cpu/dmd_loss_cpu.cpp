// Fused DMD score-difference op on the CPU (docs/method.md §5.4; math in dmd_loss_math.h).
//
// Two passes per sample: (A) Σ|x0 − x̂0_real| gives the normaliser, (B) the direction g is written
// and Σg² accumulated. The per-sample normaliser makes a single pass impossible without changing
// the NaN/Inf semantics, so the kernel keeps pass B cheap instead: samples are processed in groups
// whose inputs fit in the last-level cache, so pass B re-reads them from cache, not DRAM.
// Work inside a group is split into fixed-size chunks, and both passes use the same static
// OpenMP schedule so each thread re-reads the chunks it touched in pass A.
//
// This file is compiled once per CPU ISA level (see CMakeLists.txt): DMDR_CPU_ISA names the
// namespace of this copy (`base`, or `avx2` built with -march=x86-64-v3), and cpu_dispatch.cpp
// picks the best copy for the running CPU, so the wheel stays portable.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "dmdr_fast/cpu_convert.h"
#include "dmdr_fast/dispatch.h"
#include "dmdr_fast/dmd_loss.h"
#include "dmdr_fast/dmd_loss_math.h"

#ifndef DMDR_CPU_ISA
#define DMDR_CPU_ISA base
#endif

namespace dmdr_fast::cpu::DMDR_CPU_ISA {
namespace {

// Work unit: a contiguous chunk of one sample; 4096 elements give enough chunks for load balance.
constexpr int64_t kChunk = 4096;

// Σ_{i in [lo, hi)} f(i) with 16 float lanes that the compiler vectorises (an `omp simd`
// reduction does not vectorise with GCC here), flushed into a double every 64 steps per lane:
// the normaliser scales every g, so its sum must stay as accurate as PyTorch's pairwise sum.
template <class F>
inline double lane_sum(int64_t lo, int64_t hi, F&& f) {
  constexpr int kLanes = 16;
  constexpr int64_t kFlush = 64 * kLanes;
  double total = 0.0;
  int64_t i = lo;
  while (i < hi) {
    const int64_t end = std::min(hi, i + kFlush);
    float lane[kLanes] = {};
    for (; i + kLanes <= end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lane[j] += f(i + j);
    }
    float tail = 0.f;
    for (; i < end; ++i) tail += f(i);
    double block = tail;
    for (int j = 0; j < kLanes; ++j) block += lane[j];
    total += block;
  }
  return total;
}
// Bytes of input one group of samples may occupy so that pass B finds them in cache.
constexpr int64_t kGroupBytes = 12ll << 20;

template <typename T, bool kHasUncond>
void run(const DmdLossParams& p, int num_threads) {
  const int64_t B = p.batch, D = p.numel_per_sample;
  const T* x0 = static_cast<const T*>(p.x0);
  const T* xt = static_cast<const T*>(p.x_t);
  const T* vf = static_cast<const T*>(p.v_fake);
  const T* vc = static_cast<const T*>(p.v_cond);
  const T* vu = static_cast<const T*>(kHasUncond ? p.v_uncond : p.v_cond);
  T* g = static_cast<T*>(p.g);
  const float w = p.guidance;

  const int64_t chunks = (D + kChunk - 1) / kChunk;
  const int64_t inputs = kHasUncond ? 5 : 4;
  const int64_t sample_bytes = D * inputs * static_cast<int64_t>(sizeof(T));
  const int64_t group = std::max<int64_t>(1, kGroupBytes / std::max<int64_t>(1, sample_bytes));
  std::vector<double> part_a(static_cast<size_t>(B * chunks));
  std::vector<double> part_s(static_cast<size_t>(B * chunks));

  for (int64_t b0 = 0; b0 < B; b0 += group) {
    const int64_t nb = std::min(group, B - b0);
    const int64_t tasks = nb * chunks;
    // Pass A: per-chunk Σ|x0 − x̂0_real|.
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = b0 + task / chunks, c = task % chunks;
      const int64_t lo = b * D + c * kChunk, hi = b * D + std::min(D, (c + 1) * kChunk);
      const float tb = p.t[b];
      part_a[b * chunks + c] = lane_sum(lo, hi, [&](int64_t i) {
        return dmd_abs_residual<kHasUncond>(load(x0, i), load(xt, i), tb, load(vc, i), load(vu, i),
                                            w);
      });
    }
    // Pass B: g = nan_to_num(d / normaliser), Σg² per chunk. The normaliser is recomputed per
    // task from the chunk sums in a fixed order, so the result does not depend on thread count.
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = b0 + task / chunks, c = task % chunks;
      double sum_a = 0.0;
      for (int64_t k = 0; k < chunks; ++k) sum_a += part_a[b * chunks + k];
      const float norm = static_cast<float>(sum_a / static_cast<double>(D)) + p.eps;
      const int64_t lo = b * D + c * kChunk, hi = b * D + std::min(D, (c + 1) * kChunk);
      const float tb = p.t[b];
      part_s[b * chunks + c] = lane_sum(lo, hi, [&](int64_t i) {
        const float gi = dmd_direction(
            dmd_diff<kHasUncond>(load(xt, i), tb, load(vf, i), load(vc, i), load(vu, i), w), norm);
        store(g, i, gi);
        return gi * gi;
      });
      if (c == 0) p.norm[b] = norm;
    }
  }
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0;
    for (int64_t k = 0; k < chunks; ++k) s += part_s[b * chunks + k];
    p.sumsq[b] = static_cast<float>(s);
    total += s;
  }
  p.loss[0] = static_cast<float>(0.5 * total / (static_cast<double>(B) * static_cast<double>(D)));
}

}  // namespace

void dmd_loss_fwd(const DmdLossParams& p, int num_threads) {
  if (p.batch <= 0 || p.numel_per_sample <= 0) {
    throw std::invalid_argument("dmdr_fast.dmd_loss_fwd_cpu: empty input");
  }
  num_threads = std::max(1, num_threads);
  DMDR_FLOAT_SWITCH(p.dtype, T, float, Half, BFloat16, [&] {
    DMDR_BOOL_SWITCH(p.v_uncond != nullptr, kHasUncond,
                     [&] { run<T, kHasUncond>(p, num_threads); });
  });
}

}  // namespace dmdr_fast::cpu::DMDR_CPU_ISA
