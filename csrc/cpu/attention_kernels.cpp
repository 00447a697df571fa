// Flash-attention forward on the CPU (see attention_kernels.h for the contract).
//
// Work item: one (batch, kv head, block of queries). Its tile holds the queries of the block for every query head
// of the kv group (row r = query (r / group), head (r % group)), so each key/value block is converted once per
// group. The tile loops over key blocks with an online softmax: running max m and sum l per row in fp32, the
// output accumulator rescaled by 2^(m_old - m_new) whenever the max grows. Memory is O(tile), never Sq x Sk.
//
// The two products are small GEMMs done by register-tiled micro-kernels written with GCC vector extensions (so
// they compile to AVX-512, AVX2 or SSE, whichever the path's flags allow, with FMA):
//   scores^T (keys x rows)  = K_block (keys x D) . Q_tile^T (D x rows)   -- q is transposed once per tile and
//                                                                          k is used in its natural layout;
//   acc (rows x D)         += P (rows x keys) . V_block (keys x D)      -- P read from scores^T by broadcast.
// Keeping scores transposed puts the rows (queries) along the vector lanes, so the softmax (max, exp, sum per
// row) is vectorized down the columns of scores^T without any horizontal reduction. A narrow tile, of a few rows
// (decoding: one query per head of the group), would mostly multiply and exponentiate padding that way: it keeps
// its scores row-major with the keys along the lanes, each score a dot product along D whose partial sums are
// added across lanes a vector of keys at a time (lane_sums), and its P V reads P by rows.
// Scores are kept in log2 units (q is pre-multiplied by softmax_scale * log2(e)) so that exp is one exp2.
// Decoding (every query of a kv head in one tile) splits the keys too: a work item is (batch, kv head, chunk of
// keys), each chunk leaves its running max, sum and accumulator, and a second loop merges a tile's chunks in chunk
// order (the log-sum-exp of the partial softmaxes). The chunk length depends on the cache's length only, so the
// result is the same on any number of threads.
// With AVX512-BF16 (the avx512_bf16 and amx paths), a bf16 tile's products are vdpbf16ps, each instruction two exact
// products per lane summed in fp32: scores^T with k and q left bf16, in pairs along D (the same sums the fp32
// product forms, in another order), scaled to log2 units afterwards; P V with P rounded to bf16 after the fp32
// softmax (as the GPU kernels round it for their bf16 matmul: the row sums stay fp32's) and v in pairs of keys.
// On the amx path a wide tile's two products run on the AMX tiles instead (tile_pair_matmul), which take the left
// operand with its pairs along its rows: k's rows already are; P's pairs of keys are transposed to its rows, and the
// accumulator rescaled before the product adds to it.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "cpu/attention_kernels.h"
#include "cpu/attention_tiles.h"

namespace llama_kernels::cpu {
namespace {

using namespace tiles;

// acc[r][c .. c + kTileCols) = rescale[r] * acc[r][...] + sum_j p[r][j] * v[j][c .. c + kTileCols) for Rows
// rows r, over n_keys keys, p's element (r, j) at p[r * p_row_stride + j * p_key_stride] (either layout of the
// scores).
template <int Rows>
void pv_tile(const float* p, int64_t p_row_stride, int64_t p_key_stride, const float* v, int64_t v_stride,
             int64_t n_keys, const float* rescale, float* acc, int64_t acc_stride) {
  VecF tile[Rows][2];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    tile[r][0] = load(acc + r * acc_stride) * rescale[r];
    tile[r][1] = load(acc + r * acc_stride + kLanes) * rescale[r];
  }
  gemm_tile<Rows>(p, p_row_stride, p_key_stride, v, v_stride, n_keys, tile);
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    store(acc + r * acc_stride, tile[r][0]);
    store(acc + r * acc_stride + kLanes, tile[r][1]);
  }
}

// A vector of v's values as floats: fp32 loaded, bf16 widened (exact: its bits are a float's high half).
inline VecF load_values(const float* v) { return load(v); }
inline VecF load_values(const bf16* v) {
  using VecU16 = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  VecU16 bits;
  std::memcpy(&bits, v, sizeof bits);
  const VecI widened = __builtin_convertvector(bits, VecI) << 16;
  VecF values;
  std::memcpy(&values, &widened, sizeof values);
  return values;
}

// pv_tile for a single row over Vecs vectors of columns: each v row (fp32, or bf16 read from the cache) read whole
// and in order (the two-vector tiles would sweep a block's rows once per 32 columns).
template <int Vecs, typename Row>
void pv_row(const float* p, const Row* v, int64_t v_stride, int64_t n_keys, float rescale, float* acc) {
  VecF row[Vecs];
#pragma GCC unroll 16
  for (int i = 0; i < Vecs; ++i) row[i] = load(acc + i * kLanes) * rescale;
  for (int64_t j = 0; j < n_keys; ++j) {
    const VecF p_j = splat(p[j]);
#pragma GCC unroll 16
    for (int i = 0; i < Vecs; ++i) row[i] += p_j * load_values(v + j * v_stride + i * kLanes);
  }
#pragma GCC unroll 16
  for (int i = 0; i < Vecs; ++i) store(acc + i * kLanes, row[i]);
}

