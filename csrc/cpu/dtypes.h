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

#ifdef __FLT16_MAX__
// The compiler has _Float16 (gcc >= 12 on x86-64): conversions it can vectorize (F16C, AVX-512 FP16).
inline float to_float(fp16 x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, sizeof h);
  return static_cast<float>(h);
}
#else
inline float to_float(fp16 x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu, u;
  if (exponent == 0x1f) {  // inf, nan
    u = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // zero
    u = sign;
  } else {  // subnormal: normalize
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    u = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
#endif

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

#ifdef __FLT16_MAX__
template <>
inline fp16 from_float<fp16>(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // IEEE round to nearest even
  fp16 out;
  std::memcpy(&out.bits, &h, sizeof h);
  return out;
}
#else
template <>
inline fp16 from_float<fp16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return fp16{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (magnitude >= 0x477ff000u) return fp16{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (magnitude < 0x38800000u) {  // subnormal or zero in fp16: round the scaled value to an integer, to even
    float scaled;
    uint32_t m = magnitude;
    std::memcpy(&scaled, &m, sizeof scaled);
    scaled *= 16777216.0f;  // 2^24: one fp16 subnormal ulp becomes 1
    const float floor_value = static_cast<float>(static_cast<uint32_t>(scaled));
    uint32_t result = static_cast<uint32_t>(floor_value);
    const float rest = scaled - floor_value;
    if (rest > 0.5f || (rest == 0.5f && (result & 1u))) ++result;
    return fp16{static_cast<uint16_t>(sign | result)};
  }
  uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);  // round to nearest even at bit 13
  return fp16{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}
#endif

}  // namespace llama_kernels::cpu
