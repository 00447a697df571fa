// Tests of the CPU RMSNorm, RoPE, SwiGLU and cross-entropy step kernels (csrc/cpu/kernels.h) on one instruction-set path (the argument)
// against plain double-precision loops, and of the dtypes.h conversions against every bf16 and fp16 bit pattern.
// No torch. Exit code 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "tests/isa_under_test.h"

using namespace llama_kernels::cpu;
using llama_kernels::HeadStrides;
using llama_kernels::promoted_t;

namespace {

testing::IsaUnderTest tested;  // main's argument

int failures = 0;

#define CHECK(cond, ...)                                           \
  do {                                                             \
    if (!(cond)) {                                                 \
      if (++failures <= 20) {                                      \
        std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        std::fprintf(stderr, __VA_ARGS__);                         \
        std::fprintf(stderr, "\n");                                \
      }                                                            \
    }                                                              \
  } while (0)

template <typename T>
const char* name_of() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  if constexpr (std::is_same_v<T, bf16>) return "bf16";
  return "fp16";
}

// Relative tolerance per storage type: fp32 ~1e-5; bf16 and fp16 two ulp (8 and 11 significant bits).
template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, bf16>) return 2.0 / 128;
  return 2.0 / 1024;
}

// |got - want| within tolerance<T> of max(|want|, scale): scale covers results that cancel to near zero.
template <typename T>
bool close(float got, double want, double scale) {
  return std::fabs(got - want) <= tolerance<T>() * std::max(std::fabs(want), scale);
}

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
double uniform() {  // in [-1, 1)
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<double>(rng_state >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

template <typename T>
std::vector<T> random_values(size_t count, double amplitude) {
  std::vector<T> v(count);
  for (auto& e : v) e = from_float<T>(static_cast<float>(amplitude * uniform()));
  return v;
}

template <typename T>
uint16_t bits_of(T v) {  // of bf16 and fp16
  return v.bits;
}

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// ---------------------------------------------------------------------------- conversions
template <typename T>
void test_conversions(uint16_t inf_bits) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const T v{static_cast<uint16_t>(bits)};
    const float f = to_float(v);
    const bool is_nan = (bits & 0x7fff) > inf_bits;
    if (is_nan) {
      CHECK(std::isnan(f) && std::isnan(to_float(from_float<T>(f))), "%s nan 0x%04x", name_of<T>(), bits);
    } else {
      CHECK(bits_of(from_float<T>(f)) == bits, "%s round trip 0x%04x", name_of<T>(), bits);
    }
  }
  // Between consecutive finite positive values a < b: the midpoint goes to the even one, anything off it to the
  // nearer one. (Subnormals included; floats hold these midpoints exactly.)
  for (uint32_t bits = 0; bits + 1 < inf_bits; ++bits) {
    for (uint16_t sign : {0, 0x8000}) {
      const T a{static_cast<uint16_t>(bits | sign)}, b{static_cast<uint16_t>((bits + 1) | sign)};
      const float fa = to_float(a), fb = to_float(b), mid = fa + 0.5f * (fb - fa);  // no overflow at the top
      const uint16_t even = (bits & 1) ? bits_of(b) : bits_of(a);
      CHECK(bits_of(from_float<T>(mid)) == even, "%s tie 0x%04x", name_of<T>(), bits | sign);
      CHECK(bits_of(from_float<T>(std::nextafter(mid, fa))) == bits_of(a), "%s below 0x%04x", name_of<T>(), bits | sign);
      CHECK(bits_of(from_float<T>(std::nextafter(mid, fb))) == bits_of(b), "%s above 0x%04x", name_of<T>(), bits | sign);
    }
  }
}

