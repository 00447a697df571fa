// Flash-attention backward on the CPU (see attention_kernels.h for the contract): FlashAttention-2's backward with
// P recomputed from the forward's lse, dS = P * (dP - delta), delta = rowsum(dO * O) - dlse.
//
// Work item: one (batch, kv head, chunk of queries). It converts that head's k and v once, then walks blocks of
// queries whose tile holds every query head of the kv group (row r = query (r / group), head (r % group), as the
// forward) and, for each key block the tile sees, recomputes and accumulates
//   S^T  (keys x rows) = K_block . Q_tile^T,   P^T = 2^(S^T - lse),      dP^T (keys x rows) = V_block . dO_tile^T,
//   dS^T = P^T * (dP^T - delta),  dV_block += P^T . dO_tile,  dK_block += dS^T . Q_tile,  dQ_tile += dS . K_block.
// dq of a tile is complete after its key loop; dk and dv, accumulated in fp32 over the chunk's tiles (O(Sk) memory
// per thread, never Sq x Sk), after its last tile. A head is one chunk unless the batch's kv heads are fewer than
// the threads (34B's 8 at batch 1 on a 16-core CPU): then each chunk leaves its dk and dv partials, summed afterwards
// in chunk order, at most as many as the threads (the partials take what the threads' accumulators take). Each
// gradient element is summed by one thread in a fixed order: deterministic for a given shape and thread count, the
// same bits on any thread count up to the kv heads. Nothing is recomputed in a second pass.
// As in the forward, scores are transposed (rows along the vector lanes, so the row terms lse and delta are
// vectors) and in log2 units.
// With AVX512-BF16 (the avx512_bf16 and amx paths), bf16's five products are vdpbf16ps (attention_tiles.h's
// pair_matmul): the operands stay bf16, paired along the contracted dimension (D for S^T and dP^T, the tile's rows
// for dV and dK, keys for dQ), and P and dS are rounded to bf16 after their fp32 step, as the GPU kernels round them.
// On the amx path all five run on the AMX tiles (pair_matmul_rows), dQ's dS transposed to pairs along its rows.

#include <algorithm>
#include <limits>
#include <type_traits>

#include <omp.h>

#include "cpu/attention_kernels.h"
#include "cpu/attention_tiles.h"

namespace llama_kernels::cpu {
namespace {

using namespace tiles;

// Whether T's products are the bf16 pairs' (see the top).
template <typename T>
inline constexpr bool kPairs = kBf16Dots && std::is_same_v<T, bf16>;

// One thread's buffers: copies of a kv head and its gradients' accumulators, and the largest query tile. The
// fp32 products' operands (fp32 copies) or the bf16 products' (pairs as uint32, kBf16Dots), whichever run.
struct Workspace {
  // pairs_padded: head_dim_pairs rounded up to whole vectors (and AMX tiles), the row length of the pairs along D.
  int64_t max_rows_padded, head_dim_padded, head_dim_pairs, pairs_padded;
  FloatBuffer dk, dv;      // seqlen_k x head_dim_padded: unscaled dk, and dv
  FloatBuffer dq;          // max_rows_padded x head_dim_padded: unscaled dq
  FloatBuffer p_t, ds_t;   // kKeyBlock x max_rows_padded: S^T then P^T, dP^T then dS^T
  FloatBuffer lse_log2, delta, row_limit;  // max_rows_padded each
  // fp32 products
  FloatBuffer k, v;        // seqlen_k x head_dim_padded
  FloatBuffer q_t, do_t;   // head_dim x max_rows_padded: q scaled by softmax_scale * log2(e), and dO, transposed
  FloatBuffer q_rows, do_rows;  // max_rows_padded x head_dim_padded: q and dO row-major
  // bf16 products; keys rounded up to whole key blocks, which the AMX tiles read
  Buffer<uint32_t> k_dim_pairs, v_dim_pairs;  // keys x pairs_padded: k and v as stored, pairs along D
  Buffer<uint32_t> k_key_pairs;               // keys / 2 x head_dim_padded: pairs of keys
  Buffer<uint32_t> q_dim_pairs, do_dim_pairs;  // pairs_padded x max_rows_padded: pairs along D, rows in lanes
  Buffer<uint32_t> q_row_pairs, do_row_pairs;  // max_rows_padded / 2 x head_dim_padded: pairs of rows
  Buffer<uint32_t> p_rounded, ds_rounded;      // kKeyBlock x max_rows_padded / 2: P^T and dS^T, pairs of rows
  Buffer<uint32_t> ds_key_pairs;               // kKeyBlock / 2 x max_rows_padded: dS^T in pairs of keys
  Buffer<uint32_t> ds_pair_rows;               // max_rows_padded x kKeyBlock / 2: ds_key_pairs transposed (AMX)

