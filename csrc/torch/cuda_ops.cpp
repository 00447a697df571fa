// The CUDA ops of ops.h: the memory checks (glue.h, as the CPU ops'), the kernels' int index limits, allocation,
// dtype dispatch, and the launch of a csrc/cuda kernel on the current stream of the tensors' device. Built only
// with LLAMA_KERNELS_WITH_CUDA (a CUDA build of torch).
#ifdef LLAMA_KERNELS_WITH_CUDA

// c10's stream header rather than ATen/cuda/CUDAContext.h (whose at::cuda::getCurrentCUDAStream is this same
// function): it needs no cuBLAS or cuSPARSE headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>

#include "cuda/kernels.cuh"
#include "torch/glue.h"
#include "torch/ops.h"

namespace llama_kernels {

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                 const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm";
  const at::Device device = x.device();
  check_rms_norm(op, "x", x, "residual", residual, weight, device);
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n < INT_MAX, op, ": x: expected rows of fewer than 2^31 - 1 elements, got ", n);
  TORCH_CHECK(rows <= INT_MAX, op, ": x: expected at most 2^31 - 1 rows, got ", rows);

  const c10::cuda::CUDAGuard device_guard(device);
  auto [y, h] = rms_norm_outputs(x, residual.has_value(), weight);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_storage_type<__nv_bfloat16, __half>(x.scalar_type(), op, "x", [&](auto x_kernel_type) {
    using T = decltype(x_kernel_type);
    dispatch_storage_type<__nv_bfloat16, __half>(weight.scalar_type(), op, "weight", [&](auto weight_kernel_type) {
      using W = decltype(weight_kernel_type);
      const bool has_residual = residual.has_value();
      cuda::launch_rms_norm<T, W>(data_of<const T>(x), has_residual ? data_of<const T>(*residual) : nullptr,
                                  data_of<const W>(weight), data_of<promoted_t<T, W>>(y),
                                  has_residual ? data_of<T>(h) : nullptr, rows, n, x.stride(0),
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
  check_rope(op, q_out, k_out, q, k, positions, inv_freq, device);
  const int64_t batch = q.size(0), seqlen = q.size(1), n_q_heads = q.size(2), head_dim = q.size(3);
  const int64_t n_k_heads = k.size(2);
  TORCH_CHECK(n_q_heads * head_dim <= INT_MAX && n_k_heads * head_dim <= INT_MAX, op,
              ": q, k: expected heads * head_dim below 2^31, got ", n_q_heads, " and ", n_k_heads, " heads of ",
              head_dim);
  TORCH_CHECK(batch * seqlen <= INT_MAX, op, ": q: expected B * S at most 2^31 - 1, got ", batch * seqlen);

  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_storage_type<__nv_bfloat16, __half>(q.scalar_type(), op, "q", [&](auto kernel_type) {
    using T = decltype(kernel_type);
    const auto launch = [&](auto inv_freq_type) {
      using F = decltype(inv_freq_type);
      cuda::launch_rope<T, F>(data_of<const T>(q), data_of<const T>(k), data_of<T>(q_out), data_of<T>(k_out),
                              data_of<const int64_t>(positions), data_of<const F>(inv_freq), batch, seqlen,
                              n_q_heads, n_k_heads, head_dim, head_strides(q), head_strides(k), head_strides(q_out),
                              head_strides(k_out), positions.stride(0), positions.stride(1),
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
