// RMSNorm forward, optionally fused with the residual add (see launch_rms_norm in kernels.cuh). One block per row.
// The op is memory bound: each element of x (and residual) is read once, h and y written once, when the row fits
// in registers (up to kMaxRowInRegisters columns: Code Llama's 4096, 5120 and 8192). Wider rows take two passes, the
// second re-reading h (or x), mostly from L2.
#include "device_utils.cuh"
#include "kernels.cuh"

namespace llama_kernels::cuda {
namespace {

constexpr int kMaxRowInRegisters = 8192;
// Row elements held per thread: with 16 of them, an 8192-wide row takes 512 threads, and the 16 floats, plus a
// pack of weight or output in flight, stay well clear of spilling.
constexpr int kElemsPerThread = 16;
constexpr int kMaxThreadsInRegisters = kMaxRowInRegisters / kElemsPerThread;
constexpr int kThreadsStreaming = 512;

// Row `row` of x, residual and h; without a residual those two are null (no offset from a null pointer).
// 64-bit offsets: row * stride passes 2^31 at 100k tokens of 8192.
template <typename T>
struct RowPointers {
  const T* x;
  const T* residual;
  T* h;
};

template <typename T, bool HAS_RESIDUAL>
__device__ __forceinline__ RowPointers<T> row_pointers(const T* x, const T* residual, T* h, int64_t row,
                                                       int64_t stride_x, int64_t stride_residual, int64_t stride_h) {
  if constexpr (HAS_RESIDUAL) return {x + row * stride_x, residual + row * stride_residual, h + row * stride_h};
  return {x + row * stride_x, nullptr, nullptr};
}

// Loads pack `v` of the row as floats: x, or h = x + residual, stored rounded to T (as torch rounds x + residual)
// and returned as that rounded value, which is what the statistics and y see.
template <typename T, int VEC, bool VECTORIZED, bool HAS_RESIDUAL>
__device__ __forceinline__ void load_h(const T* x_row, const T* residual_row, T* h_row, int64_t v, float (&h)[VEC]) {
  load_floats<T, VEC, VECTORIZED>(x_row + v * VEC, h);
  if constexpr (HAS_RESIDUAL) {
    float r[VEC];
    load_floats<T, VEC, VECTORIZED>(residual_row + v * VEC, r);
#pragma unroll
    for (int e = 0; e < VEC; ++e) h[e] = to_float(from_float<T>(h[e] + r[e]));
    store_floats<T, VEC, VECTORIZED>(h_row + v * VEC, h);
  }
}

// y = cast(h * rstd, T) * weight in Out: Meta's `.type_as(x)` before the weight.
template <typename T, typename W, typename Out, int VEC, bool VECTORIZED>
__device__ __forceinline__ void store_y(const W* weight, Out* y_row, int64_t v, const float (&h)[VEC], float rstd) {
  float w[VEC];
  load_floats<W, VEC, VECTORIZED>(weight + v * VEC, w);
  float y[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) y[e] = to_float(from_float<T>(h[e] * rstd)) * w[e];
  store_floats<Out, VEC, VECTORIZED>(y_row + v * VEC, y);
}

// The row in registers: thread t holds packs t, t + blockDim.x, ... (coalesced), at most kElemsPerThread elements.
template <typename T, typename W, int VEC, bool VECTORIZED, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kMaxThreadsInRegisters)
    rms_norm_row_in_registers_kernel(const T* x, const T* residual, const W* __restrict__ weight,
                                     promoted_t<T, W>* y, T* h, int n, int64_t stride_x, int64_t stride_residual,
                                     int64_t stride_y, int64_t stride_h, float eps) {
  constexpr int kPacksPerThread = kElemsPerThread / VEC;
  __shared__ float warp_sums[32];
  const int64_t row = blockIdx.x;
  const RowPointers<T> in = row_pointers<T, HAS_RESIDUAL>(x, residual, h, row, stride_x, stride_residual, stride_h);
  const int n_packs = n / VEC;

  float row_values[kPacksPerThread][VEC];
  float sum_sq = 0.0f;
#pragma unroll
  for (int p = 0; p < kPacksPerThread; ++p) {
    const int v = threadIdx.x + p * blockDim.x;
    if (v < n_packs) {
      load_h<T, VEC, VECTORIZED, HAS_RESIDUAL>(in.x, in.residual, in.h, v, row_values[p]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum_sq += row_values[p][e] * row_values[p][e];
    }
  }
  const float rstd = rsqrtf(block_sum(sum_sq, warp_sums) / static_cast<float>(n) + eps);

  promoted_t<T, W>* y_row = y + row * stride_y;
#pragma unroll
  for (int p = 0; p < kPacksPerThread; ++p) {
    const int v = threadIdx.x + p * blockDim.x;
    if (v < n_packs) store_y<T, W, promoted_t<T, W>, VEC, VECTORIZED>(weight, y_row, v, row_values[p], rstd);
  }
}

// Rows wider than kMaxRowInRegisters: the first pass forms h and sums its squares, the second re-reads h (what the
// first pass stored, or x without a residual) and writes y. Each thread re-reads only the elements it wrote.
template <typename T, typename W, int VEC, bool VECTORIZED, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kThreadsStreaming)
    rms_norm_streaming_kernel(const T* x, const T* residual, const W* __restrict__ weight, promoted_t<T, W>* y, T* h,
                              int n, int64_t stride_x, int64_t stride_residual, int64_t stride_y, int64_t stride_h,
                              float eps) {
  __shared__ float warp_sums[32];
  const int64_t row = blockIdx.x;
  const RowPointers<T> in = row_pointers<T, HAS_RESIDUAL>(x, residual, h, row, stride_x, stride_residual, stride_h);
  const int n_packs = n / VEC;

  float sum_sq = 0.0f;
  for (int v = threadIdx.x; v < n_packs; v += blockDim.x) {
    float values[VEC];
    load_h<T, VEC, VECTORIZED, HAS_RESIDUAL>(in.x, in.residual, in.h, v, values);
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum_sq += values[e] * values[e];
  }
  const float rstd = rsqrtf(block_sum(sum_sq, warp_sums) / static_cast<float>(n) + eps);

  const T* normalized_row = HAS_RESIDUAL ? in.h : in.x;
  promoted_t<T, W>* y_row = y + row * stride_y;
  for (int v = threadIdx.x; v < n_packs; v += blockDim.x) {
    float values[VEC];
    load_floats<T, VEC, VECTORIZED>(normalized_row + v * VEC, values);
    store_y<T, W, promoted_t<T, W>, VEC, VECTORIZED>(weight, y_row, v, values, rstd);
  }
}

template <typename T, typename W, int VEC, bool VECTORIZED, bool HAS_RESIDUAL>
void launch_for_layout(const T* x, const T* residual, const W* weight, promoted_t<T, W>* y, T* h, int64_t rows,
                       int n, int64_t stride_x, int64_t stride_residual, int64_t stride_y, int64_t stride_h,
                       float eps, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  if (n <= kMaxRowInRegisters) {
    // Just enough whole warps for kElemsPerThread elements each: a 4096-wide row gets 256 threads.
    const int per_thread_packs = kElemsPerThread / VEC;
    const int n_packs = n / VEC;
    const int threads = ((n_packs + per_thread_packs - 1) / per_thread_packs + 31) / 32 * 32;
    rms_norm_row_in_registers_kernel<T, W, VEC, VECTORIZED, HAS_RESIDUAL><<<grid, threads, 0, stream>>>(
        x, residual, weight, y, h, n, stride_x, stride_residual, stride_y, stride_h, eps);
  } else {
    rms_norm_streaming_kernel<T, W, VEC, VECTORIZED, HAS_RESIDUAL><<<grid, kThreadsStreaming, 0, stream>>>(
        x, residual, weight, y, h, n, stride_x, stride_residual, stride_y, stride_h, eps);
  }
}

template <typename T, typename W, bool HAS_RESIDUAL>
void launch_with_residual(const T* x, const T* residual, const W* weight, promoted_t<T, W>* y, T* h, int64_t rows,
                          int n, int64_t stride_x, int64_t stride_residual, int64_t stride_y, int64_t stride_h,
                          float eps, cudaStream_t stream) {
  using Out = promoted_t<T, W>;
  constexpr int kVec = kElemsPer16Bytes<T>;
  // 16-byte accesses need every row of every operand on its pack's boundary, and whole packs per row.
  bool aligned = n % kVec == 0 && rows_aligned(x, stride_x, kPackAlignment<T, kVec>) &&
                 rows_aligned(weight, 0, kPackAlignment<W, kVec>) && rows_aligned(y, stride_y, kPackAlignment<Out, kVec>);
  if constexpr (HAS_RESIDUAL) {
    aligned = aligned && rows_aligned(residual, stride_residual, kPackAlignment<T, kVec>) &&
              rows_aligned(h, stride_h, kPackAlignment<T, kVec>);
  }
  if (aligned) {
    launch_for_layout<T, W, kVec, true, HAS_RESIDUAL>(x, residual, weight, y, h, rows, n, stride_x, stride_residual,
                                                      stride_y, stride_h, eps, stream);
  } else {
    launch_for_layout<T, W, 1, false, HAS_RESIDUAL>(x, residual, weight, y, h, rows, n, stride_x, stride_residual,
                                                    stride_y, stride_h, eps, stream);
  }
}

}  // namespace

