// The CUDA ops of ops.h: argument checks, allocation, dtype dispatch, and the launch of a csrc/cuda kernel on the
// current stream of the tensors' device. Built only with LLAMA_KERNELS_WITH_CUDA (a CUDA build of torch).
#ifdef LLAMA_KERNELS_WITH_CUDA

// c10's stream header rather than ATen/cuda/CUDAContext.h (whose at::cuda::getCurrentCUDAStream is this same
// function): it needs no cuBLAS or cuSPARSE headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>

#include "../cuda/kernels.cuh"
#include "ops.h"

namespace llama_kernels {
namespace {

// The kernels' element type of a torch dtype (same size and bits).
template <typename Scalar>
struct KernelTypeOf;
template <>
struct KernelTypeOf<float> {
  using type = float;
};
template <>
struct KernelTypeOf<double> {
  using type = double;
};
template <>
struct KernelTypeOf<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct KernelTypeOf<at::Half> {
  using type = __half;
};

template <typename Kernel>
Kernel* kernel_ptr(const at::Tensor& t) {
  return reinterpret_cast<Kernel*>(t.data_ptr());
}

// Calls body(T{}) with T the kernel type of an fp32, bf16 or fp16 dtype.
template <typename Body>
void dispatch_float_types(at::ScalarType dtype, const char* what, Body&& body) {
  switch (dtype) {
    case at::kFloat:
      body(float{});
      break;
    case at::kBFloat16:
      body(__nv_bfloat16{});
      break;
    case at::kHalf:
      body(__half{});
      break;
    default:
      TORCH_CHECK(false, what, ": expected dtype float32, bfloat16 or float16, got ", dtype);
  }
}

void check_cuda_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, ": expected a tensor on ", device, " (as the first input), got ",
              t.device());
}

void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              ": expected dtype float32, bfloat16 or float16, got ", dtype);
}

void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              ": expected a contiguous last dimension, got stride ", t.stride(-1));
}

