#include "a2ats/pipeline.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "a2ats/rotary.h"
#include "a2ats/thread_pool.h"
#include "a2ats/topk.h"
#include "a2ats/vq.h"
#include "pipeline_steps.h"

namespace a2ats {
namespace steps {

void rows_times_matrix(const float* x, const float* matrices, int64_t num_rows, int64_t rows_per_matrix,
                       int64_t num_matrices, int64_t d, bool transposed, float* y) {
  ThreadPool::global().parallel_for(
      num_rows,
      [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float* m = matrices + ((r / rows_per_matrix) % num_matrices) * d * d;
          const float* in = x + r * d;
          float* out = y + r * d;
          if (transposed) {
            // Eight lanes per dot product: a single accumulator is a serial chain the compiler may
            // not reorder (no -ffast-math), 4x slower on SmolLM2's dual queries.
            for (int64_t e = 0; e < d; ++e) {
              const float* row = m + e * d;
              f32x8 lanes = {};
              int64_t k = 0;
              for (; k + 8 <= d; k += 8) lanes += load8(row + k) * load8(in + k);
              float acc = sum8(lanes);
              for (; k < d; ++k) acc += row[k] * in[k];
              out[e] = acc;
            }
          } else {
            std::fill(out, out + d, 0.f);
            for (int64_t k = 0; k < d; ++k) {
              const float xk = in[k];
              const float* mk = m + k * d;
              for (int64_t e = 0; e < d; ++e) out[e] += xk * mk[e];
            }
          }
        }
      },
      ThreadPool::min_chunk_for(2 * d * d));
}

void check_setup(const KVStore& store, const PipelineShape& shape, const PipelineCodebook& codebook) {
  const int64_t L = store.num_layers(), Hkv = store.num_kv_heads(), D = store.head_dim();
  const int64_t M = shape.num_subspaces, C = shape.num_centroids;
  const auto fail = [](const std::string& msg) { throw std::invalid_argument(msg); };
  if (D > kMaxHeadDim) fail("head_dim must be <= " + std::to_string(kMaxHeadDim) + ", got " + std::to_string(D));
  if (store.capacity() > INT32_MAX) fail("the store's capacity must fit int32 (lengths and indices are int32)");
  if (shape.num_q_heads > kMaxQHeads)
    fail("num_q_heads must be <= " + std::to_string(kMaxQHeads) + ", got " + std::to_string(shape.num_q_heads));
  if (shape.num_q_heads < 1 || shape.num_q_heads % Hkv != 0)
    fail("num_q_heads must be a positive multiple of the store's num_kv_heads " + std::to_string(Hkv) + ", got " +
         std::to_string(shape.num_q_heads));
  if (shape.rotary_dim < 2 || shape.rotary_dim % 2 || shape.rotary_dim > D)
    fail("inv_freq must hold between 1 and head_dim / 2 = " + std::to_string(D / 2) + " frequencies, got " +
         std::to_string(shape.rotary_dim / 2));
  if (M < 1 || D % M || C < 1 || C > kMaxCentroids)
    fail("centroids must be (L, Hkv, M, C, D/M) with M dividing head_dim " + std::to_string(D) + " and C in [1, " +
         std::to_string(kMaxCentroids) + "], got M = " + std::to_string(M) + ", C = " + std::to_string(C));
  if (shape.sink < 0 || shape.window < 1 || shape.sink > kMaxSelected || shape.window > kMaxSelected)
    fail("sink must be in [0, 2^30] and window in [1, 2^30], got sink = " + std::to_string(shape.sink) +
         ", window = " + std::to_string(shape.window));
  const int64_t nb = int64_t(codebook.wrope_distances.size());
  if (nb < 1) fail("wrope_distances must hold at least one distance");
  for (const int64_t d : codebook.wrope_distances)
    if (d < 0 || d > (int64_t(1) << 40)) fail("wrope_distances must be in [0, 2^40], got " + std::to_string(d));
  if (int64_t(codebook.bin_edges.size()) != nb - 1)
    fail("bin_edges must hold len(wrope_distances) - 1 = " + std::to_string(nb - 1) + " edges, got " +
         std::to_string(codebook.bin_edges.size()));
  for (size_t j = 1; j < codebook.bin_edges.size(); ++j)
    if (codebook.bin_edges[j] < codebook.bin_edges[j - 1]) fail("bin_edges must be ascending");
  if (int64_t(codebook.chol.size()) != L * Hkv * D * D || codebook.chol_inv.size() != codebook.chol.size() ||
      int64_t(codebook.centroids.size()) != L * Hkv * C * D ||
      int64_t(codebook.inv_freq.size()) * 2 != shape.rotary_dim)
    fail("codebook arrays do not match the store's layers, heads and head_dim");
}

RotaryParams key_rotation(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t num_new,
                          int64_t head_dim) {
  const int64_t Hkv = num_kv_heads, D = head_dim;
  RotaryParams rp;
  rp.batch = batch;
  rp.num_heads = Hkv;
  rp.num_tokens = num_new;
  rp.head_dim = D;
  rp.rotary_dim = shape.rotary_dim;
  rp.interleaved = shape.interleaved;
  rp.dtype = DType::kFloat32;
  rp.pos_dtype = DType::kInt64;
  rp.x_stride[0] = rp.out_stride[0] = Hkv * num_new * D;
  rp.x_stride[1] = rp.out_stride[1] = num_new * D;
  rp.x_stride[2] = rp.out_stride[2] = D;
  rp.pos_stride[0] = num_new;
  rp.pos_stride[1] = 1;
  return rp;
}

RotaryParams query_rotation(const PipelineShape& shape, int64_t batch, int64_t head_dim, int64_t num_bins) {
  const int64_t Hq = shape.num_q_heads, D = head_dim, NB = num_bins;
  RotaryParams rp;
  rp.batch = batch;
  rp.num_heads = Hq;
  rp.num_tokens = NB;
  rp.head_dim = D;
  rp.rotary_dim = shape.rotary_dim;
  rp.interleaved = shape.interleaved;
  rp.dtype = DType::kFloat32;
  rp.pos_dtype = DType::kInt64;
  rp.x_stride[0] = Hq * D;
  rp.x_stride[1] = D;
  rp.x_stride[2] = 0;  // one query, NB rotations
  rp.out_stride[0] = Hq * NB * D;
  rp.out_stride[1] = NB * D;
  rp.out_stride[2] = D;
  rp.pos_stride[0] = NB;
  rp.pos_stride[1] = 1;
  return rp;
}

VQEncodeParams key_encoding(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t num_new,
                            int64_t head_dim) {
  const int64_t Hkv = num_kv_heads, D = head_dim, M = shape.num_subspaces;
  VQEncodeParams ep;
  ep.batch = batch;
  ep.num_kv_heads = Hkv;
  ep.num_tokens = num_new;
  ep.head_dim = D;
  ep.num_subspaces = M;
  ep.num_centroids = shape.num_centroids;
  ep.dtype = DType::kFloat32;
  ep.x_stride[0] = Hkv * num_new * D;
  ep.x_stride[1] = num_new * D;
  ep.x_stride[2] = D;
  ep.codes_stride[0] = Hkv * num_new * M;
  ep.codes_stride[1] = num_new * M;
  ep.codes_stride[2] = M;
  return ep;
}

LutScoresParams scoring(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t head_dim,
                        int64_t capacity, int64_t num_bins) {
  const int64_t Hkv = num_kv_heads, D = head_dim, M = shape.num_subspaces, Hq = shape.num_q_heads, NB = num_bins;
  LutScoresParams lp;
  lp.batch = batch;
  lp.num_q_heads = Hq;
  lp.num_kv_heads = Hkv;
  lp.head_dim = D;
  lp.num_subspaces = M;
  lp.num_centroids = shape.num_centroids;
  lp.capacity = capacity;
  lp.num_bins = NB;
  lp.q_stride[0] = Hq * NB * D;
  lp.q_stride[1] = NB * D;
  lp.q_stride[2] = D;
  lp.codes_stride[0] = Hkv * capacity * M;
  lp.codes_stride[1] = capacity * M;
  lp.codes_stride[2] = M;
  lp.scores_stride[0] = Hq * capacity;
  lp.scores_stride[1] = capacity;
  return lp;
}

GroupScoresParams grouping(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t capacity) {
  const int64_t Hkv = num_kv_heads, Hq = shape.num_q_heads;
  GroupScoresParams gp;
  gp.batch = batch;
  gp.num_q_heads = Hq;
  gp.group_size = Hq / Hkv;
  gp.capacity = capacity;
  gp.sink = shape.sink;
  gp.window = shape.window;
  gp.scores_stride[0] = Hq * capacity;
  gp.scores_stride[1] = capacity;
  gp.out_stride[0] = Hkv * capacity;
  gp.out_stride[1] = capacity;
  return gp;
}

SelectTopkParams selection(const PipelineShape& shape, int64_t batch, int64_t num_kv_heads, int64_t capacity, int64_t k,
                           int64_t max_selected, bool add_resident) {
  const int64_t Hkv = num_kv_heads;
  // Per KV head, the selection runs on the grouped rows: one "query head" per KV head.
  const int64_t Hq = shape.budget_per_kv_head ? Hkv : shape.num_q_heads;
  SelectTopkParams sp;
  sp.batch = batch;
  sp.num_q_heads = Hq;
  sp.group_size = Hq / Hkv;
  sp.capacity = capacity;
  sp.k = k;
  sp.sink = shape.sink;
  sp.window = shape.window;
  sp.max_selected = max_selected;
  sp.add_resident = add_resident;
  sp.scores_stride[0] = Hq * capacity;
  sp.scores_stride[1] = capacity;
  sp.indices_stride[0] = Hkv * max_selected;
  sp.indices_stride[1] = max_selected;
  sp.counts_stride[0] = Hkv;
  sp.counts_stride[1] = 1;
  return sp;
}

KVStore::AttendParams attending(const PipelineShape& shape, int64_t num_queries, int64_t num_kv_heads, int64_t head_dim,
                                int64_t max_selected, float scale) {
  const int64_t Hq = shape.num_q_heads, Hkv = num_kv_heads, D = head_dim;
  KVStore::AttendParams ap;
  ap.num_queries = num_queries;
  ap.group_size = Hq / Hkv;
  ap.scale = scale;
  ap.q_stride[0] = Hq * D;
  ap.q_stride[1] = D;
  ap.indices_stride[0] = Hkv * max_selected;
  ap.indices_stride[1] = max_selected;
  ap.counts_stride[0] = Hkv;
  ap.counts_stride[1] = 1;
  ap.out_stride[0] = Hq * D;
  ap.out_stride[1] = D;
  ap.lse_stride[0] = Hq;
  ap.lse_stride[1] = 1;
  return ap;
}

}  // namespace steps

