// The A²ATS decode step over a serving engine's paged cache (vLLM's), on the CPU: one native
// call per layer for all the requests that decode in a step.
//
// The engine owns the paged codes (its KV cache holds nothing else); the full K/V rows live in a
// slot-indexed KVStore (batch 1, capacity = the engine's slots, rows written by write_slots).
// Token t of a request lies in slot block_table[t / block_size] * block_size + t % block_size,
// in the codes and in the store alike, so prefix caching and block reuse keep them consistent.
//
//   encode(layer, k, n, positions, slots, codes)   un-rotate, whiten and encode n new keys into
//                                                  the paged codes at their slots
//   decode(layer, q, requests, codes, scale, out)  per request: WRoPE dual query (binned), LUT
//                                                  scores through its block table, its own top-k
//                                                  + sink + window, exact attention over those
//                                                  slots of the store, into out
//
// The specification is the same composition of single ops as Pipeline's, with the codes read
// through the block table; the tests check it against that.
#pragma once

#include <cstdint>
#include <vector>

#include "a2ats/kv_store.h"
#include "a2ats/pipeline.h"

namespace a2ats {

// One layer of the engine's paged codes.
struct PagedCodes {
  int16_t* data = nullptr;  // (num_blocks, Hkv, block_size, M)
  int64_t num_blocks = 0, block_size = 0;
  int64_t stride[3] = {0, 0, 0};  // (block, g, t) in elements; M contiguous
};

// The requests that decode one token each in a step.
struct PagedRequests {
  int64_t num_requests = 0;              // N
  const int32_t* lengths = nullptr;      // (N,) tokens in context, the new one included (>= 1);
                                         // the query sits at position lengths[i] - 1
  const int32_t* block_table = nullptr;  // (N, table_stride) the engine blocks of each request
  int64_t table_stride = 0;              // >= ceil(max length / block_size)
  const int32_t* k = nullptr;            // (N,) middle rows per query head (per KV head with
                                         // budget_per_kv_head) each request selects
};

class PagedPipeline {
 public:
  // Throws std::invalid_argument when the shape or codebook does not fit the store or the store
  // is not slot-indexed (batch 1).
  PagedPipeline(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook);

  // Codes of n keys k (n, Hkv, D) of the store's dtype (element strides (i, g) in k.stride[0..1]),
  // post-RoPE at positions (n,), written at slots (n,) of `codes`; slots[i] < 0 skips key i.
  // Everything is checked first: a throw leaves the codes as they were.
  void encode(int64_t layer, const ConstRows& k, int64_t n, const int64_t* positions, const int64_t* slots,
              const PagedCodes& codes);

  // q (N, Hq, D) of the store's dtype (element strides (i, h)); writes out (N, Hq, D) of the store's
  // dtype (element strides out_stride). The rows of every selected slot must be in the store.
  void decode(int64_t layer, const ConstRows& q, const PagedRequests& requests, const PagedCodes& codes, float scale,
              void* out, const int64_t out_stride[2]);

  const PipelineShape& shape() const { return shape_; }
  int64_t num_bins() const { return int64_t(codebook_.wrope_distances.size()); }
  const PipelineStats& stats() const { return stats_; }
  KVStore& store() const { return store_; }
  int64_t group_size() const { return shape_.num_q_heads / store_.num_kv_heads(); }
  // The selection of the last decode call, as token indices of each request (not slots):
  // indices (N, Hkv, Kmax) int32 ascending, padded with -1, and counts (N, Hkv) int32.
  const int32_t* last_indices() const { return indices_.data(); }
  const int32_t* last_counts() const { return counts_.data(); }
  int64_t last_num_requests() const { return last_num_requests_; }
  int64_t last_max_selected() const { return last_max_selected_; }

 private:
  void check_layer(int64_t layer) const;
  void check_codes(const PagedCodes& codes) const;

  KVStore& store_;
  PipelineShape shape_;
  PipelineCodebook codebook_;
  PipelineStats stats_;
  int64_t last_num_requests_ = 0, last_max_selected_ = 0;

  // Scratch, grown on demand and reused.
  std::vector<float> keys_, whitened_;             // (n, Hkv, D)
  std::vector<int64_t> rotate_by_;                 // (n,) or (N, NB)
  std::vector<int16_t> new_codes_;                 // (n, Hkv, M)
  std::vector<float> q_, q_wrope_, q_dual_;        // (N, Hq, D), (N, Hq, NB, D), (N, Hq, NB, D)
  std::vector<float> scores_;                      // (N, Hq, Tmax)
  std::vector<float> grouped_;                     // (N, Hkv, Tmax), per-KV-head budget only
  std::vector<int32_t> indices_, slots_, counts_;  // (N, Hkv, Kmax) tokens and slots, (N, Hkv)
  std::vector<float> out_, lse_;                   // (N, Hq, D), (N, Hq)
};

}  // namespace a2ats