inline constexpr int64_t kPvRowCols = 8 * kLanes;  // pv_row's widest: 8 accumulators, whatever the vector width

// A single row's PV over the keys [0, n_keys), in runs of `run` rows spaced `stride` apart, run j0 at run_at(j0):
// pv_row up to kPvRowCols columns at a time. Not inlined: inside attention_tile it slowed the bf16 pair products
// of the other tiles (gcc's choices there).
template <typename Row, typename RunAt>
__attribute__((noinline)) void pv_single_row(const float* p, RunAt run_at, int64_t stride, int64_t n_keys,
                                             int64_t run, float rescale, float* acc, int64_t head_dim_padded) {
  static constexpr std::array<decltype(&pv_row<2, Row>), 5> kByVectors = {
      nullptr, &pv_row<2, Row>, &pv_row<4, Row>, &pv_row<6, Row>, &pv_row<8, Row>};  // by columns / kTileCols
  for (int64_t j0 = 0; j0 < n_keys; j0 += run) {
    const Row* rows = run_at(j0);
    for (int64_t c = 0; c < head_dim_padded; c += kPvRowCols) {
      kByVectors[std::min(kPvRowCols, head_dim_padded - c) / kTileCols](
          p + j0, rows + c, stride, std::min(run, n_keys - j0), j0 == 0 ? rescale : 1.0f, acc + c);
    }
  }
}

// The shuffle that takes two vectors of keys, 2 * half lanes each, to one of keys with half lanes each, keys in
// order: lane l of the result is key slot l / half, from the first vector (its slots come first) or the second,
// and the lower (upper: the upper) half of that key's lanes.
constexpr int halving_source(int lane, int half, bool upper) {
  const int slots_per_input = kLanes / (2 * half), slot = lane / half;
  const int from_second = slot >= slots_per_input ? 1 : 0;
  return from_second * kLanes + (slot - from_second * slots_per_input) * 2 * half + lane % half + (upper ? half : 0);
}
template <int Half, bool Upper, size_t... L>
constexpr VecI halving_mask(std::index_sequence<L...>) {
  return VecI{halving_source(static_cast<int>(L), Half, Upper)...};
}

// Pairs of the 2 * Half vectors v[0 ..) added into v[0 .. Half), each key's partial sums going from 2 * Half lanes
// to Half (keys in order), and on until every key has one lane: v[0].
template <int Half>
inline void add_halves(VecF* v) {
  constexpr VecI lower = halving_mask<Half, false>(std::make_index_sequence<kLanes>());
  constexpr VecI upper = halving_mask<Half, true>(std::make_index_sequence<kLanes>());
  for (int i = 0; i < Half; ++i) {
    v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lower) + __builtin_shuffle(v[2 * i], v[2 * i + 1], upper);
  }
  if constexpr (Half > 1) add_halves<Half / 2>(v);
}

// Lane j of the result: the sum of v[j]'s lanes (kLanes horizontal sums in 2 (kLanes - 1) shuffles and kLanes - 1
// adds, where one at a time takes log2(kLanes) steps each). Overwrites v.
inline VecF lane_sums(VecF (&v)[kLanes]) {
  add_halves<kLanes / 2>(v);
  return v[0];
}

struct FloatDot {
  VecF operator()(VecF acc, const float* k, VecF q) const { return acc + load(k) * q; }
};

// scores[r][j] = scale * k[j] . q[r] for a narrow tile's rows and n_keys keys rounded up to whole vectors (the
// extra keys' scores come from stale rows of k, for the caller to mask), k's and q's rows `width` 32-bit units
// (floats, or pairs of bf16) zero-padded to a multiple of kLanes, multiplied by Dot.
template <typename Operand, typename Dot>
void score_rows(const Operand* k, int64_t k_stride, int64_t n_keys, const Operand* q, int64_t q_stride,
                int64_t rows, int64_t width, float scale, float* scores, int64_t scores_stride, Dot dot) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j0 = 0; j0 < n_keys; j0 += kLanes) {
      VecF acc[kLanes] = {};
      for (int64_t d = 0; d < width; d += kLanes) {
        VecF q_rd;
        std::memcpy(&q_rd, q + r * q_stride + d, sizeof q_rd);
#pragma GCC unroll 16
        for (int jj = 0; jj < kLanes; ++jj) acc[jj] = dot(acc[jj], k + (j0 + jj) * k_stride + d, q_rd);
      }
      store(scores + r * scores_stride + j0, lane_sums(acc) * scale);
    }
  }
}

