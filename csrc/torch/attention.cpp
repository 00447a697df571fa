// attention_cpu, attention_kvcache_cpu and attention_backward_cpu (contracts in ops.h): argument checks, allocation
// of the outputs, dtype dispatch, and the calls into the raw-pointer kernels of csrc/cpu/attention_kernels.h. Any
// head_dim from 1 to 256 is accepted (the kernels pad to their vector width; the bound keeps the per-thread buffers
// small).

#include <ATen/ATen.h>
#include <torch/types.h>

#include "cpu/attention_kernels.h"
#include "torch/ops.h"

namespace llama_kernels {
namespace {

constexpr int64_t kMaxHeadDim = 256;

void check_attention_operand(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, ": expected dtype float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected the dtype of q (", q.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, ": expected 4 dims (batch, seq, heads, head_dim), got shape ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, ": expected the last dim contiguous (stride 1), got strides ",
              t.strides());
}

// Checks q, k, v (k and v may be a cache longer than the attended keys) and returns the problem's sizes.
cpu::AttentionProblem check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const char* k_name, const char* v_name, bool causal,
                                             double softmax_scale) {
  check_attention_operand("q", q, q);
  check_attention_operand(k_name, k, q);
  check_attention_operand(v_name, v, q);
  TORCH_CHECK(k.sizes() == v.sizes(), v_name, ": expected the shape of ", k_name, " ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), k_name, ": expected batch ", q.size(0), " (q's), got ", k.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), k_name, ": expected head_dim ", q.size(3), " (q's), got ", k.size(3));
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "q: expected head_dim in [1, ", kMaxHeadDim, "], got ",
              head_dim);
  const int64_t n_q_heads = q.size(2), n_kv_heads = k.size(2);
  TORCH_CHECK(n_kv_heads >= 1 && n_q_heads % n_kv_heads == 0, k_name, ": expected a number of heads dividing q's ",
              n_q_heads, ", got ", n_kv_heads);
  return cpu::AttentionProblem{q.size(0), q.size(1), k.size(1), n_q_heads, n_kv_heads, head_dim, causal,
                               static_cast<float>(softmax_scale)};
}

cpu::BshStrides bsh_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename Storage>
void run_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& lse,
                   const int32_t* seqlens_k, const cpu::AttentionProblem& problem) {
  cpu::attention_forward<Storage>(
      reinterpret_cast<const Storage*>(q.data_ptr()), bsh_strides(q), reinterpret_cast<const Storage*>(k.data_ptr()),
      bsh_strides(k), reinterpret_cast<const Storage*>(v.data_ptr()), bsh_strides(v),
      reinterpret_cast<Storage*>(o.data_ptr()), bsh_strides(o), lse.data_ptr<float>(), seqlens_k, problem);
}

std::tuple<at::Tensor, at::Tensor> attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const int32_t* seqlens_k, const cpu::AttentionProblem& problem) {
  at::Tensor o = at::empty({problem.batch, problem.seqlen_q, problem.n_q_heads, problem.head_dim}, q.options());
  at::Tensor lse = at::empty({problem.batch, problem.n_q_heads, problem.seqlen_q}, q.options().dtype(at::kFloat));
  switch (q.scalar_type()) {
    case at::kFloat:
      run_attention<float>(q, k, v, o, lse, seqlens_k, problem);
      break;
    case at::kBFloat16:
      run_attention<cpu::bf16>(q, k, v, o, lse, seqlens_k, problem);
      break;
    case at::kHalf:
      run_attention<cpu::fp16>(q, k, v, o, lse, seqlens_k, problem);
      break;
    default:
      TORCH_CHECK(false, "q: unsupported dtype ", q.scalar_type());  // excluded by the checks above
  }
  return {o, lse};
}

// lse or dlse: fp32 (batch, n_q_heads, seqlen_q), returned contiguous for the kernel's flat indexing.
at::Tensor check_lse(const char* name, const at::Tensor& t, const cpu::AttentionProblem& problem) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == at::IntArrayRef({problem.batch, problem.n_q_heads, problem.seqlen_q}), name,
              ": expected shape (", problem.batch, ", ", problem.n_q_heads, ", ", problem.seqlen_q,
              ") (batch, q heads, seqlen_q), got ", t.sizes());
  return t.contiguous();
}

