// The pieces shared by the CPU attention kernels (attention_kernels.cpp, attention_backward.cpp): fp32 vectors in
// GCC vector extensions (so they compile to AVX-512 or AVX2, whichever the path's flags allow, with FMA), exp2 of the
// softmax's arguments, and register-tiled matrix products over zero-padded, cache-line aligned buffers.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#include "cpu/isa.h"

// Vector widths follow the path being compiled: isa.h's inline namespace.
namespace llama_kernels::cpu::inline LLAMA_KERNELS_ISA_NAMESPACE::tiles {

#if defined(__AVX512F__)
inline constexpr int kLanes = 16;
inline constexpr int kTileRows = 8;  // 8 x 2 accumulators + 2 loads of the 32 zmm registers
#else  // the avx2 path, the narrowest (isa.h)
inline constexpr int kLanes = 8;
inline constexpr int kTileRows = 6;  // 6 x 2 accumulators + 2 loads + 1 broadcast of the 16 ymm registers
#endif
inline constexpr int kTileCols = 2 * kLanes;  // columns of a micro-kernel's register tile: two vectors

// The attention tiles, forward and backward: rows of a query tile (the group's query heads x queries) and keys per
// block. A tile's operands (the forward's transposed q, k and v blocks, scores and accumulator; the backward's q
// and dO in both layouts, dq and two score blocks: each <= 64 x 128 floats = 32 KiB) stay in L2, and the
// micro-kernels' operands in L1.
inline constexpr int64_t kTargetTileRows = 64;
inline constexpr int64_t kKeyBlock = 64;

using VecF = float __attribute__((vector_size(kLanes * sizeof(float))));
using VecI = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

inline VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
// x - 0.0f is exactly x (x + 0.0f is not, for -0.0), so this folds to a plain broadcast.
inline VecF splat(float x) { return x - VecF{}; }
inline VecF max(VecF a, VecF b) { return a > b ? a : b; }

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// 2^x for x <= 0 (the softmax's arguments), 0 below -126 (and for -inf): 2^round(x) built in the exponent bits
// times 2^f, f in [-0.5, 0.5], by its degree-6 Taylor polynomial (relative error 1.2e-7, about 1 ulp).
inline VecF exp2_nonpositive(VecF x) {
  const VecF lowest = splat(-126.0f);
  const VecF clamped = x < lowest ? lowest : x;
  const VecF round_magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const VecF shifted = clamped + round_magic;
  const VecF rounded = shifted - round_magic;
  const VecF f = clamped - rounded;
  VecF poly = splat(1.5403530393381606e-4f);  // ln2^k / k!, k = 6 .. 0
  poly = poly * f + 1.3333558146428443e-3f;
  poly = poly * f + 9.6181291076284772e-3f;
  poly = poly * f + 5.5504108664821580e-2f;
  poly = poly * f + 2.4022650695910071e-1f;
  poly = poly * f + 6.9314718055994531e-1f;
  poly = poly * f + 1.0f;
  VecI shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
  const VecI exponent_bits = (shifted_bits - 0x4B400000 + 127) << 23;
  VecF power_of_two;
  std::memcpy(&power_of_two, &exponent_bits, sizeof power_of_two);
  const VecF result = poly * power_of_two;
  return x < lowest ? VecF{} : result;
}

// out[r][c .. c + kTileCols) = sum_d a[r][d] * b[d][c .. c + kTileCols) for Rows rows: the register-tiled inner
// product of every micro-kernel (a is broadcast one element at a time, b read as two vectors per d).
template <int Rows>
inline void gemm_tile(const float* a, int64_t a_row_stride, int64_t a_col_stride, const float* b,
                      int64_t b_row_stride, int64_t depth, VecF (&acc)[Rows][2]) {
  for (int64_t d = 0; d < depth; ++d) {
    const VecF b0 = load(b + d * b_row_stride), b1 = load(b + d * b_row_stride + kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const VecF a_rd = splat(a[r * a_row_stride + d * a_col_stride]);
      acc[r][0] += a_rd * b0;
      acc[r][1] += a_rd * b1;
    }
  }
}

// out[r][c .. c + kTileCols) (+)= sum_d a[r][d] * b[d][c .. c + kTileCols) for Rows rows; Accumulate adds to out.
template <int Rows, bool Accumulate>
void matmul_tile(const float* a, int64_t a_row_stride, int64_t a_col_stride, const float* b, int64_t b_row_stride,
                 int64_t depth, float* out, int64_t out_stride) {
  VecF acc[Rows][2] = {};
  if constexpr (Accumulate) {
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      acc[r][0] = load(out + r * out_stride);
      acc[r][1] = load(out + r * out_stride + kLanes);
    }
  }
  gemm_tile<Rows>(a, a_row_stride, a_col_stride, b, b_row_stride, depth, acc);
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    store(out + r * out_stride, acc[r][0]);
    store(out + r * out_stride + kLanes, acc[r][1]);
  }
}

template <bool Accumulate, size_t... I>
constexpr std::array<decltype(&matmul_tile<1, Accumulate>), kTileRows + 1> matmul_tiles(std::index_sequence<I...>) {
  return {nullptr, &matmul_tile<I + 1, Accumulate>...};
}

// out (rows x cols) (+)= a (rows x depth) . b (depth x cols), a element (r, d) at a[r * a_row_stride + d *
// a_col_stride] (so either layout of a), b and out row-major; cols a multiple of kTileCols (b and out padded).
template <bool Accumulate>
void matmul(int64_t rows, int64_t cols, const float* a, int64_t a_row_stride, int64_t a_col_stride, const float* b,
            int64_t b_row_stride, int64_t depth, float* out, int64_t out_stride) {
  static constexpr auto kTiles = matmul_tiles<Accumulate>(std::make_index_sequence<kTileRows>());
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
    for (int64_t c = 0; c < cols; c += kTileCols) {
      kTiles[tile_rows](a + r * a_row_stride, a_row_stride, a_col_stride, b + c, b_row_stride, depth,
                        out + r * out_stride + c, out_stride);
    }
  }
}

struct FreeDeleter {
  template <typename U>
  void operator()(U* p) const { std::free(p); }
};
template <typename U>
using Buffer = std::unique_ptr<U[], FreeDeleter>;
using FloatBuffer = Buffer<float>;

// Zeroed and cache-line aligned: padding that is never written stays zero and adds nothing to the products.
template <typename U = float>
inline Buffer<U> make_buffer(int64_t n) {
  const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(U), 64));
  U* p = static_cast<U*>(std::aligned_alloc(64, bytes));
  std::memset(p, 0, bytes);
  return Buffer<U>(p);
}

}  // namespace llama_kernels::cpu::inline LLAMA_KERNELS_ISA_NAMESPACE::tiles
