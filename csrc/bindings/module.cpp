// pybind11 bindings of dmdr_fast._C. Only m.def() calls and the int → pointer glue live here:
// tensors cross the boundary as raw addresses (tensor.data_ptr()) so that _C never links libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "build_info.h"
#include "dmdr_fast/dmd_loss.h"
#include "dmdr_fast/runtime.h"

namespace py = pybind11;
using dmdr_fast::DmdLossParams;

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
         int64_t batch, int64_t numel, double guidance, double eps, int dtype,
         uintptr_t workspace, size_t workspace_bytes, int device, uintptr_t stream) {
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
}
