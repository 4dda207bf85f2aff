// Fused DMD score-difference op on CUDA (docs/method.md §5.4; element math in dmd_loss_math.h).
//
// Two launches over a (blocks_per_sample, B) grid:
//   1. dmd_reduce_kernel    — each block sums |x0 − x̂0_real| over its chunk of one sample.
//   2. dmd_direction_kernel — each block sums its sample's partials (fixed order: deterministic),
//      writes g = nan_to_num(d / normaliser) for its chunk and a partial Σg²; the last block to
//      finish (atomic ticket) reduces Σg² per sample and writes the loss.
// Loads are 16-byte vectors (8 × bf16/fp16 or 4 × fp32) when sizes and pointers allow it, and all
// arithmetic is float32. The op is memory-bound: launch 2 re-reads x_t and the velocities, which
// stay in L2 for the problem sizes of a DMD step (the inputs of 8×16×128×128 bf16 are 20 MB; an
// H100's L2 is 50 MB), so DRAM traffic is close to reading every input once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "dmdr_fast/dispatch.h"
#include "dmdr_fast/dmd_loss.h"
#include "dmdr_fast/dmd_loss_math.h"

namespace dmdr_fast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC, bool kHasUncond>
__global__ void __launch_bounds__(kThreads)
    dmd_reduce_kernel(const T* __restrict__ x0, const T* __restrict__ xt, const T* __restrict__ vc,
                      const T* __restrict__ vu, const float* __restrict__ t, float guidance,
                      int64_t D, int64_t chunk, float* __restrict__ part_a) {
  const int64_t b = blockIdx.y;
  const int64_t lo = blockIdx.x * chunk, hi = min(D, lo + chunk);
  const int64_t base = b * D;
  const float tb = t[b];
  float acc = 0.f;
  for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC; i < hi;
       i += static_cast<int64_t>(kThreads) * VEC) {
    const auto a = load_pack<T, VEC>(x0, base + i);
    const auto s = load_pack<T, VEC>(xt, base + i);
    const auto c = load_pack<T, VEC>(vc, base + i);
    const auto u = load_pack<T, VEC>(vu, base + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc += dmd_abs_residual<kHasUncond>(to_float(a.v[j]), to_float(s.v[j]), tb, to_float(c.v[j]),
                                          to_float(u.v[j]), guidance);
    }
  }
  acc = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) part_a[b * gridDim.x + blockIdx.x] = acc;
}

template <typename T, int VEC, bool kHasUncond>
__global__ void __launch_bounds__(kThreads)
    dmd_direction_kernel(const T* __restrict__ xt, const T* __restrict__ vf,
                         const T* __restrict__ vc, const T* __restrict__ vu,
                         const float* __restrict__ t, float guidance, float eps, int64_t B,
                         int64_t D, int64_t chunk, const float* __restrict__ part_a,
                         float* __restrict__ part_s, unsigned int* __restrict__ counter,
                         T* __restrict__ g, float* __restrict__ norm_out,
                         float* __restrict__ sumsq_out, float* __restrict__ loss_out) {
  const int64_t b = blockIdx.y;
  const int nblk = gridDim.x;
  __shared__ float s_norm;
  __shared__ bool s_last;

  // Normaliser of sample b from launch 1's partials, summed in the same order by every block.
  if (threadIdx.x < 32) {
    float s = 0.f;
    for (int k = threadIdx.x; k < nblk; k += 32) s += part_a[b * nblk + k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) s_norm = s / static_cast<float>(D) + eps;
  }
  __syncthreads();
  const float norm = s_norm;

  const int64_t lo = blockIdx.x * chunk, hi = min(D, lo + chunk);
  const int64_t base = b * D;
  const float tb = t[b];
  float acc = 0.f;
  for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC; i < hi;
       i += static_cast<int64_t>(kThreads) * VEC) {
    const auto s = load_pack<T, VEC>(xt, base + i);
    const auto f = load_pack<T, VEC>(vf, base + i);
    const auto c = load_pack<T, VEC>(vc, base + i);
    const auto u = load_pack<T, VEC>(vu, base + i);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float gj =
          dmd_direction(dmd_diff<kHasUncond>(to_float(s.v[j]), tb, to_float(f.v[j]),
                                             to_float(c.v[j]), to_float(u.v[j]), guidance),
                        norm);
      out.v[j] = from_float<T>(gj);
      acc += gj * gj;
    }
    store_pack<T, VEC>(g, base + i, out);
  }
  acc = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) {
    part_s[b * nblk + blockIdx.x] = acc;
    if (blockIdx.x == 0) norm_out[b] = norm;
    __threadfence();  // publish part_s before taking a ticket
    const unsigned int ticket = atomicAdd(counter, 1u);
    s_last = ticket == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!s_last) return;

  // Last block: per-sample Σg² in a fixed order, then the loss.
  __threadfence();
  const volatile float* ps = part_s;
  float total = 0.f;
  for (int64_t bb = threadIdx.x; bb < B; bb += kThreads) {
    float s = 0.f;
    for (int k = 0; k < nblk; ++k) s += ps[bb * nblk + k];
    sumsq_out[bb] = s;
    total += s;
  }
  total = block_sum<kThreads>(total);
  if (threadIdx.x == 0) {
    loss_out[0] = static_cast<float>(0.5 * static_cast<double>(total) /
                                     (static_cast<double>(B) * static_cast<double>(D)));
  }
}

