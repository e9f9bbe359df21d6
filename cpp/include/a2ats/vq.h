// Vector quantisation of whitened keys and approximate attention scores from the codes.
//
// Codebook layout (shared by the CPU and CUDA paths), always contiguous float32:
//   centroids  // (Hkv, M, C, D/M): M subspaces of D/M dims, C centroids each
// A key's code is one int16 per subspace, so C <= 32768.
#pragma once

#include <cstdint>

#include "a2ats/common.h"

namespace a2ats {

constexpr int64_t kMaxCentroids = 32768;

struct VQEncodeParams {
  int64_t batch = 0, num_kv_heads = 0, num_tokens = 0, head_dim = 0;
  int64_t num_subspaces = 1, num_centroids = 0;
  DType dtype = DType::kFloat32;        // of x
  int64_t x_stride[3] = {0, 0, 0};      // (b, g, t); head_dim contiguous
  int64_t codes_stride[3] = {0, 0, 0};  // (b, g, t); subspace dim contiguous
};

// x: (B, Hkv, T, D); centroids: (Hkv, M, C, D/M); codes: (B, Hkv, T, M) int16 =
// argmin_c ||x_m - centroids[g, m, c]||^2 per subspace (lowest index on exact ties).
void vq_encode_cpu(const void* x, const float* centroids, int16_t* codes, const VQEncodeParams& params);

struct LutScoresParams {
  int64_t batch = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t num_subspaces = 1, num_centroids = 0;
  int64_t capacity = 0;                 // Tcap: token slots in codes and scores
  int64_t num_bins = 1;                 // NB: distance bins (1 = plain WRoPE)
  int64_t q_stride[3] = {0, 0, 0};      // (b, h, bin); head_dim contiguous
  int64_t codes_stride[3] = {0, 0, 0};  // (b, g, t), or paged (block, g, t); subspace dim contiguous
  int64_t scores_stride[2] = {0, 0};    // (b, h); tokens contiguous
  // Paged codes (vLLM's cache layout) when block_size > 0: codes (num_blocks, Hkv, block_size, M)
  // and token t of row b lies at offset t % block_size of block
  // block_table[b * block_table_stride + t / block_size]. Unpaged when block_table is null.
  const int32_t* block_table = nullptr;  // (B, >= ceil(Tcap / block_size))
  int64_t block_size = 0, num_blocks = 0, block_table_stride = 0;
};

// q: (B, Hq, NB, D) f32 in the dual space; centroids: (Hkv, M, C, D/M); codes: (B, Hkv, Tcap, M);
// lengths: (B,) with 0 <= lengths[b] <= Tcap; bin_edges: (NB - 1,) ascending (null when NB == 1).
// scores: (B, Hq, Tcap) f32: sum_m LUT_bin[m][codes[t, m]] for t < lengths[b], -inf after, where
// LUT_j[m][c] = q[b, h, j, m-th slice] . centroids[g, m, c] / sqrt(D) and token t at distance
// d = lengths[b] - 1 - t uses bin j = #{edges <= d}.
// Paged (params.block_table set): token t of row b reads its code from its block, as above.
// Throws std::invalid_argument, having written nothing, if a code of a valid token is outside
// [0, C), or a block holding a valid token is outside [0, num_blocks).
void lut_scores_cpu(const float* q, const float* centroids, const int16_t* codes, const int32_t* lengths,
                    const int32_t* bin_edges, float* scores, const LutScoresParams& params);

}  // namespace a2ats
