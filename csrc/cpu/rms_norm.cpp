// RMSNorm forward and backward on the CPU: one row per OpenMP iteration, two passes over the row (statistics, then
// output) so that the second pass reads the row from cache: memory sees one read of each input and one write of
// each output. The inner loops are `omp simd` loops over float values, which gcc vectorizes (AVX-512: 16 lanes).
// bf16 values are converted element by element in those loops; fp16 rows are staged instead (rms_norm_staged).
//
// Why the element accesses go through load/store/round_to below: `omp simd` privatizes every local of the loop body
// into a per-lane stack array, and that includes the temporaries a bf16/fp16 value (a struct) makes when it is
// passed to to_float or returned by from_float. gcc then gives up on those loads and stores ("no vectype") and the
// bf16 loops run scalar. The helpers are functions over pointers and floats: the struct temporaries live inside
// them, outside the simd body, and vanish when they are inlined (which happens after the privatization).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"

namespace llama_kernels::cpu {
namespace {

template <typename T>
inline float load(const T* p) {
  return to_float(*p);
}

template <typename T>
inline void store(T* p, float value) {
  *p = from_float<T>(value);
}

// value rounded to T and back: the casts of the reference (h = x + r in x's dtype, Meta's .type_as(x)).
template <typename T>
inline float round_to(float value) {
  return to_float(from_float<T>(value));
}

// bf16 rounding without dtypes.h's nan test, for this file only. Every float rounded here is the result of float
// arithmetic on bf16 values (x, residual, weight, dy, dh) and on floats made from them, and such a nan has the
// low 16 bits of its float clear: IEEE arithmetic returns an operand's nan (quieted, payload kept) or a default
// nan (0xffc00000 on x86). Rounding leaves a value with a clear low half unchanged, so that nan stays a quiet nan,
// and the test (a compare and a blend per rounding, a quarter of the forward's instructions) is not needed. The
// conversions are most of the forward's instructions: at 1024 x 4096 the rows are in L3 and the kernel is bound
// by them, not by memory. Returned as float bits with the low half cleared: one `and` where the bf16 bits would
// need a shift right and a shift left.
inline uint32_t round_bf16_bits(float value) {
  uint32_t u;
  std::memcpy(&u, &value, sizeof u);
  return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;  // to nearest even
}

template <>
inline float round_to<bf16>(float value) {
  const uint32_t bits = round_bf16_bits(value);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

template <>
inline void store<bf16>(bf16* p, float value) {
  p->bits = static_cast<uint16_t>(round_bf16_bits(value) >> 16);
}

// Stores a float that already holds a T value, where rounding it again would change nothing: bf16 keeps the
// float's high half.
template <typename T>
inline void store_exact(T* p, float value) {
  store(p, value);
}

template <>
inline void store_exact<bf16>(bf16* p, float value) {
  uint32_t u;
  std::memcpy(&u, &value, sizeof u);
  p->bits = static_cast<uint16_t>(u >> 16);
}

template <typename T, typename W>
void rms_norm_fused(const T* x, int64_t x_row_stride, const T* residual, int64_t residual_row_stride,
                    const W* weight, promoted_t<T, W>* y, int64_t y_row_stride, T* h, int64_t h_row_stride,
                    int64_t rows, int64_t n, float eps) {
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
        const float hf = round_to<T>(load(x_row + i) + load(residual_row + i));  // h in x's dtype, as Meta's
        store_exact(h_row + i, hf);
        sum_squares += hf * hf;
      }
      normed_input = h_row;
    } else {
#pragma omp simd reduction(+ : sum_squares)
      for (int64_t i = 0; i < n; ++i) {
        const float hf = load(x_row + i);
        sum_squares += hf * hf;
      }
    }
    const float rstd = 1.0f / std::sqrt(sum_squares / static_cast<float>(n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float normed = round_to<T>(load(normed_input + i) * rstd);  // Meta's .type_as(x)
      store(y_row + i, normed * load(w + i));
    }
  }
}

// fp16 rows are staged through float arrays, a chunk of the row at a time (dtypes.h's for_each_chunk), so that every
// conversion is an array conversion (dtypes.h: F16C, one instruction per vector) and the arithmetic is plain float
// loops. In the fused loops above an fp16 conversion is the portable bit-level one, about a dozen instructions per
// vector: the forward ran at a fifth of bf16's speed.

template <typename W>
void rms_norm_staged(const fp16* x, int64_t x_row_stride, const fp16* residual, int64_t residual_row_stride,
                     const W* weight, promoted_t<fp16, W>* y, int64_t y_row_stride, fp16* h, int64_t h_row_stride,
                     int64_t rows, int64_t n, float eps) {
  std::vector<float> weight_values(n);  // converted once per call
  convert(weight, weight_values.data(), n);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const fp16* x_row = x + row * x_row_stride;
    fp16* h_row = residual != nullptr ? h + row * h_row_stride : nullptr;  // h is null without a residual
    alignas(64) float sum_squares[kChunk] = {};  // per lane: a sum across the chunk would be a shuffle per chunk
    for_each_chunk(n, [&](int64_t start, int64_t width) {
      alignas(64) float values[kChunk];
      convert(x_row + start, values, width);
      if (residual != nullptr) {
        alignas(64) float residual_values[kChunk];
        convert(residual + row * residual_row_stride + start, residual_values, width);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) values[i] += residual_values[i];
        convert(values, h_row + start, width);  // h in x's dtype, as Meta's
        convert(h_row + start, values, width);
      }
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) sum_squares[i] += values[i] * values[i];
    });
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < kChunk; ++i) sum += sum_squares[i];
    const float rstd = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
    const fp16* normed_input = residual != nullptr ? h_row : x_row;  // h, the row that is normalized
    for_each_chunk(n, [&](int64_t start, int64_t width) {
      alignas(64) float values[kChunk];
      convert(normed_input + start, values, width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) values[i] *= rstd;
      alignas(64) fp16 rounded[kChunk];
      convert(values, rounded, width);  // Meta's .type_as(x)
      convert(rounded, values, width);
      const float* w = weight_values.data() + start;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) values[i] *= w[i];
      convert(values, y + row * y_row_stride + start, width);
    });
  }
}

}  // namespace

