// Stand-ins used when _C is built without CUDA (DMDR_FAST_CUDA=OFF or no nvcc found).
#include <stdexcept>
#include <string>

#include "dmdr_fast/dmd_loss.h"
#include "dmdr_fast/quantize_fp8.h"
#include "dmdr_fast/reward_grad.h"
#include "dmdr_fast/runtime.h"

namespace dmdr_fast {

std::pair<int, std::string> cuda_device_count() {
  return {0, "dmdr_fast._C was built without CUDA (rebuild with DMDR_FAST_CUDA=ON and nvcc)"};
}

std::string cuda_device_capability(int) { return ""; }

namespace cuda {
size_t dmd_loss_workspace_bytes(int64_t, int64_t, int) {
  throw std::runtime_error("dmdr_fast._C was built without CUDA");
}
void dmd_loss_fwd(const DmdLossParams&, void*, size_t, int, void*) {
  throw std::runtime_error("dmdr_fast._C was built without CUDA");
}
size_t reward_grad_workspace_bytes(int64_t, int64_t, int) {
  throw std::runtime_error("dmdr_fast._C was built without CUDA");
}
void reward_grad_fwd(const RewardGradParams&, void*, size_t, int, void*) {
  throw std::runtime_error("dmdr_fast._C was built without CUDA");
}
void quantize_fp8_fwd(const QuantizeFp8Params&, int, void*) {
  throw std::runtime_error("dmdr_fast._C was built without CUDA");
}
}  // namespace cuda

}  // namespace dmdr_fast
