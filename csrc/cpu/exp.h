// e^x for the kernels' float loops, branch-free so that `omp simd` loops vectorize (glibc's expf is a call per
// element: its vector variants need -ffast-math). Cephes' expf: x = n ln2 + r with n = round(x / ln2) and ln2 in two
// parts (Cody-Waite; n * 0.693359375 is exact), |r| <= ln2 / 2, e^r by a degree-7 polynomial (relative error about
// 1 ulp), times 2^n built in the exponent bits. x is clamped below at -80: e^x is then under 2^-115 (0 beside any
// sum it joins, and 2^(n - 1) below stays a normal float). Above ln(FLT_MAX) the result is inf, as expf's; a nan
// stays nan.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/isa.h"

namespace llama_kernels::cpu::inline LLAMA_KERNELS_ISA_NAMESPACE {

inline float exp_float(float x) {
  constexpr float kLowest = -80.0f;
  constexpr float kLargest = 88.72283905f;  // ln(FLT_MAX)
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float clamped = x < kLowest ? kLowest : (x > kLargest ? kLargest : x);
  const float shifted = clamped * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * r * r + r + 1.0f;
  // 2^(n - 1), then times 2: n reaches 128 just below ln(FLT_MAX), where 2^n itself is not a float.
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  const int32_t half_power_bits = (shifted_bits - 0x4B400000 + 126) << 23;
  float half_power;
  std::memcpy(&half_power, &half_power_bits, sizeof half_power);
  const float exp_x = exp_r * half_power * 2.0f;
  return x > kLargest ? INFINITY : exp_x;
}

}  // namespace llama_kernels::cpu::inline LLAMA_KERNELS_ISA_NAMESPACE