  Workspace(int64_t max_rows, int64_t seqlen_k, int64_t head_dim, bool pairs)
      : max_rows_padded(round_up(max_rows, kTileCols)),
        head_dim_padded(round_up(head_dim, kTileCols)),
        head_dim_pairs((head_dim + 1) / 2),
        pairs_padded(round_up(head_dim_pairs, kLanes)),
        dk(make_buffer(seqlen_k * head_dim_padded)),
        dv(make_buffer(seqlen_k * head_dim_padded)),
        dq(make_buffer(max_rows_padded * head_dim_padded)),
        p_t(make_buffer(kKeyBlock * max_rows_padded)),
        ds_t(make_buffer(kKeyBlock * max_rows_padded)),
        lse_log2(make_buffer(max_rows_padded)),
        delta(make_buffer(max_rows_padded)),
        row_limit(make_buffer(max_rows_padded)),
        k(make_buffer(pairs ? 0 : seqlen_k * head_dim_padded)),
        v(make_buffer(pairs ? 0 : seqlen_k * head_dim_padded)),
        q_t(make_buffer(pairs ? 0 : head_dim * max_rows_padded)),
        do_t(make_buffer(pairs ? 0 : head_dim * max_rows_padded)),
        q_rows(make_buffer(pairs ? 0 : max_rows_padded * head_dim_padded)),
        do_rows(make_buffer(pairs ? 0 : max_rows_padded * head_dim_padded)),
        k_dim_pairs(make_buffer<uint32_t>(pairs ? round_up(seqlen_k, kKeyBlock) * pairs_padded : 0)),
        v_dim_pairs(make_buffer<uint32_t>(pairs ? round_up(seqlen_k, kKeyBlock) * pairs_padded : 0)),
        k_key_pairs(make_buffer<uint32_t>(pairs ? round_up(seqlen_k, kKeyBlock) / 2 * head_dim_padded : 0)),
        q_dim_pairs(make_buffer<uint32_t>(pairs ? pairs_padded * max_rows_padded : 0)),
        do_dim_pairs(make_buffer<uint32_t>(pairs ? pairs_padded * max_rows_padded : 0)),
        q_row_pairs(make_buffer<uint32_t>(pairs ? max_rows_padded / 2 * head_dim_padded : 0)),
        do_row_pairs(make_buffer<uint32_t>(pairs ? max_rows_padded / 2 * head_dim_padded : 0)),
        p_rounded(make_buffer<uint32_t>(pairs ? kKeyBlock * max_rows_padded / 2 : 0)),
        ds_rounded(make_buffer<uint32_t>(pairs ? kKeyBlock * max_rows_padded / 2 : 0)),
        ds_key_pairs(make_buffer<uint32_t>(pairs ? kKeyBlock / 2 * max_rows_padded : 0)),
        ds_pair_rows(make_buffer<uint32_t>(pairs && kAmxTiles ? max_rows_padded * kKeyBlock / 2 : 0)) {}
};

template <typename T>
struct BackwardArgs {
  const T *dout, *q, *k, *v, *o;
  HeadStrides do_strides, q_strides, k_strides, v_strides, o_strides;
  const float *lse, *dlse;
  T *dq, *dk, *dv;
  HeadStrides dq_strides, dk_strides, dv_strides;
};

// Loads the query tile [q_begin, q_begin + q_count) of every head of the group, runs its key loop, writes its dq.
template <typename T>
void backward_tile(const BackwardArgs<T>& args, const AttentionProblem& problem, int64_t batch_index,
                   int64_t kv_head, int64_t q_begin, int64_t q_count, Workspace& ws) {
  const int64_t group = problem.n_q_heads / problem.n_kv_heads;
  const int64_t head_dim = problem.head_dim, row_stride = ws.head_dim_padded;
  const int64_t rows = q_count * group;
  const int64_t rows_padded = round_up(rows, kTileCols);  // the columns of the register-tiled S^T and dP^T
  // The columns the elementwise step works on; the AMX tiles sum pairs of rows 16 at a time, whose P and dS past the
  // tile's rows must be 0, so there every column of S^T.
  const int64_t rows_in_vectors = kAmxTiles ? rows_padded : round_up(rows, kLanes);
  const int64_t t_stride = rows_padded;  // of q_t, do_t, p_t and ds_t
  const int64_t causal_offset = problem.seqlen_k - problem.seqlen_q;  // query i sees keys j <= i + causal_offset
  const int64_t key_end = problem.causal
                              ? std::clamp<int64_t>(q_begin + q_count + causal_offset, 0, problem.seqlen_k)
                              : problem.seqlen_k;
  const float scale_log2 = problem.softmax_scale * kLog2e;
  const int64_t first_head = kv_head * group;
  const TileScope tile_products(kPairs<T>);
  const auto row_offset = [&](const HeadStrides& s, int64_t query, int64_t head) {
    return batch_index * s.batch + query * s.token + head * s.head;
  };

  const auto q_row_of = [&](int64_t r) {
    return args.q + row_offset(args.q_strides, q_begin + r / group, first_head + r % group);
  };
  const auto do_row_of = [&](int64_t r) {
    return args.dout + row_offset(args.do_strides, q_begin + r / group, first_head + r % group);
  };
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t query = q_begin + r / group, head = first_head + r % group;
    const T* q_row = q_row_of(r);
    const T* do_row = do_row_of(r);
    const T* o_row = args.o + row_offset(args.o_strides, query, head);
    float do_dot_o = 0.0f;
    for (int64_t d = 0; d < head_dim; ++d) {
      const float q_rd = to_float(q_row[d]), do_rd = to_float(do_row[d]);
      if constexpr (!kPairs<T>) {
        ws.q_rows[r * row_stride + d] = q_rd;
        ws.q_t[d * t_stride + r] = q_rd * scale_log2;
        ws.do_rows[r * row_stride + d] = do_rd;
        ws.do_t[d * t_stride + r] = do_rd;
      }
      do_dot_o += do_rd * to_float(o_row[d]);
    }
    if constexpr (kPairs<T>) {
      for (int64_t p = 0; p < ws.head_dim_pairs; ++p) {
        ws.q_dim_pairs[p * t_stride + r] = bits_pair(q_row, p, head_dim);
        ws.do_dim_pairs[p * t_stride + r] = bits_pair(do_row, p, head_dim);
      }
    }
    const int64_t lse_index = (batch_index * problem.n_q_heads + head) * problem.seqlen_q + query;
    const float lse = args.lse[lse_index];
    // A row that saw no key (lse -inf) gets P = 0 from an lse of +inf, whatever its scores.
    ws.lse_log2[r] = lse == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::infinity()
                                                                     : lse * kLog2e;
    ws.delta[r] = do_dot_o - (args.dlse ? args.dlse[lse_index] : 0.0f);
    // The last key this row sees, as a float for the vectorized mask (exact below 2^24 tokens).
    ws.row_limit[r] = static_cast<float>(query + causal_offset);
  }
  // The padding rows' P and dS: 0 (the bf16 products pair the last row with one of them).
  for (int64_t r = rows; r < rows_in_vectors; ++r) {
    ws.lse_log2[r] = std::numeric_limits<float>::infinity();
    ws.delta[r] = 0.0f;
  }
#if defined(__AVX512BF16__)
  if constexpr (kPairs<T>) {
    for (int64_t r = 0; r < rows; r += 2) {
      interleave_rows(q_row_of(r), r + 1 < rows ? q_row_of(r + 1) : nullptr, head_dim,
                      ws.q_row_pairs.get() + r / 2 * row_stride);
      interleave_rows(do_row_of(r), r + 1 < rows ? do_row_of(r + 1) : nullptr, head_dim,
                      ws.do_row_pairs.get() + r / 2 * row_stride);
    }
  }
#endif
  std::fill(ws.dq.get(), ws.dq.get() + rows * row_stride, 0.0f);

