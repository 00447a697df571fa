// Checks llama_kernels::cpu::attention_forward against a naive double-precision attention computed here from the
// same stored inputs: lengths equal and unequal, causal or not, GQA groups 1, 4 and 8, head dims 64 and 128 (and a
// few others), fp32, bf16 and fp16, a kv cache with ragged lengths including 0 (contiguous, or paged: pages of 16,
// 64 and 256 positions in a shuffled pool beside a NaN page nobody owns), and non-contiguous layouts. And
// attention_backward against the double-precision gradients of that attention, with and without a dlse, at lengths
// that span several of its blocks (partial ones, causal rows that see no key).
// One instruction-set path per run (the argument). Prints each failing case (its first wrong element) and exits
// nonzero if any failed.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/attention_kernels.h"
#include "tests/isa_under_test.h"

namespace {

using namespace llama_kernels::cpu;
using llama_kernels::HeadStrides;

testing::IsaUnderTest tested;  // main's argument

// A (batch, seq, heads, head_dim) tensor in a flat buffer. Strided ones are stored (batch, heads, seq, head_dim)
// with padding after each row and each batch, so no stride but the last dim's is the contiguous one.
template <typename T>
struct BshTensor {
  int64_t batch, seq, heads, head_dim;
  HeadStrides strides;
  std::vector<T> data;

  BshTensor(int64_t batch_, int64_t seq_, int64_t heads_, int64_t head_dim_, bool strided)
      : batch(batch_), seq(seq_), heads(heads_), head_dim(head_dim_) {
    if (strided) {
      const int64_t row = head_dim + 3;
      strides = {heads * seq * row + 5, row, seq * row};
    } else {
      strides = {seq * heads * head_dim, heads * head_dim, head_dim};
    }
    data.resize(static_cast<size_t>(batch * strides.batch + 8));
  }
  T* at(int64_t b, int64_t s, int64_t h) {
    return data.data() + b * strides.batch + s * strides.token + h * strides.head;
  }
  float get(int64_t b, int64_t s, int64_t h, int64_t d) { return to_float(at(b, s, h)[d]); }
};

template <typename T>
void fill_random(BshTensor<T>& t, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (T& x : t.data) x = from_float<T>(normal(rng));
}

struct Case {
  int64_t batch, seqlen_q, seqlen_k, n_q_heads, n_kv_heads, head_dim;
  bool causal, strided;
  std::vector<int32_t> seqlens_k;  // empty: plain attention
  int64_t block_size = 0;  // with seqlens_k: a paged cache of seqlen_k / block_size pages per sequence; 0: contiguous
};

std::string describe(const Case& c, const char* dtype) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "%s B=%lld Sq=%lld Sk=%lld Hq=%lld Hk=%lld D=%lld causal=%d strided=%d cache=%d block_size=%lld",
                dtype, (long long)c.batch, (long long)c.seqlen_q, (long long)c.seqlen_k, (long long)c.n_q_heads,
                (long long)c.n_kv_heads, (long long)c.head_dim, c.causal, c.strided, !c.seqlens_k.empty(),
                (long long)c.block_size);
  return buf;
}

// Tolerances on |got - expected| <= atol + rtol * |expected| for o; lse is always fp32.
template <typename T>
struct Tolerance;
template <>
struct Tolerance<float> {
  static constexpr double atol = 2e-6, rtol = 2e-5;
  static constexpr const char* name = "fp32";
};
template <>
struct Tolerance<bf16> {  // one bf16 ulp (2^-7 relative at worst) beyond the rounding of the exact value
  static constexpr double atol = 1e-6, rtol = 1.0 / 128;
  static constexpr const char* name = "bf16";
};
template <>
struct Tolerance<fp16> {
  static constexpr double atol = 1e-6, rtol = 1.0 / 1024;
  static constexpr const char* name = "fp16";
};

