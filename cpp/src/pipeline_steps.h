// What the two CPU decode pipelines (pipeline.cpp: the contiguous store; paged_pipeline.cpp: a
// serving engine's paged codes) share: row conversions, the codebook's matrix products, and the
// single ops' parameters for dense float32 scratch of `batch` rows. Private to cpp/src.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "a2ats/common.h"
#include "a2ats/pipeline.h"
#include "a2ats/rotary.h"
#include "a2ats/thread_pool.h"
#include "a2ats/topk.h"
#include "a2ats/vq.h"

namespace a2ats::steps {

// Bound on sink, window, k and the rows selected per KV head: far past any real budget, and
// small enough that no product of them overflows.
constexpr int64_t kMaxSelected = int64_t(1) << 30;
constexpr int64_t kMaxQHeads = int64_t(1) << 16;

// Throws std::invalid_argument naming what does not fit: the shape and codebook against the
// store's layers, heads and head_dim, the budget bounds and the WRoPE distances and bins.
void check_setup(const KVStore& store, const PipelineShape& shape, const PipelineCodebook& codebook);

template <typename T>
void grow(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
}

template <typename T>
void rows_to_f32(const T* src, const int64_t stride[3], int64_t n0, int64_t n1, int64_t n2, int64_t d, float* dst) {
  for (int64_t i = 0; i < n0; ++i)
    for (int64_t j = 0; j < n1; ++j)
      for (int64_t t = 0; t < n2; ++t) {
        const T* row = src + i * stride[0] + j * stride[1] + t * stride[2];
        float* to = dst + ((i * n1 + j) * n2 + t) * d;
        for (int64_t e = 0; e < d; ++e) to[e] = to_float(row[e]);
      }
}

// dst (n0, n1, n2, d) f32 contiguous from strided rows of `dtype`.
inline void to_f32(const ConstRows& src, DType dtype, int64_t n0, int64_t n1, int64_t n2, int64_t d, float* dst) {
  switch (dtype) {
    case DType::kFloat32:
      rows_to_f32(static_cast<const float*>(src.data), src.stride, n0, n1, n2, d, dst);
      break;
    case DType::kFloat16:
      rows_to_f32(static_cast<const half_t*>(src.data), src.stride, n0, n1, n2, d, dst);
      break;
    case DType::kBFloat16:
      rows_to_f32(static_cast<const bfloat16_t*>(src.data), src.stride, n0, n1, n2, d, dst);
      break;
    default:
      throw std::invalid_argument("rows must be float32, float16 or bfloat16");
  }
}

template <typename T>
void f32_to_rows(const float* src, int64_t n0, int64_t n1, int64_t d, T* dst, const int64_t stride[2]) {
  for (int64_t i = 0; i < n0; ++i)
    for (int64_t j = 0; j < n1; ++j) {
      T* row = dst + i * stride[0] + j * stride[1];
      const float* from = src + (i * n1 + j) * d;
      for (int64_t e = 0; e < d; ++e) row[e] = from_float<T>(from[e]);
    }
}

// dst (n0, n1, d) of `dtype` with element strides (i, j) from src (n0, n1, d) f32 contiguous.
inline void from_f32(const float* src, DType dtype, int64_t n0, int64_t n1, int64_t d, void* dst,
                     const int64_t stride[2]) {
  switch (dtype) {
    case DType::kFloat32:
      f32_to_rows(src, n0, n1, d, static_cast<float*>(dst), stride);
      break;
    case DType::kFloat16:
      f32_to_rows(src, n0, n1, d, static_cast<half_t*>(dst), stride);
      break;
    case DType::kBFloat16:
      f32_to_rows(src, n0, n1, d, static_cast<bfloat16_t*>(dst), stride);
      break;
    default:
      throw std::invalid_argument("rows must be float32, float16 or bfloat16");
  }
}

// y[r] = x[r] @ M[g(r)] (transposed = false: y[e] = sum_d x[d] M[d, e]) or M[g(r)] @ x[r]
// (transposed = true: y[e] = sum_d M[e, d] x[d]) for rows r of D floats; rows_per_matrix
// consecutive rows share one (D, D) matrix, matrices cycle every num_matrices groups.
void rows_times_matrix(const float* x, const float* matrices, int64_t num_rows, int64_t rows_per_matrix,
                       int64_t num_matrices, int64_t d, bool transposed, float* y);

// Parameters of the single ops over dense f32 scratch, for `batch` rows:
//   un-rotating keys (batch, Hkv, t, D) in place by positions (batch, t) int64;
//   rotating the query (batch, Hq, D) to NB distances, (batch, Hq, NB, D), by positions (batch, NB);
//   encoding whitened keys (batch, Hkv, t, D) into codes (batch, Hkv, t, M);
//   scoring dual queries (batch, Hq, NB, D) against codes (batch, Hkv, capacity, M) into scores
//   (batch, Hq, capacity) (a paged caller sets the block table and codes strides itself);
//   grouping scores (batch, Hq, capacity) into (batch, Hkv, capacity) for a per-KV-head budget;
//   selecting k rows from those or from the scores into indices (batch, Hkv, max_selected).
RotaryParams key_rotation(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t num_new,
                          int64_t head_dim);
RotaryParams query_rotation(const PipelineShape& shape, int64_t batch, int64_t head_dim, int64_t num_bins);
VQEncodeParams key_encoding(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t num_new,
                            int64_t head_dim);
LutScoresParams scoring(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t head_dim,
                        int64_t capacity, int64_t num_bins);
GroupScoresParams grouping(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t capacity);
// Attending q (num_queries, Hq, D) f32 over selections (num_queries, Hkv, max_selected) into out
// (num_queries, Hq, D) f32 and lse (num_queries, Hq), all contiguous.
KVStore::AttendParams attending(const PipelineShape& shape, int64_t num_queries, int64_t num_kv_heads, int64_t head_dim,
                                int64_t max_selected, float scale);
SelectTopkParams selection(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t capacity, int64_t k,
                           int64_t max_selected, bool add_resident);

}  // namespace a2ats::steps