  for (int64_t key_begin = 0; key_begin < key_end; key_begin += kKeyBlock) {
    const int64_t n_keys = std::min(kKeyBlock, key_end - key_begin);
#if defined(__AVX512BF16__)
    if constexpr (kPairs<T>) {
      const int64_t stride = ws.pairs_padded;
      pair_matmul_rows<false>(n_keys, rows_padded, ws.k_dim_pairs.get() + key_begin * stride, stride,
                              ws.q_dim_pairs.get(), t_stride, ws.head_dim_pairs, scale_log2, ws.p_t.get(), t_stride);
      pair_matmul_rows<false>(n_keys, rows_padded, ws.v_dim_pairs.get() + key_begin * stride, stride,
                              ws.do_dim_pairs.get(), t_stride, ws.head_dim_pairs, 1.0f, ws.ds_t.get(), t_stride);
    }
#endif
    if constexpr (!kPairs<T>) {
      matmul<false>(n_keys, rows_padded, ws.k.get() + key_begin * row_stride, row_stride, 1, ws.q_t.get(), t_stride,
                    head_dim, ws.p_t.get(), t_stride);
      matmul<false>(n_keys, rows_padded, ws.v.get() + key_begin * row_stride, row_stride, 1, ws.do_t.get(),
                    t_stride, head_dim, ws.ds_t.get(), t_stride);
    }

    // Causal mask, only in the blocks that reach past the first query's diagonal.
    const bool needs_mask = problem.causal && key_begin + n_keys - 1 > q_begin + causal_offset;
    for (int64_t c = 0; c < rows_in_vectors; c += kLanes) {
      const VecF lse = load(ws.lse_log2.get() + c), delta = load(ws.delta.get() + c);
      const VecF limit = load(ws.row_limit.get() + c) - static_cast<float>(key_begin);
      for (int64_t j = 0; j < n_keys; ++j) {
        float* p_jc = ws.p_t.get() + j * t_stride + c;
        float* ds_jc = ws.ds_t.get() + j * t_stride + c;
        VecF p = exp2_nonpositive(load(p_jc) - lse);
        if (needs_mask) p = splat(static_cast<float>(j)) > limit ? VecF{} : p;
        store(p_jc, p);
        store(ds_jc, p * (load(ds_jc) - delta));
      }
    }

    float* dv_block = ws.dv.get() + key_begin * row_stride;
    float* dk_block = ws.dk.get() + key_begin * row_stride;
#if defined(__AVX512BF16__)
    if constexpr (kPairs<T>) {
      const int64_t rounded_stride = t_stride / 2, row_pairs = (rows + 1) / 2;
      round_float_rows(ws.p_t.get(), t_stride, n_keys, rows_in_vectors, ws.p_rounded.get(), rounded_stride);
      round_float_rows(ws.ds_t.get(), t_stride, n_keys, rows_in_vectors, ws.ds_rounded.get(), rounded_stride);
      pair_float_rows(ws.ds_t.get(), t_stride, n_keys, rows_in_vectors, ws.ds_key_pairs.get(), t_stride);
      pair_matmul_rows<true>(n_keys, row_stride, ws.p_rounded.get(), rounded_stride, ws.do_row_pairs.get(),
                             row_stride, row_pairs, 1.0f, dv_block, row_stride);
      pair_matmul_rows<true>(n_keys, row_stride, ws.ds_rounded.get(), rounded_stride, ws.q_row_pairs.get(),
                             row_stride, row_pairs, 1.0f, dk_block, row_stride);
      const uint32_t* k_pairs_block = ws.k_key_pairs.get() + key_begin / 2 * row_stride;
      if constexpr (kAmxTiles) {
        // The tiles take dS with its pairs along its rows: ds_key_pairs transposed, zero past the block's keys.
        transpose_words(ws.ds_key_pairs.get(), t_stride, kKeyBlock / 2, (n_keys + 1) / 2, rows_in_vectors,
                        ws.ds_pair_rows.get(), kKeyBlock / 2);
        pair_matmul_rows<true>(rows, row_stride, ws.ds_pair_rows.get(), kKeyBlock / 2, k_pairs_block, row_stride,
                               (n_keys + 1) / 2, 1.0f, ws.dq.get(), row_stride);
      } else {
        pair_matmul<true>(rows, row_stride, ws.ds_key_pairs.get(), 1, t_stride, k_pairs_block, row_stride,
                          (n_keys + 1) / 2, 1.0f, ws.dq.get(), row_stride);
      }
    }
#endif
    if constexpr (!kPairs<T>) {
      const float* k_block = ws.k.get() + key_begin * row_stride;
      matmul<true>(n_keys, row_stride, ws.p_t.get(), t_stride, 1, ws.do_rows.get(), row_stride, rows, dv_block,
                   row_stride);
      matmul<true>(n_keys, row_stride, ws.ds_t.get(), t_stride, 1, ws.q_rows.get(), row_stride, rows, dk_block,
                   row_stride);
      matmul<true>(rows, row_stride, ws.ds_t.get(), 1, t_stride, k_block, row_stride, n_keys, ws.dq.get(),
                   row_stride);
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t query = q_begin + r / group, head = first_head + r % group;
    T* dq_row = args.dq + row_offset(args.dq_strides, query, head);
    const float* acc_row = ws.dq.get() + r * row_stride;
    for (int64_t d = 0; d < head_dim; ++d) dq_row[d] = from_float<T>(acc_row[d] * problem.softmax_scale);
  }
}

// A head's queries in chunks: as many as bring the work items to the thread count, of at least kMinChunkQueries
// queries each (whole tiles); one where the batch's kv heads already fill the threads, as the split costs a pass
// over the partials.
inline constexpr int64_t kMinChunkQueries = 512;
struct QueryChunks {
  int64_t count, queries;
};
inline QueryChunks query_chunks(const AttentionProblem& problem, int64_t queries_per_tile, int64_t threads) {
  const int64_t heads = problem.batch * problem.n_kv_heads;
  const int64_t wanted =
      heads >= threads ? 1 : std::clamp<int64_t>(problem.seqlen_q / kMinChunkQueries, 1, (threads + heads - 1) / heads);
  const int64_t queries =
      std::max(queries_per_tile, round_up((problem.seqlen_q + wanted - 1) / wanted, queries_per_tile));
  return {std::max<int64_t>(1, (problem.seqlen_q + queries - 1) / queries), queries};
}

// The keys the queries before q_end see: all of them, or under a causal mask those up to the last one's diagonal.
inline int64_t keys_seen(const AttentionProblem& problem, int64_t q_end) {
  return problem.causal ? std::clamp<int64_t>(q_end + problem.seqlen_k - problem.seqlen_q, 0, problem.seqlen_k)
                        : problem.seqlen_k;
}

// One chunk's dk and dv partials (unscaled dk, then dv, each seqlen_k x head_dim_padded), per (batch, kv head,
// chunk); rows past the chunk's keys_seen are not written.
struct ChunkPartials {
  float* data;
  int64_t n_chunks, head_floats;  // head_floats = seqlen_k * head_dim_padded
  float* dk(int64_t head_index, int64_t chunk) const {
    return data + (head_index * n_chunks + chunk) * 2 * head_floats;
  }
  float* dv(int64_t head_index, int64_t chunk) const { return dk(head_index, chunk) + head_floats; }
};

// dk and dv rows [first, last) of one head, from their unscaled fp32 sums.
template <typename T>
void store_dk_dv(const BackwardArgs<T>& args, const AttentionProblem& problem, int64_t batch_index, int64_t kv_head,
                 int64_t first, int64_t last, const float* dk_sum, const float* dv_sum, int64_t row_stride) {
  T* dk_head = args.dk + batch_index * args.dk_strides.batch + kv_head * args.dk_strides.head;
  T* dv_head = args.dv + batch_index * args.dv_strides.batch + kv_head * args.dv_strides.head;
  for (int64_t j = first; j < last; ++j) {
    const float* dk_row = dk_sum + (j - first) * row_stride;
    const float* dv_row = dv_sum + (j - first) * row_stride;
    T* dk_out = dk_head + j * args.dk_strides.token;
    T* dv_out = dv_head + j * args.dv_strides.token;
    for (int64_t d = 0; d < problem.head_dim; ++d) {
      dk_out[d] = from_float<T>(dk_row[d] * problem.softmax_scale);
      dv_out[d] = from_float<T>(dv_row[d]);
    }
  }
}

// The queries [q_first, q_end) of one head: their dq, and dk and dv (or, with partials, the chunk's share of them).
template <typename T>
void backward_chunk(const BackwardArgs<T>& args, const AttentionProblem& problem, int64_t batch_index,
                    int64_t kv_head, int64_t q_first, int64_t q_end, int64_t queries_per_tile, Workspace& ws,
                    const ChunkPartials* partials, int64_t chunk) {
  const int64_t head_dim = problem.head_dim, row_stride = ws.head_dim_padded;
  const int64_t seqlen_k = keys_seen(problem, q_end);  // the keys this chunk's gradients reach
  const T* k_head = args.k + batch_index * args.k_strides.batch + kv_head * args.k_strides.head;
  const T* v_head = args.v + batch_index * args.v_strides.batch + kv_head * args.v_strides.head;
  const auto k_row = [&](int64_t j) { return k_head + j * args.k_strides.token; };
  const auto v_row = [&](int64_t j) { return v_head + j * args.v_strides.token; };
  for (int64_t j = 0; j < seqlen_k; ++j) {
    if constexpr (kPairs<T>) {
      row_pairs(k_row(j), head_dim, ws.k_dim_pairs.get() + j * ws.pairs_padded);
      row_pairs(v_row(j), head_dim, ws.v_dim_pairs.get() + j * ws.pairs_padded);
    } else {
      convert(k_row(j), ws.k.get() + j * row_stride, head_dim);
      convert(v_row(j), ws.v.get() + j * row_stride, head_dim);
    }
  }
#if defined(__AVX512BF16__)
  if constexpr (kPairs<T>) {
    for (int64_t j = 0; j < seqlen_k; j += 2) {
      interleave_rows(k_row(j), j + 1 < seqlen_k ? k_row(j + 1) : nullptr, head_dim,
                      ws.k_key_pairs.get() + j / 2 * row_stride);
    }
  }
#endif
  std::fill(ws.dk.get(), ws.dk.get() + seqlen_k * row_stride, 0.0f);
  std::fill(ws.dv.get(), ws.dv.get() + seqlen_k * row_stride, 0.0f);

  for (int64_t q_begin = q_first; q_begin < q_end; q_begin += queries_per_tile) {
    const int64_t q_count = std::min(queries_per_tile, q_end - q_begin);
    backward_tile(args, problem, batch_index, kv_head, q_begin, q_count, ws);
  }

  if (partials == nullptr) {
    store_dk_dv(args, problem, batch_index, kv_head, 0, seqlen_k, ws.dk.get(), ws.dv.get(), row_stride);
    return;
  }
  const int64_t head_index = batch_index * problem.n_kv_heads + kv_head;
  std::copy_n(ws.dk.get(), seqlen_k * row_stride, partials->dk(head_index, chunk));
  std::copy_n(ws.dv.get(), seqlen_k * row_stride, partials->dv(head_index, chunk));
}

// dk and dv of keys [first, last) of one head: its chunks' partials summed in chunk order.
template <typename T>
void sum_chunks(const BackwardArgs<T>& args, const AttentionProblem& problem, int64_t batch_index, int64_t kv_head,
                int64_t first, int64_t last, const ChunkPartials& partials, int64_t chunk_queries, int64_t row_stride,
                float* dk_sum, float* dv_sum) {
  const int64_t head_index = batch_index * problem.n_kv_heads + kv_head;
  std::fill(dk_sum, dk_sum + (last - first) * row_stride, 0.0f);
  std::fill(dv_sum, dv_sum + (last - first) * row_stride, 0.0f);
  for (int64_t c = 0; c < partials.n_chunks; ++c) {
    const int64_t end = std::min(last, keys_seen(problem, std::min((c + 1) * chunk_queries, problem.seqlen_q)));
    const float* dk_part = partials.dk(head_index, c) + first * row_stride;
    const float* dv_part = partials.dv(head_index, c) + first * row_stride;
    for (int64_t i = 0; i < (end - first) * row_stride; ++i) {
      dk_sum[i] += dk_part[i];
      dv_sum[i] += dv_part[i];
    }
  }
  store_dk_dv(args, problem, batch_index, kv_head, first, last, dk_sum, dv_sum, row_stride);
}

}  // namespace

template <CpuIsa P, typename T>
void attention_backward(const T* dout, HeadStrides do_strides, const T* q, HeadStrides q_strides, const T* k,
                        HeadStrides k_strides, const T* v, HeadStrides v_strides, const T* o, HeadStrides o_strides,
                        const float* lse, const float* dlse, T* dq, HeadStrides dq_strides, T* dk,
                        HeadStrides dk_strides, T* dv, HeadStrides dv_strides, const AttentionProblem& problem) {
  const BackwardArgs<T> args{.dout = dout, .q = q, .k = k, .v = v, .o = o,
                             .do_strides = do_strides, .q_strides = q_strides, .k_strides = k_strides,
                             .v_strides = v_strides, .o_strides = o_strides, .lse = lse, .dlse = dlse,
                             .dq = dq, .dk = dk, .dv = dv,
                             .dq_strides = dq_strides, .dk_strides = dk_strides, .dv_strides = dv_strides};
  const int64_t group = problem.n_q_heads / problem.n_kv_heads;
  const int64_t queries_per_tile = std::max<int64_t>(1, kTargetTileRows / group);
  const QueryChunks chunks = query_chunks(problem, queries_per_tile, omp_get_max_threads());
  const int64_t head_dim_padded = round_up(problem.head_dim, kTileCols);
  FloatBuffer partial_data = make_buffer(
      chunks.count > 1 ? problem.batch * problem.n_kv_heads * chunks.count * 2 * problem.seqlen_k * head_dim_padded
                       : 0);
  const ChunkPartials partials{partial_data.get(), chunks.count, problem.seqlen_k * head_dim_padded};
  const int64_t n_key_blocks = (problem.seqlen_k + kKeyBlock - 1) / kKeyBlock;
#pragma omp parallel
  {
    Workspace ws(queries_per_tile * group, problem.seqlen_k, problem.head_dim, kPairs<T>);
    // Under a causal mask the last chunks see the most keys: they go first, so that dynamic scheduling evens out.
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < problem.batch; ++b) {
      for (int64_t kv_head = 0; kv_head < problem.n_kv_heads; ++kv_head) {
        for (int64_t from_end = 0; from_end < chunks.count; ++from_end) {
          const int64_t chunk = chunks.count - 1 - from_end, q_first = chunk * chunks.queries;
          backward_chunk(args, problem, b, kv_head, q_first, std::min(q_first + chunks.queries, problem.seqlen_q),
                         queries_per_tile, ws, chunks.count > 1 ? &partials : nullptr, chunk);
        }
      }
    }
    if (chunks.count > 1) {
#pragma omp for collapse(3) schedule(static)
      for (int64_t b = 0; b < problem.batch; ++b) {
        for (int64_t kv_head = 0; kv_head < problem.n_kv_heads; ++kv_head) {
          for (int64_t block = 0; block < n_key_blocks; ++block) {
            const int64_t first = block * kKeyBlock;
            sum_chunks(args, problem, b, kv_head, first, std::min(first + kKeyBlock, problem.seqlen_k), partials,
                       chunks.queries, head_dim_padded, ws.dk.get(), ws.dv.get());
          }
        }
      }
    }
  }
}

#define LLAMA_KERNELS_INSTANTIATE_BACKWARD(T)                                                                          \
  template void attention_backward<kIsaPath, T>(const T*, HeadStrides, const T*, HeadStrides, const T*, HeadStrides,   \
                                                const T*, HeadStrides, const T*, HeadStrides, const float*,            \
                                                const float*, T*, HeadStrides, T*, HeadStrides, T*, HeadStrides,       \
                                                const AttentionProblem&);
LLAMA_KERNELS_INSTANTIATE_BACKWARD(float)
LLAMA_KERNELS_INSTANTIATE_BACKWARD(bf16)
LLAMA_KERNELS_INSTANTIATE_BACKWARD(fp16)
#undef LLAMA_KERNELS_INSTANTIATE_BACKWARD

}  // namespace llama_kernels::cpu
