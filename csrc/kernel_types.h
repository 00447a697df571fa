// The types every kernel's interface shares, CPU and CUDA alike: plain C++17, no torch or CUDA headers, so the
// kernels, their C++ tests and the torch glue all include it.
#pragma once

#include <cstdint>
#include <type_traits>

namespace llama_kernels {

// The dtype torch gives x * weight among the storage types: the common type, else float (a bf16/fp16 x with a
// float weight, Meta's and HF's modules; bf16 with fp16 promotes to float too).
template <typename T, typename W>
using promoted_t = std::conditional_t<std::is_same_v<T, W>, T, float>;

// Element strides of a (batch, seqlen, heads, head_dim) tensor whose last dim is contiguous.
struct HeadStrides {
  int64_t batch, token, head;
};

}  // namespace llama_kernels
