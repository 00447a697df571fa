// The torch-level ops of the native extension: memory checks (glue.h), dtype dispatch, allocation, and the
// call into a kernel of csrc/cpu (raw pointers) or csrc/cuda (raw pointers, CUDA headers only).
// bindings.cpp registers each under the namespace llama_kernels_C with TORCH_LIBRARY; Python reaches
// them as torch.ops.llama_kernels_C.<name>. The semantics are llama_kernels/reference.py's:
//   every computation in fp32, results rounded once to the output dtype; tensors fp32, bf16 or fp16.
#pragma once

#include <torch/types.h>

#include <optional>
#include <tuple>

namespace llama_kernels {

// RMSNorm. x, residual: (rows, n) with the last dim contiguous (any row stride); weight: (n,).
// h = x + residual (rounded to x's dtype) when residual is given, else x; y = (h * rstd -> x's dtype) * weight,
// in promote(x.dtype, weight.dtype). Returns (y, h); h is an empty (0-element) tensor without a residual.
std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps);
// Gradients of rms_norm for dy (rows, n) w.r.t. h (rows, n), plus dh (the gradient reaching h directly, the
// residual stream's) if given: dx = rstd * (g - n * mean(g * n)) + dh with g = dy * weight, n = h * rstd;
// dweight = sum over rows of dy * (n rounded to h's dtype), fp32 accumulation, in weight's dtype.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                                         const at::Tensor& h, const at::Tensor& weight, double eps);

// RoPE, q (B, S, Hq, D) and k (B, S, Hk, D) (last dim contiguous, any other strides) rotated into q_out and k_out
// (same shapes; may be q and k themselves: in place) at positions (B, S) int64, angle = position * inv_freq[i]
// computed in inv_freq's dtype (float32 or float64; float64 angles reduced mod 2*pi before the fp32 cos/sin),
// cos and sin scaled by attention_factor, negated sin when inverse (the backward). interleaved: pairs
// (x[2i], x[2i+1]); else (x[i], x[i + D/2]).
void rope_cpu(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& positions, const at::Tensor& inv_freq, double attention_factor, bool interleaved,
              bool inverse);

// SwiGLU, gate and up (rows, n) of one dtype with the last dim contiguous (any row stride: the halves of one fused
// projection): y = silu(gate) * up, silu(g) = g / (1 + exp(-g)), in gate's dtype. The backward, for dy (rows, n):
// (dgate, dup) = (dy * up * s * (1 + gate * (1 - s)), dy * gate * s) with s = sigmoid(gate). Outputs contiguous.
at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& dy, const at::Tensor& gate,
                                                       const at::Tensor& up);

// Attention, q (B, Sq, Hq, D), k and v (B, Sk, Hk, D), last dim contiguous, Hq a multiple of Hk, GQA without
// expanding k and v. Causal is bottom-right (query i sees keys j <= i + Sk - Sq). Returns o (B, Sq, Hq, D) in q's
// dtype and lse (B, Hq, Sq) fp32 (natural log; -inf and zero output for a query that sees no key). O(S) memory:
// tiled online softmax over key blocks.
std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double softmax_scale);
// Decoding over a cache: q (B, Sq, Hq, D) against k_cache, v_cache (B, S_max, Hk, D), of which sequence b holds
// seqlens_k[b] (int32) tokens; causal bottom-right within those. Returns (o, lse) as attention_cpu. With a
// block_table (B, max_blocks_per_seq) int32 the caches are pools of pages (num_pages, block_size, Hk, D) and
// position p of sequence b is row p % block_size of page block_table[b, p / block_size] (S_max: max_blocks_per_seq
// * block_size); the pages a sequence's seqlens_k[b] tokens reach must be in the pool (checked).
std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                         bool causal, double softmax_scale,
                                                         const std::optional<at::Tensor>& block_table);

// The gradients of attention_cpu's (o, lse) for do (like q) and dlse (like lse, optional), given q, k, v and the
// forward's o and lse: (dq, dk, dv) in the dtypes and shapes of q, k, v, contiguous. O(S) memory, deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, bool causal, double softmax_scale);

// The fused cross-entropy's step on one chunk of rows: logits (rows, vocab) fp32 (contiguous last dim), target (rows,)
// int64; returns (loss, lse), each (rows,) fp32, and with dz (rows, vocab) fp32 or bf16 (may be logits itself) and
// row_scale (rows,) fp32 writes the gradient of the logits into dz: the kernel's contract, csrc/cpu/kernels.h.
std::tuple<at::Tensor, at::Tensor> cross_entropy_step_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& row_scale,
                                                          int64_t ignore_index, double label_smoothing,
                                                          const std::optional<at::Tensor>& dz);
// bf16 products with fp32 accumulation and output (the fused cross-entropy's matmuls on the CPU). pack_pairs: b (K, N)
// bf16, any strides, as ((K + 1) / 2, N, 2): rows 2p and 2p + 1 interleaved (the micro-kernel's layout; a zero row
// pads an odd K). bf16_matmul: out (M, N) fp32 = a (M, K) bf16 (contiguous last dim) @ b, given b_pairs =
// pack_pairs(b); added to out's values when accumulate. Needs bf16_matmul_available(): AVX-512 and torch's oneDNN.
at::Tensor pack_pairs_cpu(const at::Tensor& b);
void bf16_matmul_cpu(const at::Tensor& a, const at::Tensor& b_pairs, at::Tensor& out, bool accumulate);
bool bf16_matmul_available();

#ifdef LLAMA_KERNELS_WITH_CUDA
// The CUDA kernels, same contracts as the CPU ops above.
std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                 const at::Tensor& weight, double eps);
void rope_cuda(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& positions, const at::Tensor& inv_freq, double attention_factor, bool interleaved,
               bool inverse);
#endif

}  // namespace llama_kernels
