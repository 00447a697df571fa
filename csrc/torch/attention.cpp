// attention_cpu, attention_kvcache_cpu and attention_backward_cpu (contracts in ops.h): the memory checks (glue.h),
// allocation of the outputs, dtype dispatch, and the calls into the raw-pointer kernels of
// csrc/cpu/attention_kernels.h (any head_dim >= 1: the kernels pad to their vector width).

#include <ATen/ATen.h>

#include "cpu/attention_kernels.h"
#include "torch/glue.h"
#include "torch/ops.h"

namespace llama_kernels {
namespace {

const at::Device kCpu(at::kCPU);

// Checks q, k, v (k and v may be a cache longer than the attended keys, or pools of k_batch pages) and returns
// the problem's sizes.
cpu::AttentionProblem check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const char* k_name, const char* v_name,
                                             bool causal, double softmax_scale, int64_t k_batch) {
  check_storage_dtype(op, "q", q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {k_name, k}, {v_name, v}}) {
    check_device(op, name, t, kCpu);
    check_dtype(op, name, t, q.scalar_type());
    check_layout(op, name, t, 4, "(batch, seqlen, heads, head_dim)");
  }
  const int64_t n_q_heads = q.size(2), n_kv_heads = k.size(2);
  check_shape(op, k_name, k, {k_batch, k.size(1), n_kv_heads, q.size(3)});
  check_shape(op, v_name, v, k.sizes());
  // The kernels index query head h's kv head as h / (n_q_heads / n_kv_heads).
  TORCH_CHECK(n_kv_heads >= 1 && n_q_heads % n_kv_heads == 0, op, ": ", k_name,
              ": expected a number of heads dividing q's ", n_q_heads, ", got ", n_kv_heads);
  return cpu::AttentionProblem{q.size(0), q.size(1), k.size(1), n_q_heads, n_kv_heads, q.size(3), causal,
                               static_cast<float>(softmax_scale)};
}