inline float lanes_max(VecF v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  return *std::max_element(lanes, lanes + kLanes);
}
inline float lanes_sum(VecF v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

// The online softmax of one key block for a narrow tile's rows: scores row-major in log2 units, keys along the
// lanes; the keys at or past n_keys, and with needs_mask those past a row's last key (row_limit, relative to the
// whole sequence), get probability 0. Updates row_max and row_sum, and leaves each row's rescale of its accumulator.
void softmax_rows(float* scores, int64_t scores_stride, int64_t rows, int64_t n_keys, int64_t key_begin,
                  bool needs_mask, const float* row_limit, float* row_max, float* row_sum, float* rescale) {
  alignas(64) static constexpr float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const VecF iota = load(kIota), neg_inf = splat(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * scores_stride;
    const float last_in_block = static_cast<float>(n_keys - 1);
    const float last =
        needs_mask ? std::min(row_limit[r] - static_cast<float>(key_begin), last_in_block) : last_in_block;
    VecF block_max = neg_inf;
    for (int64_t j0 = 0; j0 < n_keys; j0 += kLanes) {
      const VecF masked = iota + static_cast<float>(j0) > last ? neg_inf : load(s + j0);
      store(s + j0, masked);
      block_max = max(block_max, masked);
    }
    const float new_max = std::max(row_max[r], lanes_max(block_max));
    // A row that has seen no key yet keeps max -inf; subtracting 0 instead keeps its exponentials at 0, not nan.
    const VecF shift = splat(new_max == -std::numeric_limits<float>::infinity() ? 0.0f : new_max);
    VecF sum = VecF{};
    for (int64_t j0 = 0; j0 < n_keys; j0 += kLanes) {
      const VecF p = exp2_nonpositive(load(s + j0) - shift);
      store(s + j0, p);
      sum += p;
    }
    rescale[r] = exp2_nonpositive(splat(row_max[r]) - shift)[0];
    row_max[r] = new_max;
    row_sum[r] = row_sum[r] * rescale[r] + lanes_sum(sum);
  }
}

#if defined(__AVX512BF16__)
// pv_tile's product with P and v in pairs of keys: P's pair (r, p) at p_pairs[r * p_row_stride + p *
// p_pair_stride], v_pairs (key pairs x head dims).
template <int Rows>
void pv_tile_bf16(const uint32_t* p_pairs, int64_t p_row_stride, int64_t p_pair_stride, const uint32_t* v_pairs,
                  int64_t v_stride, int64_t n_pairs, const float* rescale, float* acc, int64_t acc_stride) {
  __m512 tile[Rows][2];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    const __m512 rescale_r = _mm512_set1_ps(rescale[r]);
    tile[r][0] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * acc_stride), rescale_r);
    tile[r][1] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * acc_stride + kLanes), rescale_r);
  }
  pair_dots<Rows>(p_pairs, p_row_stride, p_pair_stride, v_pairs, v_stride, n_pairs, tile);
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    _mm512_storeu_ps(acc + r * acc_stride, tile[r][0]);
    _mm512_storeu_ps(acc + r * acc_stride + kLanes, tile[r][1]);
  }
}

template <size_t... I>
constexpr auto pv_tiles_bf16(std::index_sequence<I...>) {
  return std::array<decltype(&pv_tile_bf16<1>), kTileRows + 1>{nullptr, &pv_tile_bf16<I + 1>...};
}
constexpr auto kPvTilesBf16 = pv_tiles_bf16(std::make_index_sequence<kTileRows>());

struct Bf16PairDot {
  VecF operator()(VecF acc, const uint32_t* k, VecF q) const {
    return (VecF)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_loadu_si512(k), (__m512bh)q);
  }
};
#endif

using PvTileFn = decltype(&pv_tile<1>);

// Micro-kernels by row count, 1 .. kTileRows, for the remainders of a block.
template <size_t... I>
constexpr std::array<PvTileFn, kTileRows + 1> pv_tiles(std::index_sequence<I...>) {
  return {nullptr, &pv_tile<I + 1>...};
}
constexpr auto kPvTiles = pv_tiles(std::make_index_sequence<kTileRows>());

// One thread's buffers, sized for the largest tile.
struct Workspace {
  int64_t max_rows_padded, head_dim_padded;
  // The fp32 operands (q_t, q_rows, k_block, v_block): empty where the tile's products are bf16 pairs.
  FloatBuffer q_t;       // head_dim x max_rows_padded: the scaled q tile, transposed
  FloatBuffer q_rows;    // kTileRows x head_dim_padded: the scaled q tile of a narrow tile, row-major
  FloatBuffer k_block;   // kKeyBlock x head_dim_padded
  FloatBuffer v_block;   // kKeyBlock x head_dim_padded
  FloatBuffer scores_t;  // kKeyBlock x max_rows_padded: scores, then probabilities, key-major (a narrow tile's:
                         // kTileRows x kKeyBlock, row-major)
  FloatBuffer acc;       // max_rows_padded x head_dim_padded: unnormalized output
  FloatBuffer row_max, row_sum, rescale, row_limit;  // max_rows_padded each
  Buffer<int64_t> k_rows, v_rows;  // 2 x kKeyBlock: the offsets of a key block's rows in k and v, then the next's
  // The bf16 dot products' operands (kBf16Dots), two bf16 values to a uint32: q and k in pairs of head dims,
  // head_dim_pairs of them per row (zero-padded to pairs_padded in rows); P and v in pairs of keys.
  int64_t head_dim_pairs, pairs_padded;
  Buffer<uint32_t> q_pairs;      // pairs_padded x max_rows_padded: the unscaled q tile, pair-major
  Buffer<uint32_t> q_pair_rows;  // kTileRows x pairs_padded: the unscaled q tile of a narrow tile, row-major
  Buffer<uint32_t> k_pairs;      // kKeyBlock x pairs_padded
  Buffer<uint32_t> p_pairs;      // kKeyBlock / 2 x max_rows_padded (a narrow tile's: kTileRows x kKeyBlock / 2)
  Buffer<uint32_t> v_pairs;  // kKeyBlock / 2 x head_dim_padded
  Buffer<uint32_t> p_pair_rows;  // max_rows_padded x kKeyBlock / 2: p_pairs transposed, for the AMX tiles

