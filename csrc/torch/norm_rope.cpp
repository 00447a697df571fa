// The torch ops rms_norm_cpu, rms_norm_backward_cpu and rope_cpu (contracts in ops.h): checks, allocation, dtype
// dispatch, then the raw-pointer kernels of csrc/cpu.
#include <ATen/MemoryOverlap.h>

#include "cpu/kernels.h"
#include "torch/ops.h"

namespace llama_kernels {
namespace {

using cpu::bf16;
using cpu::fp16;

template <typename T>
T* data_of(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

bool is_storage_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Calls f(T{}) with the storage type of dtype (float, bf16 or fp16).
template <typename F>
void dispatch_storage_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(bf16{});
    case at::kHalf:
      return f(fp16{});
    default:
      TORCH_CHECK(false, "unsupported dtype ", dtype, ": expected float32, bfloat16 or float16");
  }
}

// Calls f(T{}, W{}) for the (x, weight) storage types that rms_norm supports: the same type, or a float weight.
template <typename F>
void dispatch_norm_types(at::ScalarType x_dtype, at::ScalarType weight_dtype, F&& f) {
  dispatch_storage_type(x_dtype, [&](auto x_tag) {
    using T = decltype(x_tag);
    if constexpr (std::is_same_v<T, float>) {
      f(T{}, float{});
    } else if (weight_dtype == at::kFloat) {
      f(T{}, float{});
    } else {
      f(T{}, T{});
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

void check_rows(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, n), got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last dim, got strides ",
              t.strides());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name,
                at::ScalarType dtype) {
  check_rows(t, name);
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have ", like_name, "'s shape ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_norm_weight(const at::Tensor& weight, const at::Tensor& x, const char* x_name) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must have shape (", x.size(1), ",), got ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, "weight must have ",
              x_name, "'s dtype ", x.scalar_type(), " or float32, got ", weight.scalar_type());
}

// rope's (B, S, H, D) operands, the last dim contiguous.
void check_heads(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (batch, seqlen, heads, head_dim), got shape ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, " must have a contiguous last dim, got strides ",
              t.strides());
}

cpu::HeadStrides head_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
cpu::RopeOperand<T> rope_operand(const at::Tensor& src, const at::Tensor& dst) {
  return {data_of<const T>(src), head_strides(src), data_of<T>(dst), head_strides(dst), src.size(2)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(is_storage_dtype(x.scalar_type()), "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  check_norm_weight(weight, x, "x");
  if (residual.has_value()) check_like(*residual, "residual", x, "x", x.scalar_type());

  const int64_t rows = x.size(0), n = x.size(1);
  const at::ScalarType out_dtype = at::promote_types(x.scalar_type(), weight.scalar_type());
  at::Tensor y = at::empty({rows, n}, x.options().dtype(out_dtype));
  at::Tensor h = residual.has_value() ? at::empty({rows, n}, x.options()) : at::empty({0}, x.options());
  dispatch_norm_types(x.scalar_type(), weight.scalar_type(), [&](auto x_tag, auto weight_tag) {
    using T = decltype(x_tag);
    using W = decltype(weight_tag);
    const T* residual_data = residual.has_value() ? data_of<const T>(*residual) : nullptr;
    const int64_t residual_row_stride = residual.has_value() ? residual->stride(0) : 0;
    cpu::rms_norm<T, W>(data_of<const T>(x), x.stride(0), residual_data, residual_row_stride,
                        data_of<const W>(weight), data_of<cpu::promoted_t<T, W>>(y), n,
                        residual.has_value() ? data_of<T>(h) : nullptr, n, rows, n, static_cast<float>(eps));
  });
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                                         const at::Tensor& h, const at::Tensor& weight, double eps) {
  check_rows(h, "h");
  TORCH_CHECK(is_storage_dtype(h.scalar_type()), "h must be float32, bfloat16 or float16, got ", h.scalar_type());
  check_norm_weight(weight, h, "h");
  check_like(dy, "dy", h, "h", at::promote_types(h.scalar_type(), weight.scalar_type()));
  if (dh.has_value()) check_like(*dh, "dh", h, "h", h.scalar_type());

  const int64_t rows = h.size(0), n = h.size(1);
  at::Tensor dx = at::empty({rows, n}, h.options());
  at::Tensor dweight = at::empty({n}, weight.options());
  dispatch_norm_types(h.scalar_type(), weight.scalar_type(), [&](auto h_tag, auto weight_tag) {
    using T = decltype(h_tag);
    using W = decltype(weight_tag);
    const T* dh_data = dh.has_value() ? data_of<const T>(*dh) : nullptr;
    const int64_t dh_row_stride = dh.has_value() ? dh->stride(0) : 0;
    cpu::rms_norm_backward<T, W>(data_of<const cpu::promoted_t<T, W>>(dy), dy.stride(0), dh_data, dh_row_stride,
                                 data_of<const T>(h), h.stride(0), data_of<const W>(weight), data_of<T>(dx), n,
                                 data_of<W>(dweight), rows, n, static_cast<float>(eps));
  });
  return {dx, dweight};
}

void rope_cpu(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& positions, const at::Tensor& inv_freq, double attention_factor, bool interleaved,
              bool inverse) {
  check_heads(q, "q");
  check_heads(k, "k");
  check_heads(q_out, "q_out");
  check_heads(k_out, "k_out");
  const int64_t batch = q.size(0), seqlen = q.size(1), head_dim = q.size(3);
  TORCH_CHECK(is_storage_dtype(q.scalar_type()), "q must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(k.size(0) == batch && k.size(1) == seqlen && k.size(3) == head_dim,
              "k must have q's batch, seqlen and head_dim: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(head_dim % 2 == 0, "head_dim must be even, got ", head_dim);
  TORCH_CHECK(q_out.sizes() == q.sizes() && q_out.scalar_type() == q.scalar_type(),
              "q_out must have q's shape and dtype ", q.sizes(), " ", q.scalar_type(), ", got ", q_out.sizes(), " ",
              q_out.scalar_type());
  TORCH_CHECK(k_out.sizes() == k.sizes() && k_out.scalar_type() == k.scalar_type(),
              "k_out must have k's shape and dtype ", k.sizes(), " ", k.scalar_type(), ", got ", k_out.sizes(), " ",
              k_out.scalar_type());
  // Outputs are the inputs themselves (in place) or apart from every input and from each other.
  at::assert_no_partial_overlap(q_out, q);
  at::assert_no_partial_overlap(k_out, k);
  at::assert_no_overlap(q_out, k);
  at::assert_no_overlap(k_out, q);
  at::assert_no_overlap(q_out, k_out);

  check_cpu(positions, "positions");
  TORCH_CHECK(positions.scalar_type() == at::kLong, "positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == seqlen,
              "positions must have shape (batch, seqlen) = (", batch, ", ", seqlen, "), got ", positions.sizes());
  check_cpu(inv_freq, "inv_freq");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat || inv_freq.scalar_type() == at::kDouble,
              "inv_freq must be float32 or float64, got ", inv_freq.scalar_type());
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == head_dim / 2, "inv_freq must have shape (head_dim / 2,) = (",
              head_dim / 2, ",), got ", inv_freq.sizes());
  TORCH_CHECK(inv_freq.is_contiguous(), "inv_freq must be contiguous");

  if (batch * seqlen == 0) return;
  dispatch_storage_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto q_operand = rope_operand<T>(q, q_out), k_operand = rope_operand<T>(k, k_out);
    const auto run = [&](const auto* inv_freq_data) {
      cpu::rope<T>(q_operand, k_operand, data_of<const int64_t>(positions), positions.stride(0), positions.stride(1),
                   inv_freq_data, batch, seqlen, head_dim, static_cast<float>(attention_factor), interleaved, inverse);
    };
    if (inv_freq.scalar_type() == at::kDouble) {
      run(data_of<const double>(inv_freq));
    } else {
      run(data_of<const float>(inv_freq));
    }
  });
}

}  // namespace llama_kernels