using steps::grow;
using steps::kMaxSelected;

PipelineBase::PipelineBase(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook)
    : store_(store), shape_(shape), codebook_(std::move(codebook)) {
  steps::check_setup(store, shape_, codebook_);
  const int64_t L = store.num_layers(), Hkv = store.num_kv_heads(), M = shape.num_subspaces;
  const auto fail = [](const std::string& msg) { throw std::invalid_argument(msg); };
  // Codes exist for exactly the store's rows: rows stored before the pipeline have none.
  for (int64_t layer = 0; layer < L; ++layer)
    for (int64_t b = 0; b < store.batch(); ++b)
      if (store.length(layer, b) != 0)
        fail("store must be empty: the pipeline keeps a code for every row it stores, and layer " +
             std::to_string(layer) + " already holds " + std::to_string(store.length(layer, b)) + " rows");
  int64_t total = 0;
  if (__builtin_mul_overflow(store.batch() * Hkv * store.capacity() * M, L, &total) || total > (int64_t(1) << 40))
    fail("the codes of this store would not fit in memory");
  decoded_.assign(size_t(L), 0);
}

void PipelineBase::plan(int64_t k) {
  const int64_t L = store_.num_layers(), B = store_.batch();
  if (k < 0 || k > kMaxSelected) throw std::invalid_argument("k must be in [0, 2^30], got " + std::to_string(k));
  const int64_t max_selected = (shape_.budget_per_kv_head ? 1 : group_size()) * k + shape_.sink + shape_.window;
  if (max_selected > kMaxSelected)
    throw std::invalid_argument(std::string(shape_.budget_per_kv_head ? "k" : "group_size * k") +
                                " + sink + window must be <= 2^30, got " + std::to_string(max_selected));
  for (int64_t layer = 0; layer < L; ++layer)
    for (int64_t b = 0; b < B; ++b)
      if (store_.length(layer, b) != store_.length(0, b))
        throw std::invalid_argument("the layers hold different rows (layer 0 holds " +
                                    std::to_string(store_.length(0, b)) + " of batch row " + std::to_string(b) +
                                    ", layer " + std::to_string(layer) + " holds " +
                                    std::to_string(store_.length(layer, b)) +
                                    "): an earlier step stopped inside the model; reset() and prefill again");
  for (int64_t b = 0; b < B; ++b)
    if (store_.length(0, b) + 1 > store_.capacity())
      throw std::invalid_argument("capacity exceeded: batch row " + std::to_string(b) + " holds " +
                                  std::to_string(store_.length(0, b)) + " rows, the store " +
                                  std::to_string(store_.capacity()));
  step_lengths_.resize(size_t(B));
  for (int64_t b = 0; b < B; ++b) step_lengths_[size_t(b)] = int32_t(store_.length(0, b) + 1);
  std::fill(decoded_.begin(), decoded_.end(), 0);
  k_ = k;
  max_selected_ = max_selected;
  planned_ = true;
}

