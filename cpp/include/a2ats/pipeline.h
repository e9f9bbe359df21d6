// The A²ATS decode step as one native call per layer, on the CPU.
//
// A Pipeline holds everything A²ATS keeps for one model beside the host K/V store it is given:
// the codes of every stored key, the codebook, and the scratch of a step. The store's per-row
// lengths are the one source of truth: codes exist for exactly the rows the store holds, and the
// sink and window rows are read from the store like any other (on a CPU nothing is "resident").
//
//   prefill(layer, k, v, positions, num_tokens)   store rows, un-rotate, whiten and encode them
//   plan(k)                                       once per decode step, for all layers
//   decode(layer, q, k, v, positions, out)        append + encode the new row, WRoPE dual query
//                                                 (binned), LUT scores, top-k + sink + window,
//                                                 exact attention over the selection, into out
//
// The specification is the composition of the single ops (python/a2ats/reference.py), which the
// tests check the pipeline against.
#pragma once

#include <cstdint>
#include <vector>

#include "a2ats/common.h"
#include "a2ats/kv_store.h"
#include "a2ats/rotary.h"
#include "a2ats/topk.h"
#include "a2ats/vq.h"

namespace a2ats {

struct PipelineShape {
  int64_t num_q_heads = 0;       // Hq, a multiple of the store's num_kv_heads
  int64_t rotary_dim = 0;        // R <= head_dim, even: 2 * inv_freq.size()
  bool interleaved = false;      // RoPE pairs (2i, 2i+1) instead of (i, i + R/2)
  int64_t num_subspaces = 1;     // M
  int64_t num_centroids = 0;     // C
  int64_t sink = 0, window = 1;  // first and last rows always attended
  // false: k middle rows per query head, united per KV head (the paper's; up to G k rows read).
  // true: k middle rows per KV head, the top k of group_scores (rows read = the budget).
  bool budget_per_kv_head = false;
};

// Codebook of all layers, contiguous float32, copied by the constructor:
//   chol       // (L, Hkv, D, D)      L: whitened = k_pre @ L
//   chol_inv   // (L, Hkv, D, D)      L^-1: q' = q_w @ L^-T, i.e. q'[e] = sum_d L^-1[e, d] q_w[d]
//   centroids  // (L, Hkv, M, C, D/M)
//   inv_freq   // (R/2,)
// WRoPE: bin j of NB scores far tokens at distance wrope_distances[j]; token n of a row of length
// len, at distance d = len - 1 - n, is in bin #{bin_edges <= d} (NB - 1 ascending edges).
struct PipelineCodebook {
  std::vector<float> chol, chol_inv, centroids, inv_freq;
  std::vector<int64_t> wrope_distances;  // (NB,)
  std::vector<int32_t> bin_edges;        // (NB - 1,)
};

struct PipelineStats {
  int64_t decode_calls = 0;  // layer-steps
  int64_t rows_read = 0;     // rows attended, summed over batch rows and KV heads
  int64_t rows_fetched = 0;  // of those, rows that are neither sink nor window
  int64_t rows_cached = 0;   // rows stored at those steps, same sum
};

// Strided (B, H, t, D) rows of `dtype` with head_dim contiguous; strides in elements.
struct ConstRows {
  const void* data = nullptr;
  int64_t stride[3] = {0, 0, 0};
};

// What the CPU and CUDA pipelines share: the checked shape and codebook, the plan of the
// current step and the counters. The store's per-row lengths are the one count of the rows.
class PipelineBase {
 public:
  // Throws std::invalid_argument when the shape or codebook does not fit the store, or the
  // store already holds rows (they would have no codes).
  PipelineBase(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook);

  // Starts a decode step that appends one row to every batch row of every layer and selects k
  // middle rows per query head. Throws when the layers hold different rows (an earlier step
  // stopped partway) or a layer is full.
  void plan(int64_t k);

  const PipelineShape& shape() const { return shape_; }
  int64_t num_bins() const { return int64_t(codebook_.wrope_distances.size()); }
  int64_t planned_k() const { return k_; }
  bool planned() const { return planned_; }
  const PipelineStats& stats() const { return stats_; }
  KVStore& store() const { return store_; }
  int64_t group_size() const { return shape_.num_q_heads / store_.num_kv_heads(); }
  // Middle rows a KV head may select per step under the plan: k, or G k for the union.
  int64_t max_middle() const { return shape_.budget_per_kv_head ? k_ : group_size() * k_; }

