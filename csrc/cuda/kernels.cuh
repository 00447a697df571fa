// Host launchers of the CUDA kernels, on raw device pointers, element strides and a stream: no torch headers,
// so the kernels build and are tested without torch (csrc/tests/test_cuda_kernels.cu). csrc/torch/cuda_ops.cpp
// checks the tensors and calls these. Semantics are llama_kernels/reference.py's: fp32 math, one rounding.
// Each launcher enqueues its kernel on `stream` and returns; a launch error is left for cudaGetLastError().
//
// Build: the kernels call the accurate sincosf/rsqrtf; do not compile them with --use_fast_math.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace llama_kernels::cuda {

// RMSNorm forward, per row r < rows of n elements (the last dim contiguous, rows `stride_*` elements apart):
//   h = x + residual, rounded to T (only when residual is not null; h is then written, else h may be null)
//   y = (h * rstd rounded to T) * weight, rounded to promoted_t<T, W>;  rstd = 1 / sqrt(mean(h^2) + eps)
// h may alias x or residual (each element is read before it is written, by the same thread).
// Rows up to 8192 wide are held in registers (one read, one write); wider rows take a second pass over h.
// Deterministic: the sum of squares is reduced in a fixed order.
template <typename T, typename W>
void launch_rms_norm(const T* x, const T* residual, const W* weight, promoted_t<T, W>* y, T* h, int64_t rows,
                     int64_t n, int64_t stride_x, int64_t stride_residual, int64_t stride_y, int64_t stride_h,
                     float eps, cudaStream_t stream);

// RoPE on q (batch, seqlen, n_q_heads, head_dim) and k (batch, seqlen, n_k_heads, head_dim) in one launch, written
// to q_out and k_out (same shapes; may be q and k themselves). Token (b, s) is at position
// positions[b * positions_stride_batch + s * positions_stride_token]; angle_i = position * inv_freq[i] in F
// (float or double; a double angle is reduced mod 2*pi before the float cos/sin), i < head_dim / 2.
// cos and sin are scaled by attention_factor, and sin negated when inverse (the backward).
// interleaved: pairs (x[2i], x[2i+1]) (Meta); else (x[i], x[i + head_dim/2]) (Hugging Face). head_dim is even.
template <typename T, typename F>
void launch_rope(const T* q, const T* k, T* q_out, T* k_out, const int64_t* positions, const F* inv_freq,
                 int64_t batch, int64_t seqlen, int64_t n_q_heads, int64_t n_k_heads, int64_t head_dim,
                 HeadStrides q_strides, HeadStrides k_strides, HeadStrides q_out_strides, HeadStrides k_out_strides,
                 int64_t positions_stride_batch, int64_t positions_stride_token, float attention_factor,
                 bool interleaved, bool inverse, cudaStream_t stream);

}  // namespace llama_kernels::cuda
