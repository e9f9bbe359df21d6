// VQ encoding and lookup-table scores on the device.
//
// vq_encode: a block takes 64 rows (tokens) of one (b, g) and streams the codebook of each
// subspace through shared memory in tiles of 64 centroids x 32 dims; each of its 256 threads
// accumulates a 4 x 4 block of squared distances, keeps the best centroid of its rows, and the
// 16 threads sharing a row agree on the minimum with shuffles (lowest index on exact ties).
//
// lut_scores: two kernels. build_lut computes every table entry
//   LUT[b, h, bin, m, c] = q[b, h, bin, m-th slice] . centroids[g, m, c] / sqrt(D)
// into a scratch buffer, with the CPU's dot-product association (fused multiply-adds), so the
// entries equal the CPU's on machines where the CPU build uses FMA. score_tokens then gives
// each block one (b, h) and a tile of 4096 tokens: it copies the (b, h, bin) table into shared
// memory and scans the codes with coalesced loads, summing the M sub-table entries per token.
#include <algorithm>
#include <cmath>

#include "a2ats_cuda.h"
#include "cuda_common.cuh"

namespace a2ats {
namespace {

using namespace cuda_detail;

// ---- vq_encode ---------------------------------------------------------------------------
constexpr int kEncThreads = 256;
constexpr int kEncRows = 64;   // rows per block
constexpr int kEncCents = 64;  // centroids per shared tile
constexpr int kEncDims = 32;   // dims per shared tile
constexpr int kEncPad = kEncDims + 1;

template <typename T>
__global__ void __launch_bounds__(kEncThreads)
    vq_encode_kernel(const T* __restrict__ x, const float* __restrict__ centroids, int16_t* __restrict__ codes,
                     VQEncodeParams p, int64_t row_tiles) {
  __shared__ float xs[kEncRows * kEncPad];
  __shared__ float cs[kEncCents * kEncPad];
  const int tid = threadIdx.x;
  const int tr = tid / 16, tc = tid % 16;  // rows tr + 16 i, centroids tc + 16 j of each tile
  const int64_t tile = blockIdx.x % row_tiles;
  const int64_t bg = blockIdx.x / row_tiles;
  const int64_t b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int64_t t0 = tile * kEncRows;
  const int64_t M = p.num_subspaces, C = p.num_centroids, dsub = p.head_dim / M;
  const T* xbg = x + b * p.x_stride[0] + g * p.x_stride[1];

  for (int64_t m = 0; m < M; ++m) {
    const float* cent = centroids + (g * M + m) * C * dsub;  // (C, dsub)
    float best[4];
    int32_t best_c[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      best[i] = INFINITY;
      best_c[i] = 0;
    }

    for (int64_t c0 = 0; c0 < C; c0 += kEncCents) {
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

      for (int64_t d0 = 0; d0 < dsub; d0 += kEncDims) {
        __syncthreads();  // the previous tile is no longer read
        for (int e = tid; e < kEncRows * kEncDims; e += kEncThreads) {
          const int r = e / kEncDims, dd = e % kEncDims;
          const int64_t t = t0 + r, d = d0 + dd;
          xs[r * kEncPad + dd] =
              (t < p.num_tokens && d < dsub) ? load_f32(xbg + t * p.x_stride[2] + m * dsub + d) : 0.f;
        }
        for (int e = tid; e < kEncCents * kEncDims; e += kEncThreads) {
          const int r = e / kEncDims, dd = e % kEncDims;
          const int64_t c = c0 + r, d = d0 + dd;
          cs[r * kEncPad + dd] = (c < C && d < dsub) ? cent[c * dsub + d] : 0.f;
        }
        __syncthreads();
        // Zero padding past dsub adds (0 - 0)^2 = 0, which leaves every sum unchanged.
#pragma unroll 8
        for (int dd = 0; dd < kEncDims; ++dd) {
          float xv[4], cv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) xv[i] = xs[(tr + 16 * i) * kEncPad + dd];
#pragma unroll
          for (int j = 0; j < 4; ++j) cv[j] = cs[(tc + 16 * j) * kEncPad + dd];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float diff = xv[i] - cv[j];
              acc[i][j] = fmaf(diff, diff, acc[i][j]);
            }
        }
      }
      // Centroids are visited in increasing order per thread, so strict < keeps the lowest index.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + tc + 16 * j;
        if (c < C) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (acc[i][j] < best[i]) {
              best[i] = acc[i][j];
              best_c[i] = int32_t(c);
            }
        }
      }
    }
    // The 16 threads of a row are lanes l..l+15 of one warp (tid = tr * 16 + tc).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float bd = best[i];
      int32_t bc = best_c[i];
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        const float od = __shfl_xor_sync(0xffffffffu, bd, off);
        const int32_t oc = __shfl_xor_sync(0xffffffffu, bc, off);
        if (od < bd || (od == bd && oc < bc)) {
          bd = od;
          bc = oc;
        }
      }
      const int64_t t = t0 + tr + 16 * i;
      if (tc == 0 && t < p.num_tokens)
        codes[b * p.codes_stride[0] + g * p.codes_stride[1] + t * p.codes_stride[2] + m] = int16_t(bc);
    }
  }
}

