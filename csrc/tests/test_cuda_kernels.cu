// Standalone test of the CUDA launchers of csrc/cuda (no torch): runs them on device buffers at odd sizes, strides
// and alignments, and compares with a host loop in double. Exits nonzero on any failure.
//   nvcc -std=c++17 -O2 -gencode arch=compute_80,code=sm_80 csrc/tests/test_cuda_kernels.cu csrc/cuda/rms_norm.cu \
//        csrc/cuda/rope.cu -o test_cuda_kernels && ./test_cuda_kernels
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../cuda/kernels.cuh"

namespace {

using llama_kernels::HeadStrides;
using llama_kernels::promoted_t;

#define CHECK_CUDA(call)                                                                                  \
  do {                                                                                                    \
    const cudaError_t status = (call);                                                                    \
    if (status != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(status)); \
      std::exit(2);                                                                                       \
    }                                                                                                     \
  } while (0)

double to_double(float x) { return x; }
double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }
double to_double(__half x) { return __half2float(x); }

// Rounds through float as the kernels do (float to T rounds to nearest even); a double value is first rounded to
// float, which for the test's values is exact or a rounding the tolerance absorbs.
template <typename T>
T from_double(double x);
template <>
float from_double<float>(double x) {
  return static_cast<float>(x);
}
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __float2bfloat16_rn(static_cast<float>(x));
}
template <>
__half from_double<__half>(double x) {
  return __float2half_rn(static_cast<float>(x));
}

// Relative size of one ulp of T, the tolerances' unit.
template <typename T>
double ulp() {
  if constexpr (std::is_same_v<T, float>) return 0x1p-23;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return 0x1p-7;
  return 0x1p-10;
}

template <typename T>
const char* name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  if constexpr (std::is_same_v<T, double>) return "fp64";
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bf16";
  return "fp16";
}

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
double uniform() {  // [0, 1), xorshift64*
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return static_cast<double>((rng_state * 0x2545f4914f6cdd1dull) >> 11) * 0x1p-53;
}