// The array conversions (F16C for fp16 where the target has it) against the scalar ones: every bit pattern, and
// floats around every tie, subnormals, overflow and nan, in arrays whose length is not a multiple of the vector's.
template <typename T>
void test_array_conversions(uint16_t inf_bits) {
  std::vector<T> patterns(0x10000 - 3);  // odd: exercises the tail; the last three patterns are nan
  for (size_t i = 0; i < patterns.size(); ++i) patterns[i] = T{static_cast<uint16_t>(i)};
  std::vector<float> floats(patterns.size());
  convert(patterns.data(), floats.data(), static_cast<int64_t>(patterns.size()));
  for (size_t i = 0; i < patterns.size(); ++i) {
    const float want = to_float(patterns[i]);
    const bool is_nan = (i & 0x7fff) > inf_bits;
    CHECK(is_nan ? std::isnan(floats[i]) : std::memcmp(&floats[i], &want, sizeof want) == 0, "%s to float 0x%04zx",
          name_of<T>(), i);
  }
  // Floats: each pattern's value, the midpoints to the next (ties) and the floats either side of them, plus values
  // past the largest finite and below the smallest subnormal.
  std::vector<float> inputs;
  for (uint32_t bits = 0; bits + 1 < inf_bits; ++bits) {
    for (uint16_t sign : {0, 0x8000}) {
      const float fa = to_float(T{static_cast<uint16_t>(bits | sign)});
      const float fb = to_float(T{static_cast<uint16_t>((bits + 1) | sign)});
      const float mid = fa + 0.5f * (fb - fa);
      inputs.insert(inputs.end(), {fa, mid, std::nextafter(mid, fa), std::nextafter(mid, fb)});
    }
  }
  for (float f : {1e-30f, 1e-45f, 65519.0f, 65520.0f, 65536.0f, 1e10f, 3.4e38f, INFINITY, NAN}) {
    inputs.insert(inputs.end(), {f, -f});
  }
  inputs.push_back(0.0f);  // an odd length again
  std::vector<T> rounded(inputs.size());
  convert(inputs.data(), rounded.data(), static_cast<int64_t>(inputs.size()));
  for (size_t i = 0; i < inputs.size(); ++i) {
    const T want = from_float<T>(inputs[i]);
    CHECK(std::isnan(inputs[i]) ? std::isnan(to_float(rounded[i])) : same_bits(rounded[i], want),
          "%s from float %a: 0x%04x, want 0x%04x", name_of<T>(), static_cast<double>(inputs[i]), bits_of(rounded[i]),
          bits_of(want));
  }
}