// Where the path rounds P to bf16 before P V (bf16 on avx512_bf16 and amx, as the GPU kernels do), each
// probability is off by up to half a bf16 ulp, 2^-8 of itself, so o's element d by up to 2^-8 sum_j p_j |v_jd| /
// sum_j p_j: an error that does not shrink with |o| (v's signs cancel in o, not in the bound).
template <typename T>
double probability_rounding() {
  return std::is_same_v<T, bf16> && tested.isa >= CpuIsa::avx512_bf16 ? 1.0 / 256 : 0.0;
}

template <typename T>
bool run_case(const Case& c, std::mt19937& rng) {
  if (!tested.sample()) return true;
  BshTensor<T> q(c.batch, c.seqlen_q, c.n_q_heads, c.head_dim, c.strided);
  BshTensor<T> k(c.batch, c.seqlen_k, c.n_kv_heads, c.head_dim, c.strided);
  BshTensor<T> v(c.batch, c.seqlen_k, c.n_kv_heads, c.head_dim, c.strided);
  BshTensor<T> o(c.batch, c.seqlen_q, c.n_q_heads, c.head_dim, c.strided);
  fill_random(q, rng);
  fill_random(k, rng);
  fill_random(v, rng);
  std::vector<float> lse(static_cast<size_t>(c.batch * c.n_q_heads * c.seqlen_q));
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const AttentionProblem problem{c.batch, c.seqlen_q, c.seqlen_k, c.n_q_heads, c.n_kv_heads, c.head_dim, c.causal,
                                 scale};
  if (c.block_size > 0) {
    // The same keys and values in a pool of pages in a shuffled order, with one more page (NaN) nobody owns.
    const int64_t max_blocks = c.seqlen_k / c.block_size, n_pages = c.batch * max_blocks + 1;
    BshTensor<T> k_pool(n_pages, c.block_size, c.n_kv_heads, c.head_dim, c.strided);
    BshTensor<T> v_pool(n_pages, c.block_size, c.n_kv_heads, c.head_dim, c.strided);
    for (T& x : k_pool.data) x = from_float<T>(std::numeric_limits<float>::quiet_NaN());
    for (T& x : v_pool.data) x = from_float<T>(std::numeric_limits<float>::quiet_NaN());
    std::vector<int32_t> block_table(static_cast<size_t>(c.batch * max_blocks));
    std::iota(block_table.begin(), block_table.end(), 0);
    std::shuffle(block_table.begin(), block_table.end(), rng);
    for (int64_t b = 0; b < c.batch; ++b) {
      for (int64_t p = 0; p < c.seqlen_k; ++p) {
        const int64_t page = block_table[b * max_blocks + p / c.block_size], row = p % c.block_size;
        for (int64_t h = 0; h < c.n_kv_heads; ++h) {
          std::copy_n(k.at(b, p, h), c.head_dim, k_pool.at(page, row, h));
          std::copy_n(v.at(b, p, h), c.head_dim, v_pool.at(page, row, h));
        }
      }
    }
    const KvPages pages{block_table.data(), max_blocks, c.block_size};
    on_isa(tested.isa, [&]<CpuIsa P> {
      attention_forward<P, T>(q.data.data(), q.strides, k_pool.data.data(), k_pool.strides, v_pool.data.data(),
                              v_pool.strides, o.data.data(), o.strides, lse.data(), c.seqlens_k.data(), problem,
                              &pages);
    });
  } else {
    on_isa(tested.isa, [&]<CpuIsa P> {
      attention_forward<P, T>(q.data.data(), q.strides, k.data.data(), k.strides, v.data.data(), v.strides,
                              o.data.data(), o.strides, lse.data(), c.seqlens_k.empty() ? nullptr : c.seqlens_k.data(),
                              problem);
    });
  }

  const int64_t group = c.n_q_heads / c.n_kv_heads;
  std::vector<double> scores(static_cast<size_t>(c.seqlen_k)), out(static_cast<size_t>(c.head_dim)),
      out_of_abs(static_cast<size_t>(c.head_dim));
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t len_k = c.seqlens_k.empty() ? c.seqlen_k : c.seqlens_k[b];
    for (int64_t h = 0; h < c.n_q_heads; ++h) {
      const int64_t kv_head = h / group;
      for (int64_t i = 0; i < c.seqlen_q; ++i) {
        const int64_t visible = c.causal ? std::min(len_k, std::max<int64_t>(0, i + len_k - c.seqlen_q + 1)) : len_k;
        double max_score = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < visible; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < c.head_dim; ++d) dot += double(q.get(b, i, h, d)) * k.get(b, j, kv_head, d);
          scores[j] = dot * scale;
          max_score = std::max(max_score, scores[j]);
        }
        double sum = 0.0;
        for (int64_t d = 0; d < c.head_dim; ++d) out[d] = out_of_abs[d] = 0.0;
        for (int64_t j = 0; j < visible; ++j) {
          const double p = std::exp(scores[j] - max_score);
          sum += p;
          for (int64_t d = 0; d < c.head_dim; ++d) {
            out[d] += p * v.get(b, j, kv_head, d);
            out_of_abs[d] += p * std::fabs(v.get(b, j, kv_head, d));
          }
        }
        const double expected_lse = visible ? max_score + std::log(sum) : -std::numeric_limits<double>::infinity();
        const float got_lse = lse[(b * c.n_q_heads + h) * c.seqlen_q + i];
        const bool lse_ok = visible ? std::fabs(got_lse - expected_lse) <= 1e-5 + 1e-6 * std::fabs(expected_lse)
                                    : got_lse == -std::numeric_limits<float>::infinity();
        if (!lse_ok) {
          std::printf("FAIL %s: lse[b=%lld h=%lld i=%lld] = %.8g, expected %.8g\n",
                      describe(c, Tolerance<T>::name).c_str(), (long long)b, (long long)h, (long long)i, got_lse,
                      expected_lse);
          return false;
        }
        for (int64_t d = 0; d < c.head_dim; ++d) {
          const double expected = visible ? out[d] / sum : 0.0;
          const double got = o.get(b, i, h, d);
          const double tolerance = Tolerance<T>::atol + Tolerance<T>::rtol * std::fabs(expected) +
                                   (visible ? probability_rounding<T>() * out_of_abs[d] / sum : 0.0);
          const bool ok = visible ? std::fabs(got - expected) <= tolerance : got == 0.0;
          if (!ok) {
            std::printf("FAIL %s: o[b=%lld i=%lld h=%lld d=%lld] = %.8g, expected %.8g\n",
                        describe(c, Tolerance<T>::name).c_str(), (long long)b, (long long)i, (long long)h,
                        (long long)d, got, expected);
            return false;
          }
        }
      }
    }
  }
  return true;
}

