// CUDA runtime queries, compiled only when CUDA is enabled. _C links the static CUDA runtime, so
// these calls fail gracefully (error code, no abort) on machines without a driver.
#include <cuda_runtime_api.h>

#include <string>

#include "dmdr_fast/runtime.h"

namespace dmdr_fast {

std::pair<int, std::string> cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return {0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)};
  }
  if (count == 0) return {0, "the CUDA driver reports no devices"};
  return {count, ""};
}

std::string cuda_device_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return std::to_string(major) + "." + std::to_string(minor);
}

}  // namespace dmdr_fast