template <typename T>
std::vector<T> random_vector(size_t size, double low, double high) {
  std::vector<T> values(size);
  for (auto& v : values) v = from_double<T>(low + (high - low) * uniform());
  return values;
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t size = 0;
  explicit DeviceBuffer(const std::vector<T>& host) : size(host.size()) {
    CHECK_CUDA(cudaMalloc(&ptr, size * sizeof(T)));
    CHECK_CUDA(cudaMemcpy(ptr, host.data(), size * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  std::vector<T> to_host() const {
    std::vector<T> host(size);
    CHECK_CUDA(cudaMemcpy(host.data(), ptr, size * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

int failures = 0;

// Counts the elements outside tolerance; reports the first few and the case.
struct Comparison {
  std::string label;
  int64_t bad = 0;
  double worst = 0.0;
  void check(double got, double expected, double tolerance, int64_t index) {
    const double error = std::fabs(got - expected);
    if (!(error <= tolerance)) {  // NaN fails too
      if (bad < 3) std::fprintf(stderr, "  %s [%lld]: got %.9g, expected %.9g (tol %.3g)\n", label.c_str(),
                                static_cast<long long>(index), got, expected, tolerance);
      ++bad;
    }
    if (error > worst) worst = error;
  }
  void report() {
    std::printf("%s %s (max abs error %.3g)\n", bad ? "FAIL" : "ok  ", label.c_str(), worst);
    if (bad) ++failures;
  }
};

// ------------------------------------------------------------------------------------------------ RMSNorm
// rows of n at row stride n + row_padding; misalign shifts every buffer by one element (the scalar path);
// h_in_residual writes h over the residual (the in-place fused add).
template <typename T, typename W>
void test_rms_norm(int64_t rows, int64_t n, int64_t row_padding, bool misalign, bool with_residual,
                   bool h_in_residual) {
  using Out = promoted_t<T, W>;
  const int64_t offset = misalign ? 1 : 0, stride = n + row_padding, size = offset + rows * stride;
  const float eps = 1e-5f;
  const std::vector<T> x = random_vector<T>(size, -2.0, 2.0), residual = random_vector<T>(size, -2.0, 2.0);
  const std::vector<W> weight = random_vector<W>(offset + n, 0.5, 1.5);
  DeviceBuffer<T> x_device(x), residual_device(residual), h_device{std::vector<T>(size)};
  DeviceBuffer<W> weight_device(weight);
  DeviceBuffer<Out> y_device{std::vector<Out>(size)};
  T* h_ptr = with_residual ? (h_in_residual ? residual_device.ptr : h_device.ptr) + offset : nullptr;
  llama_kernels::cuda::launch_rms_norm<T, W>(x_device.ptr + offset,
                                             with_residual ? residual_device.ptr + offset : nullptr,
                                             weight_device.ptr + offset, y_device.ptr + offset, h_ptr, rows, n,
                                             stride, stride, stride, stride, eps, nullptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<Out> y = y_device.to_host();
  const std::vector<T> h = with_residual ? (h_in_residual ? residual_device : h_device).to_host() : std::vector<T>();

  char label[160];
  std::snprintf(label, sizeof label, "rms_norm x=%s w=%s rows=%lld n=%lld stride=%lld%s%s%s", name<T>(), name<W>(),
                static_cast<long long>(rows), static_cast<long long>(n), static_cast<long long>(stride),
                misalign ? " misaligned" : "", with_residual ? " residual" : "", h_in_residual ? " h=residual" : "");
  Comparison comparison{label};
  std::vector<double> h_expected(n);
  for (int64_t r = 0; r < rows; ++r) {
    double sum_sq = 0.0;
    for (int64_t c = 0; c < n; ++c) {
      const int64_t i = offset + r * stride + c;
      h_expected[c] = with_residual ? to_double(from_double<T>(to_double(x[i]) + to_double(residual[i])))
                                    : to_double(x[i]);
      if (with_residual) comparison.check(to_double(h[i]), h_expected[c], ulp<T>() * std::fabs(h_expected[c]), i);
      sum_sq += h_expected[c] * h_expected[c];
    }
    const double rstd = 1.0 / std::sqrt(sum_sq / static_cast<double>(n) + eps);
    for (int64_t c = 0; c < n; ++c) {
      const int64_t i = offset + r * stride + c;
      const double w = to_double(weight[offset + c]);
      const double expected = to_double(from_double<T>(h_expected[c] * rstd)) * w;
      // The normalized value may round to a neighbouring T, then the product rounds to Out.
      const double tolerance = (ulp<T>() + ulp<Out>() + 1e-5) * std::fabs(h_expected[c] * rstd * w) + 1e-6;
      comparison.check(to_double(y[i]), expected, tolerance, i);
    }
  }
  comparison.report();
}

template <typename T, typename W>
void rms_norm_suite() {
  for (int64_t rows : {1, 7, 113}) {
    for (int64_t n : {7, 4096, 5120, 8192, 10007, 16384}) {
      test_rms_norm<T, W>(rows, n, 0, false, true, false);
      test_rms_norm<T, W>(rows, n, 0, false, false, false);
    }
  }
  // Row strides wider than the row; one element off (the scalar path) at the register and streaming widths;
  // h written over the residual.
  test_rms_norm<T, W>(7, 4096, 64, false, true, false);
  test_rms_norm<T, W>(7, 4096, 0, true, true, false);
  test_rms_norm<T, W>(7, 8192, 3, false, true, false);
  test_rms_norm<T, W>(7, 16384, 0, true, false, false);
  test_rms_norm<T, W>(113, 5120, 0, false, true, true);
  test_rms_norm<T, W>(7, 10007, 0, false, true, true);
}

// ------------------------------------------------------------------------------------------------ RoPE
// q and k are views of one fused (batch, seqlen, Hq + Hk + token_padding heads..., D) buffer; positions are stored
// transposed (seqlen, batch), so their strides are not the contiguous ones.
template <typename T, typename F>
void test_rope(int64_t batch, int64_t seqlen, int64_t n_q_heads, int64_t n_k_heads, int64_t head_dim,
               bool interleaved, bool inverse, bool in_place, bool misalign, float attention_factor) {
  const int64_t offset = misalign ? 1 : 0, token_padding = 8;
  const int64_t stride_token = (n_q_heads + n_k_heads) * head_dim + token_padding;
  const int64_t size = offset + batch * seqlen * stride_token;
  const HeadStrides qkv_q{seqlen * stride_token, stride_token, head_dim};
  const std::vector<T> qkv = random_vector<T>(size, -2.0, 2.0);
  std::vector<int64_t> positions(batch * seqlen);  // (seqlen, batch) in memory
  for (auto& p : positions) p = static_cast<int64_t>(uniform() * 100000.0);
  std::vector<F> inv_freq(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = static_cast<F>(1.0 / std::pow(1e6, static_cast<double>(2 * i) / static_cast<double>(head_dim)));

  DeviceBuffer<T> qkv_device(qkv);
  DeviceBuffer<int64_t> positions_device(positions);
  DeviceBuffer<F> inv_freq_device(inv_freq);
  // Out of place: contiguous (batch, seqlen, heads, D) outputs, shifted like the inputs.
  DeviceBuffer<T> q_out_device{std::vector<T>(offset + batch * seqlen * n_q_heads * head_dim)};
  DeviceBuffer<T> k_out_device{std::vector<T>(offset + batch * seqlen * n_k_heads * head_dim)};
  const T* q = qkv_device.ptr + offset;
  const T* k = qkv_device.ptr + offset + n_q_heads * head_dim;
  T* q_out = in_place ? qkv_device.ptr + offset : q_out_device.ptr + offset;
  T* k_out = in_place ? qkv_device.ptr + offset + n_q_heads * head_dim : k_out_device.ptr + offset;
  const HeadStrides q_out_strides =
      in_place ? qkv_q : HeadStrides{seqlen * n_q_heads * head_dim, n_q_heads * head_dim, head_dim};
  const HeadStrides k_out_strides =
      in_place ? qkv_q : HeadStrides{seqlen * n_k_heads * head_dim, n_k_heads * head_dim, head_dim};
  llama_kernels::cuda::launch_rope<T, F>(q, k, q_out, k_out, positions_device.ptr, inv_freq_device.ptr, batch, seqlen,
                                         n_q_heads, n_k_heads, head_dim, qkv_q, qkv_q, q_out_strides, k_out_strides,
                                         /*positions_stride_batch=*/1, /*positions_stride_token=*/batch,
                                         attention_factor, interleaved, inverse, nullptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<T> qkv_after = qkv_device.to_host();
  const std::vector<T> q_out_host = q_out_device.to_host(), k_out_host = k_out_device.to_host();

  char label[200];
  std::snprintf(label, sizeof label, "rope %s inv_freq=%s B=%lld S=%lld Hq=%lld Hk=%lld D=%lld %s%s%s%s af=%g",
                name<T>(), name<F>(), static_cast<long long>(batch), static_cast<long long>(seqlen),
                static_cast<long long>(n_q_heads), static_cast<long long>(n_k_heads),
                static_cast<long long>(head_dim), interleaved ? "interleaved" : "half-split",
                inverse ? " inverse" : "", in_place ? " in-place" : "", misalign ? " misaligned" : "",
                attention_factor);
  Comparison comparison{label};
  const int64_t half_dim = head_dim / 2;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seqlen; ++s) {
      const int64_t position = positions[s * batch + b];
      const int64_t token_in = offset + b * qkv_q.batch + s * qkv_q.token;
      for (int64_t head = 0; head < n_q_heads + n_k_heads; ++head) {
        const bool is_q = head < n_q_heads;
        const int64_t in_base = token_in + head * head_dim;
        const int64_t out_base = in_place ? in_base
                                 : is_q   ? offset + (b * seqlen + s) * n_q_heads * head_dim + head * head_dim
                                          : offset + (b * seqlen + s) * n_k_heads * head_dim +
                                              (head - n_q_heads) * head_dim;
        const std::vector<T>& out = in_place ? qkv_after : is_q ? q_out_host : k_out_host;
        for (int64_t i = 0; i < half_dim; ++i) {
          // The angle in F, as the kernel forms it (float: one float product; double: exact enough).
          const double angle = std::is_same_v<F, float>
                                   ? static_cast<double>(static_cast<float>(position) * static_cast<float>(inv_freq[i]))
                                   : static_cast<double>(position) * static_cast<double>(inv_freq[i]);
          const double c = std::cos(angle) * attention_factor;
          const double sn = (inverse ? -1.0 : 1.0) * std::sin(angle) * attention_factor;
          const int64_t j1 = interleaved ? 2 * i : i, j2 = interleaved ? 2 * i + 1 : i + half_dim;
          const double x1 = to_double(qkv[in_base + j1]), x2 = to_double(qkv[in_base + j2]);
          const double tolerance = (ulp<T>() + 4e-6) * (std::fabs(x1) + std::fabs(x2)) * attention_factor + 1e-6;
          comparison.check(to_double(out[out_base + j1]), x1 * c - x2 * sn, tolerance, out_base + j1);
          comparison.check(to_double(out[out_base + j2]), x1 * sn + x2 * c, tolerance, out_base + j2);
        }
      }
      // In place, the padding between tokens stays untouched.
      if (in_place) {
        for (int64_t p = 0; p < token_padding; ++p) {
          const int64_t i = token_in + (n_q_heads + n_k_heads) * head_dim + p;
          comparison.check(to_double(qkv_after[i]), to_double(qkv[i]), 0.0, i);
        }
      }
    }
  }
  comparison.report();
}

template <typename T, typename F>
void rope_suite() {
  for (bool interleaved : {false, true}) {
    for (int64_t head_dim : {64, 128}) {
      test_rope<T, F>(2, 7, 8, 2, head_dim, interleaved, false, false, false, 1.0f);
      test_rope<T, F>(2, 113, 8, 2, head_dim, interleaved, false, true, false, 1.0f);
      test_rope<T, F>(1, 7, 8, 8, head_dim, interleaved, true, true, true, 1.25f);
      test_rope<T, F>(3, 7, 4, 1, head_dim, interleaved, true, false, true, 1.0f);
    }
    test_rope<T, F>(1, 113, 32, 8, 128, interleaved, false, true, false, 1.0f);  // Code Llama 34B's GQA
  }
}

}  // namespace

int main() {
  rms_norm_suite<float, float>();
  rms_norm_suite<__nv_bfloat16, __nv_bfloat16>();
  rms_norm_suite<__half, __half>();
  rms_norm_suite<__nv_bfloat16, float>();
  rms_norm_suite<__half, __nv_bfloat16>();
  rms_norm_suite<float, __half>();

  rope_suite<float, float>();
  rope_suite<float, double>();
  rope_suite<__nv_bfloat16, float>();
  rope_suite<__nv_bfloat16, double>();
  rope_suite<__half, float>();
  rope_suite<__half, double>();

  if (failures) {
    std::printf("%d case(s) FAILED\n", failures);
    return 1;
  }
  std::printf("all cases passed\n");
  return 0;
}
