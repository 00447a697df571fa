// Storage types of the CPU kernels and their conversions to and from float, without torch headers.
// bf16 and fp16 are stored as their 16 bits; every kernel computes in float and rounds once, to nearest even,
// as torch's casts do.
#pragma once

#include <cstdint>
#include <cstring>

namespace llama_kernels::cpu {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp16 -> float without branches, so that loops converting arrays vectorize (gcc does not vectorize _Float16
// conversions short of AVX512-FP16, and a loop over subnormals would stop it too). Exact for every fp16 value.
inline float to_float(fp16 x) {
  const uint32_t shifted = static_cast<uint32_t>(x.bits & 0x7fffu) << 13;  // exponent and mantissa in float's place
  const uint32_t exponent = shifted & 0x0f800000u;
  const uint32_t normal = shifted + (112u << 23);  // rebiased: 15 -> 127
  const uint32_t inf_or_nan = normal + (112u << 23);  // exponent 31 -> 255
  // zero and subnormals, m * 2^-24: 2^-14 * (1 + m / 1024) minus 2^-14, both exact in float
  float below_normal;
  const uint32_t one_plus = normal + (1u << 23);
  std::memcpy(&below_normal, &one_plus, sizeof below_normal);
  below_normal -= 6.103515625e-05f;  // 2^-14
  uint32_t u;
  std::memcpy(&u, &below_normal, sizeof u);
  u = exponent == 0 ? u : (exponent == 0x0f800000u ? inf_or_nan : normal);
  u |= static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

template <>
inline bf16 from_float<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  // Branch-free, so that loops converting arrays vectorize: round to nearest even, or keep a nan quiet.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  // f != f (one float compare) rather than a test of the bits: it vectorizes to fewer instructions.
  return bf16{static_cast<uint16_t>(f != f ? quiet_nan : rounded)};
}

// float -> fp16, to nearest even, without branches (as to_float(fp16) above).
template <>
inline fp16 from_float<fp16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t magnitude = u & 0x7fffffffu;
  // normal results: the exponent rebiased (127 -> 15) and the mantissa rounded at bit 13, to even; a carry out of
  // the mantissa moves to the next exponent, up to inf for [65520, 65536)
  const uint32_t normal = (magnitude - (112u << 23) + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
  // results below 2^-14 (subnormal or zero): adding 0.5 rounds |f| to a multiple of 2^-24 (0.5's ulp), to even,
  // and leaves that multiple in the low mantissa bits (1024 of them is the smallest normal fp16: also right)
  float shifted;
  std::memcpy(&shifted, &magnitude, sizeof shifted);
  shifted += 0.5f;
  uint32_t below_normal;
  std::memcpy(&below_normal, &shifted, sizeof below_normal);
  below_normal -= 0x3f000000u;
  const uint32_t too_large = magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u;  // nan stays a (quiet) nan; else inf
  const uint32_t bits = magnitude >= 0x47800000u ? too_large : (magnitude < 0x38800000u ? below_normal : normal);
  return fp16{static_cast<uint16_t>(bits | ((u >> 16) & 0x8000u))};
}

}  // namespace llama_kernels::cpu