  Workspace(int64_t max_rows, int64_t head_dim, bool bf16_dots)
      : max_rows_padded(round_up(max_rows, kTileCols)),
        head_dim_padded(round_up(head_dim, kTileCols)),
        q_t(make_buffer(bf16_dots ? 0 : head_dim * max_rows_padded)),
        q_rows(make_buffer(bf16_dots ? 0 : kTileRows * head_dim_padded)),
        k_block(make_buffer(bf16_dots ? 0 : kKeyBlock * head_dim_padded)),
        v_block(make_buffer(bf16_dots ? 0 : kKeyBlock * head_dim_padded)),
        scores_t(make_buffer(kKeyBlock * max_rows_padded)),
        acc(make_buffer(max_rows_padded * head_dim_padded)),
        row_max(make_buffer(max_rows_padded)),
        row_sum(make_buffer(max_rows_padded)),
        rescale(make_buffer(max_rows_padded)),
        row_limit(make_buffer(max_rows_padded)),
        k_rows(make_buffer<int64_t>(2 * kKeyBlock)),
        v_rows(make_buffer<int64_t>(2 * kKeyBlock)),
        head_dim_pairs((head_dim + 1) / 2),
        pairs_padded(round_up(head_dim_pairs, kLanes)),
        q_pairs(make_buffer<uint32_t>(bf16_dots ? pairs_padded * max_rows_padded : 0)),
        q_pair_rows(make_buffer<uint32_t>(bf16_dots ? kTileRows * pairs_padded : 0)),
        k_pairs(make_buffer<uint32_t>(bf16_dots ? kKeyBlock * pairs_padded : 0)),
        p_pairs(make_buffer<uint32_t>(bf16_dots ? kKeyBlock / 2 * max_rows_padded : 0)),
        v_pairs(make_buffer<uint32_t>(bf16_dots ? kKeyBlock / 2 * head_dim_padded : 0)),
        p_pair_rows(make_buffer<uint32_t>(bf16_dots && kAmxTiles ? max_rows_padded * kKeyBlock / 2 : 0)) {}
};

struct TileArgs {
  int64_t batch_index, kv_head, q_begin, q_count;
  int64_t key_first, key_limit;  // the chunk of keys [key_first, key_limit), before the tile's own limits
};

// Keys per chunk when decoding splits the cache: at least kMinSplitKeys (the merge then costs under 1% of the
// chunk's products), at most kMaxSplits chunks (the partials, n_splits fp32 copies of o, stay
// bounded), whole key blocks.
inline constexpr int64_t kMinSplitKeys = 256, kMaxSplits = 64;
inline int64_t split_keys(int64_t seqlen_k) {
  return round_up(std::max(kMinSplitKeys, (seqlen_k + kMaxSplits - 1) / kMaxSplits), kKeyBlock);
}

// A chunk's unnormalized softmax state for each row of its tile: acc (head_dim_padded floats), then max and sum.
struct SplitPartials {
  float* data;
  int64_t row_floats;  // head_dim_padded + 2
  int64_t n_splits, rows;
  float* row(int64_t tile, int64_t split, int64_t r) const {
    return data + ((tile * n_splits + split) * rows + r) * row_floats;
  }
};

// o's row and its lse from a row's unnormalized accumulator acc, max (log2 units) and sum.
template <typename T>
void store_row(const float* acc, float row_max, float sum, int64_t head_dim, T* o_row, float* lse) {
  const float inv_sum = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) o_row[d] = from_float<T>(acc[d] * inv_sum);
  *lse = sum > 0.0f ? row_max * kLn2 + std::log(sum) : -std::numeric_limits<float>::infinity();
}

// out[j] = the offset of key position first + j of sequence b (its kv head left out) in a cache, contiguous or
// paged, for j < n: the pages walked in order, one table entry per page (none past position first + n - 1).
inline void key_offsets(HeadStrides strides, int64_t b, int64_t first, int64_t n, const KvPages* pages,
                        int64_t* out) {
  if (pages == nullptr) {
    for (int64_t j = 0; j < n; ++j) out[j] = b * strides.batch + (first + j) * strides.token;
    return;
  }
  const int32_t* table = pages->block_table + b * pages->max_blocks_per_seq;
  int64_t block = first / pages->block_size, row = first % pages->block_size;
  int64_t page_offset = table[block] * strides.batch;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = page_offset + row * strides.token;
    if (++row == pages->block_size && j + 1 < n) {
      row = 0;
      page_offset = table[++block] * strides.batch;
    }
  }
}

// The length of the runs, from rows[0] on, in which the row offsets rows[0 .. n) are evenly spaced, all at one
// spacing: n for a contiguous cache (or a block within one page), a page's rows where a paged block crosses pages;
// 0 when the rows fall into no such runs.
inline int64_t even_runs(const int64_t* rows, int64_t n, int64_t& spacing) {
  spacing = n > 1 ? rows[1] - rows[0] : 0;
  int64_t run = 1;
  while (run < n && rows[run] - rows[run - 1] == spacing) ++run;
  for (int64_t j = run + 1; j < n; ++j) {
    if (j % run != 0 && rows[j] - rows[j - 1] != spacing) return 0;
  }
  return run;
}