template <CpuIsa P, typename T, typename W>
void rms_norm(const T* x, int64_t x_row_stride, const T* residual, int64_t residual_row_stride, const W* weight,
              promoted_t<T, W>* y, int64_t y_row_stride, T* h, int64_t h_row_stride, int64_t rows, int64_t n,
              float eps) {
  if constexpr (std::is_same_v<T, fp16>) {
    rms_norm_staged(x, x_row_stride, residual, residual_row_stride, weight, y, y_row_stride, h, h_row_stride, rows, n,
                    eps);
  } else {
    rms_norm_fused(x, x_row_stride, residual, residual_row_stride, weight, y, y_row_stride, h, h_row_stride, rows, n,
                   eps);
  }
}

namespace {

// The second pass of the backward over one row, from cache: dx, and the row's dweight contribution added to
// dweight_partial. HasDh (the gradient reaching h directly) is a template argument so that the loop has no branch.
template <bool HasDh, typename T, typename W, typename Out>
inline void backward_row(const Out* __restrict dy_row, const T* __restrict dh_row, const T* __restrict h_row,
                         const W* __restrict w, T* __restrict dx_row, float* __restrict dweight_partial, int64_t n,
                         float rstd, float mean_gn) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float dyf = load(dy_row + i);
    const float normed = load(h_row + i) * rstd;
    float dxf = rstd * (dyf * load(w + i) - normed * mean_gn);
    if constexpr (HasDh) dxf += load(dh_row + i);
    store(dx_row + i, dxf);
    dweight_partial[i] += dyf * round_to<T>(normed);
  }
}

