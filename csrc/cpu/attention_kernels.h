// Flash-attention forward and backward on the CPU, on raw pointers, without torch headers (kernels in
// attention_kernels.cpp and attention_backward.cpp; csrc/torch/attention.cpp is the torch glue). Semantics are
// llama_kernels/reference.py's `attention`: GQA (query head h reads kv head
// h / (n_q_heads / n_kv_heads)), bottom-right causal mask (query i sees keys j <= i + seqlen_k - seqlen_q),
// computation in fp32, o rounded once to the storage type, lse the natural-log logsumexp of the scaled scores,
// and a query that sees no key gets o = 0 and lse = -inf.
#pragma once

#include <cstdint>

#include "cpu/dtypes.h"
#include "cpu/isa.h"
#include "kernel_types.h"

namespace llama_kernels::cpu {

struct AttentionProblem {
  int64_t batch;
  int64_t seqlen_q;
  int64_t seqlen_k;  // keys per sequence; with seqlens_k, the capacity of the cache
  int64_t n_q_heads;
  int64_t n_kv_heads;  // divides n_q_heads
  int64_t head_dim;  // any value >= 1 (the kernel pads to its vector width internally)
  bool causal;
  float softmax_scale;
};

// A paged KV cache (FlashAttention-2's layout): k and v are pools of pages (num_pages, block_size, n_kv_heads,
// head_dim), their strides' batch field the page stride, and position p of sequence b is row p % block_size of
// page block_table[b * max_blocks_per_seq + p / block_size]. Every entry a sequence reaches must be a page of the
// pools (the caller checks: the kernel reads the pages it is given).
struct KvPages {
  const int32_t* block_table;
  int64_t max_blocks_per_seq;
  int64_t block_size;
};

// o (batch, seqlen_q, n_q_heads, head_dim) = softmax(scale * q k^T) v per (batch, query head), with
// lse (batch, n_q_heads, seqlen_q) contiguous fp32. seqlens_k is null for plain attention; otherwise it holds
// batch int32 lengths, 0 <= seqlens_k[b] <= seqlen_k, and sequence b attends over its first seqlens_k[b] keys
// only (the causal alignment then uses seqlens_k[b] in place of seqlen_k). pages (with seqlens_k; seqlen_k is then
// max_blocks_per_seq * block_size) reads k and v as a paged cache; null: (batch, seqlen_k, n_kv_heads, head_dim).
// Parallel over (batch, kv head, query block) with OpenMP, and when all of a kv head's queries fit one block
// (decoding) over chunks of keys too, merged in a fixed order (deterministic); memory beyond o and lse is a few small
// per-thread buffers, and the chunks' partial outputs.
template <CpuIsa P, typename T>
void attention_forward(const T* q, HeadStrides q_strides, const T* k, HeadStrides k_strides, const T* v,
                       HeadStrides v_strides, T* o, HeadStrides o_strides, float* lse, const int32_t* seqlens_k,
                       const AttentionProblem& problem, const KvPages* pages = nullptr);

// The gradients of attention_forward (without seqlens_k) for dout = dL/do and dlse = dL/dlse (null: none), given
// its o and lse: dq (like q), dk and dv (like k) in fp32, rounded once to T, any strides with the last dim
// contiguous. Sequences attend over all seqlen_k keys. Parallel over (batch, kv head) with OpenMP; memory beyond
// the gradients is O(seqlen_k x head_dim) per thread, never seqlen_q x seqlen_k. Deterministic.
template <CpuIsa P, typename T>
void attention_backward(const T* dout, HeadStrides do_strides, const T* q, HeadStrides q_strides, const T* k,
                        HeadStrides k_strides, const T* v, HeadStrides v_strides, const T* o, HeadStrides o_strides,
                        const float* lse, const float* dlse, T* dq, HeadStrides dq_strides, T* dk,
                        HeadStrides dk_strides, T* dv, HeadStrides dv_strides, const AttentionProblem& problem);

}  // namespace llama_kernels::cpu
