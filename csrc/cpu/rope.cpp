// RoPE on the CPU: each OpenMP iteration takes one (batch, token), computes its cos and sin once per frequency and
// rotates every head of q, then of k, with them. No cos/sin table is materialized. The cos and sin are branch-free
// (sincos_of below) so that their loop vectorizes: a libm call per frequency cost more than the heads' memory traffic
// (64 calls a token against 32 KiB of 7B's q and k).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"

namespace llama_kernels::cpu {
namespace {

// Meta's and HF's fp32 angle: fl32(fl32(position) * inv_freq); with fp64 inv_freq, the fp64 product.
inline double rope_angle(int64_t position, float inv_freq) {
  return static_cast<double>(static_cast<float>(position) * inv_freq);
}
inline double rope_angle(int64_t position, double inv_freq) { return static_cast<double>(position) * inv_freq; }

// cos and sin of an angle, within about 2 ulp of the float result. The reduction is fdlibm's for medium angles, in
// fp64: angle = n * pi/2 + r, |r| <= pi/4, pi/2 in two parts whose first has 33 bits, so that n * kPiOver2High is
// exact for |n| < 2^20 (angles to 1.6e6; past them r stays within 1e-8 of exact). Then Cephes' sinf and cosf
// polynomials of r in fp32, and the quadrant n mod 4 picks and signs them.
inline void sincos_of(double angle, float& cos_out, float& sin_out) {
  constexpr double kTwoOverPi = 0.63661977236758134308;
  constexpr double kPiOver2High = 1.57079632673412561417;  // the first 33 bits of pi/2
  constexpr double kPiOver2Low = 6.07710050650619224932e-11;  // pi/2 - kPiOver2High
  constexpr double kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  const double shifted = angle * kTwoOverPi + kRoundMagic;
  const double n = shifted - kRoundMagic;
  const float r = static_cast<float>((angle - n * kPiOver2High) - n * kPiOver2Low);
  int64_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  const int64_t quadrant = shifted_bits & 3;  // n mod 4, also for negative n (2^51 + n in the low bits)
  const float r2 = r * r;
  const float sin_r = ((-1.9515295891e-4f * r2 + 8.3321608736e-3f) * r2 - 1.6666654611e-1f) * r2 * r + r;
  const float cos_r =
      ((2.443315711809948e-5f * r2 - 1.388731625493765e-3f) * r2 + 4.166664568298827e-2f) * r2 * r2 - 0.5f * r2 + 1.0f;
  const float sin_abs = quadrant & 1 ? cos_r : sin_r;  // quadrants 1, 3: sin(r + pi/2) = cos(r)
  const float cos_abs = quadrant & 1 ? sin_r : cos_r;
  sin_out = quadrant & 2 ? -sin_abs : sin_abs;              // quadrants 2, 3
  cos_out = (quadrant + 1) & 2 ? -cos_abs : cos_abs;        // quadrants 1, 2
}

#if defined(__F16C__)
// fp16 heads go through float chunks so that their conversions are dtypes.h's F16C array conversions, not the
// portable bit-level ones (about a dozen instructions a vector each way). A chunk is read before it is written, so
// dst may be src.
void rotate_head_staged(const fp16* src, fp16* dst, const float* __restrict cos, const float* __restrict sin,
                        int64_t half, bool interleaved) {
  if (interleaved) {
    for_each_chunk(half, [&](int64_t start, int64_t width) {
      alignas(64) float x[2 * kChunk], out[2 * kChunk];
      convert(src + 2 * start, x, 2 * width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        out[2 * i] = x[2 * i] * cos[start + i] - x[2 * i + 1] * sin[start + i];
        out[2 * i + 1] = x[2 * i] * sin[start + i] + x[2 * i + 1] * cos[start + i];
      }
      convert(out, dst + 2 * start, 2 * width);
    });
    return;
  }
  for_each_chunk(half, [&](int64_t start, int64_t width) {
    alignas(64) float x1[kChunk], x2[kChunk];
    convert(src + start, x1, width);
    convert(src + half + start, x2, width);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float a = x1[i], b = x2[i];
      x1[i] = a * cos[start + i] - b * sin[start + i];
      x2[i] = a * sin[start + i] + b * cos[start + i];
    }
    convert(x1, dst + start, width);
    convert(x2, dst + half + start, width);
  });
}
#endif

// Rotates one head of head_dim = 2 * half elements; dst may be src (in place): each iteration reads the pair it
// writes, and no other, so the vectorized loops stay right.
template <typename T>
void rotate_head(const T* src, T* dst, const float* __restrict cos, const float* __restrict sin, int64_t half,
                 bool interleaved) {
#if defined(__F16C__)
  if constexpr (std::is_same_v<T, fp16>) {
    rotate_head_staged(src, dst, cos, sin, half, interleaved);
    return;
  }
#endif
  if constexpr (sizeof(T) == 2) {
    if (interleaved) {  // a 16-bit pair is one 32-bit word: contiguous loads and stores, not stride-2 ones
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        uint32_t pair;
        std::memcpy(&pair, src + 2 * i, sizeof pair);
        const float x1 = to_float(T{static_cast<uint16_t>(pair)}), x2 = to_float(T{static_cast<uint16_t>(pair >> 16)});
        const uint32_t out1 = from_float<T>(x1 * cos[i] - x2 * sin[i]).bits;
        const uint32_t out2 = from_float<T>(x1 * sin[i] + x2 * cos[i]).bits;
        const uint32_t rotated = out1 | out2 << 16;
        std::memcpy(dst + 2 * i, &rotated, sizeof rotated);
      }
      return;
    }
  }
  if (interleaved) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(src[2 * i]), x2 = to_float(src[2 * i + 1]);
      dst[2 * i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      dst[2 * i + 1] = from_float<T>(x1 * sin[i] + x2 * cos[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(src[i]), x2 = to_float(src[i + half]);
      dst[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      dst[i + half] = from_float<T>(x1 * sin[i] + x2 * cos[i]);
    }
  }
}

template <typename T>
void rotate_heads(const RopeOperand<T>& x, int64_t b, int64_t s, const float* cos, const float* sin, int64_t half,
                  bool interleaved) {
  const T* src = x.src + b * x.src_strides.batch + s * x.src_strides.token;
  T* dst = x.dst + b * x.dst_strides.batch + s * x.dst_strides.token;
  for (int64_t hd = 0; hd < x.n_heads; ++hd) {
    rotate_head(src + hd * x.src_strides.head, dst + hd * x.dst_strides.head, cos, sin, half, interleaved);
  }
}

}  // namespace

template <CpuIsa P, typename T, typename AngleT>
void rope(const RopeOperand<T>& q, const RopeOperand<T>& k, const int64_t* positions, int64_t positions_stride_batch,
          int64_t positions_stride_token, const AngleT* inv_freq, int64_t batch, int64_t seqlen, int64_t head_dim,
          float attention_factor, bool interleaved, bool inverse) {
  const int64_t half = head_dim / 2;
  const float sin_sign = inverse ? -attention_factor : attention_factor;
#pragma omp parallel
  {
    std::vector<float> cos(half), sin(half);  // per thread
#pragma omp for schedule(static)
    for (int64_t token = 0; token < batch * seqlen; ++token) {
      const int64_t b = token / seqlen, s = token % seqlen;
      const int64_t position = positions[b * positions_stride_batch + s * positions_stride_token];
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        float cos_i, sin_i;
        sincos_of(rope_angle(position, inv_freq[i]), cos_i, sin_i);
        cos[i] = cos_i * attention_factor;
        sin[i] = sin_i * sin_sign;
      }
      rotate_heads(q, b, s, cos.data(), sin.data(), half, interleaved);
      rotate_heads(k, b, s, cos.data(), sin.data(), half, interleaved);
    }
  }
}

#define INSTANTIATE_ROPE(T, AngleT)                                                                                    \
  template void rope<kIsaPath, T, AngleT>(const RopeOperand<T>&, const RopeOperand<T>&, const int64_t*, int64_t,       \
                                          int64_t, const AngleT*, int64_t, int64_t, int64_t, float, bool, bool);       \

INSTANTIATE_ROPE(float, float)
INSTANTIATE_ROPE(float, double)
INSTANTIATE_ROPE(bf16, float)
INSTANTIATE_ROPE(bf16, double)
INSTANTIATE_ROPE(fp16, float)
INSTANTIATE_ROPE(fp16, double)

#undef INSTANTIATE_ROPE

}  // namespace llama_kernels::cpu
