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

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "cpu/isa.h"
#if defined(__AMX_BF16__)
#include "cpu/amx.h"
#endif

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
// The amx path's bf16 products whose a has its pairs along its rows run on the AMX tiles (tile_pair_matmul).
#if defined(__AMX_BF16__)
inline constexpr bool kAmxTiles = true;
#else
inline constexpr bool kAmxTiles = false;
#endif

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

#if defined(__AVX512BF16__)
// The bf16 paths' products (avx512_bf16, amx): operands as uint32, each two bf16 values (the low half first) that
// one vdpbf16ps multiplies exactly and adds, in fp32, to one lane.
inline constexpr bool kBf16Dots = true;

// acc[r][..] += sum_p a[r][p] . b[p][c .. c + kTileCols) for Rows rows, a's element (r, p) at a[r * a_row_stride +
// p * a_col_stride] (broadcast), b row-major.
template <int Rows>
inline void pair_dots(const uint32_t* a, int64_t a_row_stride, int64_t a_col_stride, const uint32_t* b,
                      int64_t b_stride, int64_t n_pairs, __m512 (&acc)[Rows][2]) {
  for (int64_t p = 0; p < n_pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * b_stride);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * b_stride + kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const __m512bh a_rp = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_row_stride + p * a_col_stride]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a_rp, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a_rp, b1);
    }
  }
}

template <int Rows, bool Accumulate>
void pair_matmul_tile(const uint32_t* a, int64_t a_row_stride, int64_t a_col_stride, const uint32_t* b,
                      int64_t b_stride, int64_t n_pairs, float scale, float* out, int64_t out_stride) {
  __m512 acc[Rows][2];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  pair_dots<Rows>(a, a_row_stride, a_col_stride, b, b_stride, n_pairs, acc);
  const __m512 scale_v = _mm512_set1_ps(scale);
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    for (int half = 0; half < 2; ++half) {
      float* o = out + r * out_stride + half * kLanes;
      __m512 result = _mm512_mul_ps(acc[r][half], scale_v);
      if constexpr (Accumulate) result = _mm512_add_ps(result, _mm512_loadu_ps(o));
      _mm512_storeu_ps(o, result);
    }
  }
}

template <bool Accumulate, size_t... I>
constexpr auto pair_matmul_tiles(std::index_sequence<I...>) {
  return std::array<decltype(&pair_matmul_tile<1, Accumulate>), kTileRows + 1>{
      nullptr, &pair_matmul_tile<I + 1, Accumulate>...};
}

// out (rows x cols) (+)= scale * sum_p a[r][p] . b[p][..], a as in pair_dots, cols a multiple of kTileCols.
template <bool Accumulate>
void pair_matmul(int64_t rows, int64_t cols, const uint32_t* a, int64_t a_row_stride, int64_t a_col_stride,
                 const uint32_t* b, int64_t b_stride, int64_t n_pairs, float scale, float* out, int64_t out_stride) {
  static constexpr auto kTiles = pair_matmul_tiles<Accumulate>(std::make_index_sequence<kTileRows>());
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
    for (int64_t c = 0; c < cols; c += kTileCols) {
      kTiles[tile_rows](a + r * a_row_stride, a_row_stride, a_col_stride, b + c, b_stride, n_pairs, scale,
                        out + r * out_stride + c, out_stride);
    }
  }
}

#if defined(__AMX_BF16__)
inline constexpr int64_t kAmxDim = amx_tiles::kTileRows;  // a tile's rows, fp32 columns and bf16 pair columns

