// 16-bit storage types of the CPU kernels and their float32 loads/stores, and the FP8 encoders.
// Conversions use integer bit operations so that the same code runs on any x86/ARM CPU without
// F16C or AVX512-BF16.
//
// Everything here has internal linkage: the CPU kernels are compiled once per ISA level (base and
// AVX2, see CMakeLists.txt), and the linker must not merge an out-of-line AVX2 copy of a function
// into the base kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dmdr_fast::cpu {
namespace {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Clamp into [-max_finite, max_finite]; NaN passes through. Plain comparisons so the loops
// vectorise (fminf/fmaxf must honour NaN rules and become libm calls).
inline float saturate(float x, float max_finite) {
  x = x > max_finite ? max_finite : x;
  return x < -max_finite ? -max_finite : x;
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const BFloat16* p, int64_t i) {
  return bits_to_float(static_cast<uint32_t>(p[i].bits) << 16);
}
inline float load(const Half* p, int64_t i) {
  // IEEE binary16 → binary32. Normal numbers: rebias the exponent; subnormals: scale by 2^-24;
  // Inf/NaN: all-ones exponent.
  const uint32_t h = p[i].bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  float mag;
  if (exp == 0) {
    mag = static_cast<float>(man) * 5.9604644775390625e-8f;  // 2^-24
  } else if (exp == 31) {
    mag = bits_to_float(0x7f800000u | (man << 13));
  } else {
    mag = bits_to_float(((exp + 112u) << 23) | (man << 13));
  }
  return bits_to_float(float_to_bits(mag) | sign);
}

// Stores round to nearest even and saturate at the type's largest finite value, so that a value
// beyond a 16-bit range never becomes ±Inf. Callers never store NaN.
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(BFloat16* p, int64_t i, float v) {
  const uint32_t u = float_to_bits(v);
  uint32_t h = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  // Saturate after rounding: a finite value that rounded to ±Inf (exponent all ones, mantissa 0)
  // becomes ±max by subtracting 1 (0x7f80 → 0x7f7f); NaN keeps its mantissa and is left alone.
  // Integer ops only, so the loop vectorises (a float clamp becomes compare + blend).
  h -= (h & 0x7fffu) == 0x7f80u ? 1u : 0u;
  p[i].bits = static_cast<uint16_t>(h);
}
inline void store(Half* p, int64_t i, float v) {
  v = saturate(v, 65504.f);
  const uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const float a = std::fabs(v);
  uint16_t out;
  if (a < 6.103515625e-05f) {  // below the smallest normal half: subnormal or zero
    out = static_cast<uint16_t>(std::nearbyint(a * 16777216.f));  // a / 2^-24, ties to even
  } else {
    const uint32_t ua = float_to_bits(a);
    // Rebias exponent (127 → 15) and round the 23-bit mantissa to 10 bits, ties to even.
    const uint32_t rounded = ua + 0xfffu + ((ua >> 13) & 1u);
    out = static_cast<uint16_t>((rounded - (112u << 23)) >> 13);
  }
  p[i].bits = static_cast<uint16_t>(out | sign);
}

// float32 → FP8 codes, round to nearest even, for values already clamped into the format's finite
// range (or NaN): the kernels saturate first (quantize_fp8_math.h::fp8_scaled), so no rounding
// here can overflow. Bit-exact with torch's CPU casts (.to(torch.float8_e4m3fn / float8_e5m2)),
// NaN included (0x7f with the input's sign). Both candidates are computed and one selected, without
// branches, so that the kernels' loops vectorise.
//
// Normal results: the 23-bit mantissa is rounded to 3 (e4m3) or 2 (e5m2) bits in place, a carry
// moving into the exponent, then the exponent is rebiased (127 → 7 or 15). Subnormal results:
// adding 2^14 (e4m3) or 2^7 (e5m2) makes the float32 ulp equal to the smallest fp8 subnormal
// (2^-9 or 2^-16), so the FPU rounds to that grid and the low bits are the fp8 mantissa.
inline uint8_t fp8_e4m3_bits(float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t ua = u & 0x7fffffffu;
  const uint32_t sub = float_to_bits(bits_to_float(ua) + 16384.f) - 0x46800000u;
  const uint32_t nrm = ((ua + 0x7ffffu + ((ua >> 20) & 1u)) >> 20) - (120u << 3);
  uint32_t out = ua < 0x3c800000u ? sub : nrm;  // below 2^-6, the smallest normal e4m3
  out = ua > 0x7f800000u ? 0x7fu : out;         // NaN
  return static_cast<uint8_t>(out | sign);
}

inline uint8_t fp8_e5m2_bits(float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t ua = u & 0x7fffffffu;
  const uint32_t sub = float_to_bits(bits_to_float(ua) + 128.f) - 0x43000000u;
  const uint32_t nrm = ((ua + 0xfffffu + ((ua >> 21) & 1u)) >> 21) - (112u << 2);
  uint32_t out = ua < 0x38800000u ? sub : nrm;  // below 2^-14, the smallest normal e5m2
  out = ua > 0x7f800000u ? 0x7fu : out;         // NaN
  return static_cast<uint8_t>(out | sign);
}
}  // namespace
}  // namespace dmdr_fast::cpu
