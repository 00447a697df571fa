// The torch ops rms_norm_cpu, rms_norm_backward_cpu, rope_cpu, swiglu_cpu and swiglu_backward_cpu (contracts in
// ops.h): the memory checks (glue.h), allocation, dtype dispatch, then the raw-pointer kernels of csrc/cpu.
#include "cpu/kernels.h"
#include "torch/glue.h"
#include "torch/ops.h"

namespace llama_kernels {
namespace {

using cpu::bf16;
using cpu::fp16;

const at::Device kCpu(at::kCPU);

// Calls f(T{}, W{}) for the (x, weight) storage types the CPU kernels have: the same type, or a float weight.
template <typename F>
void dispatch_norm_types(const char* op, const char* x_name, at::ScalarType x_dtype, at::ScalarType weight_dtype,
                         F&& f) {
  dispatch_storage_type<bf16, fp16>(x_dtype, op, x_name, [&](auto x_tag) {
    using T = decltype(x_tag);
    if constexpr (std::is_same_v<T, float>) {
      TORCH_CHECK(weight_dtype == at::kFloat, op, ": weight: expected dtype float32 (", x_name, "'s), got ",
                  weight_dtype);
      f(T{}, float{});
    } else if (weight_dtype == at::kFloat) {
      f(T{}, float{});
    } else {
      TORCH_CHECK(weight_dtype == x_dtype, op, ": weight: expected dtype ", x_dtype, " (", x_name,
                  "'s) or float32, got ", weight_dtype);
      f(T{}, T{});
    }
  });
}

// The operands of swiglu and its backward: CPU tensors (rows, n) with a contiguous last dim, the first one's shape
// and storage dtype.
void check_swiglu(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor&>> operands) {
  const at::Tensor& first = operands.begin()->second;
  check_storage_dtype(op, operands.begin()->first, first);
  for (const auto& [name, t] : operands) {
    check_device(op, name, t, kCpu);
    check_dtype(op, name, t, first.scalar_type());
    check_layout(op, name, t, 2, "(rows, n)");
    check_shape(op, name, t, first.sizes());
  }
}

template <typename T>
cpu::RopeOperand<T> rope_operand(const at::Tensor& src, const at::Tensor& dst) {
  return {data_of<const T>(src), head_strides(src), data_of<T>(dst), head_strides(dst), src.size(2)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm";
  check_rms_norm(op, "x", x, "residual", residual, weight, kCpu);
  auto [y, h] = rms_norm_outputs(x, residual.has_value(), weight);
  const int64_t rows = x.size(0), n = x.size(1);
  dispatch_norm_types(op, "x", x.scalar_type(), weight.scalar_type(), [&](auto x_tag, auto weight_tag) {
    using T = decltype(x_tag);
    using W = decltype(weight_tag);
    const T* residual_data = residual.has_value() ? data_of<const T>(*residual) : nullptr;
    const int64_t residual_row_stride = residual.has_value() ? residual->stride(0) : 0;
    cpu::on_isa(cpu::cpu_isa(), [&]<cpu::CpuIsa P> {
      cpu::rms_norm<P, T, W>(data_of<const T>(x), x.stride(0), residual_data, residual_row_stride,
                             data_of<const W>(weight), data_of<promoted_t<T, W>>(y), n,
                             residual.has_value() ? data_of<T>(h) : nullptr, n, rows, n, static_cast<float>(eps));
    });
  });
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                                         const at::Tensor& h, const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm_backward";
  // h, dh and weight as rms_norm's x, residual and weight; dy as its y.
  check_rms_norm(op, "h", h, "dh", dh, weight, kCpu);
  check_device(op, "dy", dy, kCpu);
  check_dtype(op, "dy", dy, at::promote_types(h.scalar_type(), weight.scalar_type()));
  check_layout(op, "dy", dy, 2, "(rows, n)");
  check_shape(op, "dy", dy, h.sizes());

  const int64_t rows = h.size(0), n = h.size(1);
  at::Tensor dx = at::empty({rows, n}, h.options());
  at::Tensor dweight = at::empty({n}, weight.options());
  dispatch_norm_types(op, "h", h.scalar_type(), weight.scalar_type(), [&](auto h_tag, auto weight_tag) {
    using T = decltype(h_tag);
    using W = decltype(weight_tag);
    const T* dh_data = dh.has_value() ? data_of<const T>(*dh) : nullptr;
    const int64_t dh_row_stride = dh.has_value() ? dh->stride(0) : 0;
    cpu::on_isa(cpu::cpu_isa(), [&]<cpu::CpuIsa P> {
      cpu::rms_norm_backward<P, T, W>(data_of<const promoted_t<T, W>>(dy), dy.stride(0), dh_data, dh_row_stride,
                                      data_of<const T>(h), h.stride(0), data_of<const W>(weight), data_of<T>(dx), n,
                                      data_of<W>(dweight), rows, n, static_cast<float>(eps));
    });
  });
  return {dx, dweight};
}

void rope_cpu(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& positions, const at::Tensor& inv_freq, double attention_factor, bool interleaved,
              bool inverse) {
  constexpr const char* op = "rope";
  check_rope(op, q_out, k_out, q, k, positions, inv_freq, kCpu);
  const int64_t batch = q.size(0), seqlen = q.size(1), head_dim = q.size(3);
  if (batch * seqlen == 0) return;
  dispatch_storage_type<bf16, fp16>(q.scalar_type(), op, "q", [&](auto tag) {
    using T = decltype(tag);
    const auto q_operand = rope_operand<T>(q, q_out), k_operand = rope_operand<T>(k, k_out);
    const auto run = [&](const auto* inv_freq_data) {
      cpu::on_isa(cpu::cpu_isa(), [&]<cpu::CpuIsa P> {
        cpu::rope<P, T>(q_operand, k_operand, data_of<const int64_t>(positions), positions.stride(0),
                        positions.stride(1), inv_freq_data, batch, seqlen, head_dim,
                        static_cast<float>(attention_factor), interleaved, inverse);
      });
    };
    if (inv_freq.scalar_type() == at::kDouble) {
      run(data_of<const double>(inv_freq));
    } else {
      run(data_of<const float>(inv_freq));
    }
  });
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* op = "swiglu";
  check_swiglu(op, {{"gate", gate}, {"up", up}});
  const int64_t rows = gate.size(0), n = gate.size(1);
  at::Tensor y = at::empty({rows, n}, gate.options());
  dispatch_storage_type<bf16, fp16>(gate.scalar_type(), op, "gate", [&](auto tag) {
    using T = decltype(tag);
    cpu::on_isa(cpu::cpu_isa(), [&]<cpu::CpuIsa P> {
      cpu::swiglu<P, T>(data_of<const T>(gate), gate.stride(0), data_of<const T>(up), up.stride(0), data_of<T>(y), n,
                        rows, n);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& dy, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  constexpr const char* op = "swiglu_backward";
  check_swiglu(op, {{"gate", gate}, {"up", up}, {"dy", dy}});
  const int64_t rows = gate.size(0), n = gate.size(1);
  at::Tensor dgate = at::empty({rows, n}, gate.options());
  at::Tensor dup = at::empty({rows, n}, gate.options());
  dispatch_storage_type<bf16, fp16>(gate.scalar_type(), op, "gate", [&](auto tag) {
    using T = decltype(tag);
    cpu::on_isa(cpu::cpu_isa(), [&]<cpu::CpuIsa P> {
      cpu::swiglu_backward<P, T>(data_of<const T>(dy), dy.stride(0), data_of<const T>(gate), gate.stride(0),
                                 data_of<const T>(up), up.stride(0), data_of<T>(dgate), n, data_of<T>(dup), n, rows, n);
    });
  });
  return {dgate, dup};
}

}  // namespace llama_kernels
