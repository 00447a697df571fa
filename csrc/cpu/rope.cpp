// RoPE on the CPU: each OpenMP iteration takes one (batch, token), computes its cos and sin once per frequency and
// rotates every head of q, then of k, with them. No cos/sin table is materialized; the sincos per token and
// frequency is small next to the heads' memory traffic.
#include <cmath>
#include <vector>

#include "cpu/kernels.h"

namespace llama_kernels::cpu {
namespace {

// Meta's and HF's fp32 angle: fl32(fl32(position) * inv_freq).
inline float rope_angle(int64_t position, float inv_freq) { return static_cast<float>(position) * inv_freq; }

// The fp64 angle, reduced to [-pi, pi] in fp64 so that the float cos/sin stay accurate at any position.
inline float rope_angle(int64_t position, double inv_freq) {
  constexpr double kTwoPi = 6.283185307179586;
  double angle = static_cast<double>(position) * inv_freq;
  angle -= kTwoPi * std::floor(angle / kTwoPi + 0.5);
  return static_cast<float>(angle);
}

// Rotates one head of head_dim = 2 * half elements. The head goes through a float copy first so that dst may be
// src (in place) while the loops that write dst still see no aliasing and vectorize.
template <typename T>
void rotate_head(const T* src, T* dst, const float* __restrict cos, const float* __restrict sin, int64_t half,
                 bool interleaved, float* __restrict head) {
#pragma omp simd
  for (int64_t d = 0; d < 2 * half; ++d) head[d] = to_float(src[d]);
  T* __restrict out = dst;
  if (interleaved) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = head[2 * i], x2 = head[2 * i + 1];
      out[2 * i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      out[2 * i + 1] = from_float<T>(x1 * sin[i] + x2 * cos[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = head[i], x2 = head[i + half];
      out[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      out[i + half] = from_float<T>(x1 * sin[i] + x2 * cos[i]);
    }
  }
}

template <typename T>
void rotate_heads(const RopeOperand<T>& x, int64_t b, int64_t s, const float* cos, const float* sin, int64_t half,
                  bool interleaved, float* head) {
  const T* src = x.src + b * x.src_strides.batch + s * x.src_strides.token;
  T* dst = x.dst + b * x.dst_strides.batch + s * x.dst_strides.token;
  for (int64_t hd = 0; hd < x.n_heads; ++hd) {
    rotate_head(src + hd * x.src_strides.head, dst + hd * x.dst_strides.head, cos, sin, half, interleaved, head);
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
    std::vector<float> cos(half), sin(half), head(head_dim);  // per thread
#pragma omp for schedule(static)
    for (int64_t token = 0; token < batch * seqlen; ++token) {
      const int64_t b = token / seqlen, s = token % seqlen;
      const int64_t position = positions[b * positions_stride_batch + s * positions_stride_token];
      for (int64_t i = 0; i < half; ++i) {
        const float angle = rope_angle(position, inv_freq[i]);
        cos[i] = std::cos(angle) * attention_factor;
        sin[i] = std::sin(angle) * sin_sign;
      }
      rotate_heads(q, b, s, cos.data(), sin.data(), half, interleaved, head.data());
      rotate_heads(k, b, s, cos.data(), sin.data(), half, interleaved, head.data());
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
