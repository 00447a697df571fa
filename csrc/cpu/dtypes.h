// Storage types of the CPU kernels and their conversions to and from float, without torch headers.
// bf16 and fp16 are stored as their 16 bits; every kernel computes in float and rounds once, to nearest even,
// as torch's casts do.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu/isa.h"

namespace llama_kernels::cpu {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// The conversions compile per instruction-set path (F16C and AVX-512 below): isa.h's inline namespace.
inline namespace LLAMA_KERNELS_ISA_NAMESPACE {

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

// Arrays converted to and from float. The generic loops vectorize the scalar conversions above; fp16 uses F16C /
// AVX-512F where the target has them: one instruction per 8 / 16 values, where the portable conversion takes about
// a dozen (gcc vectorizes _Float16 conversions only with AVX512-FP16). Same results as the scalar conversions,
// except that F16C makes a float nan an fp16 nan with the payload's high bits, where from_float makes 0x7e00.
template <typename T>
inline void convert(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void convert(const float* __restrict src, T* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

inline void convert(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

// Rows staged through float arrays a chunk at a time, so that every conversion is an array conversion (F16C for
// fp16, below) and the arithmetic is plain float loops. Chunks are a few vectors: called with the constant kChunk,
// each loop over a chunk compiles to a few vector instructions, and the arrays stay in L1 (or registers).
constexpr int64_t kChunk = 64;

// f(start, width) over the chunks of [0, n): full chunks with a constant width, then the remainder. Flattened, so
// that f is inlined with that constant: gcc otherwise calls a large f per chunk, its captures reloaded each time.
template <typename F>
__attribute__((flatten)) inline void for_each_chunk(int64_t n, F f) {
  int64_t start = 0;
  for (; start + kChunk <= n; start += kChunk) f(start, kChunk);
  if (start < n) f(start, n - start);
}

#if defined(__F16C__)
#if defined(__AVX512F__)
// The AVX-512 loops use the zero-masking intrinsics with every lane set: the compiler emits the plain instruction,
// and gcc 12's unmasked ones warn "may be used uninitialized" under -Wall (GCC bug 105593).
constexpr __mmask16 kAllLanes = 0xffff;
#endif

// The last n < 8 values: a loop over an int, which gcc's loop analysis does not take for one that could run 2^62 times
// once inlined into a loop over a chunk array ("iteration ... invokes undefined behavior").
template <typename From, typename To>
inline void convert_tail(const From* src, To* dst, int64_t n) {
  for (int i = 0; i < static_cast<int>(n); ++i) {
    if constexpr (std::is_same_v<To, float>) {
      dst[i] = to_float(src[i]);
    } else {
      dst[i] = from_float<To>(src[i]);
    }
  }
}

inline void convert(const fp16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_maskz_cvtph_ps(kAllLanes, halves));
  }
#endif
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  convert_tail(src + i, dst + i, n - i);
}

inline void convert(const float* src, fp16* dst, int64_t n) {
  constexpr int kNearestEven = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // not MXCSR's rounding mode
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i halves = _mm512_maskz_cvtps_ph(kAllLanes, _mm512_loadu_ps(src + i), kNearestEven);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), halves);
  }
#endif
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kNearestEven));
  }
  convert_tail(src + i, dst + i, n - i);
}
#endif

}  // namespace LLAMA_KERNELS_ISA_NAMESPACE
}  // namespace llama_kernels::cpu