template <typename T>
cudaError_t launch_encode(const void* x, const float* centroids, int16_t* codes, const VQEncodeParams& p,
                          cudaStream_t stream) {
  const int64_t row_tiles = ceil_div(p.num_tokens, kEncRows);
  const int64_t blocks = p.batch * p.num_kv_heads * row_tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  vq_encode_kernel<T>
      <<<unsigned(blocks), kEncThreads, 0, stream>>>(static_cast<const T*>(x), centroids, codes, p, row_tiles);
  return cudaGetLastError();
}

// ---- lut_scores --------------------------------------------------------------------------
constexpr int kLutThreads = 256;
constexpr int kLutMaxCents = 64;           // centroids per build_lut block
constexpr int kLutSmemBudget = 48 * 1024;  // build_lut: centroid tile bytes
constexpr int kScoreThreads = 256;
constexpr int kScoreItems = 16;  // tokens per thread
constexpr int kScoreTile = kScoreThreads * kScoreItems;
constexpr int64_t kMaxSmemLutFloats = 24576;  // 96 KiB: staged in shared memory up to here

struct LutArgs {
  int64_t batch, num_q_heads, num_kv_heads, group_size, num_bins, num_subspaces, num_centroids, dsub;
  int64_t q_stride[3];
  int64_t cents_per_block, cent_tiles;
  float scale;
};

// The association of the CPU's LUT dot products (cpp/src/vq.cpp), so that the entries match
// where the CPU clone contracts to FMA: centroids of whole groups of 4 with dsub % 8 == 0 use
// lut_rows' 8-lane accumulators reduced as sum8; the others use dot()'s 16 lanes, whose tail is
// summed into s first and the lanes added to s in order.
__device__ __forceinline__ float dot8_like_cpu(const float* __restrict__ a, const float* b, int64_t n) {
  float acc[8];
#pragma unroll
  for (int l = 0; l < 8; ++l) acc[l] = 0.f;
  for (int64_t i = 0; i < n; i += 8) {
#pragma unroll
    for (int l = 0; l < 8; ++l) acc[l] = fmaf(__ldg(a + i + l), b[i + l], acc[l]);
  }
  return __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[4]), __fadd_rn(acc[1], acc[5])),
                   __fadd_rn(__fadd_rn(acc[2], acc[6]), __fadd_rn(acc[3], acc[7])));
}

__device__ __forceinline__ float dot16_like_cpu(const float* __restrict__ a, const float* b, int64_t n) {
  float acc[16];
#pragma unroll
  for (int l = 0; l < 16; ++l) acc[l] = 0.f;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma unroll
    for (int l = 0; l < 16; ++l) acc[l] = fmaf(__ldg(a + i + l), b[i + l], acc[l]);
  }
  float s = 0.f;
  for (; i < n; ++i) s = fmaf(__ldg(a + i), b[i], s);
#pragma unroll
  for (int l = 0; l < 16; ++l) s = __fadd_rn(s, acc[l]);
  return s;
}