template <typename Storage>
void run_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& o, const at::Tensor& lse, const float* dlse, at::Tensor& dq,
                            at::Tensor& dk, at::Tensor& dv, const cpu::AttentionProblem& problem) {
  const auto data = [](const at::Tensor& t) { return reinterpret_cast<const Storage*>(t.data_ptr()); };
  const auto out = [](at::Tensor& t) { return reinterpret_cast<Storage*>(t.data_ptr()); };
  cpu::attention_backward<Storage>(data(dout), bsh_strides(dout), data(q), bsh_strides(q), data(k), bsh_strides(k),
                                   data(v), bsh_strides(v), data(o), bsh_strides(o), lse.data_ptr<float>(), dlse,
                                   out(dq), bsh_strides(dq), out(dk), bsh_strides(dk), out(dv), bsh_strides(dv),
                                   problem);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double softmax_scale) {
  const cpu::AttentionProblem problem = check_attention_inputs(q, k, v, "k", "v", causal, softmax_scale);
  return attention_impl(q, k, v, nullptr, problem);
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                         bool causal, double softmax_scale) {
  const cpu::AttentionProblem problem =
      check_attention_inputs(q, k_cache, v_cache, "k_cache", "v_cache", causal, softmax_scale);
  TORCH_CHECK(seqlens_k.device().is_cpu(), "seqlens_k: expected a CPU tensor, got device ", seqlens_k.device());
  TORCH_CHECK(seqlens_k.scalar_type() == at::kInt, "seqlens_k: expected dtype int32, got ", seqlens_k.scalar_type());
  TORCH_CHECK(seqlens_k.dim() == 1 && seqlens_k.size(0) == problem.batch, "seqlens_k: expected shape (",
              problem.batch, ",), got ", seqlens_k.sizes());
  const at::Tensor lengths = seqlens_k.contiguous();
  const int32_t* lengths_ptr = lengths.data_ptr<int32_t>();
  // The kernel reads keys [0, seqlens_k[b]) of the cache: a length out of range would read past it.
  for (int64_t b = 0; b < problem.batch; ++b) {
    TORCH_CHECK(lengths_ptr[b] >= 0 && lengths_ptr[b] <= problem.seqlen_k, "seqlens_k: expected values in [0, ",
                problem.seqlen_k, "] (the cache length), got ", lengths_ptr[b], " at index ", b);
  }
  return attention_impl(q, k_cache, v_cache, lengths_ptr, problem);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, bool causal, double softmax_scale) {
  const cpu::AttentionProblem problem = check_attention_inputs(q, k, v, "k", "v", causal, softmax_scale);
  check_attention_operand("do", dout, q);
  check_attention_operand("o", o, q);
  TORCH_CHECK(dout.sizes() == q.sizes(), "do: expected the shape of q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(o.sizes() == q.sizes(), "o: expected the shape of q ", q.sizes(), ", got ", o.sizes());
  const at::Tensor lse_contiguous = check_lse("lse", lse, problem);
  at::Tensor dlse_contiguous;
  if (dlse.has_value() && dlse->defined()) dlse_contiguous = check_lse("dlse", *dlse, problem);
  const float* dlse_ptr = dlse_contiguous.defined() ? dlse_contiguous.data_ptr<float>() : nullptr;
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  switch (q.scalar_type()) {
    case at::kFloat:
      run_attention_backward<float>(dout, q, k, v, o, lse_contiguous, dlse_ptr, dq, dk, dv, problem);
      break;
    case at::kBFloat16:
      run_attention_backward<cpu::bf16>(dout, q, k, v, o, lse_contiguous, dlse_ptr, dq, dk, dv, problem);
      break;
    case at::kHalf:
      run_attention_backward<cpu::fp16>(dout, q, k, v, o, lse_contiguous, dlse_ptr, dq, dk, dv, problem);
      break;
    default:
      TORCH_CHECK(false, "q: unsupported dtype ", q.scalar_type());  // excluded by the checks above
  }
  return {dq, dk, dv};
}

}  // namespace llama_kernels
