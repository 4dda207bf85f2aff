// Fused reward-gradient combination on the CPU (docs/method.md §7; math in
// reward_grad_math.h).
//
// Balanced mode takes two passes per sample: (A) Σg_dmd², Σr², Σg_dmd·r and the count of
// non-finite reward entries, (B) g = g_dmd + w·r with the sample's weight w, which needs every sum
// of pass A. Like dmd_loss_cpu.cpp, samples are processed in cache-sized groups (here about half an
// L2 per thread), so pass B re-reads them from cache rather than DRAM; each thread owns the same
// fixed-size chunks in both passes and walks them backwards in pass B, starting with those still
// in its L2.
// Fixed mode knows w up front: pass A writes g as well, and each input is read once.
//
// This file is compiled once per CPU ISA level (see CMakeLists.txt): DMDR_CPU_ISA names the
// namespace of this copy (`base`, or `avx2` built with -march=x86-64-v3), and cpu_dispatch.cpp
// picks the best copy for the running CPU, so the wheel stays portable.
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "dmdr_fast/cpu_convert.h"
#include "dmdr_fast/dispatch.h"
#include "dmdr_fast/reward_grad.h"
#include "dmdr_fast/reward_grad_math.h"

#ifndef DMDR_CPU_ISA
#define DMDR_CPU_ISA base
#endif