 protected:
  // Throws unless `layer` may decode now: in range, planned, not yet decoded in this step, and
  // holding the rows the plan counted.
  void check_decode(int64_t layer) const;
  // Marks `layer` decoded; the plan ends with the last layer.
  void finish_decode(int64_t layer);
  void check_prefill() const;
  // Counters of one decode call from its host counts (B, Hkv): `selected` rows per KV head, of
  // which the sink and window rows are part when `include_resident`, else read besides them.
  void count_step(const int32_t* selected, bool include_resident);
  void forget_plan();

  // The single ops' parameters of a step, the same on every device, for dense f32 scratch:
  //   un-rotating keys (B, Hkv, t, D) in place by positions (B, t) int64;
  //   rotating the query (B, Hq, D) to NB distances, (B, Hq, NB, D), by positions (B, NB);
  //   encoding whitened keys (B, Hkv, t, D) into codes (B, Hkv, t, M);
  //   scoring dual queries (B, Hq, NB, D) against the codes (B, Hkv, capacity, M);
  //   per KV head budget: grouping scores (B, Hq, capacity) into (B, Hkv, capacity);
  //   selecting from those, or from the scores (B, Hq, capacity), into indices (B, Hkv, max_selected).
  RotaryParams key_rotation(int64_t num_new) const;
  RotaryParams query_rotation() const;
  VQEncodeParams key_encoding(int64_t num_new) const;
  LutScoresParams scoring() const;
  GroupScoresParams grouping() const;
  SelectTopkParams selection(int64_t max_selected, bool add_resident) const;

  KVStore& store_;
  PipelineShape shape_;
  PipelineCodebook codebook_;
  bool planned_ = false;
  int64_t k_ = 0;
  int64_t max_selected_ = 0;           // max_middle() + sink + window: a selection with the resident rows
  std::vector<int32_t> step_lengths_;  // (B,) lengths after this step's append
  std::vector<char> decoded_;          // (L,) layers done this step
  PipelineStats stats_;
};

// The CPU pipeline: attends the selected rows, sink and window included, straight from the store.
class Pipeline : public PipelineBase {
 public:
  Pipeline(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook);

  // Stores the first num_tokens[b] (all t when null) rows of k, v (B, Hkv, t, D) per batch row,
  // the keys post-RoPE at positions (B, t) int64 (element strides pos_stride), and their codes.
  // Everything is checked first; a throw leaves the pipeline as it was.
  void prefill(int64_t layer, const ConstRows& k, const ConstRows& v, int64_t num_new, const int64_t* positions,
               const int64_t pos_stride[2], const int32_t* num_tokens);

  // One decode step of `layer`: q (B, Hq, D), k, v (B, Hkv, 1, D) of the store's dtype, post-RoPE
  // at positions (B,) int64; writes out (B, Hq, D) of the store's dtype (element strides
  // out_stride, head_dim contiguous). Needs plan() for this step; each layer decodes once per plan.
  void decode(int64_t layer, const ConstRows& q, const ConstRows& k, const ConstRows& v, const int64_t* positions,
              int64_t pos_stride, float scale, void* out, const int64_t out_stride[2]);

  void reset();  // forgets every row (the store's too) and the current plan

  // (B, Hkv, capacity, M) int16 codes of `layer`; rows past the store's lengths are stale.
  const int16_t* codes(int64_t layer) const { return codes_.data() + layer * layer_codes_; }
  // The selection of the last decode call: indices (B, Hkv, Kmax) int32, counts (B, Hkv) int32.
  const int32_t* last_indices() const { return indices_.data(); }
  const int32_t* last_counts() const { return counts_.data(); }
  int64_t last_max_selected() const { return last_max_selected_; }

 private:
  void encode_and_append(int64_t layer, const ConstRows& k, const ConstRows& v, int64_t num_new,
                         const int64_t* positions, const int64_t pos_stride[2], const int32_t* num_tokens);

  int64_t layer_codes_ = 0;        // B * Hkv * capacity * M
  std::vector<int16_t> codes_;     // (L, B, Hkv, capacity, M)
  int64_t last_max_selected_ = 0;  // Kmax of the selection the last decode made

  // Scratch, grown on demand and reused.
  std::vector<float> keys_, whitened_;       // (B, Hkv, t, D)
  std::vector<int64_t> rotate_by_;           // (B, t) or (B, NB)
  std::vector<int16_t> new_codes_;           // (B, Hkv, t, M)
  std::vector<float> q_, q_wrope_, q_dual_;  // (B, Hq, D), (B, Hq, NB, D), (B, Hq, NB, D)
  std::vector<float> scores_;                // (B, Hq, capacity)
  std::vector<float> grouped_;               // (B, Hkv, capacity), per-KV-head budget only
  std::vector<int32_t> indices_, counts_;    // (B, Hkv, Kmax), (B, Hkv)
  std::vector<float> out_, lse_;             // (B, Hq, D), (B, Hq)
};

}  // namespace a2ats
