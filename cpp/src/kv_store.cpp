#include "a2ats/kv_store.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace a2ats {
namespace {

constexpr size_t kAlignment = 4096;
// Stores of at least this many bytes are aligned to it and asked for transparent huge pages:
// the attended rows are scattered over the whole store, and with 4 KiB pages nearly every row
// read misses the TLB too (measured 1.25x faster random row copies on a 2-core EPYC VM).
constexpr size_t kHugePage = size_t(2) << 20;
constexpr int64_t kGatherChunkRows = 256;  // rows per work item: large enough to amortise scheduling

std::string at(int64_t layer, int64_t b) {
  return "layer " + std::to_string(layer) + ", batch row " + std::to_string(b);
}

}  // namespace

#ifndef A2ATS_WITH_CUDA
void* pinned_alloc(size_t) { return nullptr; }
bool pinned_free(void*) { return false; }
#endif

KVStore::KVStore(int64_t num_layers, int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t capacity,
                 DType dtype, bool pinned, int threads)
    : num_layers_(num_layers),
      batch_(batch),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      capacity_(capacity),
      dtype_(dtype),
      lengths_(size_t(num_layers * batch), 0),
      pool_(new ThreadPool(threads)) {
  int64_t slab = row_bytes();  // checked: a wrapped product would make a tiny store that appends overrun
  for (const int64_t dim : {num_layers, batch, num_kv_heads, capacity})
    if (dim < 1 || __builtin_mul_overflow(slab, dim, &slab) || slab > kMaxBytes / 2)
      throw std::invalid_argument("KVStore dimensions must be >= 1 and need at most " + std::to_string(kMaxBytes) +
                                  " bytes for K and V together");
  slab_bytes_ = size_t(slab);
  const size_t rounded = (slab_bytes_ + kAlignment - 1) / kAlignment * kAlignment;
  const size_t total = 2 * (rounded == 0 ? kAlignment : rounded);
  char* base = nullptr;
  if (pinned) {
    base = static_cast<char*>(pinned_alloc(total));
    pinned_ = base != nullptr;
  }
  // Untouched pages of an ordinary allocation are not committed until the first append.
  if (base == nullptr) {
    if (total >= 2 * kHugePage) {
      const size_t huge_total = (total + kHugePage - 1) / kHugePage * kHugePage;
      base = static_cast<char*>(std::aligned_alloc(kHugePage, huge_total));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (base != nullptr) madvise(base, huge_total, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
    } else {
      base = static_cast<char*>(std::aligned_alloc(kAlignment, total));
    }
  }
  if (base == nullptr) throw std::bad_alloc();
  k_ = base;
  v_ = base + total / 2;
}

KVStore::~KVStore() {
  accel_state_.reset();  // waits for in-flight copies from its staging buffers
  if (pinned_)
    pinned_free(k_);
  else
    std::free(k_);
}

void KVStore::reset() { std::fill(lengths_.begin(), lengths_.end(), 0); }

void KVStore::check_layer(int64_t layer) const {
  if (layer < 0 || layer >= num_layers_)
    throw std::invalid_argument("layer must be in [0, " + std::to_string(num_layers_) + "), got " +
                                std::to_string(layer));
}

void KVStore::check_append(int64_t layer, int64_t num_new, const int32_t* num_tokens) const {
  check_layer(layer);
  for (int64_t b = 0; b < batch_; ++b) {
    const int64_t n = num_tokens ? num_tokens[b] : num_new;
    if (n < 0 || n > num_new)
      throw std::invalid_argument("num_tokens[" + std::to_string(b) + "] must be in [0, " + std::to_string(num_new) +
                                  "], got " + std::to_string(n));
    if (length(layer, b) + n > capacity_)
      throw std::invalid_argument("KVStore capacity exceeded at " + at(layer, b) + ": " +
                                  std::to_string(length(layer, b)) + " rows stored + " + std::to_string(n) +
                                  " new > capacity " + std::to_string(capacity_));
  }
}

void KVStore::commit_append(int64_t layer, int64_t num_new, const int32_t* num_tokens) {
  for (int64_t b = 0; b < batch_; ++b) lengths_[size_t(layer * batch_ + b)] += num_tokens ? num_tokens[b] : num_new;
}

void KVStore::append(int64_t layer, const RowsView& k, const RowsView& v, int64_t num_new, const int32_t* num_tokens) {
  check_append(layer, num_new, num_tokens);
  const int64_t elem = dtype_size(dtype_);
  const size_t row = size_t(row_bytes());
  pool_->parallel_for(
      batch_ * num_kv_heads_,
      [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / num_kv_heads_, g = item % num_kv_heads_;
          const int64_t n = num_tokens ? num_tokens[b] : num_new;
          const int64_t start = length(layer, b);
          char* dst_k = k_rows(layer, b, g) + start * int64_t(row);
          char* dst_v = v_rows(layer, b, g) + start * int64_t(row);
          const char* src_k = static_cast<const char*>(k.data) + (b * k.stride[0] + g * k.stride[1]) * elem;
          const char* src_v = static_cast<const char*>(v.data) + (b * v.stride[0] + g * v.stride[1]) * elem;
          for (int64_t t = 0; t < n; ++t) {
            std::memcpy(dst_k + t * int64_t(row), src_k + t * k.stride[2] * elem, row);
            std::memcpy(dst_v + t * int64_t(row), src_v + t * v.stride[2] * elem, row);
          }
        }
      },
      ThreadPool::min_chunk_for(2 * num_new * int64_t(row)));
  commit_append(layer, num_new, num_tokens);
}