namespace dmdr_fast::cpu::DMDR_CPU_ISA {
namespace {

// Work unit: a contiguous chunk of one sample; 4096 elements give enough chunks for load balance.
constexpr int64_t kChunk = 4096;
// Bytes of input per thread one group of samples may occupy (balanced mode), so that pass B finds
// them in cache: about half of a server core's L2, and well within the last-level cache.
constexpr int64_t kGroupBytesPerThread = 512ll << 10;
// Below this many elements per group the passes run on one thread: waking a team costs more than
// the work (and, on a busy machine, a descheduled team member stalls the barrier for milliseconds).
constexpr int64_t kMinParallel = 32768;

struct Sums {
  double dd = 0.0;  // Σ g_dmd²
  double rr = 0.0;  // Σ r²
  double dr = 0.0;  // Σ g_dmd·r
  int64_t nonfinite = 0;
};

// The sums of one chunk [lo, hi), with 16 float lanes per sum that the compiler vectorises (an
// `omp simd` reduction does not vectorise with GCC here), flushed into doubles every 64 steps per
// lane: the norms set the balanced weight, so they must stay as accurate as PyTorch's pairwise sum.
// With kWriteG, also writes g = g_dmd + w·r for the chunk (fixed mode: w is known up front).
template <typename T, bool kWriteG>
Sums chunk_sums(const T* d, const T* r, T* g, float w, int64_t lo, int64_t hi) {
  constexpr int kLanes = 16;
  constexpr int64_t kFlush = 64 * kLanes;
  Sums s;
  int64_t i = lo;
  while (i < hi) {
    const int64_t end = std::min(hi, i + kFlush);
    float dd[kLanes] = {}, rr[kLanes] = {}, dr[kLanes] = {};
    int32_t bad[kLanes] = {};
    for (; i + kLanes <= end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float x = load(d, i + j), y = load(r, i + j);
        const float ry = reward_sanitise(y);
        if constexpr (kWriteG) store(g, i + j, reward_combine(x, ry, w));
        dd[j] += x * x;
        rr[j] += ry * ry;
        dr[j] += x * ry;
        bad[j] += reward_is_finite(y) ? 0 : 1;
      }
    }
    for (; i < end; ++i) {  // tail, into lane 0
      const float x = load(d, i), y = load(r, i);
      const float ry = reward_sanitise(y);
      if constexpr (kWriteG) store(g, i, reward_combine(x, ry, w));
      dd[0] += x * x;
      rr[0] += ry * ry;
      dr[0] += x * ry;
      bad[0] += reward_is_finite(y) ? 0 : 1;
    }
    for (int j = 0; j < kLanes; ++j) {
      s.dd += dd[j];
      s.rr += rr[j];
      s.dr += dr[j];
      s.nonfinite += bad[j];
    }
  }
  return s;
}

// Per-sample statistics of samples [b0, b0 + nb) from their chunk sums, added in a fixed order so
// that the result does not depend on the thread count (nb·chunks additions: negligible).
void finish_samples(const RewardGradParams& p, const std::vector<Sums>& part, int64_t b0,
                    int64_t nb, int64_t chunks) {
  for (int64_t b = b0; b < b0 + nb; ++b) {
    Sums s;
    for (int64_t k = 0; k < chunks; ++k) {
      const Sums& q = part[b * chunks + k];
      s.dd += q.dd;
      s.rr += q.rr;
      s.dr += q.dr;
      s.nonfinite += q.nonfinite;
    }
    const RewardGradSampleStats st = reward_grad_sample_stats(
        static_cast<float>(s.dd), static_cast<float>(s.rr), static_cast<float>(s.dr), p.balanced,
        p.weight_value, p.ratio, p.max_weight, p.eps);
    p.dmd_norm[b] = st.dmd_norm;
    p.reward_norm[b] = st.reward_norm;
    p.cosine[b] = st.cosine;
    p.weight[b] = st.weight;
    p.nonfinite[b] = s.nonfinite;
  }
}

template <typename T, bool kFixed>
void run(const RewardGradParams& p, int num_threads) {
  const int64_t B = p.batch, D = p.numel_per_sample;
  const T* d = static_cast<const T*>(p.g_dmd);
  const T* r = static_cast<const T*>(p.g_reward);
  T* g = static_cast<T*>(p.g);

  const int64_t chunks = (D + kChunk - 1) / kChunk;
  const int64_t sample_bytes = 2 * D * static_cast<int64_t>(sizeof(T));
  const int64_t group =
      kFixed ? B : std::max<int64_t>(1, kGroupBytesPerThread * num_threads / sample_bytes);
  std::vector<Sums> part(static_cast<size_t>(B * chunks));

  for (int64_t b0 = 0; b0 < B; b0 += group) {
    const int64_t nb = std::min(group, B - b0);
    const int64_t tasks = nb * chunks;
    [[maybe_unused]] const int threads =  // unused in a build without OpenMP
        nb * D < kMinParallel ? 1 : static_cast<int>(std::min<int64_t>(num_threads, tasks));
#pragma omp parallel num_threads(threads)
    {
      // Each thread owns one contiguous range of chunks for both passes.
#if defined(_OPENMP)
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const int t = 0, nt = 1;
#endif
      const int64_t first = b0 * chunks + tasks * t / nt;
      const int64_t last = b0 * chunks + tasks * (t + 1) / nt;
      // Pass A: per-chunk sums (and g in fixed mode).
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / chunks, c = task % chunks;
        const int64_t lo = b * D + c * kChunk, hi = b * D + std::min(D, (c + 1) * kChunk);
        part[task] = chunk_sums<T, kFixed>(d, r, g, p.weight_value, lo, hi);
      }
#pragma omp barrier
#pragma omp single
      finish_samples(p, part, b0, nb, chunks);  // the implicit barrier publishes the weights
      if constexpr (!kFixed) {
        // Pass B (balanced mode): g = g_dmd + w·r, over the same chunks in reverse order, so the
        // chunks this thread read last in pass A are still in its L2 cache.
        for (int64_t task = last - 1; task >= first; --task) {
          const int64_t b = task / chunks, c = task % chunks;
          const int64_t lo = b * D + c * kChunk, hi = b * D + std::min(D, (c + 1) * kChunk);
          const float w = p.weight[b];
          for (int64_t i = lo; i < hi; ++i) {
            store(g, i, reward_combine(load(d, i), reward_sanitise(load(r, i)), w));
          }
        }
      }
    }
  }
}

}  // namespace

void reward_grad_fwd(const RewardGradParams& p, int num_threads) {
  if (p.batch <= 0 || p.numel_per_sample <= 0) {
    throw std::invalid_argument("dmdr_fast.reward_grad_fwd_cpu: empty input");
  }
  num_threads = std::max(1, num_threads);
  DMDR_FLOAT_SWITCH(p.dtype, T, float, Half, BFloat16, [&] {
    DMDR_BOOL_SWITCH(!p.balanced, kFixed, [&] { run<T, kFixed>(p, num_threads); });
  });
}

}  // namespace dmdr_fast::cpu::DMDR_CPU_ISA
