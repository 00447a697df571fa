// The AMX tile registers as the amx path's bf16 products use them (attention_tiles.h's tile_pair_matmul): eight
// tiles of 16 rows x 64 bytes, loaded from and stored to memory a row stride apart, and TDPBF16PS, which adds to
// each fp32 element (m, n) of an accumulator tile the 16 pair products a[m][k] . b[k][n] of a 16 x 16 pair tile
// a (rows of bf16 pairs) and a 16 x 16 pair tile b (VNNI: row k holds the pair k of 16 columns).
//
// With LLAMA_KERNELS_AMX_EMULATED (CMake's ctest build only), the same calls run in plain C++ on tiles in memory,
// following TDPBF16PS's definition, so that the amx path's products are tested on a CPU without AMX; each call
// checks that the tiles are configured, as the hardware faults when they are not.
#pragma once

#include <cstdint>

#if defined(LLAMA_KERNELS_AMX_EMULATED)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#else
#include <immintrin.h>
#endif

#include "cpu/isa.h"

namespace llama_kernels::cpu::inline LLAMA_KERNELS_ISA_NAMESPACE::amx_tiles {

inline constexpr int kTileRows = 16;
inline constexpr int kTileBytes = 64;  // per row: 16 fp32, or 16 bf16 pairs

// Palette 1 with every tile at its largest: one configuration serves every product.
struct alignas(64) Config {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t row_bytes[16] = {kTileBytes, kTileBytes, kTileBytes, kTileBytes,
                            kTileBytes, kTileBytes, kTileBytes, kTileBytes};
  uint8_t rows[16] = {kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows, kTileRows};
};
static_assert(sizeof(Config) == 64);

#if defined(LLAMA_KERNELS_AMX_EMULATED)
struct EmulatedTiles {
  alignas(64) uint8_t tile[8][kTileRows][kTileBytes];
  bool configured;
};
inline thread_local EmulatedTiles emulated{};

inline void require_configured() {
  if (!emulated.configured) {
    std::fprintf(stderr, "amx: a tile instruction without a tile configuration\n");
    std::abort();
  }
}
inline float bf16_at(const uint8_t* row, int index) {
  uint16_t bits;
  std::memcpy(&bits, row + 2 * index, 2);
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, 4);
  return value;
}

// LDTILECFG zeroes every tile.
inline void configure() { emulated = EmulatedTiles{.tile = {}, .configured = true}; }
inline void release() { emulated.configured = false; }
template <int T>
void zero() {
  require_configured();
  std::memset(emulated.tile[T], 0, sizeof emulated.tile[T]);
}
template <int T>
void load(const void* base, int64_t row_stride_bytes) {
  require_configured();
  for (int r = 0; r < kTileRows; ++r) {
    std::memcpy(emulated.tile[T][r], static_cast<const uint8_t*>(base) + r * row_stride_bytes, kTileBytes);
  }
}
template <int T>
void store(void* base, int64_t row_stride_bytes) {
  require_configured();
  for (int r = 0; r < kTileRows; ++r) {
    std::memcpy(static_cast<uint8_t*>(base) + r * row_stride_bytes, emulated.tile[T][r], kTileBytes);
  }
}
// TDPBF16PS as the manual writes it: for each pair k, the odd halves' product added first, then the even's.
template <int C, int A, int B>
void dot() {
  require_configured();
  for (int m = 0; m < kTileRows; ++m) {
    float acc[16];
    std::memcpy(acc, emulated.tile[C][m], sizeof acc);
    for (int k = 0; k < 16; ++k) {
      for (int n = 0; n < 16; ++n) {
        acc[n] += bf16_at(emulated.tile[A][m], 2 * k + 1) * bf16_at(emulated.tile[B][k], 2 * n + 1);
        acc[n] += bf16_at(emulated.tile[A][m], 2 * k) * bf16_at(emulated.tile[B][k], 2 * n);
      }
    }
    std::memcpy(emulated.tile[C][m], acc, sizeof acc);
  }
}
#else
// GCC's _tile_* macros paste their tile numbers into the instruction's text; these take them as template arguments
// (the same encodings), and tell the compiler that loads and stores touch memory.
inline void configure() {
  static const Config config;
  _tile_loadconfig(&config);
}
inline void release() { _tile_release(); }
template <int T>
void zero() {
  asm volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int T>
void load(const void* base, int64_t row_stride_bytes) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(row_stride_bytes), "i"(T) : "memory");
}
template <int T>
void store(void* base, int64_t row_stride_bytes) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(row_stride_bytes), "i"(T) : "memory");
}
template <int C, int A, int B>
void dot() {
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}
#endif

}  // namespace llama_kernels::cpu::inline LLAMA_KERNELS_ISA_NAMESPACE::amx_tiles