// lse or dlse: fp32 (batch, n_q_heads, seqlen_q), returned contiguous for the kernel's flat indexing.
at::Tensor check_lse(const char* op, const char* name, const at::Tensor& t, const cpu::AttentionProblem& problem) {
  check_device(op, name, t, kCpu);
  check_dtype(op, name, t, at::kFloat);
  check_shape(op, name, t, {problem.batch, problem.n_q_heads, problem.seqlen_q});
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_impl(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const int32_t* seqlens_k,
                                                  const cpu::AttentionProblem& problem,
                                                  const cpu::KvPages* pages = nullptr) {
  at::Tensor o = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({problem.batch, problem.n_q_heads, problem.seqlen_q}, q.options().dtype(at::kFloat));
  dispatch_storage_type<cpu::bf16, cpu::fp16>(q.scalar_type(), op, "q", [&](auto tag) {
    using T = decltype(tag);
    cpu::on_isa(cpu::cpu_isa(), [&]<cpu::CpuIsa P> {
      cpu::attention_forward<P, T>(data_of<const T>(q), head_strides(q), data_of<const T>(k), head_strides(k),
                                   data_of<const T>(v), head_strides(v), data_of<T>(o), head_strides(o),
                                   lse.data_ptr<float>(), seqlens_k, problem, pages);
    });
  });
  return {o, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double softmax_scale) {
  constexpr const char* op = "attention";
  const cpu::AttentionProblem problem =
      check_attention_inputs(op, q, k, v, "k", "v", causal, softmax_scale, q.size(0));
  return attention_impl(op, q, k, v, nullptr, problem);
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                         bool causal, double softmax_scale,
                                                         const std::optional<at::Tensor>& block_table) {
  constexpr const char* op = "attention_kvcache";
  const bool paged = block_table.has_value() && block_table->defined();
  cpu::AttentionProblem problem = check_attention_inputs(op, q, k_cache, v_cache, "k_cache", "v_cache", causal,
                                                         softmax_scale, paged ? k_cache.size(0) : q.size(0));
  check_device(op, "seqlens_k", seqlens_k, kCpu);
  check_dtype(op, "seqlens_k", seqlens_k, at::kInt);
  check_shape(op, "seqlens_k", seqlens_k, {problem.batch});
  at::Tensor table;
  cpu::KvPages pages{};
  if (paged) {
    check_device(op, "block_table", *block_table, kCpu);
    check_dtype(op, "block_table", *block_table, at::kInt);
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == problem.batch && block_table->size(1) >= 1 &&
                    k_cache.size(1) >= 1,
                op, ": block_table: expected shape (", problem.batch, ", max_blocks_per_seq >= 1) over pages of "
                "at least one row, got ", block_table->sizes(), " over k_cache ", k_cache.sizes());
    table = block_table->contiguous();
    pages = {table.data_ptr<int32_t>(), table.size(1), k_cache.size(1)};
    problem.seqlen_k = pages.max_blocks_per_seq * pages.block_size;  // a sequence's capacity
  }
  const at::Tensor lengths = seqlens_k.contiguous();
  const int32_t* lengths_ptr = lengths.data_ptr<int32_t>();
  // The kernel reads keys [0, seqlens_k[b]) of the cache, in the pages that hold them: a length out of range, or
  // such a page outside the pool, would read past it.
  for (int64_t b = 0; b < problem.batch; ++b) {
    TORCH_CHECK(lengths_ptr[b] >= 0 && lengths_ptr[b] <= problem.seqlen_k, op, ": seqlens_k: expected values in [0, ",
                problem.seqlen_k, "] (the cache length), got ", lengths_ptr[b], " at index ", b);
    if (!paged) continue;
    const int64_t used = (lengths_ptr[b] + pages.block_size - 1) / pages.block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int32_t page = pages.block_table[b * pages.max_blocks_per_seq + i];
      TORCH_CHECK(page >= 0 && page < k_cache.size(0), op, ": block_table: expected page indices in [0, ",
                  k_cache.size(0), ") (the pool's pages), got ", page, " at [", b, ", ", i, "]");
    }
  }
  return attention_impl(op, q, k_cache, v_cache, lengths_ptr, problem, paged ? &pages : nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, bool causal, double softmax_scale) {
  constexpr const char* op = "attention_backward";
  const cpu::AttentionProblem problem =
      check_attention_inputs(op, q, k, v, "k", "v", causal, softmax_scale, q.size(0));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"do", dout}, {"o", o}}) {
    check_device(op, name, t, kCpu);
    check_dtype(op, name, t, q.scalar_type());
    check_layout(op, name, t, 4, "(batch, seqlen, heads, head_dim)");
    check_shape(op, name, t, q.sizes());
  }
  const at::Tensor lse_contiguous = check_lse(op, "lse", lse, problem);
  at::Tensor dlse_contiguous;
  if (dlse.has_value() && dlse->defined()) dlse_contiguous = check_lse(op, "dlse", *dlse, problem);
  const float* dlse_ptr = dlse_contiguous.defined() ? dlse_contiguous.data_ptr<float>() : nullptr;
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  dispatch_storage_type<cpu::bf16, cpu::fp16>(q.scalar_type(), op, "q", [&](auto tag) {
    using T = decltype(tag);
    cpu::on_isa(cpu::cpu_isa(), [&]<cpu::CpuIsa P> {
      cpu::attention_backward<P, T>(data_of<const T>(dout), head_strides(dout), data_of<const T>(q), head_strides(q),
                                    data_of<const T>(k), head_strides(k), data_of<const T>(v), head_strides(v),
                                    data_of<const T>(o), head_strides(o), lse_contiguous.data_ptr<float>(), dlse_ptr,
                                    data_of<T>(dq), head_strides(dq), data_of<T>(dk), head_strides(dk), data_of<T>(dv),
                                    head_strides(dv), problem);
    });
  });
  return {dq, dk, dv};
}

}  // namespace llama_kernels