template <typename T>
void attention_tile(const T* q, HeadStrides q_strides, const T* k, HeadStrides k_strides, const T* v,
                    HeadStrides v_strides, T* o, HeadStrides o_strides, float* lse, const int32_t* seqlens_k,
                    const KvPages* pages, const AttentionProblem& problem, const TileArgs& tile, Workspace& ws,
                    const SplitPartials* partials, int64_t tile_index, int64_t split) {
  const int64_t group = problem.n_q_heads / problem.n_kv_heads;
  const int64_t head_dim = problem.head_dim;
  const int64_t rows = tile.q_count * group;
  const int64_t rows_padded = round_up(rows, kTileCols);  // the columns of the register-tiled scores
  const int64_t rows_in_vectors = round_up(rows, kLanes);  // the columns the softmax works on
  // k, v, q_rows and acc rows are all head_dim_padded long.
  const int64_t q_t_stride = rows_padded, scores_t_stride = rows_padded, row_stride = ws.head_dim_padded;
  const bool narrow = rows <= kTileRows;
  constexpr bool kPairs = kBf16Dots && std::is_same_v<T, bf16>;
  const int64_t len_k = seqlens_k ? seqlens_k[tile.batch_index] : problem.seqlen_k;
  const int64_t causal_offset = len_k - problem.seqlen_q;  // query i sees keys j <= i + causal_offset
  const int64_t key_end = std::min(
      tile.key_limit,
      problem.causal ? std::clamp<int64_t>(tile.q_begin + tile.q_count + causal_offset, 0, len_k) : len_k);
  const float scale_log2 = problem.softmax_scale * kLog2e;
  const int64_t first_head = tile.kv_head * group;
  const TileScope tile_products(kPairs && !narrow);

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t query = tile.q_begin + r / group, head = first_head + r % group;
    const T* q_row = q + tile.batch_index * q_strides.batch + query * q_strides.token + head * q_strides.head;
    if constexpr (kPairs) {
      if (narrow) {
        row_pairs(q_row, head_dim, ws.q_pair_rows.get() + r * ws.pairs_padded);
      } else {
        for (int64_t p = 0; p < ws.head_dim_pairs; ++p) ws.q_pairs[p * q_t_stride + r] = bits_pair(q_row, p, head_dim);
      }
    } else {
      for (int64_t d = 0; d < head_dim; ++d) {
        const float q_rd = to_float(q_row[d]) * scale_log2;
        if (narrow) {
          ws.q_rows[r * row_stride + d] = q_rd;
        } else {
          ws.q_t[d * q_t_stride + r] = q_rd;
        }
      }
    }
    // The last key this row sees, as a float for the vectorized mask (exact below 2^24 tokens).
    ws.row_limit[r] = static_cast<float>(query + causal_offset);
  }
  for (int64_t r = 0; r < rows_in_vectors; ++r) {
    ws.row_max[r] = -std::numeric_limits<float>::infinity();
    ws.row_sum[r] = 0.0f;
  }
  std::fill(ws.acc.get(), ws.acc.get() + rows * row_stride, 0.0f);

  const T* k_head = k + tile.kv_head * k_strides.head;
  const T* v_head = v + tile.kv_head * v_strides.head;
  for (int64_t key_begin = tile.key_first; key_begin < key_end; key_begin += kKeyBlock) {
    const int64_t n_keys = std::min(kKeyBlock, key_end - key_begin);
    const int64_t n_known = std::min(2 * kKeyBlock, key_end - key_begin);  // this block's keys and the next's
    key_offsets(k_strides, tile.batch_index, key_begin, n_known, pages, ws.k_rows.get());
    key_offsets(v_strides, tile.batch_index, key_begin, n_known, pages, ws.v_rows.get());
    // A narrow tile reads fp32 rows, bf16 keys (their own pairs) and a single row's bf16 values (pv_row widens
    // them) where they lie, when they need no padding and fall into evenly spaced runs (a run per page of a paged
    // cache): copying them to the block buffers cost more than its products. Keys only for a single row (decoding
    // without GQA) and in runs of whole vectors: score_rows reads the block once per row, and rows a token stride
    // apart share L1 sets; v in runs for a single row (pv_row takes one run at a time), else only as one run.
    int64_t k_spacing = 0, v_spacing = 0;
    const int64_t k_runs = even_runs(ws.k_rows.get(), n_keys, k_spacing);
    const int64_t v_runs = even_runs(ws.v_rows.get(), n_keys, v_spacing);
    const bool whole_keys = narrow && rows == 1 && n_keys % kLanes == 0 && k_runs > 0 && k_runs % kLanes == 0;
    bool k_in_place = false, v_in_place = false;
    const bool unpadded = narrow && head_dim == row_stride;
    if constexpr (std::is_same_v<T, float>) {
      k_in_place = unpadded && whole_keys;
      v_in_place = unpadded && v_runs > 0 && (rows == 1 || v_runs == n_keys);
    }
    if constexpr (std::is_same_v<T, bf16>) v_in_place = unpadded && rows == 1 && v_runs > 0;  // widened
    if constexpr (kPairs) k_in_place = whole_keys && head_dim == 2 * ws.pairs_padded && k_spacing % 2 == 0;
    // The products read the block in runs: from the cache where in place, else one run of the block buffer.
    const int64_t k_run = k_in_place ? k_runs : n_keys, v_run = v_in_place ? v_runs : n_keys;
    // v_block: fp32 rows, in place only for fp32 (a bf16 row's in-place reads go through pv_single_row)
    const float* v_block = v_in_place && std::is_same_v<T, float>
                               ? reinterpret_cast<const float*>(v_head + ws.v_rows[0]) : ws.v_block.get();
    const int64_t v_block_stride = v_in_place ? v_spacing : row_stride;
    for (int64_t j = 0; j < n_keys; ++j) {
      if (j + kKeyBlock < n_known) {
        prefetch_row(k_head + ws.k_rows[j + kKeyBlock], head_dim);
        prefetch_row(v_head + ws.v_rows[j + kKeyBlock], head_dim);
      }
      const T* k_row = k_head + ws.k_rows[j];
      const T* v_row = v_head + ws.v_rows[j];
#if defined(__AVX512BF16__)
      if constexpr (kPairs) {
        if (!k_in_place) row_pairs(k_row, head_dim, ws.k_pairs.get() + j * ws.pairs_padded);
        if (!v_in_place && j % 2 == 0) {
          const T* v_next = j + 1 < n_keys ? v_head + ws.v_rows[j + 1] : nullptr;
          interleave_rows(v_row, v_next, head_dim, ws.v_pairs.get() + j / 2 * row_stride);
        }
        continue;
      }
#endif
      if (!k_in_place) convert(k_row, ws.k_block.get() + j * row_stride, head_dim);
      if (!v_in_place) convert(v_row, ws.v_block.get() + j * row_stride, head_dim);
    }
    // Causal mask, only in the blocks that reach past the first query's diagonal.
    const bool needs_mask = problem.causal && key_begin + n_keys - 1 > tile.q_begin + causal_offset;

    if (narrow) {
      float* scores = ws.scores_t.get();
      for (int64_t j0 = 0; j0 < n_keys; j0 += k_run) {
        const int64_t n_run = std::min(k_run, n_keys - j0);
#if defined(__AVX512BF16__)
        if constexpr (kPairs) {
          const uint32_t* run = k_in_place ? reinterpret_cast<const uint32_t*>(k_head + ws.k_rows[j0])
                                           : ws.k_pairs.get() + j0 * ws.pairs_padded;
          score_rows(run, k_in_place ? k_spacing / 2 : ws.pairs_padded, n_run, ws.q_pair_rows.get(), ws.pairs_padded,
                     rows, ws.pairs_padded, scale_log2, scores + j0, kKeyBlock, Bf16PairDot{});
          continue;
        }
#endif
        const float* run = k_in_place ? reinterpret_cast<const float*>(k_head + ws.k_rows[j0])
                                      : ws.k_block.get() + j0 * row_stride;
        score_rows(run, k_in_place ? k_spacing : row_stride, n_run, ws.q_rows.get(), row_stride, rows,
                   round_up(head_dim, kLanes), 1.0f, scores + j0, kKeyBlock, FloatDot{});
      }
      softmax_rows(scores, kKeyBlock, rows, n_keys, key_begin, needs_mask, ws.row_limit.get(), ws.row_max.get(),
                   ws.row_sum.get(), ws.rescale.get());
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
        if (v_in_place && rows == 1) {
          pv_single_row<T>(scores, [&](int64_t j0) { return v_head + ws.v_rows[j0]; }, v_block_stride, n_keys, v_run,
                           ws.rescale[0], ws.acc.get(), ws.head_dim_padded);
          continue;
        }
      }
#if defined(__AVX512BF16__)
      if constexpr (kPairs) {
        round_float_rows(scores, kKeyBlock, rows, round_up(n_keys, kLanes), ws.p_pairs.get(), kKeyBlock / 2);
        for (int64_t c = 0; c < ws.head_dim_padded; c += kTileCols) {
          kPvTilesBf16[rows](ws.p_pairs.get(), kKeyBlock / 2, 1, ws.v_pairs.get() + c, row_stride, (n_keys + 1) / 2,
                             ws.rescale.get(), ws.acc.get() + c, row_stride);
        }
        continue;
      }
#endif
      if (rows == 1) {
        pv_single_row<float>(scores, [&](int64_t j0) { return ws.v_block.get() + j0 * row_stride; }, row_stride,
                             n_keys, n_keys, ws.rescale[0], ws.acc.get(), ws.head_dim_padded);
        continue;
      }
      for (int64_t c = 0; c < ws.head_dim_padded; c += kTileCols) {
        kPvTiles[rows](scores, kKeyBlock, 1, v_block + c, v_block_stride, n_keys, ws.rescale.get(),
                       ws.acc.get() + c, row_stride);
      }
      continue;
    }

