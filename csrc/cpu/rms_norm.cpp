// RMSNorm forward and backward on the CPU: one row per OpenMP iteration, two passes over the row (statistics, then
// output) so that the second pass reads the row from cache: memory sees one read of each input and one write of
// each output. The inner loops are `omp simd` reductions over float accumulators, which gcc vectorizes.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/kernels.h"

namespace llama_kernels::cpu {

template <typename T, typename W>
void rms_norm(const T* x, int64_t x_row_stride, const T* residual, int64_t residual_row_stride, const W* weight,
              promoted_t<T, W>* y, int64_t y_row_stride, T* h, int64_t h_row_stride, int64_t rows, int64_t n,
              float eps) {
  using Out = promoted_t<T, W>;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const T* __restrict x_row = x + row * x_row_stride;
    const W* __restrict w = weight;
    Out* __restrict y_row = y + row * y_row_stride;
    float sum_squares = 0.0f;
    const T* __restrict normed_input = x_row;  // h, the row that is normalized
    if (residual != nullptr) {
      const T* __restrict residual_row = residual + row * residual_row_stride;
      T* __restrict h_row = h + row * h_row_stride;
#pragma omp simd reduction(+ : sum_squares)
      for (int64_t i = 0; i < n; ++i) {
        // h in x's dtype, as Meta's. Stored straight from the expression: a T-typed local (a struct for bf16/fp16)
        // would be privatized into a stack array by `omp simd`, and the loop would not vectorize.
        h_row[i] = from_float<T>(to_float(x_row[i]) + to_float(residual_row[i]));
        const float hf = to_float(from_float<T>(to_float(x_row[i]) + to_float(residual_row[i])));
        sum_squares += hf * hf;
      }
      normed_input = h_row;
    } else {
#pragma omp simd reduction(+ : sum_squares)
      for (int64_t i = 0; i < n; ++i) {
        const float hf = to_float(x_row[i]);
        sum_squares += hf * hf;
      }
    }
    const float rstd = 1.0f / std::sqrt(sum_squares / static_cast<float>(n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float normed = to_float(from_float<T>(to_float(normed_input[i]) * rstd));  // Meta's .type_as(x)
      y_row[i] = from_float<Out>(normed * to_float(w[i]));
    }
  }
}

// Row blocks of the dweight reduction: a fixed number, so the sum's order does not depend on the thread count.
constexpr int64_t kMaxRowBlocks = 128;

template <typename T, typename W>
void rms_norm_backward(const promoted_t<T, W>* dy, int64_t dy_row_stride, const T* dh, int64_t dh_row_stride,
                       const T* h, int64_t h_row_stride, const W* weight, T* dx, int64_t dx_row_stride, W* dweight,
                       int64_t rows, int64_t n, float eps) {
  using Out = promoted_t<T, W>;
  const int64_t rows_per_block = std::max<int64_t>(1, (rows + kMaxRowBlocks - 1) / kMaxRowBlocks);
  const int64_t n_blocks = (rows + rows_per_block - 1) / rows_per_block;
  std::vector<float> dweight_partials(static_cast<size_t>(n_blocks * n), 0.0f);

#pragma omp parallel for schedule(static)
  for (int64_t block = 0; block < n_blocks; ++block) {
    float* __restrict dweight_partial = dweight_partials.data() + block * n;
    const W* __restrict w = weight;
    const int64_t row_end = std::min(rows, (block + 1) * rows_per_block);
    for (int64_t row = block * rows_per_block; row < row_end; ++row) {
      const Out* __restrict dy_row = dy + row * dy_row_stride;
      const T* __restrict h_row = h + row * h_row_stride;
      T* __restrict dx_row = dx + row * dx_row_stride;
      float sum_squares = 0.0f, sum_gh = 0.0f;
#pragma omp simd reduction(+ : sum_squares, sum_gh)
      for (int64_t i = 0; i < n; ++i) {
        const float hf = to_float(h_row[i]);
        sum_squares += hf * hf;
        sum_gh += to_float(dy_row[i]) * to_float(w[i]) * hf;
      }
      const float inv_n = 1.0f / static_cast<float>(n);
      const float rstd = 1.0f / std::sqrt(sum_squares * inv_n + eps);
      const float mean_gn = sum_gh * rstd * inv_n;  // mean(g * normed)
      const T* __restrict dh_row = dh != nullptr ? dh + row * dh_row_stride : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float dyf = to_float(dy_row[i]);
        const float normed = to_float(h_row[i]) * rstd;
        float dxf = rstd * (dyf * to_float(w[i]) - normed * mean_gn);
        if (dh_row != nullptr) dxf += to_float(dh_row[i]);
        dx_row[i] = from_float<T>(dxf);
        dweight_partial[i] += dyf * to_float(from_float<T>(normed));
      }
    }
  }

#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (int64_t block = 0; block < n_blocks; ++block) sum += dweight_partials[block * n + i];
    dweight[i] = from_float<W>(sum);
  }
}

#define INSTANTIATE_RMS_NORM(T, W)                                                                                  \
  template void rms_norm<T, W>(const T*, int64_t, const T*, int64_t, const W*, promoted_t<T, W>*, int64_t, T*,     \
                               int64_t, int64_t, int64_t, float);                                                  \
  template void rms_norm_backward<T, W>(const promoted_t<T, W>*, int64_t, const T*, int64_t, const T*, int64_t,    \
                                        const W*, T*, int64_t, W*, int64_t, int64_t, float);

INSTANTIATE_RMS_NORM(float, float)
INSTANTIATE_RMS_NORM(bf16, bf16)
INSTANTIATE_RMS_NORM(fp16, fp16)
INSTANTIATE_RMS_NORM(bf16, float)
INSTANTIATE_RMS_NORM(fp16, float)

#undef INSTANTIATE_RMS_NORM

}  // namespace llama_kernels::cpu