void PipelineBase::check_prefill() const {
  if (planned_)
    throw std::invalid_argument("prefill during a planned decode step: finish the step's layers or reset()");
}

void PipelineBase::check_decode(int64_t layer) const {
  const int64_t L = store_.num_layers(), B = store_.batch();
  if (layer < 0 || layer >= L)
    throw std::invalid_argument("layer must be in [0, " + std::to_string(L) + "), got " + std::to_string(layer));
  if (!planned_) throw std::invalid_argument("decode before plan(): plan each step once, then decode its layers");
  if (decoded_[size_t(layer)])
    throw std::invalid_argument("layer " + std::to_string(layer) +
                                " was already decoded in this step; plan() the next");
  for (int64_t b = 0; b < B; ++b)
    if (store_.length(layer, b) + 1 != step_lengths_[size_t(b)])
      throw std::invalid_argument("layer " + std::to_string(layer) + " holds " +
                                  std::to_string(store_.length(layer, b)) + " rows of batch row " + std::to_string(b) +
                                  " but this step planned " + std::to_string(step_lengths_[size_t(b)] - 1) +
                                  "; reset() and prefill again");
}

void PipelineBase::finish_decode(int64_t layer) {
  decoded_[size_t(layer)] = 1;
  if (std::all_of(decoded_.begin(), decoded_.end(), [](char d) { return d != 0; })) planned_ = false;
}