// Tolerances of the gradients, |got - expected| <= tol * max(1, max |expected|) for fp32 (fp32 rounding grows with
// the gradient's scale) and tol * (1 + |expected|) for the 16-bit types (their rounding of o, and of the result).
template <typename T>
constexpr double kGradTolerance = 2e-2;
template <>
constexpr double kGradTolerance<float> = 1e-4;

// The gradients of sum(o * dout) + sum(lse * dlse) with respect to q, k and v, in double, from the stored inputs.
template <typename T>
bool run_backward_case(const Case& c, bool with_dlse, std::mt19937& rng) {
  if (!tested.sample()) return true;
  BshTensor<T> q(c.batch, c.seqlen_q, c.n_q_heads, c.head_dim, c.strided);
  BshTensor<T> k(c.batch, c.seqlen_k, c.n_kv_heads, c.head_dim, c.strided);
  BshTensor<T> v(c.batch, c.seqlen_k, c.n_kv_heads, c.head_dim, c.strided);
  BshTensor<T> dout(c.batch, c.seqlen_q, c.n_q_heads, c.head_dim, c.strided);
  BshTensor<T> o(c.batch, c.seqlen_q, c.n_q_heads, c.head_dim, false);
  BshTensor<T> dq(c.batch, c.seqlen_q, c.n_q_heads, c.head_dim, c.strided);
  BshTensor<T> dk(c.batch, c.seqlen_k, c.n_kv_heads, c.head_dim, c.strided);
  BshTensor<T> dv(c.batch, c.seqlen_k, c.n_kv_heads, c.head_dim, false);
  for (auto* t : {&q, &k, &v, &dout}) fill_random(*t, rng);
  const size_t n_rows = static_cast<size_t>(c.batch * c.n_q_heads * c.seqlen_q);
  std::vector<float> lse(n_rows), dlse(n_rows);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : dlse) x = normal(rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const AttentionProblem problem{c.batch, c.seqlen_q, c.seqlen_k, c.n_q_heads, c.n_kv_heads, c.head_dim, c.causal,
                                 scale};
  on_isa(tested.isa, [&]<CpuIsa P> {
    attention_forward<P, T>(q.data.data(), q.strides, k.data.data(), k.strides, v.data.data(), v.strides, o.data.data(),
                            o.strides, lse.data(), nullptr, problem);
    attention_backward<P, T>(dout.data.data(), dout.strides, q.data.data(), q.strides, k.data.data(), k.strides,
                             v.data.data(), v.strides, o.data.data(), o.strides, lse.data(),
                             with_dlse ? dlse.data() : nullptr, dq.data.data(), dq.strides, dk.data.data(), dk.strides,
                             dv.data.data(), dv.strides, problem);
  });

  const int64_t group = c.n_q_heads / c.n_kv_heads, d_size = c.head_dim;
  const auto flat = [&](int64_t b, int64_t s, int64_t h, int64_t seq, int64_t heads) {
    return static_cast<size_t>(((b * seq + s) * heads + h) * d_size);
  };
  const size_t n_kv_elements = static_cast<size_t>(c.batch * c.seqlen_k * c.n_kv_heads * d_size);
  std::vector<double> want_dq(n_rows * d_size), want_dk(n_kv_elements), want_dv(n_kv_elements);
  std::vector<double> p(static_cast<size_t>(c.seqlen_k)), out(static_cast<size_t>(d_size));
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t h = 0; h < c.n_q_heads; ++h) {
      const int64_t kv_head = h / group;
      for (int64_t i = 0; i < c.seqlen_q; ++i) {
        const int64_t visible =
            c.causal ? std::min(c.seqlen_k, std::max<int64_t>(0, i + c.seqlen_k - c.seqlen_q + 1)) : c.seqlen_k;
        if (visible == 0) continue;  // no key: o and lse are constants, all gradients 0
        double max_score = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < visible; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < d_size; ++d) dot += double(q.get(b, i, h, d)) * k.get(b, j, kv_head, d);
          p[j] = dot * scale;
          max_score = std::max(max_score, p[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < visible; ++j) sum += (p[j] = std::exp(p[j] - max_score));
        std::fill(out.begin(), out.end(), 0.0);
        for (int64_t j = 0; j < visible; ++j) {
          p[j] /= sum;
          for (int64_t d = 0; d < d_size; ++d) out[d] += p[j] * v.get(b, j, kv_head, d);
        }
        double delta = with_dlse ? -double(dlse[(b * c.n_q_heads + h) * c.seqlen_q + i]) : 0.0;
        for (int64_t d = 0; d < d_size; ++d) delta += out[d] * dout.get(b, i, h, d);
        for (int64_t j = 0; j < visible; ++j) {
          double dp = 0.0;
          for (int64_t d = 0; d < d_size; ++d) dp += double(dout.get(b, i, h, d)) * v.get(b, j, kv_head, d);
          const double ds = p[j] * (dp - delta) * scale;
          const size_t qi = flat(b, i, h, c.seqlen_q, c.n_q_heads), kj = flat(b, j, kv_head, c.seqlen_k, c.n_kv_heads);
          for (int64_t d = 0; d < d_size; ++d) {
            want_dq[qi + d] += ds * k.get(b, j, kv_head, d);
            want_dk[kj + d] += ds * q.get(b, i, h, d);
            want_dv[kj + d] += p[j] * dout.get(b, i, h, d);
          }
        }
      }
    }
  }

  const auto compare = [&](const char* name, BshTensor<T>& got, const std::vector<double>& want) {
    double largest = 1.0;
    for (double w : want) largest = std::max(largest, std::fabs(w));
    for (int64_t b = 0; b < got.batch; ++b) {
      for (int64_t s = 0; s < got.seq; ++s) {
        for (int64_t h = 0; h < got.heads; ++h) {
          for (int64_t d = 0; d < d_size; ++d) {
            const double w = want[flat(b, s, h, got.seq, got.heads) + d], g = got.get(b, s, h, d);
            const double tolerance = kGradTolerance<T> * (std::is_same_v<T, float> ? largest : 1.0 + std::fabs(w));
            if (!(std::fabs(g - w) <= tolerance)) {
              std::printf("FAIL backward %s dlse=%d: %s[b=%lld s=%lld h=%lld d=%lld] = %.8g, expected %.8g\n",
                          describe(c, Tolerance<T>::name).c_str(), with_dlse, name, (long long)b, (long long)s,
                          (long long)h, (long long)d, g, w);
              return false;
            }
          }
        }
      }
    }
    return true;
  };
  return compare("dq", dq, want_dq) && compare("dk", dk, want_dk) && compare("dv", dv, want_dv);
}

}  // namespace

