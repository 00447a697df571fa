// RoPE on q and k in one launch (see launch_rope in kernels.cuh). One block per (batch, token): its threads compute
// the token's cos and sin once per frequency, into shared memory, then rotate every head of q and of k with them.
// The op is memory bound; each element is read once and written once, with 16-byte accesses when every row allows.
#include "device_utils.cuh"
#include "kernels.cuh"

namespace llama_kernels::cuda {
namespace {

constexpr int kMaxThreads = 256;

// angle = position * inv_freq in inv_freq's dtype (torch's `positions.to(inv_freq.dtype) * inv_freq`), as a float
// for the accurate sincosf. A float product is used as it is, rounding included (Meta's precision). A double one is
// first reduced to [-pi, pi] in double, so the float it becomes keeps the double's accuracy at any position.
__device__ __forceinline__ float rope_angle(int64_t position, float inv_freq) {
  return static_cast<float>(position) * inv_freq;
}
__device__ __forceinline__ float rope_angle(int64_t position, double inv_freq) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const double angle = static_cast<double>(position) * inv_freq;
  return static_cast<float>(angle - kTwoPi * floor(angle / kTwoPi + 0.5));
}

// Rotates every head of one token of x into out. A unit is what one thread does per step: interleaved, N consecutive
// elements (N/2 pairs); half-split, N consecutive elements of the first half and the N facing them in the second.
// cos and sin (shared memory) are indexed by frequency, i < head_dim / 2.
template <typename T, bool INTERLEAVED, int N, bool VECTORIZED>
__device__ __forceinline__ void rotate_token_heads(const T* x_token, T* out_token, int n_heads, int head_dim,
                                                   int64_t stride_x_head, int64_t stride_out_head, const float* cos,
                                                   const float* sin) {
  const int half_dim = head_dim / 2;
  const int units_per_head = INTERLEAVED ? head_dim / N : half_dim / N;
  for (int unit = threadIdx.x; unit < n_heads * units_per_head; unit += blockDim.x) {
    const int head = unit / units_per_head;
    const int first = (unit % units_per_head) * N;  // the unit's first element within the head
    const T* x_head = x_token + head * stride_x_head;
    T* out_head = out_token + head * stride_out_head;
    if constexpr (INTERLEAVED) {
      float x[N], out[N];
      load_floats<T, N, VECTORIZED>(x_head + first, x);
#pragma unroll
      for (int e = 0; e < N; e += 2) {
        const int i = (first + e) / 2;
        out[e] = x[e] * cos[i] - x[e + 1] * sin[i];
        out[e + 1] = x[e] * sin[i] + x[e + 1] * cos[i];
      }
      store_floats<T, N, VECTORIZED>(out_head + first, out);
    } else {
      float x1[N], x2[N], out1[N], out2[N];
      load_floats<T, N, VECTORIZED>(x_head + first, x1);
      load_floats<T, N, VECTORIZED>(x_head + half_dim + first, x2);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const int i = first + e;
        out1[e] = x1[e] * cos[i] - x2[e] * sin[i];
        out2[e] = x1[e] * sin[i] + x2[e] * cos[i];
      }
      store_floats<T, N, VECTORIZED>(out_head + first, out1);
      store_floats<T, N, VECTORIZED>(out_head + half_dim + first, out2);
    }
  }
}

template <typename T, typename F, bool INTERLEAVED, int N, bool VECTORIZED>
__global__ void __launch_bounds__(kMaxThreads)
    rope_kernel(const T* q, const T* k, T* q_out, T* k_out, const int64_t* __restrict__ positions,
                const F* __restrict__ inv_freq, int64_t seqlen, int n_q_heads, int n_k_heads, int head_dim,
                HeadStrides q_strides, HeadStrides k_strides, HeadStrides q_out_strides, HeadStrides k_out_strides,
                int64_t positions_stride_batch, int64_t positions_stride_token, float attention_factor,
                float sin_sign) {
  extern __shared__ float cos_sin[];  // cos[head_dim / 2], then sin[head_dim / 2]
  const int half_dim = head_dim / 2;
  float* cos = cos_sin;
  float* sin = cos_sin + half_dim;

  // A flat grid over batch * seqlen (the y axis stops at 65,535); 64-bit offsets, as token * stride passes 2^31.
  const int64_t batch_index = blockIdx.x / seqlen;
  const int64_t token = blockIdx.x % seqlen;
  const int64_t position = positions[batch_index * positions_stride_batch + token * positions_stride_token];
  for (int i = threadIdx.x; i < half_dim; i += blockDim.x) {
    float s, c;
    sincosf(rope_angle(position, inv_freq[i]), &s, &c);
    cos[i] = c * attention_factor;
    sin[i] = sin_sign * s * attention_factor;  // sin(-a) = -sin(a) exactly: the inverse is rotating at -position
  }
  __syncthreads();

  rotate_token_heads<T, INTERLEAVED, N, VECTORIZED>(
      q + batch_index * q_strides.batch + token * q_strides.token,
      q_out + batch_index * q_out_strides.batch + token * q_out_strides.token, n_q_heads, head_dim, q_strides.head,
      q_out_strides.head, cos, sin);
  rotate_token_heads<T, INTERLEAVED, N, VECTORIZED>(
      k + batch_index * k_strides.batch + token * k_strides.token,
      k_out + batch_index * k_out_strides.batch + token * k_out_strides.token, n_k_heads, head_dim, k_strides.head,
      k_out_strides.head, cos, sin);
}