// ---------------------------------------------------------------------------- RMSNorm
template <typename T, typename W>
void test_rms_norm(int64_t rows, int64_t n, bool with_residual, bool with_dh, int64_t pad) {
  if (!tested.sample()) return;
  using Out = promoted_t<T, W>;
  const int64_t stride = n + pad;  // every row strided by pad elements
  const float eps = 1e-5f;
  const auto x = random_values<T>(rows * stride, 2.0);
  const auto residual = random_values<T>(rows * stride, 1.0);
  const auto weight = random_values<W>(n, 1.5);
  const Out sentinel = from_float<Out>(12345.0f);
  std::vector<Out> y(rows * stride, sentinel);
  std::vector<T> h(rows * stride, from_float<T>(12345.0f));
  on_isa(tested.isa, [&]<CpuIsa P> {
    rms_norm<P, T, W>(x.data(), stride, with_residual ? residual.data() : nullptr, stride, weight.data(), y.data(),
                      stride, with_residual ? h.data() : nullptr, stride, rows, n, eps);
  });

  // Backward of the same rows, dy in the output dtype, dh in h's.
  const auto dy = random_values<Out>(rows * stride, 1.0);
  const auto dh = random_values<T>(rows * stride, 0.5);
  const T* h_in = with_residual ? h.data() : x.data();
  const T dx_sentinel = from_float<T>(12345.0f);
  std::vector<T> dx(rows * stride, dx_sentinel);
  std::vector<W> dweight(n);
  on_isa(tested.isa, [&]<CpuIsa P> {
    rms_norm_backward<P, T, W>(dy.data(), stride, with_dh ? dh.data() : nullptr, stride, h_in, stride, weight.data(),
                               dx.data(), stride, dweight.data(), rows, n, eps);
  });

  std::vector<double> dweight_want(n, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * stride;
    std::vector<double> hv(n);
    double sum_squares = 0;
    for (int64_t i = 0; i < n; ++i) {
      hv[i] = with_residual ? to_float(from_float<T>(to_float(x[o + i]) + to_float(residual[o + i]))) : to_float(x[o + i]);
      sum_squares += hv[i] * hv[i];
    }
    const double rstd = 1.0 / std::sqrt(sum_squares / n + eps);
    double sum_gn = 0;
    for (int64_t i = 0; i < n; ++i) sum_gn += to_float(dy[o + i]) * to_float(weight[i]) * hv[i] * rstd;
    for (int64_t i = 0; i < n; ++i) {
      const double normed = hv[i] * rstd;
      const double normed_rounded = to_float(from_float<T>(static_cast<float>(normed)));
      const double y_want = normed_rounded * to_float(weight[i]);
      // Tolerances of T for y and dweight even when they are fp32: h * rstd rounded to T may land on the other
      // neighbour when rstd differs in its last bits (fp32 sums in another order, as torch's also do).
      CHECK(close<T>(to_float(y[o + i]), y_want, 1e-3), "rms_norm %s/%s rows=%lld n=%lld res=%d (%lld,%lld): %g vs %g",
            name_of<T>(), name_of<W>(), (long long)rows, (long long)n, with_residual, (long long)r, (long long)i,
            to_float(y[o + i]), y_want);
      if (with_residual) {
        CHECK(same_bits(h[o + i], from_float<T>(static_cast<float>(hv[i]))), "rms_norm h %s (%lld,%lld)", name_of<T>(),
              (long long)r, (long long)i);
      }
      const double g = to_float(dy[o + i]) * to_float(weight[i]);
      const double dx_want = rstd * (g - normed * sum_gn / n) + (with_dh ? to_float(dh[o + i]) : 0.0);
      // Scale 1.0, the size of dx's terms (rstd * g), which cancel.
      CHECK(close<T>(to_float(dx[o + i]), dx_want, 1.0), "rms_norm_backward dx %s/%s rows=%lld n=%lld (%lld,%lld): %g vs %g",
            name_of<T>(), name_of<W>(), (long long)rows, (long long)n, (long long)r, (long long)i, to_float(dx[o + i]),
            dx_want);
      dweight_want[i] += to_float(dy[o + i]) * normed_rounded;
    }
    for (int64_t i = n; i < stride; ++i) {  // the padding between rows is not written
      CHECK(same_bits(y[o + i], sentinel), "rms_norm wrote padding");
      CHECK(same_bits(dx[o + i], dx_sentinel), "rms_norm_backward wrote padding");
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    CHECK(close<T>(to_float(dweight[i]), dweight_want[i], std::sqrt(static_cast<double>(rows))),
          "rms_norm_backward dweight %s/%s rows=%lld n=%lld [%lld]: %g vs %g", name_of<T>(), name_of<W>(),
          (long long)rows, (long long)n, (long long)i, to_float(dweight[i]), dweight_want[i]);
  }
}

template <typename T, typename W>
void test_rms_norm_sizes() {
  for (int64_t rows : {1, 7, 113}) {
    for (int64_t n : {1, 7, 4096, 5120, 10007}) {
      test_rms_norm<T, W>(rows, n, false, false, 0);
      test_rms_norm<T, W>(rows, n, true, true, 5);
    }
  }
  test_rms_norm<T, W>(7, 4096, true, false, 0);
  test_rms_norm<T, W>(7, 4096, false, true, 3);
}

// The dweight reduction's order is fixed: two runs give the same bits (and, with OpenMP, so do other thread counts).
void test_rms_norm_backward_deterministic() {
  const int64_t rows = 1000, n = 257;
  const auto h = random_values<float>(rows * n, 2.0), dy = random_values<float>(rows * n, 1.0);
  const auto weight = random_values<float>(n, 1.0);
  std::vector<float> dx(rows * n), dweight_a(n), dweight_b(n);
  on_isa(tested.isa, [&]<CpuIsa P> {
    rms_norm_backward<P, float, float>(dy.data(), n, nullptr, 0, h.data(), n, weight.data(), dx.data(), n,
                                       dweight_a.data(), rows, n, 1e-5f);
    rms_norm_backward<P, float, float>(dy.data(), n, nullptr, 0, h.data(), n, weight.data(), dx.data(), n,
                                       dweight_b.data(), rows, n, 1e-5f);
  });
  CHECK(std::memcmp(dweight_a.data(), dweight_b.data(), n * sizeof(float)) == 0, "dweight not deterministic");
}

// ---------------------------------------------------------------------------- RoPE
struct RopeCase {
  int64_t batch, seqlen, n_q_heads, n_k_heads, head_dim;
  bool interleaved, inverse, in_place;
  float attention_factor;
};

// q and k are slices of one packed (B, S, Hq + Hk, D) buffer (strided tokens); outputs are separate contiguous
// tensors, or the packed buffer itself when in place. Positions: (B, S) with a batch stride of S + 1.
template <typename T, typename AngleT>
void test_rope(const RopeCase& c) {
  if (!tested.sample()) return;
  const int64_t D = c.head_dim, half = D / 2, heads = c.n_q_heads + c.n_k_heads;
  const int64_t n_tokens = c.batch * c.seqlen;
  const HeadStrides packed{c.seqlen * heads * D, heads * D, D};
  const HeadStrides q_dense{c.seqlen * c.n_q_heads * D, c.n_q_heads * D, D};
  const HeadStrides k_dense{c.seqlen * c.n_k_heads * D, c.n_k_heads * D, D};
  const auto input = random_values<T>(n_tokens * heads * D, 2.0);
  std::vector<T> packed_out = input, q_out(n_tokens * c.n_q_heads * D), k_out(n_tokens * c.n_k_heads * D);
  std::vector<int64_t> positions(c.batch * (c.seqlen + 1));
  for (auto& p : positions) p = static_cast<int64_t>((uniform() + 1.0) * 100000.0);
  std::vector<AngleT> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = static_cast<AngleT>(1.0 / std::pow(1e6, 2.0 * i / D));

  const T* src = c.in_place ? packed_out.data() : input.data();
  const RopeOperand<T> q{src, packed, c.in_place ? packed_out.data() : q_out.data(), c.in_place ? packed : q_dense,
                         c.n_q_heads};
  const RopeOperand<T> k{src + c.n_q_heads * D, packed,
                         c.in_place ? packed_out.data() + c.n_q_heads * D : k_out.data(), c.in_place ? packed : k_dense,
                         c.n_k_heads};
  on_isa(tested.isa, [&]<CpuIsa P> {
    rope<P, T, AngleT>(q, k, positions.data(), c.seqlen + 1, 1, inv_freq.data(), c.batch, c.seqlen, D,
                       c.attention_factor, c.interleaved, c.inverse);
  });

  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t s = 0; s < c.seqlen; ++s) {
      const int64_t position = positions[b * (c.seqlen + 1) + s];
      for (int64_t hd = 0; hd < heads; ++hd) {
        const bool is_q = hd < c.n_q_heads;
        const T* x = input.data() + b * packed.batch + s * packed.token + hd * D;
        const T* got = c.in_place ? packed_out.data() + b * packed.batch + s * packed.token + hd * D
                       : is_q     ? q_out.data() + b * q_dense.batch + s * q_dense.token + hd * D
                                  : k_out.data() + b * k_dense.batch + s * k_dense.token + (hd - c.n_q_heads) * D;
        for (int64_t i = 0; i < half; ++i) {
          // The angle as the kernel's contract forms it (fp32 product for float inv_freq), then exact trigonometry.
          const double angle = std::is_same_v<AngleT, float>
                                   ? static_cast<double>(static_cast<float>(position) * static_cast<float>(inv_freq[i]))
                                   : static_cast<double>(position) * static_cast<double>(inv_freq[i]);
          const double cos = std::cos(angle) * c.attention_factor;
          const double sin = std::sin(angle) * c.attention_factor * (c.inverse ? -1.0 : 1.0);
          const int64_t i1 = c.interleaved ? 2 * i : i, i2 = c.interleaved ? 2 * i + 1 : i + half;
          const double x1 = to_float(x[i1]), x2 = to_float(x[i2]);
          const double want1 = x1 * cos - x2 * sin, want2 = x1 * sin + x2 * cos;
          const double scale = c.attention_factor * (std::fabs(x1) + std::fabs(x2));
          CHECK(close<T>(to_float(got[i1]), want1, scale) && close<T>(to_float(got[i2]), want2, scale),
                "rope %s angles=%s B=%lld S=%lld Hq=%lld Hk=%lld D=%lld il=%d inv=%d inplace=%d at (%lld,%lld,%lld,%lld):"
                " (%g, %g) vs (%g, %g)",
                name_of<T>(), sizeof(AngleT) == 8 ? "fp64" : "fp32", (long long)c.batch, (long long)c.seqlen,
                (long long)c.n_q_heads, (long long)c.n_k_heads, (long long)D, c.interleaved, c.inverse, c.in_place,
                (long long)b, (long long)s, (long long)hd, (long long)i, to_float(got[i1]), to_float(got[i2]), want1,
                want2);
        }
      }
    }
  }
}