template <typename T, typename W>
void launch_rms_norm(const T* x, const T* residual, const W* weight, promoted_t<T, W>* y, T* h, int64_t rows,
                     int64_t n, int64_t stride_x, int64_t stride_residual, int64_t stride_y, int64_t stride_h,
                     float eps, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  // Columns are indexed in int within a row (the glue checks n < 2^31); rows are the 1-D grid.
  const int n_cols = static_cast<int>(n);
  if (residual != nullptr) {
    launch_with_residual<T, W, true>(x, residual, weight, y, h, rows, n_cols, stride_x, stride_residual, stride_y,
                                     stride_h, eps, stream);
  } else {
    launch_with_residual<T, W, false>(x, residual, weight, y, h, rows, n_cols, stride_x, stride_residual, stride_y,
                                      stride_h, eps, stream);
  }
}

#define LLAMA_KERNELS_INSTANTIATE_RMS_NORM(T, W)                                                                  \
  template void launch_rms_norm<T, W>(const T*, const T*, const W*, promoted_t<T, W>*, T*, int64_t, int64_t,    \
                                      int64_t, int64_t, int64_t, int64_t, float, cudaStream_t);
#define LLAMA_KERNELS_INSTANTIATE_RMS_NORM_FOR_X(T) \
  LLAMA_KERNELS_INSTANTIATE_RMS_NORM(T, float)      \
  LLAMA_KERNELS_INSTANTIATE_RMS_NORM(T, __nv_bfloat16) \
  LLAMA_KERNELS_INSTANTIATE_RMS_NORM(T, __half)
LLAMA_KERNELS_INSTANTIATE_RMS_NORM_FOR_X(float)
LLAMA_KERNELS_INSTANTIATE_RMS_NORM_FOR_X(__nv_bfloat16)
LLAMA_KERNELS_INSTANTIATE_RMS_NORM_FOR_X(__half)
#undef LLAMA_KERNELS_INSTANTIATE_RMS_NORM_FOR_X
#undef LLAMA_KERNELS_INSTANTIATE_RMS_NORM

}  // namespace llama_kernels::cuda
