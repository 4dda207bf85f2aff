// Element types understood by the kernels. Python passes one of these codes next to every raw
// pointer (the compiled module does not link libtorch, so it cannot read torch dtypes itself).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dmdr_fast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

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
  }
  return "unknown";
}

inline DType dtype_from_code(int code) {
  if (code < 0 || code > 3) {
    throw std::invalid_argument("dmdr_fast: unknown dtype code " + std::to_string(code) +
                                " (expected 0=float32, 1=float16, 2=bfloat16, 3=float64)");
  }
  return static_cast<DType>(code);
}

}  // namespace dmdr_fast
