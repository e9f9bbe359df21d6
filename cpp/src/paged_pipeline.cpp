#include "a2ats/paged_pipeline.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "a2ats/rotary.h"
#include "a2ats/topk.h"
#include "a2ats/vq.h"
#include "pipeline_steps.h"

namespace a2ats {

using steps::grow;
using steps::kMaxSelected;

PagedPipeline::PagedPipeline(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook)
    : store_(store), shape_(shape), codebook_(std::move(codebook)) {
  steps::check_setup(store, shape_, codebook_);
  if (store.batch() != 1)
    throw std::invalid_argument("the store must be slot-indexed (batch 1, capacity = the engine's slots), got batch " +
                                std::to_string(store.batch()));
}

void PagedPipeline::check_layer(int64_t layer) const {
  if (layer < 0 || layer >= store_.num_layers())
    throw std::invalid_argument("layer must be in [0, " + std::to_string(store_.num_layers()) + "), got " +
                                std::to_string(layer));
}

void PagedPipeline::check_codes(const PagedCodes& codes) const {
  if (codes.data == nullptr || codes.block_size < 1 || codes.num_blocks < 1)
    throw std::invalid_argument("codes must be (num_blocks, num_kv_heads, block_size, M) with at least one block");
  if (codes.num_blocks > store_.capacity() / codes.block_size)
    throw std::invalid_argument("codes hold " + std::to_string(codes.num_blocks) + " blocks of " +
                                std::to_string(codes.block_size) + " slots, more than the store's " +
                                std::to_string(store_.capacity()) + " slots");
}

void PagedPipeline::encode(int64_t layer, const ConstRows& k, int64_t n, const int64_t* positions, const int64_t* slots,
                           const PagedCodes& codes) {
  check_layer(layer);
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  check_codes(codes);
  const int64_t Hkv = store_.num_kv_heads(), D = store_.head_dim(), M = shape_.num_subspaces;
  const int64_t num_slots = codes.num_blocks * codes.block_size;
  for (int64_t i = 0; i < n; ++i)
    if (slots[i] >= num_slots)
      throw std::invalid_argument("slots[" + std::to_string(i) + "] = " + std::to_string(slots[i]) +
                                  " is past the codes' " + std::to_string(num_slots) + " slots");
  const int64_t rows = n * Hkv;
  grow(keys_, rows * D);
  grow(whitened_, rows * D);
  grow(rotate_by_, n);
  grow(new_codes_, rows * M);
  // Pre-RoPE keys: rotated back by their positions, in float32 (n "batch rows" of one token).
  steps::to_f32(ConstRows{k.data, {k.stride[0], k.stride[1], 0}}, store_.dtype(), n, Hkv, 1, D, keys_.data());
  for (int64_t i = 0; i < n; ++i) rotate_by_[size_t(i)] = -positions[i];
  rotary_cpu(keys_.data(), keys_.data(), rotate_by_.data(), codebook_.inv_freq.data(),
             steps::key_rotation(shape_, n, Hkv, 1, D));
  // Whitened by the layer's L (one per KV head), then the nearest centroid.
  const float* chol = codebook_.chol.data() + layer * Hkv * D * D;
  steps::rows_times_matrix(keys_.data(), chol, rows, 1, Hkv, D, false, whitened_.data());
  const float* centroids = codebook_.centroids.data() + layer * Hkv * shape_.num_centroids * D;
  vq_encode_cpu(whitened_.data(), centroids, new_codes_.data(), steps::key_encoding(shape_, n, Hkv, 1, D));
  for (int64_t i = 0; i < n; ++i) {
    if (slots[i] < 0) continue;  // the engine's padding
    const int64_t block = slots[i] / codes.block_size, offset = slots[i] % codes.block_size;
    for (int64_t g = 0; g < Hkv; ++g) {
      int16_t* to = codes.data + block * codes.stride[0] + g * codes.stride[1] + offset * codes.stride[2];
      std::copy_n(new_codes_.data() + (i * Hkv + g) * M, M, to);
    }
  }
}

void PagedPipeline::decode(int64_t layer, const ConstRows& q, const PagedRequests& requests, const PagedCodes& codes,
                           float scale, void* out, const int64_t out_stride[2]) {
  check_layer(layer);
  const int64_t N = requests.num_requests;
  if (N < 0) throw std::invalid_argument("num_requests must be >= 0, got " + std::to_string(N));
  last_num_requests_ = 0;
  last_max_selected_ = 0;
  if (N == 0) return;
  check_codes(codes);
  const int64_t Hkv = store_.num_kv_heads(), D = store_.head_dim(), Hq = shape_.num_q_heads, G = Hq / Hkv;
  const int64_t NB = num_bins(), bs = codes.block_size;
  const int64_t per_head = shape_.budget_per_kv_head ? 1 : G;  // middle rows a KV head reads per unit of k
  int64_t max_length = 0, max_selected = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t length = requests.lengths[i], k = requests.k[i];
    if (length < 1 || length > requests.table_stride * bs)
      throw std::invalid_argument(
          "lengths[" + std::to_string(i) + "] = " + std::to_string(length) +
          " must be in [1, block_table columns * block_size = " + std::to_string(requests.table_stride * bs) + "]");
    if (k < 0 || k > kMaxSelected)
      throw std::invalid_argument("k[" + std::to_string(i) + "] must be in [0, 2^30], got " + std::to_string(k));
    max_length = std::max(max_length, length);
    max_selected = std::max(max_selected, per_head * k + shape_.sink + shape_.window);
  }
  if (max_selected > kMaxSelected)
    throw std::invalid_argument("the rows a KV head selects (" + std::to_string(max_selected) + ") must be <= 2^30");
  const int64_t rows_scored = shape_.budget_per_kv_head ? Hkv : Hq;
  // Every buffer first.
  grow(q_, N * Hq * D);
  grow(q_wrope_, N * Hq * NB * D);
  grow(q_dual_, N * Hq * NB * D);
  grow(rotate_by_, N * NB);
  grow(scores_, N * Hq * max_length);
  if (shape_.budget_per_kv_head) grow(grouped_, N * Hkv * max_length);
  grow(indices_, N * Hkv * max_selected);
  grow(slots_, N * Hkv * max_selected);
  grow(counts_, N * Hkv);
  grow(out_, N * Hq * D);
  grow(lse_, N * Hq);