// pair_matmul with a's pairs along its rows (a_col_stride 1) on the tiles, configured by a TileScope that the caller
// holds: out in blocks of 32 x 32 (the last rows:
// 16 x 32), each four (two) accumulator tiles summed over 16 pairs at a time. With scale 1 a whole block's tiles
// start from (or at zero) and end in out itself; otherwise they are scaled (and added) on the way out through an L1
// block, so that only out's rows < rows are written. The tiles read whole 16 x 16 blocks: a needs
// round_up(rows, 16) rows of round_up(n_pairs, 16) pairs, those from n_pairs on zero; b needs that many rows, finite;
// cols is a multiple of 32.
template <bool Accumulate>
void tile_pair_matmul(int64_t rows, int64_t cols, const uint32_t* a, int64_t a_stride, const uint32_t* b,
                      int64_t b_stride, int64_t n_pairs, float scale, float* out, int64_t out_stride) {
  alignas(64) float block[2 * kAmxDim][2 * kAmxDim];
  constexpr int64_t kBlockBytes = sizeof block[0];
  const int64_t a_bytes = a_stride * 4, b_bytes = b_stride * 4, out_bytes = out_stride * 4;
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; r += 2 * kAmxDim) {
    const bool two_row_tiles = rows - r > kAmxDim;
    const bool in_place = scale == 1.0f && rows - r >= 2 * kAmxDim;
    for (int64_t c = 0; c < cols; c += 2 * kAmxDim) {
      float* out_block = out + r * out_stride + c;
      if (in_place && Accumulate) {
        amx_tiles::load<0>(out_block, out_bytes);
        amx_tiles::load<1>(out_block + kAmxDim, out_bytes);
        amx_tiles::load<2>(out_block + kAmxDim * out_stride, out_bytes);
        amx_tiles::load<3>(out_block + kAmxDim * out_stride + kAmxDim, out_bytes);
      } else {
        amx_tiles::zero<0>();
        amx_tiles::zero<1>();
        if (two_row_tiles) {
          amx_tiles::zero<2>();
          amx_tiles::zero<3>();
        }
      }
      for (int64_t p = 0; p < n_pairs; p += kAmxDim) {
        amx_tiles::load<4>(a + r * a_stride + p, a_bytes);
        amx_tiles::load<6>(b + p * b_stride + c, b_bytes);
        amx_tiles::load<7>(b + p * b_stride + c + kAmxDim, b_bytes);
        amx_tiles::dot<0, 4, 6>();
        amx_tiles::dot<1, 4, 7>();
        if (two_row_tiles) {
          amx_tiles::load<5>(a + (r + kAmxDim) * a_stride + p, a_bytes);
          amx_tiles::dot<2, 5, 6>();
          amx_tiles::dot<3, 5, 7>();
        }
      }
      if (in_place) {
        amx_tiles::store<0>(out_block, out_bytes);
        amx_tiles::store<1>(out_block + kAmxDim, out_bytes);
        amx_tiles::store<2>(out_block + kAmxDim * out_stride, out_bytes);
        amx_tiles::store<3>(out_block + kAmxDim * out_stride + kAmxDim, out_bytes);
        continue;
      }
      amx_tiles::store<0>(&block[0][0], kBlockBytes);
      amx_tiles::store<1>(&block[0][kAmxDim], kBlockBytes);
      if (two_row_tiles) {
        amx_tiles::store<2>(&block[kAmxDim][0], kBlockBytes);
        amx_tiles::store<3>(&block[kAmxDim][kAmxDim], kBlockBytes);
      }
      const int64_t block_rows = std::min(2 * kAmxDim, rows - r);
      for (int64_t i = 0; i < block_rows; ++i) {
        for (int64_t half = 0; half < 2; ++half) {
          float* o = out_block + i * out_stride + half * kAmxDim;
          __m512 result = _mm512_mul_ps(_mm512_load_ps(&block[i][half * kAmxDim]), scale_v);
          if constexpr (Accumulate) result = _mm512_add_ps(result, _mm512_loadu_ps(o));
          _mm512_storeu_ps(o, result);
        }
      }
    }
  }
}
#endif

