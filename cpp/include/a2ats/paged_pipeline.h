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

// What the CPU PagedPipeline and its CUDA twin (CudaPagedPipeline, cuda/a2ats_cuda.h) share:
// the setup, the checks a host can make, the plan of a decode call and the single ops' parameters.
class PagedPipelineBase {
 public:
  // Throws std::invalid_argument when the shape or codebook does not fit the store or the store
  // is not slot-indexed (batch 1).
  PagedPipelineBase(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook);

  const PipelineShape& shape() const { return shape_; }
  int64_t num_bins() const { return int64_t(codebook_.wrope_distances.size()); }
  const PipelineStats& stats() const { return stats_; }
  KVStore& store() const { return store_; }
  int64_t group_size() const { return shape_.num_q_heads / store_.num_kv_heads(); }
  int64_t last_num_requests() const { return last_num_requests_; }
  int64_t last_max_selected() const { return last_max_selected_; }

 protected:
  // One decode call's sizes: the longest context, the largest k and the rows a KV head may
  // select (Kmax = k or G k, plus sink + window).
  struct DecodePlan {
    int64_t num_requests = 0, max_length = 0, max_k = 0, max_selected = 0;
  };
  void check_layer(int64_t layer) const;
  void check_codes(const PagedCodes& codes) const;
  // Checks the host arrays of a decode call (lengths, k, the table's width); throws
  // std::invalid_argument naming the argument.
  DecodePlan plan_decode(const PagedRequests& requests, const PagedCodes& codes) const;
  // (N, NB) rotations of the WRoPE queries: bin j moved to distance wrope_distances[j].
  void wrope_rotations(const PagedRequests& requests, int64_t* out) const;
  // Counters of one decode call from its host counts (N, Hkv) (sink and window included).
  void count_step(const PagedRequests& requests, const int32_t* counts);

  // The single ops' parameters for dense f32 scratch: un-rotating keys (n, Hkv, D); rotating
  // the queries (N, Hq, D) to (N, Hq, NB, D); encoding (n, Hkv, D) into (n, Hkv, M); scoring
  // (N, Hq, NB, D) through the block table into (N, Hq, Tmax); grouping into (N, Hkv, Tmax);
  // selecting each request's own k (k_per_row = requests.k) into (N, Hkv, Kmax).
  RotaryParams key_rotation(int64_t n) const;
  RotaryParams query_rotation(int64_t num_requests) const;
  VQEncodeParams key_encoding(int64_t n) const;
  LutScoresParams scoring(const DecodePlan& plan, const PagedRequests& requests, const PagedCodes& codes) const;
  GroupScoresParams grouping(const DecodePlan& plan) const;
  SelectTopkParams selection(const DecodePlan& plan, const PagedRequests& requests) const;

  KVStore& store_;
  PipelineShape shape_;
  PipelineCodebook codebook_;
  PipelineStats stats_;
  int64_t last_num_requests_ = 0, last_max_selected_ = 0;
};

class PagedPipeline : public PagedPipelineBase {
 public:
  using PagedPipelineBase::PagedPipelineBase;

  // Codes of n keys k (n, Hkv, D) of the store's dtype (element strides (i, g) in k.stride[0..1]),
  // post-RoPE at positions (n,), written at slots (n,) of `codes`; slots[i] < 0 skips key i.
  // Everything is checked first: a throw leaves the codes as they were.
  void encode(int64_t layer, const ConstRows& k, int64_t n, const int64_t* positions, const int64_t* slots,
              const PagedCodes& codes);

  // q (N, Hq, D) of the store's dtype (element strides (i, h)); writes out (N, Hq, D) of the store's
  // dtype (element strides out_stride). The rows of every selected slot must be in the store.
  void decode(int64_t layer, const ConstRows& q, const PagedRequests& requests, const PagedCodes& codes, float scale,
              void* out, const int64_t out_stride[2]);

  // The selection of the last decode call, as token indices of each request (not slots):
  // indices (N, Hkv, Kmax) int32 ascending, padded with -1, and counts (N, Hkv) int32.
  const int32_t* last_indices() const { return indices_.data(); }
  const int32_t* last_counts() const { return counts_.data(); }

 private:
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
