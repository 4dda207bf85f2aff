// pybind11 bindings of dmdr_fast._C. Only m.def() calls and the int → pointer glue live here:
// tensors cross the boundary as raw addresses (tensor.data_ptr()) so that _C never links libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "build_info.h"
#include "dmdr_fast/dmd_loss.h"
#include "dmdr_fast/quantize_fp8.h"
#include "dmdr_fast/reward_grad.h"
#include "dmdr_fast/runtime.h"

namespace py = pybind11;
using dmdr_fast::DmdLossParams;
using dmdr_fast::QuantizeFp8Params;
using dmdr_fast::RewardGradParams;

namespace {

template <typename T>
T* as_ptr(uintptr_t addr) {
  return reinterpret_cast<T*>(addr);
}

DmdLossParams make_dmd_params(uintptr_t x0, uintptr_t x_t, uintptr_t t, uintptr_t v_fake,
                              uintptr_t v_cond, uintptr_t v_uncond, uintptr_t g, uintptr_t norm,
                              uintptr_t sumsq, uintptr_t loss, int64_t batch, int64_t numel,
                              double guidance, double eps, int dtype) {
  DmdLossParams p;
  p.x0 = as_ptr<const void>(x0);
  p.x_t = as_ptr<const void>(x_t);
  p.t = as_ptr<const float>(t);
  p.v_fake = as_ptr<const void>(v_fake);
  p.v_cond = as_ptr<const void>(v_cond);
  p.v_uncond = as_ptr<const void>(v_uncond);  // 0 → nullptr → no CFG
  p.g = as_ptr<void>(g);
  p.norm = as_ptr<float>(norm);
  p.sumsq = as_ptr<float>(sumsq);
  p.loss = as_ptr<float>(loss);
  p.batch = batch;
  p.numel_per_sample = numel;
  p.guidance = static_cast<float>(guidance);
  p.eps = static_cast<float>(eps);
  p.dtype = dmdr_fast::dtype_from_code(dtype);
  return p;
}

// `stats` is a (4, B) float32 buffer: rows dmd_norm, reward_norm, cosine, weight.
RewardGradParams make_reward_params(uintptr_t g_dmd, uintptr_t g_reward, uintptr_t g,
                                    uintptr_t stats, uintptr_t nonfinite, int64_t batch,
                                    int64_t numel, bool balanced, double weight, double ratio,
                                    double max_weight, double eps, int dtype) {
  RewardGradParams p;
  p.g_dmd = as_ptr<const void>(g_dmd);
  p.g_reward = as_ptr<const void>(g_reward);
  p.g = as_ptr<void>(g);
  p.dmd_norm = as_ptr<float>(stats);
  p.reward_norm = p.dmd_norm + batch;
  p.cosine = p.reward_norm + batch;
  p.weight = p.cosine + batch;
  p.nonfinite = as_ptr<int64_t>(nonfinite);
  p.batch = batch;
  p.numel_per_sample = numel;
  p.balanced = balanced;
  p.weight_value = static_cast<float>(weight);
  p.ratio = static_cast<float>(ratio);
  p.max_weight = static_cast<float>(max_weight);  // +Inf stays +Inf
  p.eps = static_cast<float>(eps);
  p.dtype = dmdr_fast::dtype_from_code(dtype);
  return p;
}

QuantizeFp8Params make_quantize_fp8_params(uintptr_t x, uintptr_t q, uintptr_t scale, int64_t rows,
                                           int64_t row_size, double eps, double amax_ub, int dtype,
                                           int fp8_dtype) {
  QuantizeFp8Params p;
  p.x = as_ptr<const void>(x);
  p.q = as_ptr<uint8_t>(q);
  p.scale = as_ptr<float>(scale);
  p.rows = rows;
  p.row_size = row_size;
  p.eps = static_cast<float>(eps);
  p.amax_ub = static_cast<float>(amax_ub);  // +Inf stays +Inf
  p.dtype = dmdr_fast::dtype_from_code(dtype);
  p.fp8_dtype = dmdr_fast::dtype_from_code(fp8_dtype);
  return p;
}

py::dict build_info() {
  py::dict d;
  d["version"] = DMDR_FAST_VERSION;
  d["cuda"] = static_cast<bool>(DMDR_FAST_WITH_CUDA);
  d["cuda_mode"] = DMDR_FAST_CUDA_MODE;
  d["cuda_archs"] = DMDR_FAST_CUDA_ARCHS;
  d["cuda_compiler"] = DMDR_FAST_CUDA_COMPILER;
  d["cxx_compiler"] = DMDR_FAST_CXX_COMPILER;
  d["openmp"] = DMDR_FAST_OPENMP;
  d["build_type"] = DMDR_FAST_BUILD_TYPE;
  d["cpu_isa"] = dmdr_fast::cpu::isa();  // ISA level the CPU kernels run with here
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dmdr_fast native kernels (C++ CPU with OpenMP, CUDA when compiled in).";

  m.def("build_info", &build_info,
        "What this module was compiled with: CUDA on/off, archs, compiler versions, OpenMP.");

  m.def("cuda_device_count", &dmdr_fast::cuda_device_count,
        "(count, reason): visible CUDA devices, and why there are none when count is 0.");

  m.def("cuda_device_capability", &dmdr_fast::cuda_device_capability, py::arg("device"),
        "Compute capability 'major.minor' of a device, or '' when unavailable.");

  m.def(
      "dmd_loss_fwd_cpu",
      [](uintptr_t x0, uintptr_t x_t, uintptr_t t, uintptr_t v_fake, uintptr_t v_cond,
         uintptr_t v_uncond, uintptr_t g, uintptr_t norm, uintptr_t sumsq, uintptr_t loss,
         int64_t batch, int64_t numel, double guidance, double eps, int dtype, int num_threads) {
        const DmdLossParams p = make_dmd_params(x0, x_t, t, v_fake, v_cond, v_uncond, g, norm,
                                                sumsq, loss, batch, numel, guidance, eps, dtype);
        py::gil_scoped_release release;
        dmdr_fast::cpu::dmd_loss_fwd(p, num_threads);
      },
      py::arg("x0"), py::arg("x_t"), py::arg("t"), py::arg("v_fake"), py::arg("v_cond"),
      py::arg("v_uncond"), py::arg("g"), py::arg("norm"), py::arg("sumsq"), py::arg("loss"),
      py::arg("batch"), py::arg("numel"), py::arg("guidance"), py::arg("eps"), py::arg("dtype"),
      py::arg("num_threads"),
      "Fused DMD loss forward on the CPU. All pointers are contiguous host buffers; v_uncond=0 "
      "means no CFG. Writes g (B, D), norm (B,), sumsq (B,) and loss (1,).");

  m.def("dmd_loss_workspace_bytes", &dmdr_fast::cuda::dmd_loss_workspace_bytes, py::arg("batch"),
        py::arg("numel"), py::arg("device"),
        "Device workspace in bytes that dmd_loss_fwd_cuda needs.");

  m.def(
      "dmd_loss_fwd_cuda",
      [](uintptr_t x0, uintptr_t x_t, uintptr_t t, uintptr_t v_fake, uintptr_t v_cond,
         uintptr_t v_uncond, uintptr_t g, uintptr_t norm, uintptr_t sumsq, uintptr_t loss,
         int64_t batch, int64_t numel, double guidance, double eps, int dtype, uintptr_t workspace,
         size_t workspace_bytes, int device, uintptr_t stream) {
        const DmdLossParams p = make_dmd_params(x0, x_t, t, v_fake, v_cond, v_uncond, g, norm,
                                                sumsq, loss, batch, numel, guidance, eps, dtype);
        dmdr_fast::cuda::dmd_loss_fwd(p, as_ptr<void>(workspace), workspace_bytes, device,
                                      as_ptr<void>(stream));
      },
      py::arg("x0"), py::arg("x_t"), py::arg("t"), py::arg("v_fake"), py::arg("v_cond"),
      py::arg("v_uncond"), py::arg("g"), py::arg("norm"), py::arg("sumsq"), py::arg("loss"),
      py::arg("batch"), py::arg("numel"), py::arg("guidance"), py::arg("eps"), py::arg("dtype"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"),
      "Fused DMD loss forward on a CUDA device (two launches on `stream`). Pointers are device "
      "buffers on `device`; the workspace holds dmd_loss_workspace_bytes(...) bytes.");

  m.def(
      "reward_grad_fwd_cpu",
      [](uintptr_t g_dmd, uintptr_t g_reward, uintptr_t g, uintptr_t stats, uintptr_t nonfinite,
         int64_t batch, int64_t numel, bool balanced, double weight, double ratio,
         double max_weight, double eps, int dtype, int num_threads) {
        const RewardGradParams p =
            make_reward_params(g_dmd, g_reward, g, stats, nonfinite, batch, numel, balanced, weight,
                               ratio, max_weight, eps, dtype);
        py::gil_scoped_release release;
        dmdr_fast::cpu::reward_grad_fwd(p, num_threads);
      },
      py::arg("g_dmd"), py::arg("g_reward"), py::arg("g"), py::arg("stats"), py::arg("nonfinite"),
      py::arg("batch"), py::arg("numel"), py::arg("balanced"), py::arg("weight"), py::arg("ratio"),
      py::arg("max_weight"), py::arg("eps"), py::arg("dtype"), py::arg("num_threads"),
      "Fused reward-gradient combination on the CPU. All pointers are contiguous host buffers. "
      "Writes g (B, D), stats (4, B) float32 [dmd_norm, reward_norm, cosine, weight] and "
      "nonfinite (B,) int64.");

  m.def("reward_grad_workspace_bytes", &dmdr_fast::cuda::reward_grad_workspace_bytes,
        py::arg("batch"), py::arg("numel"), py::arg("device"),
        "Device workspace in bytes that reward_grad_fwd_cuda needs.");

  m.def(
      "reward_grad_fwd_cuda",
      [](uintptr_t g_dmd, uintptr_t g_reward, uintptr_t g, uintptr_t stats, uintptr_t nonfinite,
         int64_t batch, int64_t numel, bool balanced, double weight, double ratio,
         double max_weight, double eps, int dtype, uintptr_t workspace, size_t workspace_bytes,
         int device, uintptr_t stream) {
        const RewardGradParams p =
            make_reward_params(g_dmd, g_reward, g, stats, nonfinite, batch, numel, balanced, weight,
                               ratio, max_weight, eps, dtype);
        dmdr_fast::cuda::reward_grad_fwd(p, as_ptr<void>(workspace), workspace_bytes, device,
                                         as_ptr<void>(stream));
      },
      py::arg("g_dmd"), py::arg("g_reward"), py::arg("g"), py::arg("stats"), py::arg("nonfinite"),
      py::arg("batch"), py::arg("numel"), py::arg("balanced"), py::arg("weight"), py::arg("ratio"),
      py::arg("max_weight"), py::arg("eps"), py::arg("dtype"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"),
      "Fused reward-gradient combination on a CUDA device (two launches on `stream`). Pointers "
      "are device buffers on `device`; the workspace holds reward_grad_workspace_bytes(...) "
      "bytes.");

  m.def(
      "quantize_fp8_fwd_cpu",
      [](uintptr_t x, uintptr_t q, uintptr_t scale, int64_t rows, int64_t row_size, double eps,
         double amax_ub, int dtype, int fp8_dtype, int num_threads) {
        const QuantizeFp8Params p =
            make_quantize_fp8_params(x, q, scale, rows, row_size, eps, amax_ub, dtype, fp8_dtype);
        py::gil_scoped_release release;
        dmdr_fast::cpu::quantize_fp8_fwd(p, num_threads);
      },
      py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("rows"), py::arg("row_size"),
      py::arg("eps"), py::arg("amax_ub"), py::arg("dtype"), py::arg("fp8_dtype"),
      py::arg("num_threads"),
      "Row-wise FP8 quantisation on the CPU. All pointers are contiguous host buffers. Writes q "
      "(rows, row_size) fp8 codes and scale (rows,) float32.");

  m.def(
      "quantize_fp8_fwd_cuda",
      [](uintptr_t x, uintptr_t q, uintptr_t scale, int64_t rows, int64_t row_size, double eps,
         double amax_ub, int dtype, int fp8_dtype, int device, uintptr_t stream) {
        const QuantizeFp8Params p =
            make_quantize_fp8_params(x, q, scale, rows, row_size, eps, amax_ub, dtype, fp8_dtype);
        dmdr_fast::cuda::quantize_fp8_fwd(p, device, as_ptr<void>(stream));
      },
      py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("rows"), py::arg("row_size"),
      py::arg("eps"), py::arg("amax_ub"), py::arg("dtype"), py::arg("fp8_dtype"), py::arg("device"),
      py::arg("stream"),
      "Row-wise FP8 quantisation on a CUDA device (one launch on `stream`). Pointers are device "
      "buffers on `device`.");
}