// pair_matmul with a's pairs along its rows: on the AMX tiles where the path has them (tile_pair_matmul: a and b
// padded as it says), else vdpbf16ps.
template <bool Accumulate>
void pair_matmul_rows(int64_t rows, int64_t cols, const uint32_t* a, int64_t a_stride, const uint32_t* b,
                      int64_t b_stride, int64_t n_pairs, float scale, float* out, int64_t out_stride) {
#if defined(__AMX_BF16__)
  tile_pair_matmul<Accumulate>(rows, cols, a, a_stride, b, b_stride, n_pairs, scale, out, out_stride);
#else
  pair_matmul<Accumulate>(rows, cols, a, a_stride, 1, b, b_stride, n_pairs, scale, out, out_stride);
#endif
}

// The zero-masked forms: GCC 12's unmasked ones start from _mm512_undefined_epi32, which -Wall reports.
inline constexpr __mmask16 kAllLanes = 0xffff;
inline constexpr __mmask8 kAllQwords = 0xff;

// dst[c][r] = src[r][c] for 32-bit elements, r < src_rows and c < cols (both multiples of 16), the rows from
// valid_rows on read as zeros: 16 x 16 blocks transposed in registers (pairs of elements, of those pairs, then of
// 128-bit lanes, twice).
inline void transpose_words(const uint32_t* src, int64_t src_stride, int64_t src_rows, int64_t valid_rows,
                            int64_t cols, uint32_t* dst, int64_t dst_stride) {
  for (int64_t r0 = 0; r0 < src_rows; r0 += kLanes) {
    for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
      __m512i x[16], y[16];
      for (int i = 0; i < 16; ++i) {
        x[i] = r0 + i < valid_rows ? _mm512_loadu_si512(src + (r0 + i) * src_stride + c0) : _mm512_setzero_si512();
      }
      for (int i = 0; i < 16; i += 2) {  // y[i]: columns 4l, 4l + 1 of rows i, i + 1 in lane l; y[i + 1]: 4l + 2, + 3
        y[i] = _mm512_maskz_unpacklo_epi32(kAllLanes, x[i], x[i + 1]);
        y[i + 1] = _mm512_maskz_unpackhi_epi32(kAllLanes, x[i], x[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {  // x[i + j]: column 4l + j of rows i .. i + 3 in lane l
        x[i] = _mm512_maskz_unpacklo_epi64(kAllQwords, y[i], y[i + 2]);
        x[i + 1] = _mm512_maskz_unpackhi_epi64(kAllQwords, y[i], y[i + 2]);
        x[i + 2] = _mm512_maskz_unpacklo_epi64(kAllQwords, y[i + 1], y[i + 3]);
        x[i + 3] = _mm512_maskz_unpackhi_epi64(kAllQwords, y[i + 1], y[i + 3]);
      }
      for (int j = 0; j < 4; ++j) {  // y[4g + j]: lanes (0, 2) then (1, 3) of rows 8g .. 8g + 7's x[.. + j]
        for (int g = 0; g < 2; ++g) {
          y[8 * g + j] = _mm512_maskz_shuffle_i32x4(kAllLanes, x[8 * g + j], x[8 * g + 4 + j], 0x88);
          y[8 * g + 4 + j] = _mm512_maskz_shuffle_i32x4(kAllLanes, x[8 * g + j], x[8 * g + 4 + j], 0xdd);
        }
      }
      for (int j = 0; j < 8; ++j) {  // column j (and j + 8): its four groups of four rows
        x[j] = _mm512_maskz_shuffle_i32x4(kAllLanes, y[j], y[8 + j], 0x88);
        x[8 + j] = _mm512_maskz_shuffle_i32x4(kAllLanes, y[j], y[8 + j], 0xdd);
      }
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (c0 + i) * dst_stride + r0, x[i]);
    }
  }
}

// out[c] = row0[c] | row1[c] << 16 for c < n (row1 null: zeros), two bf16 rows interleaved, and zeros up to the
// next multiple of kTileCols: b's pairs along rows of a row-major bf16 matrix.
inline void interleave_rows(const void* row0, const void* row1, int64_t n, uint32_t* out) {
  // permutex2var's indices: 0-31 pick from row0, 32-63 from row1; the low half of the columns, then the high.
  alignas(64) static constexpr uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  const auto* first = static_cast<const uint16_t*>(row0);
  const auto* second = static_cast<const uint16_t*>(row1);
  for (int64_t c = 0; c < n; c += kTileCols) {
    const int64_t left = n - c;
    const __mmask32 mask = left >= kTileCols ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
    const __m512i a = _mm512_maskz_loadu_epi16(mask, first + c);
    const __m512i b = second ? _mm512_maskz_loadu_epi16(mask, second + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + c, _mm512_permutex2var_epi16(a, low, b));
    _mm512_storeu_si512(out + c + kLanes, _mm512_permutex2var_epi16(a, high, b));
  }
}

// out[q][c] = bf16(src[2q][c]) | bf16(src[2q + 1][c]) << 16 for n_rows rows of floats (an odd count's last pair:
// zero above) and cols columns (a multiple of kLanes): pairs along the rows of a float matrix, rounded.
inline void pair_float_rows(const float* src, int64_t src_stride, int64_t n_rows, int64_t cols, uint32_t* out,
                            int64_t out_stride) {
  const auto widened = [](const float* p) {
    return _mm512_maskz_cvtepu16_epi32(kAllLanes, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p)));
  };
  for (int64_t j = 0; j < n_rows; j += 2) {
    for (int64_t c = 0; c < cols; c += kLanes) {
      const __m512i low = widened(src + j * src_stride + c);
      const __m512i high = j + 1 < n_rows ? widened(src + (j + 1) * src_stride + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + j / 2 * out_stride + c,
                          _mm512_or_si512(low, _mm512_maskz_slli_epi32(kAllLanes, high, 16)));
    }
  }
}