// Blocks per sample: about four resident blocks per SM in total, but never less than one full
// block-stride of work per block.
int64_t blocks_per_sample(int64_t B, int64_t D, int device) {
  const int64_t target = (4ll * sm_count(device) + B - 1) / B;
  const int64_t max_useful = (D + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min(target, max_useful));
}

template <typename T, bool kHasUncond>
void launch(const DmdLossParams& p, float* part_a, float* part_s, unsigned int* counter,
            int64_t nblk, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* x0 = static_cast<const T*>(p.x0);
  const T* xt = static_cast<const T*>(p.x_t);
  const T* vf = static_cast<const T*>(p.v_fake);
  const T* vc = static_cast<const T*>(p.v_cond);
  const T* vu = static_cast<const T*>(kHasUncond ? p.v_uncond : p.v_cond);
  T* g = static_cast<T*>(p.g);
  const int64_t D = p.numel_per_sample;
  const bool vec_ok = D % kVec == 0 && aligned16(x0) && aligned16(xt) && aligned16(vf) &&
                      aligned16(vc) && aligned16(vu) && aligned16(g);
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(p.batch));
  DMDR_BOOL_SWITCH(vec_ok, kVecOk, [&] {
    constexpr int V = kVecOk ? kVec : 1;
    // Chunks are multiples of V so that no vector straddles two blocks.
    const int64_t chunk = ((D + nblk - 1) / nblk + V - 1) / V * V;
    dmd_reduce_kernel<T, V, kHasUncond>
        <<<grid, kThreads, 0, stream>>>(x0, xt, vc, vu, p.t, p.guidance, D, chunk, part_a);
    check(cudaGetLastError(), "dmd_reduce_kernel launch");
    dmd_direction_kernel<T, V, kHasUncond>
        <<<grid, kThreads, 0, stream>>>(xt, vf, vc, vu, p.t, p.guidance, p.eps, p.batch, D, chunk,
                                        part_a, part_s, counter, g, p.norm, p.sumsq, p.loss);
    check(cudaGetLastError(), "dmd_direction_kernel launch");
  });
}

}  // namespace

size_t dmd_loss_workspace_bytes(int64_t batch, int64_t numel_per_sample, int device) {
  const DeviceGuard guard(device);
  const int64_t nblk = blocks_per_sample(batch, numel_per_sample, device);
  // part_a and part_s (B × nblk floats each), then one 16-byte-aligned ticket counter.
  return static_cast<size_t>(2 * batch * nblk) * sizeof(float) + 16;
}

void dmd_loss_fwd(const DmdLossParams& p, void* workspace, size_t workspace_bytes, int device,
                  void* stream_ptr) {
  if (p.batch <= 0 || p.numel_per_sample <= 0) {
    throw std::invalid_argument("dmdr_fast.dmd_loss_fwd_cuda: empty input");
  }
  if (p.batch > 65535) throw std::invalid_argument("dmdr_fast.dmd_loss_fwd_cuda: batch > 65535");
  const DeviceGuard guard(device);
  const int64_t nblk = blocks_per_sample(p.batch, p.numel_per_sample, device);
  const size_t need = static_cast<size_t>(2 * p.batch * nblk) * sizeof(float) + 16;
  if (workspace_bytes < need) {
    throw std::invalid_argument("dmdr_fast.dmd_loss_fwd_cuda: workspace too small (" +
                                std::to_string(workspace_bytes) + " < " + std::to_string(need) +
                                " bytes)");
  }
  auto* part_a = static_cast<float*>(workspace);
  float* part_s = part_a + p.batch * nblk;
  auto* counter = reinterpret_cast<unsigned int*>(part_s + p.batch * nblk);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  check(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream), "cudaMemsetAsync");
  DMDR_FLOAT_SWITCH(p.dtype, T, float, __half, __nv_bfloat16, [&] {
    DMDR_BOOL_SWITCH(p.v_uncond != nullptr, kHasUncond,
                     [&] { launch<T, kHasUncond>(p, part_a, part_s, counter, nblk, stream); });
  });
}

}  // namespace dmdr_fast::cuda
