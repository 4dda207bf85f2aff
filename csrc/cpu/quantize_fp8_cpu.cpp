// Row-wise FP8 quantisation on the CPU (ops/reference.py::quantize_fp8_ref; element math in
// quantize_fp8_math.h, encoders in cpu_convert.h).
//
// Each row takes two passes: (A) the amax of its finite entries, (B) the codes, which need the
// row's scale. A thread owns whole rows, so pass B re-reads a row that pass A has just brought
// into its cache (a row of 16K float32 is 64 KiB): DRAM sees each input once. Rows are
// independent, hence the result does not depend on the thread count.
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
#include <string>

#include "dmdr_fast/cpu_convert.h"
#include "dmdr_fast/dispatch.h"
#include "dmdr_fast/quantize_fp8.h"
#include "dmdr_fast/quantize_fp8_math.h"

#ifndef DMDR_CPU_ISA
#define DMDR_CPU_ISA base
#endif

namespace dmdr_fast::cpu::DMDR_CPU_ISA {
namespace {

// Below this many elements the op runs on one thread: waking a team costs more than the work.
constexpr int64_t kMinParallel = 32768;

struct E4M3 {
  static constexpr float kMax = kFp8E4M3Max;
  static uint8_t encode(float v) { return fp8_e4m3_bits(v); }
};
struct E5M2 {
  static constexpr float kMax = kFp8E5M2Max;
  static uint8_t encode(float v) { return fp8_e5m2_bits(v); }
};

// max over [0, K) of fp8_finite_abs, with 16 lanes so that the compiler vectorises it (max is
// exact and order-free, so the lanes change nothing but speed).
template <typename T>
float row_amax(const T* x, int64_t K) {
  constexpr int kLanes = 16;
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= K; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] = fp8_max_of(lane[j], fp8_finite_abs(load(x, i + j)));
  }
  float m = 0.f;
  for (; i < K; ++i) m = fp8_max_of(m, fp8_finite_abs(load(x, i)));
  for (int j = 0; j < kLanes; ++j) m = fp8_max_of(m, lane[j]);
  return m;
}

template <typename T, typename F>
void run(const QuantizeFp8Params& p, int num_threads) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t R = p.rows, K = p.row_size;
  const bool parallel = R > 1 && R * K >= kMinParallel;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * K;
    uint8_t* qr = p.q + r * K;
    const float scale = fp8_row_scale(row_amax(xr, K), p.amax_ub, p.eps, F::kMax);
    const float inv = 1.f / scale;
    for (int64_t i = 0; i < K; ++i) qr[i] = F::encode(fp8_scaled(load(xr, i), inv, F::kMax));
    p.scale[r] = scale;
  }
}

}  // namespace

void quantize_fp8_fwd(const QuantizeFp8Params& p, int num_threads) {
  if (p.rows < 0 || p.row_size <= 0) {
    throw std::invalid_argument("dmdr_fast.quantize_fp8_fwd_cpu: rows < 0 or row_size <= 0");
  }
  num_threads = std::max(1, num_threads);
  DMDR_FLOAT_SWITCH(p.dtype, T, float, Half, BFloat16, [&] {
    switch (p.fp8_dtype) {
      case DType::kFloat8E4M3:
        return run<T, E4M3>(p, num_threads);
      case DType::kFloat8E5M2:
        return run<T, E5M2>(p, num_threads);
      default:
        throw std::invalid_argument(
            std::string("dmdr_fast.quantize_fp8_fwd_cpu: fp8_dtype must be float8_e4m3fn or "
                        "float8_e5m2, got ") +
            dtype_name(p.fp8_dtype));
    }
  });
}

}  // namespace dmdr_fast::cpu::DMDR_CPU_ISA
