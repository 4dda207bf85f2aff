// Host-side interface of the fused DMD score-difference op. Python validates every argument
// (shapes, dtypes, devices, contiguity) before calling; these functions trust their inputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dmdr_fast/dtype.h"

namespace dmdr_fast {

// All tensors are contiguous (B, D) row-major views of the op's (B, ...) inputs.
struct DmdLossParams {
  const void* x0 = nullptr;        // (B, D) generator output
  const void* x_t = nullptr;       // (B, D) renoised sample
  const void* v_fake = nullptr;    // (B, D) fake-score velocity
  const void* v_cond = nullptr;    // (B, D) conditional real velocity
  const void* v_uncond = nullptr;  // (B, D) unconditional real velocity, or null (no CFG)
  const float* t = nullptr;        // (B,) renoise times, float32
  void* g = nullptr;               // out (B, D): direction, same dtype as the inputs
  float* norm = nullptr;           // out (B,): mean|x0 − x̂0_real| + eps
  float* sumsq = nullptr;          // out (B,): Σ_d g² in float32 before the output cast
  float* loss = nullptr;           // out (1,): ½·Σ sumsq / (B·D)
  int64_t batch = 0;
  int64_t numel_per_sample = 0;
  float guidance = 1.f;
  float eps = 1e-8f;
  DType dtype = DType::kFloat32;  // element type of x0, x_t, v_* and g
};

namespace cpu {
// Fused two-pass kernel, OpenMP-parallel with `num_threads` threads; runs the copy compiled for
// the best ISA level of this CPU.
void dmd_loss_fwd(const DmdLossParams& p, int num_threads);
// The ISA level cpu kernels run with: "avx2" (x86-64-v3) or "base".
const char* isa();
}  // namespace cpu

namespace cuda {
// Bytes of device workspace the CUDA launcher needs for this problem size.
size_t dmd_loss_workspace_bytes(int64_t batch, int64_t numel_per_sample, int device);
// Two kernel launches on `stream` (a cudaStream_t); `workspace` must hold
// dmd_loss_workspace_bytes(...) bytes on the same device.
void dmd_loss_fwd(const DmdLossParams& p, void* workspace, size_t workspace_bytes, int device,
                  void* stream);
}  // namespace cuda

}  // namespace dmdr_fast
