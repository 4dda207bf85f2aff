// Picks, at run time, the copy of the CPU kernels built for the best ISA level this CPU supports.
#include <stdexcept>

#include "dmdr_fast/dmd_loss.h"
#include "dmdr_fast/quantize_fp8.h"
#include "dmdr_fast/reward_grad.h"

namespace dmdr_fast::cpu {

namespace base {
void dmd_loss_fwd(const DmdLossParams& p, int num_threads);
void reward_grad_fwd(const RewardGradParams& p, int num_threads);
void quantize_fp8_fwd(const QuantizeFp8Params& p, int num_threads);
}  // namespace base
#if defined(DMDR_FAST_HAVE_AVX2)
namespace avx2 {
void dmd_loss_fwd(const DmdLossParams& p, int num_threads);
void reward_grad_fwd(const RewardGradParams& p, int num_threads);
void quantize_fp8_fwd(const QuantizeFp8Params& p, int num_threads);
}  // namespace avx2
#endif

const char* isa() {
#if defined(DMDR_FAST_HAVE_AVX2)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2 ? "avx2" : "base";
#else
  return "base";
#endif
}

void dmd_loss_fwd(const DmdLossParams& p, int num_threads) {
#if defined(DMDR_FAST_HAVE_AVX2)
  if (isa()[0] == 'a') return avx2::dmd_loss_fwd(p, num_threads);
#endif
  base::dmd_loss_fwd(p, num_threads);
}

void reward_grad_fwd(const RewardGradParams& p, int num_threads) {
#if defined(DMDR_FAST_HAVE_AVX2)
  if (isa()[0] == 'a') return avx2::reward_grad_fwd(p, num_threads);
#endif
  base::reward_grad_fwd(p, num_threads);
}

void quantize_fp8_fwd(const QuantizeFp8Params& p, int num_threads) {
#if defined(DMDR_FAST_HAVE_AVX2)
  if (isa()[0] == 'a') return avx2::quantize_fp8_fwd(p, num_threads);
#endif
  base::quantize_fp8_fwd(p, num_threads);
}

}  // namespace dmdr_fast::cpu
