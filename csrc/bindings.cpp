// Registers the native ops with torch under the namespace llama_kernels_C (torch.ops.llama_kernels_C.<name>).
// The implementations are in csrc/torch/*.cpp (checks and dispatch) over the kernels of csrc/cpu and csrc/cuda.
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"
#include "torch/ops.h"

TORCH_LIBRARY(llama_kernels_C, m) {
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor? dh, Tensor h, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rope(Tensor(a!) q_out, Tensor(b!) k_out, Tensor q, Tensor k, Tensor positions, Tensor inv_freq, "
      "float attention_factor, bool interleaved, bool inverse) -> ()");
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "attention_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, bool causal, "
      "float softmax_scale, Tensor? block_table=None) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? dlse, bool causal, "
      "float softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  m.def(
      "cross_entropy_step(Tensor logits, Tensor target, Tensor? row_scale, int ignore_index, float label_smoothing, "
      "Tensor(a!)? dz) -> (Tensor loss, Tensor lse)");
  m.def("pack_pairs(Tensor b) -> Tensor");
  m.def("bf16_matmul(Tensor a, Tensor b_pairs, Tensor(a!) out, bool accumulate) -> ()");
  m.def("bf16_matmul_available() -> bool", &llama_kernels::bf16_matmul_available);
  // The instruction-set path the CPU kernels run in this process (csrc/cpu/isa.h), e.g. "avx512_bf16".
  m.def("cpu_isa() -> str", [] { return std::string(llama_kernels::cpu::isa_name(llama_kernels::cpu::cpu_isa())); });
}

TORCH_LIBRARY_IMPL(llama_kernels_C, CPU, m) {
  m.impl("rms_norm", &llama_kernels::rms_norm_cpu);
  m.impl("rms_norm_backward", &llama_kernels::rms_norm_backward_cpu);
  m.impl("rope", &llama_kernels::rope_cpu);
  m.impl("attention", &llama_kernels::attention_cpu);
  m.impl("attention_kvcache", &llama_kernels::attention_kvcache_cpu);
  m.impl("attention_backward", &llama_kernels::attention_backward_cpu);
  m.impl("swiglu", &llama_kernels::swiglu_cpu);
  m.impl("swiglu_backward", &llama_kernels::swiglu_backward_cpu);
  m.impl("cross_entropy_step", &llama_kernels::cross_entropy_step_cpu);
  m.impl("pack_pairs", &llama_kernels::pack_pairs_cpu);
  m.impl("bf16_matmul", &llama_kernels::bf16_matmul_cpu);
}

#ifdef LLAMA_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(llama_kernels_C, CUDA, m) {
  m.impl("rms_norm", &llama_kernels::rms_norm_cuda);
  m.impl("rope", &llama_kernels::rope_cuda);
}
#endif

#ifdef LLAMA_KERNELS_PYTHON_MODULE
// Built by setup.py as the Python module llama_kernels._C: importing it runs the registrations above; the
// module itself holds nothing. (The CMake build makes a plain library for torch.ops.load_library instead.)
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "llama-kernels' native ops, in torch.ops.llama_kernels_C",
                               -1, nullptr};
  return PyModule_Create(&module);
}
#endif
