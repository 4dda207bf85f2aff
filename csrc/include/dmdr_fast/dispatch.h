// Compile-time switches turning runtime flags and dtype codes into template parameters.
#pragma once

#include <stdexcept>
#include <string>

#include "dmdr_fast/dtype.h"

// DMDR_BOOL_SWITCH(cond, NAME, ...): runs the body with `constexpr bool NAME = cond`.
#define DMDR_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                   \
    if (COND) {                           \
      constexpr bool NAME = true;         \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr bool NAME = false;        \
      return __VA_ARGS__();               \
    }                                     \
  }()

// DMDR_FLOAT_SWITCH(dtype, T, F32, F16, BF16, ...): runs the body with `using T = <type>`, where
// the three type arguments name the storage type used for each dtype on this platform. Fused
// kernels compute in float32; float64 inputs are served by the PyTorch reference backend.
#define DMDR_FLOAT_SWITCH(DTYPE, T, F32, F16, BF16, ...)                                      \
  [&] {                                                                                       \
    switch (DTYPE) {                                                                          \
      case ::dmdr_fast::DType::kFloat32: {                                                    \
        using T = F32;                                                                        \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::dmdr_fast::DType::kFloat16: {                                                    \
        using T = F16;                                                                        \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::dmdr_fast::DType::kBFloat16: {                                                   \
        using T = BF16;                                                                       \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      default:                                                                                \
        break;                                                                                \
    }                                                                                         \
    throw std::invalid_argument(std::string("dmdr_fast: fused kernels take float32, float16 " \
                                            "or bfloat16, got ") +                            \
                                ::dmdr_fast::dtype_name(DTYPE));                              \
  }()