// The backward's fp16 rows, staged as the forward's (rms_norm_staged); w is the weight as floats.
// First pass: the row's sums of h^2 and of dy * w * h.
template <typename Out>
inline void backward_sums_staged(const Out* dy_row, const fp16* h_row, const float* w, int64_t n, float& sum_squares,
                                 float& sum_gh) {
  alignas(64) float squares[kChunk] = {}, products[kChunk] = {};  // per lane, as in rms_norm_staged
  for_each_chunk(n, [&](int64_t start, int64_t width) {
    alignas(64) float hf[kChunk], dyf[kChunk];
    convert(h_row + start, hf, width);
    convert(dy_row + start, dyf, width);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      squares[i] += hf[i] * hf[i];
      products[i] += dyf[i] * w[start + i] * hf[i];
    }
  });
  sum_squares = 0.0f;
  sum_gh = 0.0f;
#pragma omp simd reduction(+ : sum_squares, sum_gh)
  for (int64_t i = 0; i < kChunk; ++i) {
    sum_squares += squares[i];
    sum_gh += products[i];
  }
}

// Second pass, as backward_row.
template <bool HasDh, typename Out>
inline void backward_row_staged(const Out* dy_row, const fp16* dh_row, const fp16* h_row, const float* w,
                                fp16* dx_row, float* __restrict dweight_partial, int64_t n, float rstd,
                                float mean_gn) {
  for_each_chunk(n, [&](int64_t start, int64_t width) {
    alignas(64) float dyf[kChunk], normed[kChunk], dxf[kChunk];
    convert(dy_row + start, dyf, width);
    convert(h_row + start, normed, width);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      normed[i] *= rstd;
      dxf[i] = rstd * (dyf[i] * w[start + i] - normed[i] * mean_gn);
    }
    if constexpr (HasDh) {
      alignas(64) float dhf[kChunk];
      convert(dh_row + start, dhf, width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) dxf[i] += dhf[i];
    }
    convert(dxf, dx_row + start, width);
    alignas(64) fp16 rounded[kChunk];
    convert(normed, rounded, width);  // normed rounded to T, as in the forward
    convert(rounded, normed, width);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) dweight_partial[start + i] += dyf[i] * normed[i];
  });
}

}  // namespace

// Row blocks of the dweight reduction: a fixed number, so the sum's order does not depend on the thread count.
constexpr int64_t kMaxRowBlocks = 128;
// Columns of dweight per step of the final reduction: the block partials are added a cache-sized strip at a time.
constexpr int64_t kReduceColumns = 1024;

