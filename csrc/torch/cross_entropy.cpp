// The fused cross-entropy's CPU pieces (contracts in ops.h): cross_entropy_step_cpu over the kernel of
// csrc/cpu/cross_entropy.cpp, and bf16_matmul_cpu, pack_pairs_cpu and bf16_matmul_available: bf16 products with
// fp32 accumulation and an fp32 output, which torch's CPU matmuls lack (a bf16 mm rounds its output to bf16;
// an fp32 mm of bf16 values converts both operands on every call). The products are oneDNN's brgemm micro-kernel as
// torch ships it (at::native::cpublas::brgemm, SDPA's own CPU block product: AMX tiles where the CPU has them,
// AVX-512 bf16 dot products otherwise), one call per output block, the blocks spread over the OpenMP threads.
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "torch/glue.h"
#include "torch/ops.h"

namespace llama_kernels {
namespace {

const at::Device kCpu(at::kCPU);
// One micro-kernel call: an output block of kBlockM x kBlockN, over kBlockK of K (even: pairs).
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;
constexpr int64_t kBlockK = 1024;

uint32_t pair_of(uint16_t even, uint16_t odd) { return static_cast<uint32_t>(odd) << 16 | even; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_step_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& row_scale,
                                                          int64_t ignore_index, double label_smoothing,
                                                          const std::optional<at::Tensor>& dz) {
  constexpr const char* op = "cross_entropy_step";
  check_device(op, "logits", logits, kCpu);
  check_dtype(op, "logits", logits, at::kFloat);
  check_layout(op, "logits", logits, 2, "(rows, vocab)");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const at::Tensor target_ = target.contiguous();
  check_device(op, "target", target_, kCpu);
  check_dtype(op, "target", target_, at::kLong);
  check_shape(op, "target", target_, {rows});
  TORCH_CHECK(row_scale.has_value() == dz.has_value(), op, ": row_scale: expected with dz and only with it");
  at::Tensor scale;
  if (row_scale.has_value()) {
    scale = row_scale->contiguous();
    check_device(op, "row_scale", scale, kCpu);
    check_dtype(op, "row_scale", scale, at::kFloat);
    check_shape(op, "row_scale", scale, {rows});
    check_device(op, "dz", *dz, kCpu);
    TORCH_CHECK(dz->scalar_type() == at::kFloat || dz->scalar_type() == at::kBFloat16, op,
                ": dz: expected dtype float32 or bfloat16, got ", dz->scalar_type());
    check_layout(op, "dz", *dz, 2, "(rows, vocab)");
    check_shape(op, "dz", *dz, logits.sizes());
  }
  at::Tensor loss = at::empty({rows}, logits.options());
  at::Tensor lse = at::empty({rows}, logits.options());
  if (rows == 0 || vocab == 0) return {loss, lse};
  auto run = [&](auto dz_tag) {
    using DZ = decltype(dz_tag);
    cpu::on_isa(cpu::cpu_isa(), [&]<cpu::CpuIsa P> {
      cpu::cross_entropy_step<P, DZ>(data_of<const float>(logits), logits.stride(0), data_of<const int64_t>(target_),
                                     dz ? data_of<const float>(scale) : nullptr, ignore_index,
                                     static_cast<float>(label_smoothing), data_of<float>(loss), data_of<float>(lse),
                                     dz ? data_of<DZ>(*dz) : nullptr, dz ? dz->stride(0) : 0, rows, vocab);
    });
  };
  if (dz && dz->scalar_type() == at::kBFloat16) {
    run(cpu::bf16{});
  } else {
    run(float{});
  }
  return {loss, lse};
}

bool bf16_matmul_available() {
  // The micro-kernel's own floor is AVX-512 (cpublas::brgemm refuses below it); a path forced below it is honoured.
  return at::globalContext().userEnabledMkldnn() &&
         static_cast<int>(cpu::cpu_isa()) >= static_cast<int>(cpu::CpuIsa::avx512);
}

at::Tensor pack_pairs_cpu(const at::Tensor& b) {
  constexpr const char* op = "pack_pairs";
  check_device(op, "b", b, kCpu);
  check_dtype(op, "b", b, at::kBFloat16);
  TORCH_CHECK(b.dim() == 2, op, ": b: expected 2 dims (K, N), got shape ", b.sizes());
  const int64_t k = b.size(0), n = b.size(1), pairs = (k + 1) / 2, s0 = b.stride(0), s1 = b.stride(1);
  at::Tensor out = at::empty({pairs, n, 2}, b.options());
  const auto* src = data_of<const uint16_t>(b);
  auto* dst = data_of<uint32_t>(out);
  const bool even_pairs = k % 2 == 0 && s1 % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0;
  if (s0 == 1 && n > 1 && even_pairs) {
    // The transpose of a row-major (N, K) matrix (a weight's .T): its rows hold the pairs already, so this is a
    // transpose of 32-bit pairs, in tiles that keep both sides in cache.
    const auto* src_pairs = reinterpret_cast<const uint32_t*>(src);
    const int64_t pair_stride = s1 / 2;
    constexpr int64_t kTile = 32;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += kTile) {
      for (int64_t p0 = 0; p0 < pairs; p0 += kTile) {
        for (int64_t p = p0; p < std::min(p0 + kTile, pairs); ++p) {
          for (int64_t c = n0; c < std::min(n0 + kTile, n); ++c) dst[p * n + c] = src_pairs[c * pair_stride + p];
        }
      }
    }
  } else if (s1 == 1) {  // rows contiguous: rows 2p and 2p + 1 interleaved
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t* even = src + 2 * p * s0;
      uint32_t* out_row = dst + p * n;
      if (2 * p + 1 < k) {
        const uint16_t* odd = even + s0;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) out_row[c] = pair_of(even[c], odd[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) out_row[c] = pair_of(even[c], 0);
      }
    }
  } else {  // any other strides (an odd K of a transpose, ...): element by element
    auto at_ = [&](int64_t row, int64_t col) -> uint16_t { return row < k ? src[row * s0 + col * s1] : 0; };
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
      for (int64_t c = 0; c < n; ++c) dst[p * n + c] = pair_of(at_(2 * p, c), at_(2 * p + 1, c));
    }
  }
  return out;
}

