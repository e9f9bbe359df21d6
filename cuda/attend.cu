// Exact attention of a GQA group's query heads over rows already on the device, as softmax
// states that merge by their log-sum-exp, and that merge. The CPU twin is KVStore::attend
// (cpp/src/attend.cpp), which reads the rows from the host store instead; the specification is
// reference.attend and reference.merge_attention (python/a2ats/reference.py).
//
// attend_rows_cuda splits each (b, g)'s rows into tiles of kTileRows (flash-decoding): one block
// per (b, g, tile) writes a state (max logit m, sum of exp s, unnormalised output o) per query
// head of the group, and a second kernel combines a head's tiles in tile order. Every sum runs in
// a fixed order, so the result does not depend on scheduling.
#include <cmath>

#include "a2ats_cuda.h"
#include "cuda_common.cuh"

namespace a2ats {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 128;   // 4 warps
constexpr int kTileRows = 256;  // rows per block: (kTileRows,) logits in shared memory

// Tree sum or max over the block's kThreads values, the same order on every run.
template <bool kMax>
__device__ float block_reduce(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) {
      const float other = red[threadIdx.x + half];
      red[threadIdx.x] = kMax ? fmaxf(red[threadIdx.x], other) : red[threadIdx.x] + other;
    }
    __syncthreads();
  }
  const float result = red[0];
  __syncthreads();  // red is reused by the next reduction
  return result;
}

struct AttendArgs {
  int64_t num_kv_heads, group_size, head_dim, tiles;
  float scale;
  int64_t q_stride[2], rows_stride[3], counts_stride[2];
};

// states: (B * Hq, tiles, D + 2) f32: o[0, D), then m, s.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attend_tile_kernel(const float* __restrict__ q, const T* __restrict__ keys, const T* __restrict__ values,
                       const int32_t* __restrict__ counts, float* __restrict__ states, AttendArgs a) {
  __shared__ float logits[kTileRows];
  __shared__ float red[kThreads];
  extern __shared__ float q_head[];  // (D,)
  const int64_t bg = blockIdx.x, tile = blockIdx.y;
  const int64_t b = bg / a.num_kv_heads, g = bg % a.num_kv_heads;
  const int64_t D = a.head_dim;
  const int64_t count = counts[b * a.counts_stride[0] + g * a.counts_stride[1]];
  const int64_t row0 = tile * kTileRows;
  const int64_t n = max(int64_t(0), min(int64_t(kTileRows), count - row0));
  const T* k_rows = keys + b * a.rows_stride[0] + g * a.rows_stride[1] + row0 * a.rows_stride[2];
  const T* v_rows = values + b * a.rows_stride[0] + g * a.rows_stride[1] + row0 * a.rows_stride[2];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  for (int64_t j = 0; j < a.group_size; ++j) {
    const int64_t h = g * a.group_size + j;
    float* state = states + ((b * a.num_kv_heads * a.group_size + h) * a.tiles + tile) * (D + 2);
    if (n == 0) {  // no rows here: the empty state (merges as nothing)
      for (int64_t d = threadIdx.x; d < D; d += kThreads) state[d] = 0.f;
      if (threadIdx.x == 0) {
        state[D] = -INFINITY;
        state[D + 1] = 0.f;
      }
      continue;
    }
    for (int64_t d = threadIdx.x; d < D; d += kThreads) q_head[d] = q[b * a.q_stride[0] + h * a.q_stride[1] + d];
    __syncthreads();
    // One warp per row: lanes stride the head dimension, then a butterfly sum.
    for (int64_t i = warp; i < n; i += kThreads / 32) {
      const T* row = k_rows + i * a.rows_stride[2];
      float dot = 0.f;
      for (int64_t d = lane; d < D; d += 32) dot += load_f32(row + d) * q_head[d];
      for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (lane == 0) logits[i] = dot * a.scale;
    }
    __syncthreads();
    float local_max = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) local_max = fmaxf(local_max, logits[i]);
    const float m = block_reduce<true>(local_max, red);
    float local_sum = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const float p = expf(logits[i] - m);
      logits[i] = p;
      local_sum += p;
    }
    const float s = block_reduce<false>(local_sum, red);  // its barriers also publish the p's
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      float acc = 0.f;
      for (int64_t i = 0; i < n; ++i) acc += logits[i] * load_f32(v_rows + i * a.rows_stride[2] + d);
      state[d] = acc;
    }
    if (threadIdx.x == 0) {
      state[D] = m;
      state[D + 1] = s;
    }
    __syncthreads();  // logits and q_head are rewritten for the next head
  }
}