// Each of n_rows float rows rounded to bf16 in place of pairs (cols a multiple of kLanes): pairs along columns.
inline void round_float_rows(const float* src, int64_t src_stride, int64_t n_rows, int64_t cols, uint32_t* out,
                             int64_t out_stride) {
  for (int64_t j = 0; j < n_rows; ++j) {
    for (int64_t c = 0; c < cols; c += kLanes) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * out_stride + c / 2),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j * src_stride + c)));
    }
  }
}
#else
inline constexpr bool kBf16Dots = false;
#endif

// The AMX tiles configured for tile_pair_matmul while it lives, where wanted on the amx path (a tile of work with
// bf16 pair products): LDTILECFG costs too much to pay per product, and the tiles keep their configuration until
// released. Nothing on the other paths.
class TileScope {
 public:
  explicit TileScope(bool wanted) : active_(kAmxTiles && wanted) {
#if defined(__AMX_BF16__)
    if (active_) amx_tiles::configure();
#endif
  }
  ~TileScope() {
#if defined(__AMX_BF16__)
    if (active_) amx_tiles::release();
#endif
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  bool active_;
};

// A row of 16-bit values (bf16: their .bits) as pairs along it, each a uint32 with the low half first: the pair p
// of n values (bits_pair; an odd n's last pair zero above), or the whole row into (n + 1) / 2 of them (row_pairs).
template <typename T>
inline uint32_t bits_pair(const T* row, int64_t p, int64_t n) {
  return row[2 * p].bits | (2 * p + 1 < n ? static_cast<uint32_t>(row[2 * p + 1].bits) << 16 : 0u);
}
template <typename T>
inline void row_pairs(const T* row, int64_t n, uint32_t* out) {
  std::memcpy(out, row, n * 2);  // little-endian: value 2p is pair p's low half
  if (n % 2) out[n / 2] &= 0xffffu;
}

// Asks for a row of n values into L2 ahead of its use. A head's rows of a token-major tensor lie a page or more
// apart (7B: 32 heads x 256 bytes), further than the hardware prefetchers follow, so a block of keys read one
// head at a time waits on memory for every row unless the block before it asked for them.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(bytes + offset, 0, 2);
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