void bf16_matmul_cpu(const at::Tensor& a, const at::Tensor& b_pairs, at::Tensor& out, bool accumulate) {
  constexpr const char* op = "bf16_matmul";
  check_device(op, "a", a, kCpu);
  check_dtype(op, "a", a, at::kBFloat16);
  check_layout(op, "a", a, 2, "(M, K)");
  const int64_t m = a.size(0), k = a.size(1), even_k = k - k % 2;
  check_device(op, "b_pairs", b_pairs, kCpu);
  check_dtype(op, "b_pairs", b_pairs, at::kBFloat16);
  TORCH_CHECK(b_pairs.dim() == 3 && b_pairs.size(0) == (k + 1) / 2 && b_pairs.size(2) == 2 && b_pairs.is_contiguous(),
              op, ": b_pairs: expected a contiguous ((K + 1) / 2, N, 2) = (", (k + 1) / 2, ", N, 2) from pack_pairs, "
              "got shape ", b_pairs.sizes(), " and strides ", b_pairs.strides());
  const int64_t n = b_pairs.size(1);
  check_device(op, "out", out, kCpu);
  check_dtype(op, "out", out, at::kFloat);
  check_layout(op, "out", out, 2, "(M, N)");
  check_shape(op, "out", out, {m, n});
  TORCH_CHECK(bf16_matmul_available(), op, ": needs a CPU with AVX-512 and torch's oneDNN enabled "
              "(torch.backends.mkldnn.enabled), on a path not forced below avx512 by LLAMA_KERNELS_CPU_ISA");
  if (m == 0 || n == 0) return;
  const auto* pa = data_of<const at::BFloat16>(a);
  const auto* pb = data_of<const at::BFloat16>(b_pairs);
  const auto* pb_last = data_of<const uint16_t>(b_pairs) + (k / 2) * n * 2;  // K odd: the last row, paired with 0
  float* pc = data_of<float>(out);
  const int64_t lda = a.stride(0), ldc = out.stride(0);
  const int64_t blocks_m = (m + kBlockM - 1) / kBlockM, blocks_n = (n + kBlockN - 1) / kBlockN;
  // K in slices: per slice, a thread's output blocks take their panels of a and b while those stay in cache (the
  // whole of K per block would stream both operands from memory once per block). A static schedule of one shape
  // gives each thread the same blocks in every slice, so the slices need no barrier between them.
  const int64_t slices = std::max<int64_t>(1, (even_k + kBlockK - 1) / kBlockK);
#pragma omp parallel
  {
    for (int64_t slice = 0; slice < slices; ++slice) {
      const int64_t k0 = slice * kBlockK, depth = std::min(kBlockK, even_k - k0);  // 0 when K is 1
      const bool add = accumulate || slice > 0;
#pragma omp for collapse(2) schedule(static) nowait
      for (int64_t bn = 0; bn < blocks_n; ++bn) {  // each thread streams its share of b once per slice
        for (int64_t bm = 0; bm < blocks_m; ++bm) {
          const int64_t m0 = bm * kBlockM, n0 = bn * kBlockN;
          const int64_t rows = std::min(kBlockM, m - m0), cols = std::min(kBlockN, n - n0);
          float* c = pc + m0 * ldc + n0;
          if (depth > 0) {
            at::native::cpublas::brgemm(rows, cols, depth, lda, n, ldc, add, pa + m0 * lda + k0,
                                        pb + (k0 / 2 * n + n0) * 2, c, /*is_vnni=*/true);
          } else if (!add) {
            for (int64_t i = 0; i < rows; ++i) std::memset(c + i * ldc, 0, cols * sizeof(float));
          }
          if (k % 2 && slice == slices - 1) {  // the micro-kernel takes pairs of K: the odd last one as a rank-1 update
            for (int64_t i = 0; i < rows; ++i) {
              const float a_last = static_cast<float>(pa[(m0 + i) * lda + k - 1]);
              for (int64_t j = 0; j < cols; ++j) {
                const uint32_t bits = static_cast<uint32_t>(pb_last[(n0 + j) * 2]) << 16;
                float b_last;
                std::memcpy(&b_last, &bits, sizeof(b_last));
                c[i * ldc + j] += a_last * b_last;
              }
            }
          }
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);  // the AMX tile state, where it was taken
  }
}

}  // namespace llama_kernels
