// SwiGLU forward and backward on the CPU: one row per OpenMP iteration, each row staged through float arrays a
// chunk at a time (dtypes.h's for_each_chunk: every bf16/fp16 conversion an array conversion), the math in `omp simd`
// loops over those floats. Elementwise: memory sees one read of each input and one write of each output.
#include <cmath>
#include <cstring>

#include "cpu/exp.h"
#include "cpu/kernels.h"

namespace llama_kernels::cpu {
namespace {

// 1 + e^x, the denominator of silu and sigmoid.
inline float one_plus_exp(float x) { return 1.0f + exp_float(x); }

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