// One block per (b, h): the head's tile states in tile order -> out (normalised), lse.
__global__ void __launch_bounds__(kThreads)
    attend_combine_kernel(const float* __restrict__ states, float* __restrict__ out, float* __restrict__ lse,
                          int64_t num_q_heads, int64_t head_dim, int64_t tiles, AttendRowsParams p) {
  const int64_t bh = blockIdx.x, b = bh / num_q_heads, h = bh % num_q_heads;
  const int64_t D = head_dim;
  const float* st = states + bh * tiles * (D + 2);
  float m = -INFINITY;
  for (int64_t t = 0; t < tiles; ++t) m = fmaxf(m, st[t * (D + 2) + D]);
  float s = 0.f;
  if (m != -INFINITY)
    for (int64_t t = 0; t < tiles; ++t) s += st[t * (D + 2) + D + 1] * expf(st[t * (D + 2) + D] - m);
  float* o = out + b * p.out_stride[0] + h * p.out_stride[1];
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.f;
    if (s > 0.f)
      for (int64_t t = 0; t < tiles; ++t) acc += st[t * (D + 2) + d] * expf(st[t * (D + 2) + D] - m);
    o[d] = s > 0.f ? acc / s : 0.f;
  }
  if (threadIdx.x == 0) lse[b * p.lse_stride[0] + h * p.lse_stride[1]] = s > 0.f ? m + logf(s) : -INFINITY;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const float* __restrict__ out_a, const float* __restrict__ lse_a, const float* __restrict__ out_b,
                 const float* __restrict__ lse_b, T* __restrict__ out, MergeAttentionParams p) {
  const int64_t bh = blockIdx.x, b = bh / p.num_heads, h = bh % p.num_heads;
  const float la = lse_a[b * p.lse_a_stride[0] + h * p.lse_a_stride[1]];
  const float lb = lse_b[b * p.lse_b_stride[0] + h * p.lse_b_stride[1]];
  const float m = fmaxf(la, lb);
  // Weights of the two parts; an empty part (lse -inf) weighs 0, two empty parts give 0.
  const float wa = m == -INFINITY ? 0.f : expf(la - m), wb = m == -INFINITY ? 0.f : expf(lb - m);
  const float total = wa + wb;
  const float* oa = out_a + b * p.out_a_stride[0] + h * p.out_a_stride[1];
  const float* ob = out_b + b * p.out_b_stride[0] + h * p.out_b_stride[1];
  T* o = out + b * p.out_stride[0] + h * p.out_stride[1];
  for (int64_t d = threadIdx.x; d < p.head_dim; d += kThreads)
    store_f32(o + d, total > 0.f ? (wa * oa[d] + wb * ob[d]) / total : 0.f);
}

}  // namespace

cudaError_t attend_rows_cuda(const float* q, const void* keys, const void* values, const int32_t* counts, float* out,
                             float* lse, const AttendRowsParams& p, cudaStream_t stream) {
  if (p.group_size < 1 || p.num_q_heads % p.group_size != 0 || p.head_dim < 1 || p.head_dim > kMaxHeadDim ||
      p.max_rows < 0)
    return cudaErrorInvalidValue;
  const int64_t Hkv = p.num_q_heads / p.group_size;
  const int64_t groups = p.batch * Hkv, heads = p.batch * p.num_q_heads;
  if (groups == 0) return cudaSuccess;
  AttendArgs a;
  a.num_kv_heads = Hkv;
  a.group_size = p.group_size;
  a.head_dim = p.head_dim;
  a.scale = p.scale;
  a.tiles = std::max<int64_t>(1, ceil_div(p.max_rows, kTileRows));  // one empty tile when max_rows == 0
  for (int d = 0; d < 2; ++d) {
    a.q_stride[d] = p.q_stride[d];
    a.counts_stride[d] = p.counts_stride[d];
  }
  for (int d = 0; d < 3; ++d) a.rows_stride[d] = p.rows_stride[d];
  if (groups > kMaxGridBlocks || a.tiles > 65535 || heads > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  Scratch scratch(stream);
  A2ATS_CUDA_TRY(scratch.allocate(size_t(heads * a.tiles * (p.head_dim + 2)) * sizeof(float)));
  float* states = scratch.get<float>();
  const dim3 grid(unsigned(groups), unsigned(a.tiles));
  const size_t smem = size_t(p.head_dim) * sizeof(float);
  switch (p.dtype) {
    case DType::kFloat32:
      attend_tile_kernel<float><<<grid, kThreads, smem, stream>>>(q, static_cast<const float*>(keys),
                                                                  static_cast<const float*>(values), counts, states, a);
      break;
    case DType::kFloat16:
      attend_tile_kernel<half_t><<<grid, kThreads, smem, stream>>>(
          q, static_cast<const half_t*>(keys), static_cast<const half_t*>(values), counts, states, a);
      break;
    case DType::kBFloat16:
      attend_tile_kernel<bfloat16_t><<<grid, kThreads, smem, stream>>>(
          q, static_cast<const bfloat16_t*>(keys), static_cast<const bfloat16_t*>(values), counts, states, a);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  A2ATS_CUDA_TRY(cudaGetLastError());
  attend_combine_kernel<<<unsigned(heads), kThreads, 0, stream>>>(states, out, lse, p.num_q_heads, p.head_dim, a.tiles,
                                                                  p);
  return cudaGetLastError();
}

cudaError_t merge_attention_cuda(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b,
                                 void* out, const MergeAttentionParams& p, cudaStream_t stream) {
  const int64_t heads = p.batch * p.num_heads;
  if (p.head_dim < 1) return cudaErrorInvalidValue;
  if (heads == 0) return cudaSuccess;
  if (heads > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  switch (p.dtype) {
    case DType::kFloat32:
      merge_kernel<float>
          <<<unsigned(heads), kThreads, 0, stream>>>(out_a, lse_a, out_b, lse_b, static_cast<float*>(out), p);
      break;
    case DType::kFloat16:
      merge_kernel<half_t>
          <<<unsigned(heads), kThreads, 0, stream>>>(out_a, lse_a, out_b, lse_b, static_cast<half_t*>(out), p);
      break;
    case DType::kBFloat16:
      merge_kernel<bfloat16_t>
          <<<unsigned(heads), kThreads, 0, stream>>>(out_a, lse_a, out_b, lse_b, static_cast<bfloat16_t*>(out), p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace a2ats