  // The exact query in float32, and its WRoPE forms: bin j moved to distance wrope_distances[j].
  steps::to_f32(ConstRows{q.data, {q.stride[0], q.stride[1], 0}}, store_.dtype(), N, Hq, 1, D, q_.data());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < NB; ++j)
      rotate_by_[size_t(i * NB + j)] = codebook_.wrope_distances[size_t(j)] - (requests.lengths[i] - 1);
  rotary_cpu(q_.data(), q_wrope_.data(), rotate_by_.data(), codebook_.inv_freq.data(),
             steps::query_rotation(shape_, N, D, NB));
  const float* chol_inv = codebook_.chol_inv.data() + layer * Hkv * D * D;
  steps::rows_times_matrix(q_wrope_.data(), chol_inv, N * Hq * NB, G * NB, Hkv, D, true, q_dual_.data());

  // Scores of every context token from the paged codes, then each request's own selection.
  LutScoresParams lp = steps::scoring(shape_, N, Hkv, D, max_length, NB);
  lp.codes_stride[0] = codes.stride[0];
  lp.codes_stride[1] = codes.stride[1];
  lp.codes_stride[2] = codes.stride[2];
  lp.block_table = requests.block_table;
  lp.block_size = bs;
  lp.num_blocks = codes.num_blocks;
  lp.block_table_stride = requests.table_stride;
  const float* centroids = codebook_.centroids.data() + layer * Hkv * shape_.num_centroids * D;
  lut_scores_cpu(q_dual_.data(), centroids, codes.data, requests.lengths, NB > 1 ? codebook_.bin_edges.data() : nullptr,
                 scores_.data(), lp);
  const float* selected_from = scores_.data();
  if (shape_.budget_per_kv_head) {
    group_scores_cpu(scores_.data(), requests.lengths, grouped_.data(), steps::grouping(shape_, N, Hkv, max_length));
    selected_from = grouped_.data();
  }
  // Each request's selection fills the first per_head * k + sink + window of its rows of the
  // shared (N, Hkv, Kmax) indices; the rest is padding.
  std::fill(indices_.begin(), indices_.begin() + N * Hkv * max_selected, -1);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t own = per_head * requests.k[i] + shape_.sink + shape_.window;
    SelectTopkParams sp = steps::selection(shape_, 1, Hkv, max_length, requests.k[i], own, true);
    sp.indices_stride[0] = Hkv * max_selected;
    sp.indices_stride[1] = max_selected;
    select_topk_cpu(selected_from + i * rows_scored * max_length, requests.lengths + i,
                    indices_.data() + i * Hkv * max_selected, counts_.data() + i * Hkv, sp);
  }
  last_num_requests_ = N;
  last_max_selected_ = max_selected;
  // Tokens to slots through each request's block table (lut_scores checked its blocks).
  for (int64_t i = 0; i < N; ++i) {
    const int32_t* table = requests.block_table + i * requests.table_stride;
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t base = (i * Hkv + g) * max_selected, count = counts_[size_t(i * Hkv + g)];
      for (int64_t j = 0; j < max_selected; ++j) {
        const int32_t token = indices_[size_t(base + j)];
        slots_[size_t(base + j)] = j < count ? int32_t(int64_t(table[token / bs]) * bs + token % bs) : -1;
      }
    }
  }

  // Exact attention with the model's own query over the selected slots (sink and window
  // included), read straight from the store.
  const KVStore::AttendParams ap = steps::attending(shape_, N, Hkv, D, max_selected, scale);
  store_.attend(layer, q_.data(), slots_.data(), counts_.data(), out_.data(), lse_.data(), ap);
  steps::from_f32(out_.data(), store_.dtype(), N, Hq, D, out, out_stride);

  stats_.decode_calls += 1;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t length = requests.lengths[i], resident = std::min(length, shape_.sink + shape_.window);
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t count = counts_[size_t(i * Hkv + g)];
      stats_.rows_read += count;
      stats_.rows_fetched += count - std::min(count, resident);
    }
    stats_.rows_cached += length * Hkv;
  }
}

}  // namespace a2ats
