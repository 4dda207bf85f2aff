// Fused reward-gradient combination on CUDA (docs/method.md §7; math in
// reward_grad_math.h).
//
// Two launches over a (blocks_per_sample, B) grid:
//   1. reward_grad_reduce_kernel  — each block accumulates Σg_dmd², Σr², Σg_dmd·r and the count
//      of non-finite reward entries over its chunk of one sample (r = g_reward with NaN/±Inf → 0)
//      and writes them as partials; the last block to finish (atomic ticket) sums every sample's
//      partials in a fixed order (deterministic) and writes the per-sample statistics and weights.
//   2. reward_grad_combine_kernel — g = g_dmd + w_b·r, elementwise, with the weights of launch 1.
// In fixed mode the weight is known up front: launch 1 also writes g and launch 2 is skipped.
// Loads are 16-byte vectors (8 × bf16/fp16 or 4 × fp32) when sizes and pointers allow it, and all
// arithmetic is float32. The op is memory-bound: launch 2 re-reads both inputs, which stay in L2
// for the sizes of a DMD step (two 8×16×128×128 bf16 tensors are 8 MiB; an H100's L2 is 50 MB),
// so DRAM traffic is close to the minimum of 2 reads + 1 write.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "dmdr_fast/dispatch.h"
#include "dmdr_fast/reward_grad.h"
#include "dmdr_fast/reward_grad_math.h"

namespace dmdr_fast::cuda {
namespace {

constexpr int kThreads = 256;

// Workspace layout: B·nblk non-finite counts (u64), then 3·B·nblk float partials (Σd², Σr², Σd·r),
// then the ticket counter.
struct Workspace {
  unsigned long long* part_n;
  float* part;
  unsigned int* counter;
};

size_t workspace_bytes(int64_t batch, int64_t nblk) {
  return static_cast<size_t>(batch * nblk) * (sizeof(unsigned long long) + 3 * sizeof(float)) + 16;
}

Workspace carve(void* ws, int64_t batch, int64_t nblk) {
  Workspace w;
  w.part_n = static_cast<unsigned long long*>(ws);
  w.part = reinterpret_cast<float*>(w.part_n + batch * nblk);
  w.counter = reinterpret_cast<unsigned int*>(w.part + 3 * batch * nblk);
  return w;
}

template <typename T, int VEC, bool kWriteG>
__global__ void __launch_bounds__(kThreads)
    reward_grad_reduce_kernel(const T* __restrict__ d, const T* __restrict__ r, T* __restrict__ g,
                              int64_t D, int64_t chunk, Workspace ws, RewardGradParams p) {
  const int64_t b = blockIdx.y;
  const int64_t nblk = gridDim.x, B = gridDim.y;
  const int64_t lo = blockIdx.x * chunk, hi = min(D, lo + chunk);
  const int64_t base = b * D;
  float dd = 0.f, rr = 0.f, dr = 0.f;
  int bad = 0;
  for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC; i < hi;
       i += static_cast<int64_t>(kThreads) * VEC) {
    const auto x = load_pack<T, VEC>(d, base + i);
    const auto y = load_pack<T, VEC>(r, base + i);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xj = to_float(x.v[j]), yj = to_float(y.v[j]);
      const float rj = reward_sanitise(yj);
      dd += xj * xj;
      rr += rj * rj;
      dr += xj * rj;
      bad += reward_is_finite(yj) ? 0 : 1;
      if constexpr (kWriteG) out.v[j] = from_float<T>(reward_combine(xj, rj, p.weight_value));
    }
    if constexpr (kWriteG) store_pack<T, VEC>(g, base + i, out);
  }
  dd = block_sum<kThreads>(dd);
  rr = block_sum<kThreads>(rr);
  dr = block_sum<kThreads>(dr);
  bad = block_sum<kThreads>(bad);
  __shared__ bool s_last;
  if (threadIdx.x == 0) {
    const int64_t j = b * nblk + blockIdx.x;
    ws.part[j] = dd;
    ws.part[B * nblk + j] = rr;
    ws.part[2 * B * nblk + j] = dr;
    ws.part_n[j] = static_cast<unsigned long long>(bad);
    __threadfence();  // publish the partials before taking a ticket
    const unsigned int ticket = atomicAdd(ws.counter, 1u);
    s_last = ticket == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!s_last) return;

