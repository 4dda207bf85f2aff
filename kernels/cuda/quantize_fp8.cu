// Row-wise FP8 quantisation on CUDA (ops/reference.py::quantize_fp8_ref; element math in
// quantize_fp8_math.h).
//
// One warp per row, kRowsPerBlock rows per block; the row amax is a warp-shuffle max, so the
// kernel needs no shared memory and no second launch. Rows of up to 32·VEC·kPacks elements are
// held in registers between the amax and the store, so each input byte is read once from DRAM;
// longer rows are read twice (the second time mostly from L1/L2). Loads are 16-byte vectors (8 ×
// bf16/fp16 or 4 × fp32) when the row length and pointers allow it, stores VEC bytes of codes.
// The cast is cuda_fp8.h's round-to-nearest-even conversion with __NV_SATFINITE (one cvt
// instruction on sm_89+, emulated on older GPUs); the value is clamped before it, as in the
// reference, so saturation only matters for NaN, which stays NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "dmdr_fast/dispatch.h"
#include "dmdr_fast/quantize_fp8.h"
#include "dmdr_fast/quantize_fp8_math.h"

namespace dmdr_fast::cuda {
namespace {

constexpr int kRowsPerBlock = 4;
constexpr int kThreads = 32 * kRowsPerBlock;

template <bool kE4M3>
__device__ __forceinline__ uint8_t encode(float v) {
  return static_cast<uint8_t>(
      __nv_cvt_float_to_fp8(v, __NV_SATFINITE, kE4M3 ? __NV_E4M3 : __NV_E5M2));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fp8_max_of(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// kPacks > 0: the row (at most 32·VEC·kPacks elements) stays in registers; kPacks == 0: any
// length, read twice.
template <typename T, int VEC, int kPacks, bool kE4M3>
__global__ void __launch_bounds__(kThreads)
    quantize_fp8_kernel(const T* __restrict__ x, uint8_t* __restrict__ q,
                        float* __restrict__ scale_out, int64_t rows, int64_t K, float eps,
                        float amax_ub) {
  constexpr float kMax = kE4M3 ? kFp8E4M3Max : kFp8E5M2Max;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together: the shuffles below stay full-warp
  const T* xr = x + row * K;
  uint8_t* qr = q + row * K;
  constexpr int64_t kStride = 32 * VEC;

  if constexpr (kPacks > 0) {
    Pack<T, VEC> cache[kPacks];
    float amax = 0.f;
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t i = p * kStride + lane * VEC;
      if (i < K) {
        cache[p] = load_pack<T, VEC>(xr, i);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          amax = fp8_max_of(amax, fp8_finite_abs(to_float(cache[p].v[j])));
      }
    }
    const float scale = fp8_row_scale(warp_max(amax), amax_ub, eps, kMax);
    const float inv = 1.f / scale;
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t i = p * kStride + lane * VEC;
      if (i < K) {
        Pack<uint8_t, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          out.v[j] = encode<kE4M3>(fp8_scaled(to_float(cache[p].v[j]), inv, kMax));
        store_pack<uint8_t, VEC>(qr, i, out);
      }
    }
    if (lane == 0) scale_out[row] = scale;
  } else {
    float amax = 0.f;
    for (int64_t i = lane * VEC; i < K; i += kStride) {
      const auto v = load_pack<T, VEC>(xr, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) amax = fp8_max_of(amax, fp8_finite_abs(to_float(v.v[j])));
    }
    const float scale = fp8_row_scale(warp_max(amax), amax_ub, eps, kMax);
    const float inv = 1.f / scale;
    for (int64_t i = lane * VEC; i < K; i += kStride) {
      const auto v = load_pack<T, VEC>(xr, i);
      Pack<uint8_t, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        out.v[j] = encode<kE4M3>(fp8_scaled(to_float(v.v[j]), inv, kMax));
      store_pack<uint8_t, VEC>(qr, i, out);
    }
    if (lane == 0) scale_out[row] = scale;
  }
}

template <typename T, int VEC, bool kE4M3>
void launch_vec(const QuantizeFp8Params& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t K = p.row_size;
  const int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffff)
    throw std::invalid_argument("dmdr_fast.quantize_fp8_fwd_cuda: too many rows");
  const dim3 grid(static_cast<unsigned>(blocks));
  // Packs per lane held in registers: the smallest of 1, 4, 16 covering the row, else streaming.
  const int64_t packs = (K + 32 * VEC - 1) / (32 * VEC);
  auto go = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(x, p.q, p.scale, p.rows, K, p.eps, p.amax_ub);
    check(cudaGetLastError(), "quantize_fp8_kernel launch");
  };
  if (packs <= 1) {
    go(quantize_fp8_kernel<T, VEC, 1, kE4M3>);
  } else if (packs <= 4) {
    go(quantize_fp8_kernel<T, VEC, 4, kE4M3>);
  } else if (packs <= 16) {
    go(quantize_fp8_kernel<T, VEC, 16, kE4M3>);
  } else {
    go(quantize_fp8_kernel<T, VEC, 0, kE4M3>);
  }
}

template <typename T, bool kE4M3>
void launch(const QuantizeFp8Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = p.row_size % kVec == 0 && aligned16(p.x) && aligned16(p.q);
  DMDR_BOOL_SWITCH(vec_ok, kVecOk, [&] {
    constexpr int V = kVecOk ? kVec : 1;
    launch_vec<T, V, kE4M3>(p, stream);
  });
}

}  // namespace

void quantize_fp8_fwd(const QuantizeFp8Params& p, int device, void* stream_ptr) {
  if (p.rows < 0 || p.row_size <= 0) {
    throw std::invalid_argument("dmdr_fast.quantize_fp8_fwd_cuda: rows < 0 or row_size <= 0");
  }
  if (p.rows == 0) return;
  const DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  DMDR_FLOAT_SWITCH(p.dtype, T, float, __half, __nv_bfloat16, [&] {
    switch (p.fp8_dtype) {
      case DType::kFloat8E4M3:
        return launch<T, true>(p, stream);
      case DType::kFloat8E5M2:
        return launch<T, false>(p, stream);
      default:
        throw std::invalid_argument(
            std::string("dmdr_fast.quantize_fp8_fwd_cuda: fp8_dtype must be float8_e4m3fn or "
                        "float8_e5m2, got ") +
            dtype_name(p.fp8_dtype));
    }
  });
}

}  // namespace dmdr_fast::cuda
