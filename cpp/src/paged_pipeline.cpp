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

PagedPipelineBase::PagedPipelineBase(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook)
    : store_(store), shape_(shape), codebook_(std::move(codebook)) {
  steps::check_setup(store, shape_, codebook_);
  if (store.batch() != 1)
    throw std::invalid_argument("the store must be slot-indexed (batch 1, capacity = the engine's slots), got batch " +
                                std::to_string(store.batch()));
}

void PagedPipelineBase::check_layer(int64_t layer) const {
  if (layer < 0 || layer >= store_.num_layers())
    throw std::invalid_argument("layer must be in [0, " + std::to_string(store_.num_layers()) + "), got " +
                                std::to_string(layer));
}

void PagedPipelineBase::check_codes(const PagedCodes& codes) const {
  if (codes.data == nullptr || codes.block_size < 1 || codes.num_blocks < 1)
    throw std::invalid_argument("codes must be (num_blocks, num_kv_heads, block_size, M) with at least one block");
  if (codes.num_blocks > store_.capacity() / codes.block_size)
    throw std::invalid_argument("codes hold " + std::to_string(codes.num_blocks) + " blocks of " +
                                std::to_string(codes.block_size) + " slots, more than the store's " +
                                std::to_string(store_.capacity()) + " slots");
}

PagedPipelineBase::DecodePlan PagedPipelineBase::plan_decode(const PagedRequests& requests,
                                                             const PagedCodes& codes) const {
  DecodePlan plan;
  plan.num_requests = requests.num_requests;
  if (plan.num_requests < 0)
    throw std::invalid_argument("num_requests must be >= 0, got " + std::to_string(plan.num_requests));
  if (plan.num_requests == 0) return plan;
  check_codes(codes);
  const int64_t bs = codes.block_size;
  for (int64_t i = 0; i < plan.num_requests; ++i) {
    const int64_t length = requests.lengths[i], k = requests.k[i];
    if (length < 1 || length > requests.table_stride * bs)
      throw std::invalid_argument(
          "lengths[" + std::to_string(i) + "] = " + std::to_string(length) +
          " must be in [1, block_table columns * block_size = " + std::to_string(requests.table_stride * bs) + "]");
    if (k < 0 || k > kMaxSelected)
      throw std::invalid_argument("k[" + std::to_string(i) + "] must be in [0, 2^30], got " + std::to_string(k));
    plan.max_length = std::max(plan.max_length, length);
    plan.max_k = std::max(plan.max_k, k);
  }
  const int64_t per_head = shape_.budget_per_kv_head ? 1 : group_size();  // middle rows per unit of k
  plan.max_selected = per_head * plan.max_k + shape_.sink + shape_.window;
  if (plan.max_selected > kMaxSelected)
    throw std::invalid_argument("the rows a KV head selects (" + std::to_string(plan.max_selected) +
                                ") must be <= 2^30");
  return plan;
}

void PagedPipelineBase::wrope_rotations(const PagedRequests& requests, int64_t* out) const {
  const int64_t NB = num_bins();
  for (int64_t i = 0; i < requests.num_requests; ++i)
    for (int64_t j = 0; j < NB; ++j) out[i * NB + j] = codebook_.wrope_distances[size_t(j)] - (requests.lengths[i] - 1);
}

void PagedPipelineBase::count_step(const PagedRequests& requests, const int32_t* counts) {
  const int64_t Hkv = store_.num_kv_heads();
  stats_.decode_calls += 1;
  for (int64_t i = 0; i < requests.num_requests; ++i) {
    const int64_t length = requests.lengths[i], resident = std::min(length, shape_.sink + shape_.window);
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t count = counts[i * Hkv + g];
      stats_.rows_read += count;
      stats_.rows_fetched += count - std::min(count, resident);
    }
    stats_.rows_cached += length * Hkv;
  }
}

RotaryParams PagedPipelineBase::key_rotation(int64_t n) const {
  return steps::key_rotation(shape_, n, store_.num_kv_heads(), 1, store_.head_dim());
}
RotaryParams PagedPipelineBase::query_rotation(int64_t num_requests) const {
  return steps::query_rotation(shape_, num_requests, store_.head_dim(), num_bins());
}
VQEncodeParams PagedPipelineBase::key_encoding(int64_t n) const {
  return steps::key_encoding(shape_, n, store_.num_kv_heads(), 1, store_.head_dim());
}

LutScoresParams PagedPipelineBase::scoring(const DecodePlan& plan, const PagedRequests& requests,
                                           const PagedCodes& codes) const {
  LutScoresParams lp =
      steps::scoring(shape_, plan.num_requests, store_.num_kv_heads(), store_.head_dim(), plan.max_length, num_bins());
  lp.codes_stride[0] = codes.stride[0];
  lp.codes_stride[1] = codes.stride[1];
  lp.codes_stride[2] = codes.stride[2];
  lp.block_table = requests.block_table;
  lp.block_size = codes.block_size;
  lp.num_blocks = codes.num_blocks;
  lp.block_table_stride = requests.table_stride;
  return lp;
}