template <CpuIsa P, typename T, typename W>
void rms_norm_backward(const promoted_t<T, W>* dy, int64_t dy_row_stride, const T* dh, int64_t dh_row_stride,
                       const T* h, int64_t h_row_stride, const W* weight, T* dx, int64_t dx_row_stride, W* dweight,
                       int64_t rows, int64_t n, float eps) {
  using Out = promoted_t<T, W>;
  if (rows == 0) {  // an empty sum
    for (int64_t i = 0; i < n; ++i) dweight[i] = from_float<W>(0.0f);
    return;
  }
  const int64_t rows_per_block = std::max<int64_t>(1, (rows + kMaxRowBlocks - 1) / kMaxRowBlocks);
  const int64_t n_blocks = (rows + rows_per_block - 1) / rows_per_block;
  // Uninitialized: each block zeroes its own partial row in the parallel loop (a serial zeroing of the whole
  // buffer cost as much as a tenth of the backward at 1024 x 4096), and that row is then warm in cache.
  std::unique_ptr<float[]> dweight_partials(new float[static_cast<size_t>(n_blocks * n)]);
  const float inv_n = 1.0f / static_cast<float>(n);
  constexpr bool kStaged = std::is_same_v<T, fp16>;
  std::vector<float> weight_values(kStaged ? n : 0);  // the staged rows' weight, converted once per call
  if constexpr (kStaged) convert(weight, weight_values.data(), n);

#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t block = 0; block < n_blocks; ++block) {
      float* __restrict dweight_partial = dweight_partials.get() + block * n;
      std::fill(dweight_partial, dweight_partial + n, 0.0f);
      const W* __restrict w = weight;
      const int64_t row_end = std::min(rows, (block + 1) * rows_per_block);
      for (int64_t row = block * rows_per_block; row < row_end; ++row) {
        const Out* __restrict dy_row = dy + row * dy_row_stride;
        const T* __restrict h_row = h + row * h_row_stride;
        const T* dh_row = dh != nullptr ? dh + row * dh_row_stride : nullptr;
        T* __restrict dx_row = dx + row * dx_row_stride;
        // First pass: the row's statistics (rstd recomputed from h, the only thing the forward saved).
        float sum_squares = 0.0f, sum_gh = 0.0f;
        if constexpr (kStaged) {
          backward_sums_staged(dy_row, h_row, weight_values.data(), n, sum_squares, sum_gh);
        } else {
#pragma omp simd reduction(+ : sum_squares, sum_gh)
          for (int64_t i = 0; i < n; ++i) {
            const float hf = load(h_row + i);
            sum_squares += hf * hf;
            sum_gh += load(dy_row + i) * load(w + i) * hf;
          }
        }
        const float rstd = 1.0f / std::sqrt(sum_squares * inv_n + eps);
        const float mean_gn = sum_gh * rstd * inv_n;  // mean(g * normed)
        if constexpr (kStaged) {
          if (dh_row != nullptr) {
            backward_row_staged<true>(dy_row, dh_row, h_row, weight_values.data(), dx_row, dweight_partial, n, rstd,
                                      mean_gn);
          } else {
            backward_row_staged<false>(dy_row, dh_row, h_row, weight_values.data(), dx_row, dweight_partial, n, rstd,
                                       mean_gn);
          }
        } else if (dh_row != nullptr) {
          backward_row<true>(dy_row, dh_row, h_row, w, dx_row, dweight_partial, n, rstd, mean_gn);
        } else {
          backward_row<false>(dy_row, dh_row, h_row, w, dx_row, dweight_partial, n, rstd, mean_gn);
        }
      }
    }

    // dweight = the partials summed block after block (the same order for every thread count), a strip of
    // columns per iteration: the inner loop runs along a row, so it vectorizes; strip 0 accumulates in place.
#pragma omp for schedule(static)
    for (int64_t start = 0; start < n; start += kReduceColumns) {
      const int64_t width = std::min(kReduceColumns, n - start);
      float* __restrict sum = dweight_partials.get() + start;
      for (int64_t block = 1; block < n_blocks; ++block) {
        const float* __restrict partial = dweight_partials.get() + block * n + start;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) sum[i] += partial[i];
      }
      W* __restrict out = dweight + start;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) store(out + i, sum[i]);
    }
  }
}

#define INSTANTIATE_RMS_NORM(T, W)                                                                                     \
  template void rms_norm<kIsaPath, T, W>(const T*, int64_t, const T*, int64_t, const W*, promoted_t<T, W>*, int64_t,   \
                                         T*, int64_t, int64_t, int64_t, float);                                        \
  template void rms_norm_backward<kIsaPath, T, W>(const promoted_t<T, W>*, int64_t, const T*, int64_t, const T*,       \
                                                  int64_t, const W*, T*, int64_t, W*, int64_t, int64_t, float);        \

INSTANTIATE_RMS_NORM(float, float)
INSTANTIATE_RMS_NORM(bf16, bf16)
INSTANTIATE_RMS_NORM(fp16, fp16)
INSTANTIATE_RMS_NORM(bf16, float)
INSTANTIATE_RMS_NORM(fp16, float)

#undef INSTANTIATE_RMS_NORM

}  // namespace llama_kernels::cpu
