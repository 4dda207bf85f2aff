// Element types understood by the kernels. Python passes one of these codes next to every raw
// pointer (the compiled module does not link libtorch, so it cannot read torch dtypes itself).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dmdr_fast {

// kFloat8* are output codes only (the element types of quantize_fp8's q), never kernel inputs.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
  kFloat8E4M3 = 4,  // torch.float8_e4m3fn: no Inf, largest finite 448
  kFloat8E5M2 = 5,  // torch.float8_e5m2: IEEE-like, largest finite 57344
};

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat64:
      return "float64";
    case DType::kFloat8E4M3:
      return "float8_e4m3fn";
    case DType::kFloat8E5M2:
      return "float8_e5m2";
  }
  return "unknown";
}

inline DType dtype_from_code(int code) {
  if (code < 0 || code > 5) {
    throw std::invalid_argument("dmdr_fast: unknown dtype code " + std::to_string(code) +
                                " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64, "
                                "4=float8_e4m3fn, 5=float8_e5m2)");
  }
  return static_cast<DType>(code);
}

}  // namespace dmdr_fast