  // Last block: per-sample sums of the partials in a fixed order (double: cheap here, and the
  // result does not depend on the grid), then the statistics and the weight of each sample.
  __threadfence();
  const volatile float* part = ws.part;
  const volatile unsigned long long* part_n = ws.part_n;
  for (int64_t bb = threadIdx.x; bb < B; bb += kThreads) {
    double sdd = 0.0, srr = 0.0, sdr = 0.0;
    unsigned long long n = 0;
    for (int64_t k = 0; k < nblk; ++k) {
      const int64_t j = bb * nblk + k;
      sdd += part[j];
      srr += part[B * nblk + j];
      sdr += part[2 * B * nblk + j];
      n += part_n[j];
    }
    const RewardGradSampleStats st = reward_grad_sample_stats(
        static_cast<float>(sdd), static_cast<float>(srr), static_cast<float>(sdr), p.balanced,
        p.weight_value, p.ratio, p.max_weight, p.eps);
    p.dmd_norm[bb] = st.dmd_norm;
    p.reward_norm[bb] = st.reward_norm;
    p.cosine[bb] = st.cosine;
    p.weight[bb] = st.weight;
    p.nonfinite[bb] = static_cast<int64_t>(n);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    reward_grad_combine_kernel(const T* __restrict__ d, const T* __restrict__ r,
                               const float* __restrict__ weight, int64_t D, int64_t chunk,
                               T* __restrict__ g) {
  const int64_t b = blockIdx.y;
  const int64_t lo = blockIdx.x * chunk, hi = min(D, lo + chunk);
  const int64_t base = b * D;
  const float w = weight[b];
  for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC; i < hi;
       i += static_cast<int64_t>(kThreads) * VEC) {
    const auto x = load_pack<T, VEC>(d, base + i);
    const auto y = load_pack<T, VEC>(r, base + i);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float rj = reward_sanitise(to_float(y.v[j]));
      out.v[j] = from_float<T>(reward_combine(to_float(x.v[j]), rj, w));
    }
    store_pack<T, VEC>(g, base + i, out);
  }
}

// Blocks per sample: about four resident blocks per SM in total, but never less than one full
// block-stride of work per block.
int64_t blocks_per_sample(int64_t B, int64_t D, int device) {
  const int64_t target = (4ll * sm_count(device) + B - 1) / B;
  const int64_t max_useful = (D + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min(target, max_useful));
}

template <typename T>
void launch(const RewardGradParams& p, const Workspace& ws, int64_t nblk, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* d = static_cast<const T*>(p.g_dmd);
  const T* r = static_cast<const T*>(p.g_reward);
  T* g = static_cast<T*>(p.g);
  const int64_t D = p.numel_per_sample;
  const bool vec_ok = D % kVec == 0 && aligned16(d) && aligned16(r) && aligned16(g);
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(p.batch));
  DMDR_BOOL_SWITCH(vec_ok, kVecOk, [&] {
    constexpr int V = kVecOk ? kVec : 1;
    // Chunks are multiples of V so that no vector straddles two blocks.
    const int64_t chunk = ((D + nblk - 1) / nblk + V - 1) / V * V;
    if (!p.balanced) {  // fixed weight: one pass writes g too
      reward_grad_reduce_kernel<T, V, true>
          <<<grid, kThreads, 0, stream>>>(d, r, g, D, chunk, ws, p);
      check(cudaGetLastError(), "reward_grad_reduce_kernel launch");
      return;
    }
    reward_grad_reduce_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(d, r, g, D, chunk, ws, p);
    check(cudaGetLastError(), "reward_grad_reduce_kernel launch");
    reward_grad_combine_kernel<T, V><<<grid, kThreads, 0, stream>>>(d, r, p.weight, D, chunk, g);
    check(cudaGetLastError(), "reward_grad_combine_kernel launch");
  });
}

}  // namespace

size_t reward_grad_workspace_bytes(int64_t batch, int64_t numel_per_sample, int device) {
  const DeviceGuard guard(device);
  return workspace_bytes(batch, blocks_per_sample(batch, numel_per_sample, device));
}

void reward_grad_fwd(const RewardGradParams& p, void* workspace, size_t workspace_bytes_given,
                     int device, void* stream_ptr) {
  if (p.batch <= 0 || p.numel_per_sample <= 0) {
    throw std::invalid_argument("dmdr_fast.reward_grad_fwd_cuda: empty input");
  }
  if (p.batch > 65535) {
    throw std::invalid_argument("dmdr_fast.reward_grad_fwd_cuda: batch > 65535");
  }
  const DeviceGuard guard(device);
  const int64_t nblk = blocks_per_sample(p.batch, p.numel_per_sample, device);
  const size_t need = workspace_bytes(p.batch, nblk);
  if (workspace_bytes_given < need) {
    throw std::invalid_argument("dmdr_fast.reward_grad_fwd_cuda: workspace too small (" +
                                std::to_string(workspace_bytes_given) + " < " +
                                std::to_string(need) + " bytes)");
  }
  const Workspace ws = carve(workspace, p.batch, nblk);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  check(cudaMemsetAsync(ws.counter, 0, sizeof(unsigned int), stream), "cudaMemsetAsync");
  DMDR_FLOAT_SWITCH(p.dtype, T, float, __half, __nv_bfloat16,
                    [&] { launch<T>(p, ws, nblk, stream); });
}

}  // namespace dmdr_fast::cuda