#if defined(__AVX512BF16__)
    if constexpr (kPairs) {
      pair_matmul_rows<false>(n_keys, rows_padded, ws.k_pairs.get(), ws.pairs_padded, ws.q_pairs.get(), q_t_stride,
                              ws.head_dim_pairs, scale_log2, ws.scores_t.get(), scores_t_stride);
    } else
#endif
    {
      matmul<false>(n_keys, rows_padded, ws.k_block.get(), row_stride, 1, ws.q_t.get(), q_t_stride, head_dim,
                    ws.scores_t.get(), scores_t_stride);
    }

    const VecF neg_inf = splat(-std::numeric_limits<float>::infinity());
    for (int64_t c = 0; c < rows_in_vectors; c += kLanes) {
      const VecF old_max = load(ws.row_max.get() + c);
      VecF block_max = neg_inf;
      if (needs_mask) {
        const VecF limit = load(ws.row_limit.get() + c) - static_cast<float>(key_begin);
        for (int64_t j = 0; j < n_keys; ++j) {
          float* s = ws.scores_t.get() + j * scores_t_stride + c;
          const VecF masked = splat(static_cast<float>(j)) > limit ? neg_inf : load(s);
          store(s, masked);
          block_max = max(block_max, masked);
        }
      } else {
        for (int64_t j = 0; j < n_keys; ++j) {
          block_max = max(block_max, load(ws.scores_t.get() + j * scores_t_stride + c));
        }
      }
      const VecF new_max = max(old_max, block_max);
      // A row that has seen no key yet keeps max -inf; subtracting 0 instead keeps its exponentials at 0, not nan.
      const VecF shift = new_max == neg_inf ? VecF{} : new_max;
      const VecF rescale = exp2_nonpositive(old_max - shift);
      VecF sum = VecF{};
      for (int64_t j = 0; j < n_keys; ++j) {
        float* s = ws.scores_t.get() + j * scores_t_stride + c;
        const VecF p = exp2_nonpositive(load(s) - shift);
        store(s, p);
        sum += p;
      }
      store(ws.row_max.get() + c, new_max);
      store(ws.row_sum.get() + c, load(ws.row_sum.get() + c) * rescale + sum);
      store(ws.rescale.get() + c, rescale);
    }