__global__ void __launch_bounds__(kLutThreads)
    build_lut_kernel(const float* __restrict__ q, const float* __restrict__ centroids, float* __restrict__ lut,
                     LutArgs a) {
  extern __shared__ float cent_tile[];  // (cents_per_block, dsub + 1)
  const int64_t CT = a.cents_per_block, M = a.num_subspaces, C = a.num_centroids, dsub = a.dsub;
  const int64_t pad = dsub + 1;
  int64_t rest = blockIdx.x;
  const int64_t ctile = rest % a.cent_tiles;
  rest /= a.cent_tiles;
  const int64_t m = rest % M;
  rest /= M;
  const int64_t j = rest % a.num_bins;
  rest /= a.num_bins;
  const int64_t g = rest % a.num_kv_heads;
  const int64_t b = rest / a.num_kv_heads;
  const int64_t c_begin = ctile * CT;
  const float* cent = centroids + ((g * M + m) * C + c_begin) * dsub;
  for (int64_t e = threadIdx.x; e < CT * dsub; e += blockDim.x) {
    const int64_t c = e / dsub, d = e % dsub;
    cent_tile[c * pad + d] = c_begin + c < C ? cent[e] : 0.f;
  }
  __syncthreads();
  const int64_t Hq = a.num_q_heads, G = a.group_size;
  for (int64_t e = threadIdx.x; e < G * CT; e += blockDim.x) {
    const int64_t hl = e / CT, c = e % CT;
    if (c_begin + c >= C) continue;
    const int64_t h = g * G + hl;
    const float* qrow = q + b * a.q_stride[0] + h * a.q_stride[1] + j * a.q_stride[2] + m * dsub;
    const int64_t cg = c_begin + c;
    const float s = (dsub % 8 == 0 && cg < C / 4 * 4) ? dot8_like_cpu(qrow, cent_tile + c * pad, dsub)
                                                      : dot16_like_cpu(qrow, cent_tile + c * pad, dsub);
    lut[(((b * Hq + h) * a.num_bins + j) * M + m) * C + c_begin + c] = __fmul_rn(s, a.scale);
  }
}

struct ScoreArgs {
  int64_t num_q_heads, group_size, num_bins, num_subspaces, num_centroids, capacity, tiles;
  int64_t codes_stride[3];  // (b, g, t), or paged (block, g, t)
  int64_t scores_stride[2];
  const int32_t* block_table;  // (B, ...) when paged, else null
  int64_t block_size, num_blocks, block_table_stride;
};

// Token t's code in row b, KV head g; null when its block id is outside [0, num_blocks).
__device__ __forceinline__ const int16_t* token_code(const ScoreArgs& a, const int16_t* codes, int64_t b, int64_t g,
                                                     int64_t t) {
  if (a.block_table == nullptr) return codes + b * a.codes_stride[0] + g * a.codes_stride[1] + t * a.codes_stride[2];
  const int64_t block = __ldg(a.block_table + b * a.block_table_stride + t / a.block_size);
  if (block < 0 || block >= a.num_blocks) return nullptr;
  return codes + block * a.codes_stride[0] + g * a.codes_stride[1] + (t % a.block_size) * a.codes_stride[2];
}

__device__ __forceinline__ float score_token(const float* table, const int16_t* code, int64_t M, uint32_t C) {
  if (code == nullptr) return __int_as_float(0x7fffffff);  // a bad block id: NaN, as a bad code
  if (M == 1) {
    const uint32_t c = uint16_t(code[0]);  // negative codes become >= 32768 >= C
    return c < C ? table[c] : __int_as_float(0x7fffffff);
  }
  float s = 0.f;
  bool bad = false;
  for (int64_t m = 0; m < M; ++m) {
    uint32_t c = uint16_t(code[m]);
    bad |= c >= C;
    c = c < C ? c : 0u;
    s = __fadd_rn(s, table[m * C + c]);
  }
  return bad ? __int_as_float(0x7fffffff) : s;
}

