// Host-memory store of the full K/V cache: one slab for K and one for V, each holding every
// layer, plus the threaded append, gather and attend over its rows.
//
// Layout of each of K and V (row-major):
//   // (num_layers, batch, num_kv_heads, capacity, head_dim)
// so every (layer, b, g) owns a contiguous block of `capacity` rows of head_dim elements.
// Lengths are tracked per (layer, batch row). Validation happens before any byte is
// written, so a rejected append or gather leaves the store exactly as it was.
//
// A store of batch 1 can also be slot-indexed, as a paged serving engine addresses its cache:
// capacity = the engine's number of slots, rows written at given slots (write_slots), and any
// number of queries reading batch row 0 through gather and attend (num_queries).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "a2ats/common.h"
#include "a2ats/thread_pool.h"

namespace a2ats {

// Strided source or destination of rows: element strides of (b, g, t); head_dim contiguous.
struct RowsView {
  void* data = nullptr;
  int64_t stride[3] = {0, 0, 0};
};

class KVStore {
 public:
  // K and V bytes together at most 2^50 (1 PiB), so every row offset fits int64 with room to spare.
  static constexpr int64_t kMaxBytes = int64_t(1) << 50;
  // pinned: try page-locked memory (needs a CUDA build and a driver); falls back to
  // ordinary memory otherwise, which pinned() then reports.
  // threads: size of the store's own pool, which runs its append, gather and attend work,
  // the caller included; 0 means ThreadPool::default_num_threads().
  KVStore(int64_t num_layers, int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t capacity, DType dtype,
          bool pinned, int threads);
  ~KVStore();
  KVStore(const KVStore&) = delete;
  KVStore& operator=(const KVStore&) = delete;

