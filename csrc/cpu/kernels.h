// The CPU kernels on raw pointers, without torch headers; csrc/torch wraps them as torch ops.
// Storage types are float, bf16 and fp16 (dtypes.h); every computation is in float, rounded once to the output.
// Sizes and strides are in elements, int64_t. Kernels parallelize with OpenMP.
// Each kernel's first template argument is the instruction-set path it runs (cpu/isa.h), instantiated for every
// path: callers pick one with on_isa(cpu_isa(), ...).
#pragma once

#include <cstdint>

#include "cpu/dtypes.h"
#include "cpu/isa.h"
#include "kernel_types.h"

namespace llama_kernels::cpu {

// ============================================================================ RMSNorm and RoPE

// Rows of n elements, the elements of a row contiguous, row i at data + i * row_stride.
// h = x + residual rounded to T (when residual is given; h is then written, else h is x and may be null);
// y = (h * rstd rounded to T) * weight, rstd = 1 / sqrt(mean(h^2) + eps).
// Instantiated for (T, W) = (float, float), (bf16, bf16), (fp16, fp16), (bf16, float), (fp16, float).
template <CpuIsa P, typename T, typename W>
void rms_norm(const T* x, int64_t x_row_stride, const T* residual, int64_t residual_row_stride, const W* weight,
              promoted_t<T, W>* y, int64_t y_row_stride, T* h, int64_t h_row_stride, int64_t rows, int64_t n,
              float eps);

// Gradients of rms_norm w.r.t. h and weight for dy; dh (may be null) is a gradient reaching h directly, added
// before dx is rounded. dweight = sum over rows of dy * (h * rstd rounded to T), accumulated in float over fixed
// blocks of rows summed in order: the same bits for any thread count. Same instantiations as rms_norm.
template <CpuIsa P, typename T, typename W>
void rms_norm_backward(const promoted_t<T, W>* dy, int64_t dy_row_stride, const T* dh, int64_t dh_row_stride,
                       const T* h, int64_t h_row_stride, const W* weight, T* dx, int64_t dx_row_stride, W* dweight,
                       int64_t rows, int64_t n, float eps);

// One of q and k for rope: src rotated into dst (dst may be src: in place; otherwise they must not overlap).
template <typename T>
struct RopeOperand {
  const T* src;
  HeadStrides src_strides;
  T* dst;
  HeadStrides dst_strides;
  int64_t n_heads;
};

// Rotates q and k at positions[b * positions_stride_batch + s * positions_stride_token] by the angles
// position * inv_freq[i] (i < head_dim / 2), formed in AngleT (float: Meta's and HF's fp32 product; double:
// reduced in fp64 before the float cos/sin). cos and sin are scaled by attention_factor, sin negated when
// inverse. interleaved: pairs (x[2i], x[2i+1]); else (x[i], x[i + head_dim/2]). head_dim even.
// Instantiated for T in {float, bf16, fp16} x AngleT in {float, double}.
template <CpuIsa P, typename T, typename AngleT>
void rope(const RopeOperand<T>& q, const RopeOperand<T>& k, const int64_t* positions, int64_t positions_stride_batch,
          int64_t positions_stride_token, const AngleT* inv_freq, int64_t batch, int64_t seqlen, int64_t head_dim,
          float attention_factor, bool interleaved, bool inverse);

// ============================================================================ end of RMSNorm and RoPE

// ============================================================================ SwiGLU

// Rows of n elements, the elements of a row contiguous, row i of each operand at its pointer + i * its row stride
// (gate and up may be the two halves of one fused projection's rows). y = silu(gate) * up, silu(g) = g / (1 + e^-g).
// Instantiated for T in {float, bf16, fp16}.
template <CpuIsa P, typename T>
void swiglu(const T* gate, int64_t gate_row_stride, const T* up, int64_t up_row_stride, T* y, int64_t y_row_stride,
            int64_t rows, int64_t n);

// Gradients of swiglu for dy, with s = sigmoid(gate): dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s.
template <CpuIsa P, typename T>
void swiglu_backward(const T* dy, int64_t dy_row_stride, const T* gate, int64_t gate_row_stride, const T* up,
                     int64_t up_row_stride, T* dgate, int64_t dgate_row_stride, T* dup, int64_t dup_row_stride,
                     int64_t rows, int64_t n);

// ============================================================================ end of SwiGLU

// ============================================================================ the fused cross-entropy's step

// Rows of vocab fp32 logits z (row i at logits + i * logits_row_stride), each with its target t = target[i]:
// lse[i] = log sum_j e^z_j; loss[i] = lse - (1 - e) z_t - e mean_j(z_j) (0 where t == ignore_index), e the label
// smoothing. With dz (else null): dz_j = (softmax(z)_j - e / vocab - (1 - e) [j == t]) * row_scale[i] (0 for an
// ignored row), in DZ; a float dz may be the logits themselves. A t outside [0, vocab) that is not ignore_index is
// never read: its loss and dz are nan. Instantiated for DZ in {float, bf16}.
template <CpuIsa P, typename DZ>
void cross_entropy_step(const float* logits, int64_t logits_row_stride, const int64_t* target,
                        const float* row_scale, int64_t ignore_index, float label_smoothing, float* loss, float* lse,
                        DZ* dz, int64_t dz_row_stride, int64_t rows, int64_t vocab);

// ============================================================================ end of the fused cross-entropy's step

}  // namespace llama_kernels::cpu
