// Host-side interface of the fused reward-gradient combination op. Python validates every argument
// (shapes, dtypes, devices, contiguity, scalar ranges) before calling; these functions trust their
// inputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dmdr_fast/dtype.h"

namespace dmdr_fast {

// All tensors are contiguous (B, D) row-major views of the op's (B, ...) inputs.
struct RewardGradParams {
  const void* g_dmd = nullptr;     // (B, D) DMD direction, finite
  const void* g_reward = nullptr;  // (B, D) reward gradient; NaN/±Inf entries count as 0
  void* g = nullptr;               // out (B, D): g_dmd + w·sanitised(g_reward), same dtype
  float* dmd_norm = nullptr;       // out (B,): ‖g_dmd‖₂
  float* reward_norm = nullptr;    // out (B,): ‖sanitised g_reward‖₂
  float* cosine = nullptr;         // out (B,): cosine between the two (0 when a norm is 0)
  float* weight = nullptr;         // out (B,): the weight w applied to the sample
  int64_t* nonfinite = nullptr;    // out (B,): number of non-finite entries of g_reward
  int64_t batch = 0;
  int64_t numel_per_sample = 0;
  bool balanced = false;  // false: w = weight; true: w = min(max_weight, ratio·‖g_dmd‖/(‖r‖+eps))
  float weight_value = 1.f;
  float ratio = 1.f;
  float max_weight = 1.f;  // may be +Inf (no cap)
  float eps = 1e-12f;
  DType dtype = DType::kFloat32;  // element type of g_dmd, g_reward and g
};

namespace cpu {
// Fused two-pass kernel, OpenMP-parallel with `num_threads` threads; runs the copy compiled for
// the best ISA level of this CPU.
void reward_grad_fwd(const RewardGradParams& p, int num_threads);
}  // namespace cpu

namespace cuda {
// Bytes of device workspace the CUDA launcher needs for this problem size.
size_t reward_grad_workspace_bytes(int64_t batch, int64_t numel_per_sample, int device);
// Two kernel launches on `stream` (a cudaStream_t); `workspace` must hold
// reward_grad_workspace_bytes(...) bytes on the same device.
void reward_grad_fwd(const RewardGradParams& p, void* workspace, size_t workspace_bytes, int device,
                     void* stream);
}  // namespace cuda

}  // namespace dmdr_fast