template <bool kSmemTable, bool kBinned>
__global__ void __launch_bounds__(kScoreThreads)
    score_tokens_kernel(const float* __restrict__ lut, const int16_t* __restrict__ codes,
                        const int32_t* __restrict__ lengths, const int32_t* __restrict__ bin_edges,
                        float* __restrict__ scores, ScoreArgs a) {
  extern __shared__ float table_smem[];  // (M * C) when kSmemTable
  __shared__ int bin_lo, bin_hi;
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x % a.tiles;
  const int64_t bh = blockIdx.x / a.tiles;
  const int64_t h = bh % a.num_q_heads, b = bh / a.num_q_heads;
  const int64_t g = h / a.group_size;
  const int64_t Tcap = a.capacity;
  const int64_t len = min(max(int64_t(lengths[b]), int64_t(0)), Tcap);
  const int64_t t0 = tile * kScoreTile;
  float* out = scores + b * a.scores_stride[0] + h * a.scores_stride[1];
  const int64_t M = a.num_subspaces, NB = a.num_bins;
  const uint32_t C = uint32_t(a.num_centroids);

  if (t0 >= len) {  // the whole tile is past the length (uniform per block)
    for (int64_t t = t0 + tid; t < min(t0 + kScoreTile, Tcap); t += kScoreThreads) out[t] = -INFINITY;
    return;
  }
  if (!kBinned) {  // one table for every token
    const float* table = lut + (b * a.num_q_heads + h) * M * int64_t(C);
    if (kSmemTable) {
      for (int64_t e = tid; e < M * int64_t(C); e += kScoreThreads) table_smem[e] = table[e];
      __syncthreads();
      table = table_smem;
    }
    const int64_t t_end = min(t0 + kScoreTile, Tcap);
#pragma unroll 4
    for (int64_t t = t0 + tid; t < t_end; t += kScoreThreads)
      out[t] = t < len ? score_token(table, token_code(a, codes, b, g, t), M, C) : -INFINITY;
    return;
  }
  // Bin of each of this thread's tokens: #{edges <= distance}.
  int bins[kScoreItems];
  int my_lo = int(NB), my_hi = -1;
#pragma unroll
  for (int r = 0; r < kScoreItems; ++r) {
    const int64_t t = t0 + int64_t(r) * kScoreThreads + tid;
    int j = 0;
    if (t < len) {
      const int64_t dist = len - 1 - t;
      for (int64_t e = 0; e + 1 < NB; ++e) j += int64_t(__ldg(bin_edges + e)) <= dist;
      my_lo = min(my_lo, j);
      my_hi = max(my_hi, j);
    }
    bins[r] = j;
  }
  if (tid == 0) {
    bin_lo = int(NB);
    bin_hi = -1;
  }
  __syncthreads();
  atomicMin(&bin_lo, my_lo);
  atomicMax(&bin_hi, my_hi);
  __syncthreads();
  const int lo = bin_lo, hi = bin_hi;
  for (int j = lo; j <= hi; ++j) {
    const float* lut_j = lut + ((b * a.num_q_heads + h) * NB + j) * M * int64_t(C);
    const float* table = lut_j;
    if (kSmemTable) {
      __syncthreads();  // the previous bin's table is no longer read
      for (int64_t e = tid; e < M * int64_t(C); e += kScoreThreads) table_smem[e] = lut_j[e];
      __syncthreads();
      table = table_smem;
    }
#pragma unroll
    for (int r = 0; r < kScoreItems; ++r) {
      const int64_t t = t0 + int64_t(r) * kScoreThreads + tid;
      if (t < len && bins[r] == j) out[t] = score_token(table, token_code(a, codes, b, g, t), M, C);
    }
  }
#pragma unroll
  for (int r = 0; r < kScoreItems; ++r) {
    const int64_t t = t0 + int64_t(r) * kScoreThreads + tid;
    if (t >= len && t < Tcap) out[t] = -INFINITY;
  }
}

}  // namespace

