// One chunk of the fused linear cross-entropy's rows on the CPU (llama_kernels/ops/cross_entropy.py): one row per
// OpenMP iteration, three `omp simd` passes over its fp32 logits (max and sum, sum of exponentials, dz): memory sees
// up to three reads of the logits (a 128 KiB row stays in L2 between them) and one write of dz.
#include <cmath>
#include <limits>

#include "cpu/exp.h"
#include "cpu/kernels.h"

namespace llama_kernels::cpu {

template <CpuIsa P, typename DZ>
void cross_entropy_step(const float* logits, int64_t logits_row_stride, const int64_t* target,
                        const float* row_scale, int64_t ignore_index, float label_smoothing, float* loss, float* lse,
                        DZ* dz, int64_t dz_row_stride, int64_t rows, int64_t vocab) {
  const float off_target = label_smoothing / static_cast<float>(vocab);
  const float on_target = 1.0f - label_smoothing;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float* z = logits + row * logits_row_stride;
    // The sums in float per chunk and in double across chunks: a float sum over 32k terms would drift by ~1e-5.
    float z_max = -std::numeric_limits<float>::infinity();
    double z_sum = 0.0, exp_sum = 0.0;
    for_each_chunk(vocab, [&](int64_t start, int64_t width) {
      float chunk_max = z_max, chunk_sum = 0.0f;
#pragma omp simd reduction(max : chunk_max) reduction(+ : chunk_sum)
      for (int64_t i = 0; i < width; ++i) {
        chunk_max = z[start + i] > chunk_max ? z[start + i] : chunk_max;  // not fmax: a call per element
        chunk_sum += z[start + i];
      }
      z_max = chunk_max;
      z_sum += chunk_sum;
    });
    for_each_chunk(vocab, [&](int64_t start, int64_t width) {
      const float* z_chunk = z + start;
      float chunk_sum = 0.0f;
#pragma omp simd reduction(+ : chunk_sum)
      for (int64_t i = 0; i < width; ++i) chunk_sum += exp_float(z_chunk[i] - z_max);
      exp_sum += chunk_sum;
    });
    const float row_lse = z_max + static_cast<float>(std::log(exp_sum));
    const int64_t t = target[row];
    const bool ignored = t == ignore_index, in_range = t >= 0 && t < vocab;
    // A target outside [0, V) that is not ignored reads nothing: its loss and dz are nan.
    const float z_target = in_range ? z[t] : std::numeric_limits<float>::quiet_NaN();
    const float row_loss = row_lse - on_target * z_target - label_smoothing * static_cast<float>(z_sum / vocab);
    loss[row] = ignored ? 0.0f : row_loss;
    lse[row] = row_lse;
    if (dz == nullptr) continue;
    const float scale = ignored ? 0.0f : (in_range ? row_scale[row] : std::numeric_limits<float>::quiet_NaN());
    DZ* dz_row = dz + row * dz_row_stride;
    for_each_chunk(vocab, [&](int64_t start, int64_t width) {
      alignas(64) float out[kChunk];
      const float* z_chunk = z + start;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) out[i] = (exp_float(z_chunk[i] - row_lse) - off_target) * scale;
      if (t >= start && t < start + width) {
        out[t - start] = (exp_float(z_chunk[t - start] - row_lse) - off_target - on_target) * scale;
      }
      convert(out, dz_row + start, width);  // dz may be the logits themselves (float): each element read first
    });
  }
}

#define INSTANTIATE(DZ)                                                                                           \
  template void cross_entropy_step<kIsaPath, DZ>(const float*, int64_t, const int64_t*, const float*, int64_t,  \
                                                 float, float*, float*, DZ*, int64_t, int64_t, int64_t);
INSTANTIATE(float)
INSTANTIATE(bf16)
#undef INSTANTIATE

}  // namespace llama_kernels::cpu