void PipelineBase::count_step(const int32_t* selected, bool include_resident) {
  const int64_t B = store_.batch(), Hkv = store_.num_kv_heads();
  stats_.decode_calls += 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = step_lengths_[size_t(b)];
    const int64_t resident = std::min(n, shape_.sink + shape_.window);  // the sink and window rows
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t count = selected[b * Hkv + g];
      const int64_t fetched = include_resident ? count - std::min(count, resident) : count;
      stats_.rows_read += fetched + resident;
      stats_.rows_fetched += fetched;
    }
    stats_.rows_cached += n * Hkv;
  }
}

RotaryParams PipelineBase::key_rotation(int64_t num_new) const {
  return steps::key_rotation(shape_, store_.batch(), store_.num_kv_heads(), num_new, store_.head_dim());
}

RotaryParams PipelineBase::query_rotation() const {
  return steps::query_rotation(shape_, store_.batch(), store_.head_dim(), num_bins());
}

VQEncodeParams PipelineBase::key_encoding(int64_t num_new) const {
  return steps::key_encoding(shape_, store_.batch(), store_.num_kv_heads(), num_new, store_.head_dim());
}

LutScoresParams PipelineBase::scoring() const {
  return steps::scoring(shape_, store_.batch(), store_.num_kv_heads(), store_.head_dim(), store_.capacity(),
                        num_bins());
}