template <typename T, typename AngleT>
void test_rope_cases() {
  const int64_t head_counts[][2] = {{1, 1}, {4, 1}, {8, 2}};
  for (int64_t head_dim : {64, 128}) {
    for (const auto& hc : head_counts) {
      for (int64_t seqlen : {1, 7, 33}) {
        for (bool interleaved : {false, true}) {
          for (bool in_place : {false, true}) {
            const bool inverse = seqlen == 7;
            const float attention_factor = seqlen == 33 ? 1.25f : 1.0f;
            test_rope<T, AngleT>({2, seqlen, hc[0], hc[1], head_dim, interleaved, inverse, in_place, attention_factor});
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------- SwiGLU
// One ulp of T, relative (fp32: eight, the float math's own error): the kernels compute in float, within a few
// float ulps of the exact value, and round once.
template <typename T>
double swiglu_tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-6;
  if constexpr (std::is_same_v<T, bf16>) return 1.0 / 128;
  return 1.0 / 1024;
}

// The magnitude below which the tolerance is absolute (tolerance times this): fp16's smallest normal value (an ulp
// is fixed below it); else 1e-30: where e^-g overflows float (g < -88.7) the float formula, torch's as well, gives
// 0 for an exact |g| e^g under 4e-37.
template <typename T>
double swiglu_floor() {
  return std::is_same_v<T, fp16> ? 0x1p-14 : 1e-30;
}

// gate, up and dy as the rows of fused (rows, 2n + pad) projections: gate the first half, up the second, rows
// strided; outputs strided by pad too, whose padding must stay unwritten. extremes: gate's first elements are
// +-100, +-89 (e^89 overflows float), +-20 and nan.
template <typename T>
void test_swiglu(int64_t rows, int64_t n, int64_t pad, bool extremes) {
  if (!tested.sample()) return;
  const int64_t stride = 2 * n + pad, out_stride = n + pad;
  auto gate_up = random_values<T>(rows * stride, 3.0);
  const auto dy = random_values<T>(rows * stride, 1.0);
  const float extreme_values[] = {-100.0f, 100.0f, -89.0f, 89.0f, -20.0f, 20.0f, NAN};
  if (extremes) {
    for (int64_t i = 0; i < std::min<int64_t>(n, 7); ++i) gate_up[i] = from_float<T>(extreme_values[i]);
  }
  const T* gate = gate_up.data();
  const T* up = gate_up.data() + n;
  const T sentinel = from_float<T>(12345.0f);
  std::vector<T> y(rows * out_stride, sentinel), dgate(rows * out_stride, sentinel), dup(rows * out_stride, sentinel);
  on_isa(tested.isa, [&]<CpuIsa P> {
    swiglu<P, T>(gate, stride, up, stride, y.data(), out_stride, rows, n);
    swiglu_backward<P, T>(dy.data(), stride, gate, stride, up, stride, dgate.data(), out_stride, dup.data(), out_stride,
                          rows, n);
  });
  const double tol = swiglu_tolerance<T>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      const double g = to_float(gate[r * stride + i]), u = to_float(up[r * stride + i]);
      const double d = to_float(dy[r * stride + i]);
      const double s = 1.0 / (1.0 + std::exp(-g));
      const double want[3] = {g * s * u, d * u * s * (1.0 + g * (1.0 - s)), d * g * s};
      // Scales: swiglu_floor, and for dgate the magnitude of its terms, as 1 + g (1 - s) cancels near g = -1.28.
      const double tiny = swiglu_floor<T>();
      const double scales[3] = {tiny, std::max(tiny, std::fabs(d * u * s) * (1.0 + std::fabs(g * (1.0 - s)))), tiny};
      const float got[3] = {to_float(y[r * out_stride + i]), to_float(dgate[r * out_stride + i]),
                            to_float(dup[r * out_stride + i])};
      const char* names[3] = {"y", "dgate", "dup"};
      for (int k = 0; k < 3; ++k) {
        const bool ok = std::isnan(g) ? std::isnan(got[k])
                                      : std::fabs(got[k] - want[k]) <= tol * std::max(std::fabs(want[k]), scales[k]);
        CHECK(ok, "swiglu %s %s rows=%lld n=%lld pad=%lld (%lld,%lld) g=%g: %g vs %g", names[k], name_of<T>(),
              (long long)rows, (long long)n, (long long)pad, (long long)r, (long long)i, g, got[k], want[k]);
      }
    }
    for (int64_t i = n; i < out_stride; ++i) {  // the padding between rows is not written
      CHECK(same_bits(y[r * out_stride + i], sentinel) && same_bits(dgate[r * out_stride + i], sentinel) &&
                same_bits(dup[r * out_stride + i], sentinel),
            "swiglu %s wrote padding", name_of<T>());
    }
  }
}

template <typename T>
void test_swiglu_sizes() {
  for (int64_t rows : {1, 7, 113}) {
    for (int64_t n : {1, 13, 11008}) test_swiglu<T>(rows, n, rows == 7 ? 0 : 3, n > 1);
  }
}

// ---------------------------------------------------------------------------- the cross-entropy step
// Rows of fp32 logits with targets (one ignored, one outside [0, vocab) on rows >= 3), dz in DZ at a padded row
// stride (or in place over the logits, in_place), against double loops: lse, loss, dz, nan for the bad target.
template <typename DZ>
void test_cross_entropy_step(int64_t rows, int64_t vocab, float smoothing, bool in_place) {
  if (!tested.sample()) return;
  constexpr int64_t kIgnore = -100;
  const int64_t stride = vocab + 3;
  std::vector<float> logits(rows * stride), scale(rows), loss(rows, 7.0f), lse(rows, 7.0f);
  std::vector<int64_t> target(rows);
  for (auto& z : logits) z = static_cast<float>(8.0 * uniform());
  for (int64_t r = 0; r < rows; ++r) {
    target[r] = r == 1 ? kIgnore : (r == 2 && rows > 3 ? vocab : static_cast<int64_t>((uniform() + 1.0) / 2 * vocab));
    scale[r] = static_cast<float>(0.5 + uniform() / 4);
  }
  const std::vector<float> z0 = logits;
  const DZ sentinel = from_float<DZ>(12345.0f);
  std::vector<DZ> dz_storage(in_place ? 0 : rows * stride, sentinel);
  DZ* dz = in_place ? reinterpret_cast<DZ*>(logits.data()) : dz_storage.data();
  on_isa(tested.isa, [&]<CpuIsa P> {
    cross_entropy_step<P, DZ>(logits.data(), stride, target.data(), scale.data(), kIgnore, smoothing, loss.data(),
                              lse.data(), dz, stride, rows, vocab);
  });
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = z0.data() + r * stride;
    double z_max = z[0], sum = 0.0, exp_sum = 0.0;
    for (int64_t j = 0; j < vocab; ++j) z_max = std::max(z_max, static_cast<double>(z[j]));
    for (int64_t j = 0; j < vocab; ++j) exp_sum += std::exp(z[j] - z_max), sum += z[j];
    const double want_lse = z_max + std::log(exp_sum);
    const int64_t t = target[r];
    const bool ignored = t == kIgnore, bad = !ignored && (t < 0 || t >= vocab);
    CHECK(close<float>(lse[r], want_lse, 1.0), "ce lse rows=%lld vocab=%lld row %lld: %g vs %g", (long long)rows,
          (long long)vocab, (long long)r, lse[r], want_lse);
    const double want_loss = ignored ? 0.0 : want_lse - (1.0 - smoothing) * z[bad ? 0 : t] - smoothing * sum / vocab;
    CHECK(bad ? std::isnan(loss[r]) : close<float>(loss[r], want_loss, 1.0),
          "ce loss rows=%lld vocab=%lld row %lld: %g vs %g", (long long)rows, (long long)vocab, (long long)r, loss[r],
          want_loss);
    const double s = ignored ? 0.0 : scale[r];
    for (int64_t j = 0; j < vocab; ++j) {
      const double p = std::exp(z[j] - want_lse);
      const double want = (p - smoothing / vocab - (j == t ? 1.0 - smoothing : 0.0)) * s;
      const float got = to_float(dz[r * stride + j]);
      CHECK(bad ? std::isnan(got) : close<DZ>(got, want, s * (p + smoothing / vocab + (j == t))),
            "ce dz %s rows=%lld vocab=%lld e=%g (%lld,%lld): %g vs %g", name_of<DZ>(), (long long)rows,
            (long long)vocab, smoothing, (long long)r, (long long)j, got, want);
    }
    for (int64_t j = vocab; j < stride && !in_place; ++j) {
      CHECK(same_bits(dz[r * stride + j], sentinel), "ce dz %s wrote padding", name_of<DZ>());
    }
  }
}

template <typename DZ>
void test_cross_entropy_step_sizes() {
  for (int64_t rows : {1, 7, 113}) {
    for (int64_t vocab : {1, 13, 32016}) {
      for (float smoothing : {0.0f, 0.1f}) test_cross_entropy_step<DZ>(rows, vocab, smoothing, false);
    }
  }
  if constexpr (std::is_same_v<DZ, float>) test_cross_entropy_step<float>(7, 1001, 0.1f, true);
}

}  // namespace

int main(int argc, char** argv) {
  tested = testing::isa_under_test(argc, argv);
  test_conversions<bf16>(0x7f80);
  test_conversions<fp16>(0x7c00);
  test_array_conversions<bf16>(0x7f80);
  test_array_conversions<fp16>(0x7c00);

  test_rms_norm_sizes<float, float>();
  test_rms_norm_sizes<bf16, bf16>();
  test_rms_norm_sizes<fp16, fp16>();
  test_rms_norm_sizes<bf16, float>();
  test_rms_norm_sizes<fp16, float>();
  test_rms_norm_backward_deterministic();

  test_rope_cases<float, float>();
  test_rope_cases<float, double>();
  test_rope_cases<bf16, float>();
  test_rope_cases<bf16, double>();
  test_rope_cases<fp16, float>();
  test_rope_cases<fp16, double>();

  test_swiglu_sizes<float>();
  test_swiglu_sizes<bf16>();
  test_swiglu_sizes<fp16>();

  test_cross_entropy_step_sizes<float>();
  test_cross_entropy_step_sizes<bf16>();

  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_cpu_norm_rope: all checks passed\n");
  return 0;
}