GroupScoresParams PagedPipelineBase::grouping(const DecodePlan& plan) const {
  return steps::grouping(shape_, plan.num_requests, store_.num_kv_heads(), plan.max_length);
}

SelectTopkParams PagedPipelineBase::selection(const DecodePlan& plan, const PagedRequests& requests) const {
  // Each request selects its own k: its rows of the shared (N, Hkv, Kmax) indices are padded
  // with -1 past per_head * k + sink + window.
  SelectTopkParams sp = steps::selection(shape_, plan.num_requests, store_.num_kv_heads(), plan.max_length, plan.max_k,
                                         plan.max_selected, true);
  sp.k_per_row = requests.k;
  return sp;
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
  rotary_cpu(keys_.data(), keys_.data(), rotate_by_.data(), codebook_.inv_freq.data(), key_rotation(n));
  // Whitened by the layer's L (one per KV head), then the nearest centroid.
  const float* chol = codebook_.chol.data() + layer * Hkv * D * D;
  steps::rows_times_matrix(keys_.data(), chol, rows, 1, Hkv, D, false, whitened_.data());
  const float* centroids = codebook_.centroids.data() + layer * Hkv * shape_.num_centroids * D;
  vq_encode_cpu(whitened_.data(), centroids, new_codes_.data(), key_encoding(n));
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
  last_num_requests_ = 0;
  last_max_selected_ = 0;
  const DecodePlan plan = plan_decode(requests, codes);
  const int64_t N = plan.num_requests;
  if (N == 0) return;
  const int64_t Hkv = store_.num_kv_heads(), D = store_.head_dim(), Hq = shape_.num_q_heads, G = Hq / Hkv;
  const int64_t NB = num_bins(), bs = codes.block_size, Tmax = plan.max_length, Kmax = plan.max_selected;
  // Every buffer first.
  grow(q_, N * Hq * D);
  grow(q_wrope_, N * Hq * NB * D);
  grow(q_dual_, N * Hq * NB * D);
  grow(rotate_by_, N * NB);
  grow(scores_, N * Hq * Tmax);
  if (shape_.budget_per_kv_head) grow(grouped_, N * Hkv * Tmax);
  grow(indices_, N * Hkv * Kmax);
  grow(slots_, N * Hkv * Kmax);
  grow(counts_, N * Hkv);
  grow(out_, N * Hq * D);
  grow(lse_, N * Hq);

  // The exact query in float32, and its WRoPE forms: bin j moved to distance wrope_distances[j].
  steps::to_f32(ConstRows{q.data, {q.stride[0], q.stride[1], 0}}, store_.dtype(), N, Hq, 1, D, q_.data());
  wrope_rotations(requests, rotate_by_.data());
  rotary_cpu(q_.data(), q_wrope_.data(), rotate_by_.data(), codebook_.inv_freq.data(), query_rotation(N));
  const float* chol_inv = codebook_.chol_inv.data() + layer * Hkv * D * D;
  steps::rows_times_matrix(q_wrope_.data(), chol_inv, N * Hq * NB, G * NB, Hkv, D, true, q_dual_.data());

  // Scores of every context token from the paged codes, then each request's own selection.
  const float* centroids = codebook_.centroids.data() + layer * Hkv * shape_.num_centroids * D;
  lut_scores_cpu(q_dual_.data(), centroids, codes.data, requests.lengths, NB > 1 ? codebook_.bin_edges.data() : nullptr,
                 scores_.data(), scoring(plan, requests, codes));
  const float* selected_from = scores_.data();
  if (shape_.budget_per_kv_head) {
    group_scores_cpu(scores_.data(), requests.lengths, grouped_.data(), grouping(plan));
    selected_from = grouped_.data();
  }
  select_topk_cpu(selected_from, requests.lengths, indices_.data(), counts_.data(), selection(plan, requests));
  last_num_requests_ = N;
  last_max_selected_ = Kmax;
  // Tokens to slots through each request's block table (lut_scores checked its blocks).
  for (int64_t i = 0; i < N; ++i) {
    const int32_t* table = requests.block_table + i * requests.table_stride;
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t base = (i * Hkv + g) * Kmax, count = counts_[size_t(i * Hkv + g)];
      for (int64_t j = 0; j < Kmax; ++j) {
        const int32_t token = indices_[size_t(base + j)];
        slots_[size_t(base + j)] = j < count ? int32_t(int64_t(table[token / bs]) * bs + token % bs) : -1;
      }
    }
  }

  // Exact attention with the model's own query over the selected slots (sink and window
  // included), read straight from the store.
  const KVStore::AttendParams ap = steps::attending(shape_, N, Hkv, D, Kmax, scale);
  store_.attend(layer, q_.data(), slots_.data(), counts_.data(), out_.data(), lse_.data(), ap);
  steps::from_f32(out_.data(), store_.dtype(), N, Hq, D, out, out_stride);
  count_step(requests, counts_.data());
}

}  // namespace a2ats