  int64_t num_layers() const { return num_layers_; }
  int64_t batch() const { return batch_; }
  int64_t num_kv_heads() const { return num_kv_heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t capacity() const { return capacity_; }
  DType dtype() const { return dtype_; }
  bool pinned() const { return pinned_; }
  int num_threads() const { return pool_->num_threads(); }
  int64_t row_bytes() const { return head_dim_ * dtype_size(dtype_); }
  size_t nbytes() const { return 2 * slab_bytes_; }
  int64_t length(int64_t layer, int64_t b) const { return lengths_[size_t(layer * batch_ + b)]; }
  void reset();

  char* k_rows(int64_t layer, int64_t b, int64_t g) { return k_ + block_offset(layer, b, g); }
  char* v_rows(int64_t layer, int64_t b, int64_t g) { return v_ + block_offset(layer, b, g); }

  // Checks an append of num_tokens[b] rows per batch row (all num_new when num_tokens is
  // null); throws std::invalid_argument naming the problem. Nothing is modified.
  void check_append(int64_t layer, int64_t num_new, const int32_t* num_tokens) const;
  // Copies rows from host memory and advances the lengths; k, v are (B, Hkv, num_new, D).
  void append(int64_t layer, const RowsView& k, const RowsView& v, int64_t num_new, const int32_t* num_tokens);
  // Advances lengths after rows were written by another path (the CUDA append).
  void commit_append(int64_t layer, int64_t num_new, const int32_t* num_tokens);

  // Slot-indexed writes (batch 1 only): row i of k, v (N, Hkv, D), element strides (n, g) in
  // RowsView.stride[0..1], goes to slot slots[i] of every KV head of `layer`; slots[i] < 0
  // skips row i (an engine's padding). The length becomes max(length, highest slot + 1), so
  // reads stay checked against the slots written so far. check_write_slots throws
  // std::invalid_argument for a batch > 1 store, a slot >= capacity or a slot named twice
  // (which row would win would depend on the threads).
  void check_write_slots(int64_t layer, const int64_t* slots, int64_t n) const;
  void write_slots(int64_t layer, const int64_t* slots, int64_t n, const RowsView& k, const RowsView& v);
  // The length update of a write_slots whose rows another path wrote (the CUDA one).
  void commit_write_slots(int64_t layer, const int64_t* slots, int64_t n);

  // num_queries of a gather or attend: the B of its indices, counts and outputs. It equals
  // batch() (query b reads batch row b) except on a batch-1 store, where any number of queries
  // all read batch row 0 (the slot-indexed use). 0 means batch().
  int64_t store_row(int64_t b) const { return batch_ == 1 ? 0 : b; }

  // Checks counts[b, g] <= max_selected and every used index in [0, length); throws
  // std::invalid_argument otherwise. indices: (B, Hkv, Kmax) int32; counts: (B, Hkv) int32,
  // B = num_queries.
  void check_gather(int64_t layer, const int32_t* indices, const int64_t indices_stride[2], const int32_t* counts,
                    const int64_t counts_stride[2], int64_t max_selected, int64_t num_queries = 0) const;
  // Copies the first counts[b, g] selected rows of K and V into host outputs (B, Hkv, Kmax, D).
  void gather(int64_t layer, const int32_t* indices, const int64_t indices_stride[2], const int32_t* counts,
              const int64_t counts_stride[2], const RowsView& out_k, const RowsView& out_v, int64_t num_queries = 0);

  // Exact attention over the rows a selection names, read from the store (CPU only; no output
  // tensor of rows: each chunk of 128 rows passes through a per-thread buffer).
  // q: (B, Hq, D) f32, Hq = group_size * num_kv_heads; indices/counts as for gather, checked
  // with check_gather first. For each (b, h), with S the rows indices[b, h / G, :counts]:
  //   out[b, h] = softmax(scale * K_S q) V_S      // (B, Hq, D) f32
  //   lse[b, h] = log sum exp(scale * K_S q)      // (B, Hq) f32; -inf and out = 0 when empty
  // the state that merges exactly with attention over other rows (the resident sink/window).
  struct AttendParams {
    int64_t num_queries = 0;  // B of q, indices, counts, out, lse; 0 means batch()
    int64_t group_size = 1;
    float scale = 1.f;
    int64_t q_stride[2] = {0, 0};        // (b, h); head_dim contiguous
    int64_t indices_stride[2] = {0, 0};  // (b, g)
    int64_t counts_stride[2] = {0, 0};
    int64_t out_stride[2] = {0, 0};  // (b, h); head_dim contiguous
    int64_t lse_stride[2] = {0, 0};  // (b, h)
  };
  void attend(int64_t layer, const float* q, const int32_t* indices, const int32_t* counts, float* out, float* lse,
              const AttendParams& p);

  ThreadPool& pool() { return *pool_; }

  // Opaque per-store state of an accelerator path (the CUDA gather's staging buffers and
  // events), created lazily by that path and released first thing in ~KVStore via `deleter`.
  void* accel_state() const { return accel_state_.get(); }
  void set_accel_state(void* state, void (*deleter)(void*)) { accel_state_ = AccelState(state, deleter); }

 private:
  using AccelState = std::unique_ptr<void, void (*)(void*)>;

  // Throws std::invalid_argument unless 0 <= layer < num_layers (every check_* starts here).
  void check_layer(int64_t layer) const;

  // The largest counts[b, g]: how many rows the longest selection of a gather or attend holds.
  int64_t max_count(const int32_t* counts, const int64_t counts_stride[2], int64_t num_queries) const {
    int64_t largest = 0;
    for (int64_t b = 0; b < num_queries; ++b)
      for (int64_t g = 0; g < num_kv_heads_; ++g)
        largest = std::max<int64_t>(largest, counts[b * counts_stride[0] + g * counts_stride[1]]);
    return largest;
  }

  int64_t queries_or_batch(int64_t num_queries) const { return num_queries > 0 ? num_queries : batch_; }

  size_t block_offset(int64_t layer, int64_t b, int64_t g) const {
    return size_t(((layer * batch_ + b) * num_kv_heads_ + g) * capacity_) * size_t(row_bytes());
  }

  int64_t num_layers_, batch_, num_kv_heads_, head_dim_, capacity_;
  DType dtype_;
  bool pinned_ = false;
  size_t slab_bytes_ = 0;  // bytes of K (== bytes of V)
  char* k_ = nullptr;
  char* v_ = nullptr;
  std::vector<int64_t> lengths_;  // (num_layers, batch)
  std::unique_ptr<ThreadPool> pool_;
  std::vector<float> attend_partials_;  // (B * Hkv * chunks, G, D + 2) per-chunk softmax states
  AccelState accel_state_{nullptr, nullptr};
};

// Page-locked host memory through the CUDA runtime; both are no-ops returning
// nullptr/false in a build without CUDA or on a machine without a usable device.
void* pinned_alloc(size_t bytes);
bool pinned_free(void* ptr);

}  // namespace a2ats