#if defined(__AVX512BF16__)
    if constexpr (kPairs) {
      pair_float_rows(ws.scores_t.get(), scores_t_stride, n_keys, rows_in_vectors, ws.p_pairs.get(),
                      scores_t_stride);
      if constexpr (kAmxTiles) {
        // The tiles take P with its pairs along its rows: p_pairs transposed, zero past the block's keys.
        transpose_words(ws.p_pairs.get(), scores_t_stride, kKeyBlock / 2, (n_keys + 1) / 2, rows_in_vectors,
                        ws.p_pair_rows.get(), kKeyBlock / 2);
        for (int64_t r = 0; r < rows; ++r) {
          float* acc_row = ws.acc.get() + r * row_stride;
          for (int64_t d = 0; d < row_stride; d += kLanes) store(acc_row + d, load(acc_row + d) * ws.rescale[r]);
        }
        pair_matmul_rows<true>(rows, row_stride, ws.p_pair_rows.get(), kKeyBlock / 2, ws.v_pairs.get(), row_stride,
                               (n_keys + 1) / 2, 1.0f, ws.acc.get(), row_stride);
        continue;
      }
      for (int64_t r = 0; r < rows; r += kTileRows) {
        const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
        for (int64_t c = 0; c < ws.head_dim_padded; c += kTileCols) {
          kPvTilesBf16[tile_rows](ws.p_pairs.get() + r, 1, scores_t_stride, ws.v_pairs.get() + c, row_stride,
                                  (n_keys + 1) / 2, ws.rescale.get() + r, ws.acc.get() + r * row_stride + c,
                                  row_stride);
        }
      }
      continue;
    }
#endif
    for (int64_t r = 0; r < rows; r += kTileRows) {
      const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
      for (int64_t c = 0; c < ws.head_dim_padded; c += kTileCols) {
        kPvTiles[tile_rows](ws.scores_t.get() + r, 1, scores_t_stride, ws.v_block.get() + c, row_stride, n_keys,
                            ws.rescale.get() + r, ws.acc.get() + r * row_stride + c, row_stride);
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const float* acc_row = ws.acc.get() + r * row_stride;
    if (partials != nullptr) {
      float* partial = partials->row(tile_index, split, r);
      std::copy(acc_row, acc_row + row_stride, partial);
      partial[row_stride] = ws.row_max[r];
      partial[row_stride + 1] = ws.row_sum[r];
      continue;
    }
    const int64_t query = tile.q_begin + r / group, head = first_head + r % group;
    store_row(acc_row, ws.row_max[r], ws.row_sum[r], head_dim,
              o + tile.batch_index * o_strides.batch + query * o_strides.token + head * o_strides.head,
              lse + (tile.batch_index * problem.n_q_heads + head) * problem.seqlen_q + query);
  }
}