int main(int argc, char** argv) {
  tested = testing::isa_under_test(argc, argv);
  std::mt19937 rng(1234);
  int n_cases = 0;
  bool all_ok = true;
  auto check = [&](bool ok) {
    ++n_cases;
    all_ok = all_ok && ok;
  };

  const int64_t lengths[][2] = {{1, 1}, {7, 7}, {113, 113}, {300, 300}, {1, 300}, {7, 113},
                                {113, 300}, {300, 113}, {113, 7}, {300, 1}};
  const int64_t heads[][2] = {{8, 8}, {8, 2}, {8, 1}};
  for (const auto& len : lengths) {
    for (const auto& h : heads) {
      for (int64_t head_dim : {64, 128}) {
        for (bool causal : {false, true}) {
          const bool strided = (len[0] + h[1] + head_dim + causal) % 2 == 0;  // about half the cases, spread out
          const Case c{2, len[0], len[1], h[0], h[1], head_dim, causal, strided, {}};
          check(run_case<float>(c, rng));
          if (head_dim == 128 || h[1] == 2) check(run_case<bf16>(c, rng));
        }
      }
    }
  }
  // Other head dims (padded to the vector width inside the kernel) and fp16.
  for (int64_t head_dim : {40, 80, 96, 256}) {
    check(run_case<float>({1, 70, 150, 4, 2, head_dim, true, true, {}}, rng));
  }
  // ... and in narrow tiles (scores row-major, keys along the lanes), an odd head dim among them (bf16: half a pair).
  for (int64_t head_dim : {33, 40, 96, 256}) {
    check(run_case<float>({2, 1, 150, 4, 2, head_dim, true, true, {}}, rng));
    check(run_case<bf16>({2, 3, 150, 8, 4, head_dim, true, false, {}}, rng));
  }
  // Single-row tiles (decoding without GQA) take their columns 2 to 8 vectors at a time.
  for (int64_t head_dim : {33, 80, 96, 160, 256}) {
    check(run_case<float>({2, 1, 150, 4, 4, head_dim, true, head_dim % 2 == 0, {}}, rng));
  }
  for (bool causal : {false, true}) {
    check(run_case<fp16>({2, 113, 113, 8, 2, 128, causal, false, {}}, rng));
    check(run_case<fp16>({1, 7, 300, 8, 8, 64, causal, true, {}}, rng));
  }
  // A kv cache longer than the ragged lengths, 0 included: rows that see nothing give zeros and -inf.
  for (int64_t seqlen_q : {1, 7, 70}) {
    for (bool causal : {false, true}) {
      for (bool strided : {false, true}) {
        const Case c{5, seqlen_q, 300, 8, 2, 128, causal, strided, {0, 1, 113, 300, 5}};
        check(run_case<float>(c, rng));
        check(run_case<bf16>(c, rng));
      }
    }
  }
  // A paged cache: pages of 16, 64 and 256 positions, ragged lengths 0, 1, ending on a page (64, 256) and not.
  for (int64_t block_size : {16, 64, 256}) {
    for (int64_t seqlen_q : {1, 7}) {
      for (const auto& h : heads) {
        const bool causal = h[1] != 2, strided = (block_size + seqlen_q) % 2 == 0;
        const Case c{5, seqlen_q, 256, h[0], h[1], h[1] == 1 ? 64 : 128, causal, strided, {0, 1, 113, 256, 64},
                     block_size};
        check(run_case<float>(c, rng));
        if (h[1] == 2) check(run_case<bf16>(c, rng));
      }
    }
  }
  // Single-row tiles read a page's rows in place, a run per page: pages of 16 (runs of whole vectors), and pages of
  // 20, where a key block's rows fall into runs of unequal lengths and go through the block buffers.
  for (int64_t block_size : {16, 20}) {
    check(run_case<float>({3, 1, 320, 8, 8, 128, true, false, {1, 150, 320}, block_size}, rng));
    check(run_case<bf16>({3, 1, 320, 8, 8, 128, true, false, {1, 150, 320}, block_size}, rng));
  }
  // Decoding splits the cache into chunks of 256 keys or more (at most 64 of them), merged afterwards: lengths that
  // end on a chunk, one past it, and within one; a paged cache across chunks; a cache long enough for longer chunks.
  for (int64_t seqlen_q : {1, 7}) {
    for (bool causal : {false, true}) {
      const Case c{4, seqlen_q, 1100, 8, 2, 128, causal, causal, {0, 256, 257, 1100}};
      check(run_case<float>(c, rng));
      check(run_case<bf16>(c, rng));
      check(run_case<float>({3, seqlen_q, 1024, 8, 8, 64, causal, !causal, {1, 512, 1000}, 64}, rng));
    }
  }
  check(run_case<bf16>({1, 1, 17000, 8, 1, 64, false, false, {16999}}, rng));
  // The backward: lengths across its 64-row query tiles and 64-key blocks, GQA groups 1, 4 and 8.
  const int64_t backward_lengths[][2] = {{1, 1}, {17, 17}, {113, 113}, {257, 257}, {300, 300}, {1, 300},
                                         {113, 257}, {257, 113}, {300, 1}};
  for (const auto& len : backward_lengths) {
    for (const auto& h : heads) {
      for (bool causal : {false, true}) {
        const int64_t head_dim = (len[0] + h[1]) % 2 ? 64 : 128;
        const bool strided = (len[1] + h[1] + causal) % 2 == 0;
        const Case c{1, len[0], len[1], h[0], h[1], head_dim, causal, strided, {}};
        check(run_backward_case<float>(c, causal, rng));
        check(run_backward_case<bf16>(c, !causal, rng));  // group 1 at odd lengths: tiles of an odd row count
      }
    }
  }
  for (int64_t head_dim : {40, 256}) {
    check(run_backward_case<float>({2, 70, 150, 4, 2, head_dim, true, true, {}}, true, rng));
    check(run_backward_case<bf16>({2, 70, 150, 4, 2, head_dim, true, true, {}}, true, rng));
  }
  for (bool causal : {false, true}) {
    check(run_backward_case<fp16>({2, 113, 70, 8, 2, 128, causal, false, {}}, true, rng));
  }
  // Few kv heads and long enough queries: each head's queries in 2 and 3 chunks, their dk and dv partials summed.
  for (bool causal : {false, true}) {
    check(run_backward_case<float>({1, 1100, 1100, 2, 1, 64, causal, causal, {}}, !causal, rng));
    check(run_backward_case<bf16>({1, 1600, 1700, 4, 1, 64, causal, !causal, {}}, causal, rng));
  }
  std::printf("%s: %d cases\n", all_ok ? "OK" : "FAILED", n_cases);
  return all_ok ? 0 : 1;
}