GroupScoresParams PipelineBase::grouping() const {
  return steps::grouping(shape_, store_.batch(), store_.num_kv_heads(), store_.capacity());
}

SelectTopkParams PipelineBase::selection(int64_t max_selected, bool add_resident) const {
  return steps::selection(shape_, store_.batch(), store_.num_kv_heads(), store_.capacity(), k_, max_selected,
                          add_resident);
}

void PipelineBase::forget_plan() {
  planned_ = false;
  std::fill(decoded_.begin(), decoded_.end(), 0);
}

Pipeline::Pipeline(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook)
    : PipelineBase(store, shape, std::move(codebook)) {
  layer_codes_ = store.batch() * store.num_kv_heads() * store.capacity() * shape.num_subspaces;
  codes_.assign(size_t(layer_codes_ * store.num_layers()), 0);
}

void Pipeline::encode_and_append(int64_t layer, const ConstRows& k, const ConstRows& v, int64_t num_new,
                                 const int64_t* positions, const int64_t pos_stride[2], const int32_t* num_tokens) {
  store_.check_append(layer, num_new, num_tokens);  // throws before anything changes
  const int64_t B = store_.batch(), Hkv = store_.num_kv_heads(), D = store_.head_dim(), M = shape_.num_subspaces;
  const int64_t rows = B * Hkv * num_new;
  grow(keys_, rows * D);
  grow(whitened_, rows * D);
  grow(rotate_by_, B * num_new);
  grow(new_codes_, rows * M);
  // Pre-RoPE keys: rotated back by their positions, in float32.
  steps::to_f32(k, store_.dtype(), B, Hkv, num_new, D, keys_.data());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < num_new; ++t)
      rotate_by_[size_t(b * num_new + t)] = -positions[b * pos_stride[0] + t * pos_stride[1]];
  rotary_cpu(keys_.data(), keys_.data(), rotate_by_.data(), codebook_.inv_freq.data(), key_rotation(num_new));
  // Whitened by the layer's L (one per KV head), then the nearest centroid.
  const float* chol = codebook_.chol.data() + layer * Hkv * D * D;
  steps::rows_times_matrix(keys_.data(), chol, rows, num_new, Hkv, D, false, whitened_.data());
  const float* centroids = codebook_.centroids.data() + layer * Hkv * shape_.num_centroids * D;
  vq_encode_cpu(whitened_.data(), centroids, new_codes_.data(), key_encoding(num_new));
  // Codes go where the store puts the rows: after each row's current length.
  const int64_t capacity = store_.capacity();
  int16_t* codes = codes_.data() + layer * layer_codes_;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = num_tokens ? num_tokens[b] : num_new, start = store_.length(layer, b);
    if (n == 0) continue;  // nothing to copy (and new_codes_ may still be empty: no null memcpy)
    for (int64_t g = 0; g < Hkv; ++g)
      std::memcpy(codes + ((b * Hkv + g) * capacity + start) * M, new_codes_.data() + (b * Hkv + g) * num_new * M,
                  size_t(n * M) * sizeof(int16_t));
  }
  RowsView kv{const_cast<void*>(k.data), {k.stride[0], k.stride[1], k.stride[2]}};
  RowsView vv{const_cast<void*>(v.data), {v.stride[0], v.stride[1], v.stride[2]}};
  store_.append(layer, kv, vv, num_new, num_tokens);
}