void KVStore::check_write_slots(int64_t layer, const int64_t* slots, int64_t n) const {
  check_layer(layer);
  if (batch_ != 1)
    throw std::invalid_argument("write_slots needs a slot-indexed store (batch 1), this one has batch " +
                                std::to_string(batch_));
  std::vector<int64_t> named;
  named.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    if (slots[i] >= capacity_)
      throw std::invalid_argument("slots[" + std::to_string(i) + "] = " + std::to_string(slots[i]) +
                                  " is outside [0, capacity " + std::to_string(capacity_) + ")");
    if (slots[i] >= 0) named.push_back(slots[i]);
  }
  std::sort(named.begin(), named.end());
  const auto twice = std::adjacent_find(named.begin(), named.end());
  if (twice != named.end())
    throw std::invalid_argument("slot " + std::to_string(*twice) + " is named twice in one write_slots call");
}

void KVStore::write_slots(int64_t layer, const int64_t* slots, int64_t n, const RowsView& k, const RowsView& v) {
  check_write_slots(layer, slots, n);
  const int64_t elem = dtype_size(dtype_);
  const size_t row = size_t(row_bytes());
  pool_->parallel_for(
      n * num_kv_heads_,
      [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t i = item / num_kv_heads_, g = item % num_kv_heads_;
          if (slots[i] < 0) continue;
          const int64_t offset = (i * k.stride[0] + g * k.stride[1]) * elem;
          std::memcpy(k_rows(layer, 0, g) + slots[i] * int64_t(row), static_cast<const char*>(k.data) + offset, row);
          std::memcpy(v_rows(layer, 0, g) + slots[i] * int64_t(row),
                      static_cast<const char*>(v.data) + (i * v.stride[0] + g * v.stride[1]) * elem, row);
        }
      },
      ThreadPool::min_chunk_for(2 * int64_t(row)));
  commit_write_slots(layer, slots, n);
}

void KVStore::commit_write_slots(int64_t layer, const int64_t* slots, int64_t n) {
  int64_t& length = lengths_[size_t(layer)];
  for (int64_t i = 0; i < n; ++i) length = std::max(length, slots[i] + 1);
}

void KVStore::check_gather(int64_t layer, const int32_t* indices, const int64_t indices_stride[2],
                           const int32_t* counts, const int64_t counts_stride[2], int64_t max_selected,
                           int64_t num_queries) const {
  check_layer(layer);
  num_queries = queries_or_batch(num_queries);
  if (num_queries != batch_ && batch_ != 1)
    throw std::invalid_argument("a store of batch " + std::to_string(batch_) + " serves exactly " +
                                std::to_string(batch_) + " queries, got " + std::to_string(num_queries));
  for (int64_t b = 0; b < num_queries; ++b) {
    const int64_t len = length(layer, store_row(b));
    for (int64_t g = 0; g < num_kv_heads_; ++g) {
      const int64_t count = counts[b * counts_stride[0] + g * counts_stride[1]];
      if (count < 0 || count > max_selected)
        throw std::invalid_argument("counts[" + std::to_string(b) + ", " + std::to_string(g) + "] must be in [0, " +
                                    std::to_string(max_selected) + "], got " + std::to_string(count));
      const int32_t* row = indices + b * indices_stride[0] + g * indices_stride[1];
      uint32_t worst = 0;  // unsigned compare catches negative indices too
      for (int64_t i = 0; i < count; ++i) worst = std::max(worst, uint32_t(row[i]));
      if (count > 0 && int64_t(worst) >= len) {
        for (int64_t i = 0; i < count; ++i)
          if (row[i] < 0 || row[i] >= len)
            throw std::invalid_argument("indices[" + std::to_string(b) + ", " + std::to_string(g) + ", " +
                                        std::to_string(i) + "] = " + std::to_string(row[i]) + " is outside [0, " +
                                        std::to_string(len) + ") rows stored at " + at(layer, store_row(b)));
      }
    }
  }
}

void KVStore::gather(int64_t layer, const int32_t* indices, const int64_t indices_stride[2], const int32_t* counts,
                     const int64_t counts_stride[2], const RowsView& out_k, const RowsView& out_v,
                     int64_t num_queries) {
  num_queries = queries_or_batch(num_queries);
  const int64_t elem = dtype_size(dtype_);
  const size_t row = size_t(row_bytes());
  const int64_t chunks = (max_count(counts, counts_stride, num_queries) + kGatherChunkRows - 1) / kGatherChunkRows;
  pool_->parallel_for(
      num_queries * num_kv_heads_ * chunks,
      [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t chunk = item % chunks, bg = item / chunks;
          const int64_t b = bg / num_kv_heads_, g = bg % num_kv_heads_;
          const int64_t count = counts[b * counts_stride[0] + g * counts_stride[1]];
          const int64_t lo = chunk * kGatherChunkRows, hi = std::min(count, lo + kGatherChunkRows);
          const int32_t* idx = indices + b * indices_stride[0] + g * indices_stride[1];
          const char* src_k = k_rows(layer, store_row(b), g);
          const char* src_v = v_rows(layer, store_row(b), g);
          char* dst_k = static_cast<char*>(out_k.data) + (b * out_k.stride[0] + g * out_k.stride[1]) * elem;
          char* dst_v = static_cast<char*>(out_v.data) + (b * out_v.stride[0] + g * out_v.stride[1]) * elem;
          for_each_row_prefetched(src_k, src_v, idx, lo, hi, row, [&](int64_t i, const char* k, const char* v) {
            std::memcpy(dst_k + i * out_k.stride[2] * elem, k, row);
            std::memcpy(dst_v + i * out_v.stride[2] * elem, v, row);
          });
        }
      },
      ThreadPool::min_chunk_for(2 * kGatherChunkRows * int64_t(row)));
}

}  // namespace a2ats