// Merges a tile's chunks, in chunk order: each weighted by 2^(its max - the overall max).
template <typename T>
void merge_splits(const SplitPartials& partials, int64_t tile_index, const TileArgs& tile, T* o, HeadStrides o_strides,
                  float* lse, const AttentionProblem& problem, float* acc) {
  const int64_t group = problem.n_q_heads / problem.n_kv_heads;
  const int64_t head_dim_padded = partials.row_floats - 2;
  for (int64_t r = 0; r < partials.rows; ++r) {
    float row_max = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < partials.n_splits; ++s) {
      row_max = std::max(row_max, partials.row(tile_index, s, r)[head_dim_padded]);
    }
    float sum = 0.0f;
    std::fill(acc, acc + head_dim_padded, 0.0f);
    for (int64_t s = 0; s < partials.n_splits && row_max != -std::numeric_limits<float>::infinity(); ++s) {
      const float* partial = partials.row(tile_index, s, r);
      if (partial[head_dim_padded] == -std::numeric_limits<float>::infinity()) continue;  // saw no key
      const float weight = std::exp2(partial[head_dim_padded] - row_max);
      sum += weight * partial[head_dim_padded + 1];
      for (int64_t d = 0; d < head_dim_padded; d += kLanes) store(acc + d, load(acc + d) + weight * load(partial + d));
    }
    const int64_t query = tile.q_begin + r / group, head = tile.kv_head * group + r % group;
    store_row(acc, row_max, sum, problem.head_dim,
              o + tile.batch_index * o_strides.batch + query * o_strides.token + head * o_strides.head,
              lse + (tile.batch_index * problem.n_q_heads + head) * problem.seqlen_q + query);
  }
}

}  // namespace

template <CpuIsa P, typename T>
void attention_forward(const T* q, HeadStrides q_strides, const T* k, HeadStrides k_strides, const T* v,
                       HeadStrides v_strides, T* o, HeadStrides o_strides, float* lse, const int32_t* seqlens_k,
                       const AttentionProblem& problem, const KvPages* pages) {
  const int64_t group = problem.n_q_heads / problem.n_kv_heads;
  const int64_t queries_per_tile = std::max<int64_t>(1, kTargetTileRows / group);
  const int64_t n_q_blocks = (problem.seqlen_q + queries_per_tile - 1) / queries_per_tile;
  const int64_t chunk = n_q_blocks == 1 ? split_keys(problem.seqlen_k) : problem.seqlen_k;
  const int64_t n_splits = std::max<int64_t>(1, (problem.seqlen_k + chunk - 1) / chunk);
  const int64_t head_dim_padded = round_up(problem.head_dim, kTileCols);
  const int64_t split_rows = problem.seqlen_q * group;
  FloatBuffer partial_data =
      make_buffer(n_splits > 1 ? problem.batch * problem.n_kv_heads * n_splits * split_rows * (head_dim_padded + 2)
                               : 0);
  const SplitPartials partials{partial_data.get(), head_dim_padded + 2, n_splits, split_rows};
  const SplitPartials* partials_or_null = n_splits > 1 ? &partials : nullptr;
#pragma omp parallel
  {
    Workspace ws(queries_per_tile * group, problem.head_dim, kBf16Dots && std::is_same_v<T, bf16>);
    // Consecutive work items share a kv head, so its keys and values stay in cache (all heads' do not fit in L3
    // at long lengths). Within a head the last query blocks, the most work under a causal mask, go first so that
    // dynamic scheduling evens out the end. With chunks of keys there is one query block.
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < problem.batch; ++b) {
      for (int64_t kv_head = 0; kv_head < problem.n_kv_heads; ++kv_head) {
        for (int64_t item = 0; item < n_q_blocks * n_splits; ++item) {
          const int64_t block_from_end = item / n_splits, split = item % n_splits;
          const int64_t q_begin = (n_q_blocks - 1 - block_from_end) * queries_per_tile;
          const TileArgs tile{b, kv_head, q_begin, std::min(queries_per_tile, problem.seqlen_q - q_begin),
                              split * chunk, split == n_splits - 1 ? problem.seqlen_k : (split + 1) * chunk};
          attention_tile(q, q_strides, k, k_strides, v, v_strides, o, o_strides, lse, seqlens_k, pages, problem,
                         tile, ws, partials_or_null, b * problem.n_kv_heads + kv_head, split);
        }
      }
    }
    if (n_splits > 1) {
#pragma omp for collapse(2) schedule(static)
      for (int64_t b = 0; b < problem.batch; ++b) {
        for (int64_t kv_head = 0; kv_head < problem.n_kv_heads; ++kv_head) {
          const TileArgs tile{b, kv_head, 0, problem.seqlen_q, 0, problem.seqlen_k};
          merge_splits(partials, b * problem.n_kv_heads + kv_head, tile, o, o_strides, lse, problem, ws.acc.get());
        }
      }
    }
  }
}

#define LLAMA_KERNELS_INSTANTIATE_FORWARD(T)                                                                           \
  template void attention_forward<kIsaPath, T>(const T*, HeadStrides, const T*, HeadStrides, const T*, HeadStrides,    \
                                               T*, HeadStrides, float*, const int32_t*, const AttentionProblem&,       \
                                               const KvPages*);
LLAMA_KERNELS_INSTANTIATE_FORWARD(float)
LLAMA_KERNELS_INSTANTIATE_FORWARD(bf16)
LLAMA_KERNELS_INSTANTIATE_FORWARD(fp16)
#undef LLAMA_KERNELS_INSTANTIATE_FORWARD

}  // namespace llama_kernels::cpu
