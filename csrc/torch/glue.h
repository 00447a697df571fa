// What the torch glue of every op shares (csrc/torch/*.cpp, CPU and CUDA): the dispatch from a dtype to the kernels'
// storage type, raw pointers and strides of tensors, and the checks that guard the kernels' memory accesses (device,
// dtype, shape, the contiguous last dim, index ranges), in one message form: "op: name: expected ..., got ...".
// The checks of the public API's rules (which head_dims, which layouts, ...) are the Python layer's
// (llama_kernels/ops/*.py), which calls these ops only after them; the ones here keep a direct call of
// torch.ops.llama_kernels_C.* from reading or writing out of bounds.
#pragma once

#include <torch/types.h>

#include "kernel_types.h"

namespace llama_kernels {

template <typename T>
T* data_of(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

inline HeadStrides head_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Calls body(T{}) with T the kernels' storage type of an fp32, bf16 or fp16 dtype: float, BF16 or FP16 (the CPU
// kernels' cpu::bf16 and cpu::fp16, the CUDA kernels' __nv_bfloat16 and __half).
template <typename BF16, typename FP16, typename Body>
void dispatch_storage_type(at::ScalarType dtype, const char* op, const char* name, Body&& body) {
  switch (dtype) {
    case at::kFloat:
      return body(float{});
    case at::kBFloat16:
      return body(BF16{});
    case at::kHalf:
      return body(FP16{});
    default:
      TORCH_CHECK(false, op, ": ", name, ": expected dtype float32, bfloat16 or float16, got ", dtype);
  }
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, ": expected a tensor on ", device, ", got one on ", t.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_storage_dtype(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              ": expected dtype float32, bfloat16 or float16, got ", dtype);
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, ": expected shape ", shape, ", got ", t.sizes());
}

// dims: the dims' names, e.g. "(rows, n)"; the kernels index the last one with stride 1.
inline void check_layout(const char* op, const char* name, const at::Tensor& t, int64_t n_dims, const char* dims) {
  TORCH_CHECK(t.dim() == n_dims, op, ": ", name, ": expected ", n_dims, " dims ", dims, ", got shape ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              ": expected a contiguous last dim (stride 1), got strides ", t.strides());
}

// The operands of rms_norm on `device`: x (rows, n), weight (n,), residual like x, all with a contiguous last dim.
// The backward's h and dh are x and residual: the names go into the messages.
inline void check_rms_norm(const char* op, const char* x_name, const at::Tensor& x, const char* residual_name,
                           const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                           const at::Device& device) {
  check_device(op, x_name, x, device);
  check_storage_dtype(op, x_name, x);
  check_layout(op, x_name, x, 2, "(rows, n)");
  check_device(op, "weight", weight, device);
  check_storage_dtype(op, "weight", weight);
  check_layout(op, "weight", weight, 1, "(n,)");
  check_shape(op, "weight", weight, {x.size(1)});
  if (residual.has_value()) {
    check_device(op, residual_name, *residual, device);
    check_dtype(op, residual_name, *residual, x.scalar_type());
    check_layout(op, residual_name, *residual, 2, "(rows, n)");
    check_shape(op, residual_name, *residual, x.sizes());
  }
}

// rms_norm's outputs: y (rows, n) in promote(x, weight), and h like x with a residual, else empty (0 elements).
inline std::tuple<at::Tensor, at::Tensor> rms_norm_outputs(const at::Tensor& x, bool has_residual,
                                                           const at::Tensor& weight) {
  const at::ScalarType y_dtype = at::promote_types(x.scalar_type(), weight.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(y_dtype));
  at::Tensor h = has_residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  return {y, h};
}

// The operands of rope on `device`: q (B, S, Hq, D), k (B, S, Hk, D), q_out and k_out shaped as q and k, all of
// q's storage dtype with a contiguous last dim; positions (B, S) int64; inv_freq (D / 2,) float32 or float64.
inline void check_rope(const char* op, const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& positions, const at::Tensor& inv_freq,
                       const at::Device& device) {
  constexpr const char* kHeads = "(batch, seqlen, heads, head_dim)";
  check_storage_dtype(op, "q", q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"q_out", q_out},
                                {"k_out", k_out}}) {
    check_device(op, name, t, device);
    check_dtype(op, name, t, q.scalar_type());
    check_layout(op, name, t, 4, kHeads);
  }
  const int64_t batch = q.size(0), seqlen = q.size(1), head_dim = q.size(3);
  check_shape(op, "k", k, {batch, seqlen, k.size(2), head_dim});
  check_shape(op, "q_out", q_out, q.sizes());
  check_shape(op, "k_out", k_out, k.sizes());
  check_device(op, "positions", positions, device);
  check_dtype(op, "positions", positions, at::kLong);
  check_shape(op, "positions", positions, {batch, seqlen});
  check_device(op, "inv_freq", inv_freq, device);
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat || inv_freq.scalar_type() == at::kDouble, op,
              ": inv_freq: expected dtype float32 or float64, got ", inv_freq.scalar_type());
  check_layout(op, "inv_freq", inv_freq, 1, "(head_dim / 2,)");
  check_shape(op, "inv_freq", inv_freq, {head_dim / 2});
}

}  // namespace llama_kernels
