// Device helpers shared by the kernels of csrc/cuda: conversions to and from float, packed vector accesses, and the
// block reduction. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace llama_kernels::cuda {

// Every value is upcast as it is loaded and rounded once, to nearest even, as it is stored (torch's casts).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Elements of T per 16-byte access, the widest global load and store.
template <typename T>
inline constexpr int kElemsPer16Bytes = static_cast<int>(16 / sizeof(T));

// N consecutive elements accessed as one unit. VECTORIZED: aligned to min(16, N * sizeof(T)) bytes, so the compiler
// emits 16-byte (or narrower, for fewer bytes) vector accesses; 32 bytes of float become two 16-byte accesses.
// Otherwise aligned as T alone: N scalar accesses, for rows at any offset.
template <typename T, int N, bool VECTORIZED>
struct alignas(VECTORIZED ? (N * sizeof(T) < 16 ? N * sizeof(T) : 16) : sizeof(T)) Pack {
  T elems[N];
};

// Byte alignment the launchers require of every row of a VECTORIZED Pack<T, N>.
template <typename T, int N>
inline constexpr int64_t kPackAlignment = N * sizeof(T) < 16 ? N * sizeof(T) : 16;

// Whether the rows at ptr + r * stride (elements) all start on an `alignment`-byte boundary.
template <typename T>
inline bool rows_aligned(const T* ptr, int64_t stride, int64_t alignment) {
  return reinterpret_cast<uintptr_t>(ptr) % alignment == 0 && (stride * static_cast<int64_t>(sizeof(T))) % alignment == 0;
}

template <typename T, int N, bool VECTORIZED>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[N]) {
  const Pack<T, N, VECTORIZED> pack = *reinterpret_cast<const Pack<T, N, VECTORIZED>*>(ptr);
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = to_float(pack.elems[e]);
}

template <typename T, int N, bool VECTORIZED>
__device__ __forceinline__ void store_floats(T* ptr, const float (&values)[N]) {
  Pack<T, N, VECTORIZED> pack;
#pragma unroll
  for (int e = 0; e < N; ++e) pack.elems[e] = from_float<T>(values[e]);
  *reinterpret_cast<Pack<T, N, VECTORIZED>*>(ptr) = pack;
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum of `value` over the block (blockDim.x a multiple of 32), returned to every thread. Warps reduce by shuffles,
// then every warp reduces the per-warp sums itself, which saves a second barrier for a broadcast. Call it once per
// kernel: warp_sums is not reset. The order of the additions is fixed, so the result is the same on every run.
__device__ __forceinline__ float block_sum(float value, float* warp_sums /* __shared__ [32] */) {
  value = warp_sum(value);
  const int lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[threadIdx.x >> 5] = value;
  __syncthreads();
  const int n_warps = blockDim.x >> 5;
  return warp_sum(lane < n_warps ? warp_sums[lane] : 0.0f);
}

}  // namespace llama_kernels::cuda
