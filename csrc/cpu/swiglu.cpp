// SwiGLU forward and backward on the CPU: one row per OpenMP iteration, each row staged through float arrays a
// chunk at a time (dtypes.h's for_each_chunk: every bf16/fp16 conversion an array conversion), the math in `omp simd`
// loops over those floats. Elementwise: memory sees one read of each input and one write of each output.
#include <cmath>
#include <cstring>

#include "cpu/kernels.h"

namespace llama_kernels::cpu {
namespace {

// 1 + e^x, the denominator of silu and sigmoid, branch-free so that the loops below vectorize (glibc's expf is a
// call per element: its vector variants need -ffast-math). Cephes' expf: x = n ln2 + r with n = round(x / ln2) and
// ln2 in two parts (Cody-Waite; n * 0.693359375 is exact), |r| <= ln2 / 2, e^r by a degree-7 polynomial (relative
// error about 1 ulp), times 2^n built in the exponent bits. x is clamped below at -80: e^x is then under 2^-115 and
// 1 + e^x is 1 in float, and 2^(n - 1) below stays a normal float. Above ln(FLT_MAX) the result is inf, as expf's;
// a nan stays nan.
inline float one_plus_exp(float x) {
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
  return 1.0f + (x > kLargest ? INFINITY : exp_x);
}

}  // namespace

template <CpuIsa P, typename T>
void swiglu(const T* gate, int64_t gate_row_stride, const T* up, int64_t up_row_stride, T* y, int64_t y_row_stride,
            int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const T* gate_row = gate + row * gate_row_stride;
    const T* up_row = up + row * up_row_stride;
    T* y_row = y + row * y_row_stride;
    for_each_chunk(n, [&](int64_t start, int64_t width) {
      alignas(64) float g[kChunk], u[kChunk], out[kChunk];
      convert(gate_row + start, g, width);
      convert(up_row + start, u, width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) out[i] = g[i] / one_plus_exp(-g[i]) * u[i];  // silu(g) * u, torch's order
      convert(out, y_row + start, width);
    });
  }
}

template <CpuIsa P, typename T>
void swiglu_backward(const T* dy, int64_t dy_row_stride, const T* gate, int64_t gate_row_stride, const T* up,
                     int64_t up_row_stride, T* dgate, int64_t dgate_row_stride, T* dup, int64_t dup_row_stride,
                     int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const T* dy_row = dy + row * dy_row_stride;
    const T* gate_row = gate + row * gate_row_stride;
    const T* up_row = up + row * up_row_stride;
    T* dgate_row = dgate + row * dgate_row_stride;
    T* dup_row = dup + row * dup_row_stride;
    for_each_chunk(n, [&](int64_t start, int64_t width) {
      alignas(64) float d[kChunk], g[kChunk], u[kChunk], dg[kChunk], du[kChunk];
      convert(dy_row + start, d, width);
      convert(gate_row + start, g, width);
      convert(up_row + start, u, width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float s = 1.0f / one_plus_exp(-g[i]);  // sigmoid(g)
        dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        du[i] = d[i] * g[i] * s;
      }
      convert(dg, dgate_row + start, width);
      convert(du, dup_row + start, width);
    });
  }
}

#define INSTANTIATE_SWIGLU(T)                                                                                          \
  template void swiglu<kIsaPath, T>(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, int64_t);              \
  template void swiglu_backward<kIsaPath, T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t, T*, \
                                             int64_t, int64_t, int64_t);                                               \

INSTANTIATE_SWIGLU(float)
INSTANTIATE_SWIGLU(bf16)
INSTANTIATE_SWIGLU(fp16)

#undef INSTANTIATE_SWIGLU

}  // namespace llama_kernels::cpu