cudaError_t vq_encode_cuda(const void* x, const float* centroids, int16_t* codes, const VQEncodeParams& p,
                           cudaStream_t stream) {
  if (p.num_subspaces < 1 || p.head_dim % p.num_subspaces != 0 || p.num_centroids < 1) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_encode<float>(x, centroids, codes, p, stream);
    case DType::kFloat16:
      return launch_encode<half_t>(x, centroids, codes, p, stream);
    case DType::kBFloat16:
      return launch_encode<bfloat16_t>(x, centroids, codes, p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t lut_scores_cuda(const float* q, const float* centroids, const int16_t* codes, const int32_t* lengths,
                            const int32_t* bin_edges, float* scores, const LutScoresParams& p, cudaStream_t stream) {
  if (p.num_kv_heads < 1 || p.num_q_heads % p.num_kv_heads != 0 || p.num_subspaces < 1 ||
      p.head_dim % p.num_subspaces != 0 || p.num_centroids < 1 || p.num_centroids > kMaxCentroids || p.num_bins < 1 ||
      (p.num_bins > 1 && bin_edges == nullptr))
    return cudaErrorInvalidValue;
  if (p.batch == 0 || p.num_q_heads == 0 || p.capacity == 0) return cudaSuccess;

  const int64_t G = p.num_q_heads / p.num_kv_heads;
  const int64_t M = p.num_subspaces, C = p.num_centroids, NB = p.num_bins;
  const int64_t dsub = p.head_dim / M;
  const int64_t table = M * C;

  Scratch lut(stream);
  A2ATS_CUDA_TRY(lut.allocate(size_t(p.batch * p.num_q_heads * NB * table) * sizeof(float)));

  LutArgs la;
  la.batch = p.batch;
  la.num_q_heads = p.num_q_heads;
  la.num_kv_heads = p.num_kv_heads;
  la.group_size = G;
  la.num_bins = NB;
  la.num_subspaces = M;
  la.num_centroids = C;
  la.dsub = dsub;
  for (int d = 0; d < 3; ++d) la.q_stride[d] = p.q_stride[d];
  la.cents_per_block = std::max<int64_t>(1, std::min<int64_t>(kLutMaxCents, kLutSmemBudget / (4 * (dsub + 1))));
  la.cent_tiles = ceil_div(C, la.cents_per_block);
  la.scale = 1.0f / std::sqrt(float(p.head_dim));  // as lut_scores_cpu
  const int64_t build_blocks = p.batch * p.num_kv_heads * NB * M * la.cent_tiles;
  if (build_blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  const size_t build_smem = size_t(la.cents_per_block * (dsub + 1)) * sizeof(float);
  build_lut_kernel<<<unsigned(build_blocks), kLutThreads, build_smem, stream>>>(q, centroids, lut.get<float>(), la);
  A2ATS_CUDA_TRY(cudaGetLastError());

  ScoreArgs sa;
  sa.num_q_heads = p.num_q_heads;
  sa.group_size = G;
  sa.num_bins = NB;
  sa.num_subspaces = M;
  sa.num_centroids = C;
  sa.capacity = p.capacity;
  sa.tiles = ceil_div(p.capacity, kScoreTile);
  for (int d = 0; d < 3; ++d) sa.codes_stride[d] = p.codes_stride[d];
  sa.scores_stride[0] = p.scores_stride[0];
  sa.scores_stride[1] = p.scores_stride[1];
  sa.block_table = p.block_table;
  sa.block_size = p.block_size;
  sa.num_blocks = p.num_blocks;
  sa.block_table_stride = p.block_table_stride;
  if (p.block_table != nullptr && p.block_size < 1) return cudaErrorInvalidValue;
  const int64_t score_blocks = p.batch * p.num_q_heads * sa.tiles;
  if (score_blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  const bool smem_table = table <= kMaxSmemLutFloats;
  const size_t smem = smem_table ? size_t(table) * sizeof(float) : 0;
  auto kernel = smem_table ? (NB > 1 ? score_tokens_kernel<true, true> : score_tokens_kernel<true, false>)
                           : (NB > 1 ? score_tokens_kernel<false, true> : score_tokens_kernel<false, false>);
  if (smem > 48 * 1024)
    A2ATS_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<unsigned(score_blocks), kScoreThreads, smem, stream>>>(lut.get<float>(), codes, lengths, bin_edges, scores,
                                                                  sa);
  return cudaGetLastError();
}

}  // namespace a2ats