void Pipeline::prefill(int64_t layer, const ConstRows& k, const ConstRows& v, int64_t num_new, const int64_t* positions,
                       const int64_t pos_stride[2], const int32_t* num_tokens) {
  check_prefill();
  encode_and_append(layer, k, v, num_new, positions, pos_stride, num_tokens);
}

void Pipeline::decode(int64_t layer, const ConstRows& q, const ConstRows& k, const ConstRows& v,
                      const int64_t* positions, int64_t pos_stride, float scale, void* out,
                      const int64_t out_stride[2]) {
  const int64_t B = store_.batch(), Hkv = store_.num_kv_heads(), D = store_.head_dim();
  const int64_t Hq = shape_.num_q_heads, group = Hq / Hkv, M = shape_.num_subspaces, NB = num_bins();
  check_decode(layer);
  // Every buffer first: an allocation that fails must leave the store as it was.
  const int64_t capacity = store_.capacity();
  grow(q_, B * Hq * D);
  grow(q_wrope_, B * Hq * NB * D);
  grow(q_dual_, B * Hq * NB * D);
  grow(rotate_by_, std::max(B * NB, B));
  grow(scores_, B * Hq * capacity);
  if (shape_.budget_per_kv_head) grow(grouped_, B * Hkv * capacity);
  grow(indices_, B * Hkv * max_selected_);
  grow(counts_, B * Hkv);
  grow(out_, B * Hq * D);
  grow(lse_, B * Hq);
  grow(keys_, B * Hkv * D);
  grow(whitened_, B * Hkv * D);
  grow(new_codes_, B * Hkv * M);
  const int64_t pos2[2] = {pos_stride, 0};
  encode_and_append(layer, k, v, 1, positions, pos2, nullptr);
  finish_decode(layer);

  // The exact query in float32, and its WRoPE forms: bin j moved to distance wrope_distances[j].
  steps::to_f32(ConstRows{q.data, {q.stride[0], q.stride[1], 0}}, store_.dtype(), B, Hq, 1, D, q_.data());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < NB; ++j)
      rotate_by_[size_t(b * NB + j)] = codebook_.wrope_distances[size_t(j)] - positions[b * pos_stride];
  rotary_cpu(q_.data(), q_wrope_.data(), rotate_by_.data(), codebook_.inv_freq.data(), query_rotation());
  // Into the dual space of each query head's KV head: q' = L^-1 q_w.
  const float* chol_inv = codebook_.chol_inv.data() + layer * Hkv * D * D;
  steps::rows_times_matrix(q_wrope_.data(), chol_inv, B * Hq * NB, group * NB, Hkv, D, true, q_dual_.data());

  // Scores of every stored token from the codes, then the selection.
  const LutScoresParams lp = scoring();
  const float* centroids = codebook_.centroids.data() + layer * Hkv * shape_.num_centroids * D;
  lut_scores_cpu(q_dual_.data(), centroids, codes(layer), step_lengths_.data(),
                 NB > 1 ? codebook_.bin_edges.data() : nullptr, scores_.data(), lp);
  const float* selected_from = scores_.data();
  if (shape_.budget_per_kv_head) {
    group_scores_cpu(scores_.data(), step_lengths_.data(), grouped_.data(), grouping());
    selected_from = grouped_.data();
  }
  const SelectTopkParams sp = selection(max_selected_, true);
  select_topk_cpu(selected_from, step_lengths_.data(), indices_.data(), counts_.data(), sp);
  last_max_selected_ = max_selected_;

  // Exact attention with the model's own query over the selected rows (sink and window
  // included), read straight from the store.
  const KVStore::AttendParams ap = steps::attending(shape_, B, Hkv, D, max_selected_, scale);
  store_.attend(layer, q_.data(), indices_.data(), counts_.data(), out_.data(), lse_.data(), ap);
  steps::from_f32(out_.data(), store_.dtype(), B, Hq, D, out, out_stride);

  count_step(counts_.data(), true);
}

void Pipeline::reset() {
  store_.reset();
  forget_plan();
}

}  // namespace a2ats