template <typename T>
bool heads_aligned(const T* ptr, HeadStrides strides, int64_t alignment) {
  return rows_aligned(ptr, strides.batch, alignment) && rows_aligned(ptr, strides.token, alignment) &&
         rows_aligned(ptr, strides.head, alignment);
}

template <typename T, typename F, bool INTERLEAVED>
void launch_for_layout(const T* q, const T* k, T* q_out, T* k_out, const int64_t* positions, const F* inv_freq,
                       int64_t batch, int64_t seqlen, int n_q_heads, int n_k_heads, int head_dim,
                       HeadStrides q_strides, HeadStrides k_strides, HeadStrides q_out_strides,
                       HeadStrides k_out_strides, int64_t positions_stride_batch, int64_t positions_stride_token,
                       float attention_factor, float sin_sign, cudaStream_t stream) {
  constexpr int kVec = kElemsPer16Bytes<T>;
  // 16-byte units need every head of every operand on a 16-byte boundary and whole units per head (or half).
  const int elems_per_unit_row = INTERLEAVED ? head_dim : head_dim / 2;
  constexpr int64_t kAlignment = kPackAlignment<T, kVec>;
  const bool aligned = elems_per_unit_row % kVec == 0 && heads_aligned(q, q_strides, kAlignment) &&
                       heads_aligned(k, k_strides, kAlignment) && heads_aligned(q_out, q_out_strides, kAlignment) &&
                       heads_aligned(k_out, k_out_strides, kAlignment);
  // The fallback unit is one pair for interleaved (two scalar accesses), one element otherwise.
  constexpr int kScalarUnit = INTERLEAVED ? 2 : 1;
  const int unit = aligned ? kVec : kScalarUnit;
  const int units_per_head = elems_per_unit_row / unit;
  const int64_t units = static_cast<int64_t>(n_q_heads > n_k_heads ? n_q_heads : n_k_heads) * units_per_head;
  const int threads = static_cast<int>(units >= kMaxThreads ? kMaxThreads : (units + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(batch * seqlen));
  const size_t shared_bytes = static_cast<size_t>(head_dim) * sizeof(float);
  if (aligned) {
    rope_kernel<T, F, INTERLEAVED, kVec, true><<<grid, threads, shared_bytes, stream>>>(
        q, k, q_out, k_out, positions, inv_freq, seqlen, n_q_heads, n_k_heads, head_dim, q_strides, k_strides,
        q_out_strides, k_out_strides, positions_stride_batch, positions_stride_token, attention_factor, sin_sign);
  } else {
    rope_kernel<T, F, INTERLEAVED, kScalarUnit, false><<<grid, threads, shared_bytes, stream>>>(
        q, k, q_out, k_out, positions, inv_freq, seqlen, n_q_heads, n_k_heads, head_dim, q_strides, k_strides,
        q_out_strides, k_out_strides, positions_stride_batch, positions_stride_token, attention_factor, sin_sign);
  }
}

}  // namespace

template <typename T, typename F>
void launch_rope(const T* q, const T* k, T* q_out, T* k_out, const int64_t* positions, const F* inv_freq,
                 int64_t batch, int64_t seqlen, int64_t n_q_heads, int64_t n_k_heads, int64_t head_dim,
                 HeadStrides q_strides, HeadStrides k_strides, HeadStrides q_out_strides, HeadStrides k_out_strides,
                 int64_t positions_stride_batch, int64_t positions_stride_token, float attention_factor,
                 bool interleaved, bool inverse, cudaStream_t stream) {
  if (batch == 0 || seqlen == 0 || head_dim == 0 || (n_q_heads == 0 && n_k_heads == 0)) return;
  const float sin_sign = inverse ? -1.0f : 1.0f;
  // Heads and head_dim are indexed in int within a token (the glue checks they fit).
  if (interleaved) {
    launch_for_layout<T, F, true>(q, k, q_out, k_out, positions, inv_freq, batch, seqlen, static_cast<int>(n_q_heads),
                                  static_cast<int>(n_k_heads), static_cast<int>(head_dim), q_strides, k_strides,
                                  q_out_strides, k_out_strides, positions_stride_batch, positions_stride_token,
                                  attention_factor, sin_sign, stream);
  } else {
    launch_for_layout<T, F, false>(q, k, q_out, k_out, positions, inv_freq, batch, seqlen, static_cast<int>(n_q_heads),
                                   static_cast<int>(n_k_heads), static_cast<int>(head_dim), q_strides, k_strides,
                                   q_out_strides, k_out_strides, positions_stride_batch, positions_stride_token,
                                   attention_factor, sin_sign, stream);
  }
}

#define LLAMA_KERNELS_INSTANTIATE_ROPE(T, F)                                                                       \
  template void launch_rope<T, F>(const T*, const T*, T*, T*, const int64_t*, const F*, int64_t, int64_t, int64_t, \
                                  int64_t, int64_t, HeadStrides, HeadStrides, HeadStrides, HeadStrides, int64_t,   \
                                  int64_t, float, bool, bool, cudaStream_t);
LLAMA_KERNELS_INSTANTIATE_ROPE(float, float)
LLAMA_KERNELS_INSTANTIATE_ROPE(float, double)
LLAMA_KERNELS_INSTANTIATE_ROPE(__nv_bfloat16, float)
LLAMA_KERNELS_INSTANTIATE_ROPE(__nv_bfloat16, double)
LLAMA_KERNELS_INSTANTIATE_ROPE(__half, float)
LLAMA_KERNELS_INSTANTIATE_ROPE(__half, double)
#undef LLAMA_KERNELS_INSTANTIATE_ROPE

}  // namespace llama_kernels::cuda