cuda::HeadStrides head_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                 const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm";
  const at::Device device = x.device();
  check_cuda_tensor(op, "x", x, device);
  check_cuda_tensor(op, "weight", weight, device);
  check_float_dtype(op, "x", x);
  check_float_dtype(op, "weight", weight);
  TORCH_CHECK(x.dim() == 2, op, ": x: expected a 2-D (rows, n) tensor, got ", x.dim(), " dimensions");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n < INT_MAX, op, ": x: expected rows of fewer than 2^31 - 1 elements, got ", n);
  TORCH_CHECK(rows <= INT_MAX, op, ": x: expected at most 2^31 - 1 rows, got ", rows);
  check_last_dim_contiguous(op, "x", x);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, op, ": weight: expected shape (", n, ",), got ",
              weight.sizes());
  check_last_dim_contiguous(op, "weight", weight);
  if (residual.has_value()) {
    check_cuda_tensor(op, "residual", *residual, device);
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual: expected dtype ", x.scalar_type(),
                " as x's, got ", residual->scalar_type());
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual: expected shape ", x.sizes(), " as x's, got ",
                residual->sizes());
    check_last_dim_contiguous(op, "residual", *residual);
  }

  const c10::cuda::CUDAGuard device_guard(device);
  const at::ScalarType y_dtype = at::promote_types(x.scalar_type(), weight.scalar_type());
  at::Tensor y = at::empty({rows, n}, x.options().dtype(y_dtype));
  at::Tensor h = residual.has_value() ? at::empty({rows, n}, x.options()) : at::empty({0}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_types(x.scalar_type(), "rms_norm: x", [&](auto x_kernel_type) {
    using T = decltype(x_kernel_type);
    dispatch_float_types(weight.scalar_type(), "rms_norm: weight", [&](auto weight_kernel_type) {
      using W = decltype(weight_kernel_type);
      const bool has_residual = residual.has_value();
      cuda::launch_rms_norm<T, W>(kernel_ptr<const T>(x), has_residual ? kernel_ptr<const T>(*residual) : nullptr,
                                  kernel_ptr<const W>(weight), kernel_ptr<cuda::promoted_t<T, W>>(y),
                                  has_residual ? kernel_ptr<T>(h) : nullptr, rows, n, x.stride(0),
                                  has_residual ? residual->stride(0) : 0, y.stride(0),
                                  has_residual ? h.stride(0) : 0, static_cast<float>(eps), stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, h};
}

void rope_cuda(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& positions, const at::Tensor& inv_freq, double attention_factor, bool interleaved,
               bool inverse) {
  constexpr const char* op = "rope";
  const at::Device device = q.device();
  check_cuda_tensor(op, "q", q, device);
  check_cuda_tensor(op, "k", k, device);
  check_cuda_tensor(op, "q_out", q_out, device);
  check_cuda_tensor(op, "k_out", k_out, device);
  check_cuda_tensor(op, "positions", positions, device);
  check_cuda_tensor(op, "inv_freq", inv_freq, device);
  check_float_dtype(op, "q", q);
  TORCH_CHECK(q.dim() == 4, op, ": q: expected a 4-D (B, S, Hq, D) tensor, got ", q.dim(), " dimensions");
  TORCH_CHECK(k.dim() == 4, op, ": k: expected a 4-D (B, S, Hk, D) tensor, got ", k.dim(), " dimensions");
  const int64_t batch = q.size(0), seqlen = q.size(1), n_q_heads = q.size(2), head_dim = q.size(3);
  const int64_t n_k_heads = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(1) == seqlen && k.size(3) == head_dim, op, ": k: expected shape (", batch,
              ", ", seqlen, ", Hk, ", head_dim, ") matching q's ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(head_dim % 2 == 0, op, ": q: expected an even head_dim, got ", head_dim);
  TORCH_CHECK(n_q_heads * head_dim <= INT_MAX && n_k_heads * head_dim <= INT_MAX, op,
              ": q, k: expected heads * head_dim below 2^31, got ", n_q_heads, " and ", n_k_heads, " heads of ",
              head_dim);
  TORCH_CHECK(batch * seqlen <= INT_MAX, op, ": q: expected B * S at most 2^31 - 1, got ", batch * seqlen);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"q_out", q_out}, {"k_out", k_out}}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, ": expected dtype ", q.scalar_type(),
                " as q's, got ", t.scalar_type());
  }
  TORCH_CHECK(q_out.sizes() == q.sizes(), op, ": q_out: expected shape ", q.sizes(), " as q's, got ", q_out.sizes());
  TORCH_CHECK(k_out.sizes() == k.sizes(), op, ": k_out: expected shape ", k.sizes(), " as k's, got ", k_out.sizes());
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "q_out", q_out);
  check_last_dim_contiguous(op, "k_out", k_out);
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions: expected dtype int64, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == seqlen, op,
              ": positions: expected shape (B, S) = (", batch, ", ", seqlen, "), got ", positions.sizes());
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat || inv_freq.scalar_type() == at::kDouble, op,
              ": inv_freq: expected dtype float32 or float64, got ", inv_freq.scalar_type());
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == head_dim / 2, op, ": inv_freq: expected shape (D/2,) = (",
              head_dim / 2, ",), got ", inv_freq.sizes());
  check_last_dim_contiguous(op, "inv_freq", inv_freq);

  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_types(q.scalar_type(), "rope: q", [&](auto kernel_type) {
    using T = decltype(kernel_type);
    const auto launch = [&](auto inv_freq_type) {
      using F = decltype(inv_freq_type);
      cuda::launch_rope<T, F>(kernel_ptr<const T>(q), kernel_ptr<const T>(k), kernel_ptr<T>(q_out),
                              kernel_ptr<T>(k_out), positions.data_ptr<int64_t>(), kernel_ptr<const F>(inv_freq),
                              batch, seqlen, n_q_heads, n_k_heads, head_dim, head_strides(q), head_strides(k),
                              head_strides(q_out), head_strides(k_out), positions.stride(0), positions.stride(1),
                              static_cast<float>(attention_factor), interleaved, inverse, stream);
    };
    if (inv_freq.scalar_type() == at::kDouble) {
      launch(double{});
    } else {
      launch(float{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace llama_kernels

#endif  // LLAMA_KERNELS_WITH_CUDA
