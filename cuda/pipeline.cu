// CudaPipeline: the decode step of a2ats_cuda.h, composed of the CUDA kernels of this folder
// plus the small kernels below (conversions, rotations, the per-head matrices, code and
// resident-row placement). Its specification is the CPU Pipeline (cpp/src/pipeline.cpp) with the
// sink and window rows read from the device instead of the host store.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "a2ats_cuda.h"
#include "cuda_common.cuh"
#include "pipeline_steps.cuh"

namespace a2ats {
namespace {

using namespace cuda_detail;
using namespace cuda_steps;

constexpr int kThreads = 128;

// New codes (B, Hkv, t, M) into the layer's codes (B, Hkv, capacity, M) after each row's start;
// rows t >= num_new[b] are not stored. One block per (b, g).
__global__ void __launch_bounds__(kThreads)
    place_codes_kernel(const int16_t* __restrict__ new_codes, int64_t t, int64_t M, int64_t num_kv_heads,
                       int64_t capacity, const int32_t* __restrict__ starts, const int32_t* __restrict__ num_new,
                       int16_t* __restrict__ codes) {
  const int64_t bg = blockIdx.x, b = bg / num_kv_heads;
  const int64_t n = min(int64_t(num_new[b]), t);
  int16_t* to = codes + (bg * capacity + starts[b]) * M;
  const int16_t* from = new_codes + bg * t * M;
  for (int64_t e = threadIdx.x; e < n * M; e += kThreads) to[e] = from[e];
}

// Rows n = starts[b] + i (i < num_new[b]) of k, v (B, Hkv, t, D) into their resident slots (see
// a2ats_cuda.h); rows that leave the window within this append are skipped. Grid (B * Hkv, t).
__global__ void __launch_bounds__(kThreads)
    place_resident_kernel(const char* __restrict__ k, const char* __restrict__ v, int64_t ks0, int64_t ks1, int64_t ks2,
                          int64_t vs0, int64_t vs1, int64_t vs2, int64_t num_kv_heads, int64_t row_bytes, int64_t elem,
                          int64_t sink, int64_t window, const int32_t* __restrict__ starts,
                          const int32_t* __restrict__ num_new, char* __restrict__ resident_k,
                          char* __restrict__ resident_v) {
  const int64_t bg = blockIdx.x, i = blockIdx.y, b = bg / num_kv_heads, g = bg % num_kv_heads;
  if (i >= num_new[b]) return;
  const int64_t n = starts[b] + i, end = starts[b] + num_new[b];
  int64_t slot = -1;
  if (n < sink)
    slot = n;
  else if (n >= end - window)
    slot = sink + (n - sink) % window;
  if (slot < 0) return;
  const int64_t slots = sink + window;
  const uint16_t* src_k = reinterpret_cast<const uint16_t*>(k + (b * ks0 + g * ks1 + i * ks2) * elem);
  const uint16_t* src_v = reinterpret_cast<const uint16_t*>(v + (b * vs0 + g * vs1 + i * vs2) * elem);
  uint16_t* dst_k = reinterpret_cast<uint16_t*>(resident_k + (bg * slots + slot) * row_bytes);
  uint16_t* dst_v = reinterpret_cast<uint16_t*>(resident_v + (bg * slots + slot) * row_bytes);
  for (int64_t e = threadIdx.x; e < row_bytes / 2; e += kThreads) {  // rows are whole 2-byte units
    dst_k[e] = src_k[e];
    dst_v[e] = src_v[e];
  }
}

}  // namespace

CudaPipeline::CudaPipeline(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook)
    : PipelineBase(store, shape, std::move(codebook)) {
  cudaError_t err = cudaGetDevice(&device_);
  if (err == cudaSuccess) err = allocate();
  if (err != cudaSuccess) {
    release();
    cudaGetLastError();
    throw std::runtime_error(failure("allocating device memory", err));
  }
}

CudaPipeline::~CudaPipeline() { release(); }

cudaError_t CudaPipeline::allocate() {
  const int64_t L = store_.num_layers(), B = store_.batch(), Hkv = store_.num_kv_heads(), D = store_.head_dim();
  const int64_t Hq = shape_.num_q_heads, M = shape_.num_subspaces, NB = num_bins(), cap = store_.capacity();
  const int64_t elem = dtype_size(store_.dtype());
  layer_codes_ = B * Hkv * cap * M;
  resident_rows_ = shape_.sink + shape_.window;
  layer_resident_ = B * Hkv * resident_rows_ * D;
  A2ATS_CUDA_TRY(book_.upload(codebook_));
  A2ATS_CUDA_TRY(device_alloc(&codes_, L * layer_codes_));
  A2ATS_CUDA_TRY(device_alloc(&resident_k_, L * layer_resident_ * elem));
  A2ATS_CUDA_TRY(device_alloc(&resident_v_, L * layer_resident_ * elem));
  A2ATS_CUDA_TRY(device_alloc(&meta_, 4 * B));
  A2ATS_CUDA_TRY(device_alloc(&q_, B * Hq * D));
  A2ATS_CUDA_TRY(device_alloc(&q_wrope_, B * Hq * NB * D));
  A2ATS_CUDA_TRY(device_alloc(&q_dual_, B * Hq * NB * D));
  A2ATS_CUDA_TRY(device_alloc(&rotate_by_, B * NB));
  A2ATS_CUDA_TRY(device_alloc(&keys_, B * Hkv * D));
  A2ATS_CUDA_TRY(device_alloc(&whitened_, B * Hkv * D));
  A2ATS_CUDA_TRY(device_alloc(&new_codes_, B * Hkv * M));
  A2ATS_CUDA_TRY(device_alloc(&scores_, B * Hq * cap));
  if (shape_.budget_per_kv_head) A2ATS_CUDA_TRY(device_alloc(&grouped_, B * Hkv * cap));
  A2ATS_CUDA_TRY(device_alloc(&out_middle_, B * Hq * D));
  A2ATS_CUDA_TRY(device_alloc(&lse_middle_, B * Hq));
  A2ATS_CUDA_TRY(device_alloc(&out_resident_, B * Hq * D));
  A2ATS_CUDA_TRY(device_alloc(&lse_resident_, B * Hq));
  A2ATS_CUDA_TRY(device_alloc(&counts_, B * Hkv));
  host_meta_.assign(size_t(4 * B), 0);
  host_counts_.assign(size_t(B * Hkv), 0);
  return cudaSuccess;
}

void CudaPipeline::release() {
  OnDevice on(device_);
  // Decode steps leave rows in flight to the host store, which may be freed after us.
  if (has_stream_) cudaDeviceSynchronize();
  book_.release();
  device_free(codes_);
  device_free(resident_k_);
  device_free(resident_v_);
  device_free(meta_);
  device_free(q_);
  device_free(q_wrope_);
  device_free(q_dual_);
  device_free(rotate_by_);
  device_free(keys_);
  device_free(whitened_);
  device_free(new_codes_);
  device_free(scores_);
  device_free(grouped_);
  device_free(out_middle_);
  device_free(lse_middle_);
  device_free(out_resident_);
  device_free(lse_resident_);
  device_free(indices_);
  device_free(counts_);
  device_free(gathered_k_);
  device_free(gathered_v_);
  cudaGetLastError();  // teardown errors (e.g. at process exit) are not reported
}

const void* CudaPipeline::resident_k(int64_t layer) const {
  return resident_k_ + layer * layer_resident_ * dtype_size(store_.dtype());
}
const void* CudaPipeline::resident_v(int64_t layer) const {
  return resident_v_ + layer * layer_resident_ * dtype_size(store_.dtype());
}

// Selection buffers for max_middle() rows per KV head; they only grow (plans of a run mostly repeat).
cudaError_t CudaPipeline::ensure_selection(int64_t max_middle) {
  if (max_middle <= selection_capacity_) return cudaSuccess;
  const int64_t B = store_.batch(), Hkv = store_.num_kv_heads(), D = store_.head_dim();
  device_free(indices_);
  device_free(gathered_k_);
  device_free(gathered_v_);
  selection_capacity_ = -1;
  const int64_t rows = B * Hkv * max_middle * D * dtype_size(store_.dtype());
  A2ATS_CUDA_TRY(device_alloc(&indices_, B * Hkv * max_middle));
  A2ATS_CUDA_TRY(device_alloc(&gathered_k_, rows));
  A2ATS_CUDA_TRY(device_alloc(&gathered_v_, rows));
  selection_capacity_ = max_middle;
  return cudaSuccess;
}

// Stores num_new[b] rows per batch row after its current length: the host store (asynchronously
// when decoding), the resident rows, and the codes of the un-rotated, whitened keys.
cudaError_t CudaPipeline::encode_and_store(int64_t layer, const ConstRows& k, const ConstRows& v, int64_t num_new,
                                           const int64_t* positions, const int64_t pos_stride[2],
                                           const int32_t* num_tokens, bool decoding, cudaStream_t stream) {
  store_.check_append(layer, num_new, num_tokens);  // throws before anything changes
  const int64_t B = store_.batch(), Hkv = store_.num_kv_heads(), D = store_.head_dim(), M = shape_.num_subspaces;
  const int64_t elem = dtype_size(store_.dtype()), rows = B * Hkv * num_new;
  if (num_new == 0) return cudaSuccess;
  if (num_new > 65535) return cudaErrorInvalidConfiguration;  // grid.y of place_resident_kernel
  // Per-row starts and counts on the device (the decode plan uploaded them already).
  int32_t* starts = meta_ + B;
  int32_t* counts = meta_ + 3 * B;
  if (!decoding) {
    for (int64_t b = 0; b < B; ++b) {
      host_meta_[size_t(B + b)] = int32_t(store_.length(layer, b));
      host_meta_[size_t(3 * B + b)] = num_tokens ? num_tokens[b] : int32_t(num_new);
    }
    A2ATS_CUDA_TRY(
        cudaMemcpyAsync(starts, host_meta_.data() + B, size_t(B) * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    A2ATS_CUDA_TRY(cudaMemcpyAsync(counts, host_meta_.data() + 3 * B, size_t(B) * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
  }
  // Prefill chunks are large: their intermediates come from the stream-ordered pool.
  Scratch scratch(stream);
  float* keys = keys_;
  float* whitened = whitened_;
  int16_t* new_codes = new_codes_;
  int64_t* rotate_by = rotate_by_;
  if (!decoding) {
    const size_t f32_bytes = align_up(size_t(rows * D) * sizeof(float));
    const size_t code_bytes = align_up(size_t(rows * M) * sizeof(int16_t));
    A2ATS_CUDA_TRY(scratch.allocate(2 * f32_bytes + code_bytes + size_t(B * num_new) * sizeof(int64_t)));
    char* base = scratch.get<char>();
    keys = reinterpret_cast<float*>(base);
    whitened = reinterpret_cast<float*>(base + f32_bytes);
    new_codes = reinterpret_cast<int16_t*>(base + 2 * f32_bytes);
    rotate_by = reinterpret_cast<int64_t*>(base + 2 * f32_bytes + code_bytes);
  }
  // Pre-RoPE keys in f32, whitened by the layer's L per KV head, then the nearest centroids.
  A2ATS_CUDA_TRY(to_f32(k, store_.dtype(), B, Hkv, num_new, D, keys, stream));
  A2ATS_CUDA_TRY(rotations(positions, pos_stride[0], pos_stride[1], B, num_new, nullptr, rotate_by, stream));
  A2ATS_CUDA_TRY(rotary_cuda(keys, keys, rotate_by, book_.inv_freq.get(), key_rotation(num_new), stream));
  A2ATS_CUDA_TRY(
      rows_times_matrix(keys, book_.chol.get() + layer * Hkv * D * D, rows, num_new, Hkv, D, false, whitened, stream));
  const float* centroids = book_.centroids.get() + layer * Hkv * shape_.num_centroids * D;
  A2ATS_CUDA_TRY(vq_encode_cuda(whitened, centroids, new_codes, key_encoding(num_new), stream));
  place_codes_kernel<<<unsigned(B * Hkv), kThreads, 0, stream>>>(new_codes, num_new, M, Hkv, store_.capacity(), starts,
                                                                 counts, codes_ + layer * layer_codes_);
  A2ATS_CUDA_TRY(cudaGetLastError());
  char* res_k = resident_k_ + layer * layer_resident_ * elem;
  char* res_v = resident_v_ + layer * layer_resident_ * elem;
  place_resident_kernel<<<dim3(unsigned(B * Hkv), unsigned(num_new)), kThreads, 0, stream>>>(
      static_cast<const char*>(k.data), static_cast<const char*>(v.data), k.stride[0], k.stride[1], k.stride[2],
      v.stride[0], v.stride[1], v.stride[2], Hkv, store_.row_bytes(), elem, shape_.sink, shape_.window, starts, counts,
      res_k, res_v);
  A2ATS_CUDA_TRY(cudaGetLastError());
  // The full rows to the host store; a prefill waits for them, a decode step leaves them in
  // flight (the next host read of the store, the gather's index copy, synchronises after them).
  RowsView kv{const_cast<void*>(k.data), {k.stride[0], k.stride[1], k.stride[2]}};
  RowsView vv{const_cast<void*>(v.data), {v.stride[0], v.stride[1], v.stride[2]}};
  A2ATS_CUDA_TRY(kv_append_cuda(store_, layer, kv, vv, num_new, num_tokens, stream, !decoding));
  store_.commit_append(layer, num_new, num_tokens);
  return cudaSuccess;
}

// Rows that earlier calls left in flight to the host store on another stream must land before
// work on `stream` reads the store.
cudaError_t CudaPipeline::switch_stream(cudaStream_t stream) {
  if (has_stream_ && last_stream_ != stream) A2ATS_CUDA_TRY(cudaStreamSynchronize(last_stream_));
  last_stream_ = stream;
  has_stream_ = true;
  return cudaSuccess;
}

cudaError_t CudaPipeline::prefill(int64_t layer, const ConstRows& k, const ConstRows& v, int64_t num_new,
                                  const int64_t* positions, const int64_t pos_stride[2], const int32_t* num_tokens,
                                  cudaStream_t stream) {
  check_prefill();
  A2ATS_CUDA_TRY(switch_stream(stream));
  return encode_and_store(layer, k, v, num_new, positions, pos_stride, num_tokens, false, stream);
}

cudaError_t CudaPipeline::decode(int64_t layer, const ConstRows& q, const ConstRows& k, const ConstRows& v,
                                 const int64_t* positions, int64_t pos_stride, float scale, void* out,
                                 const int64_t out_stride[2], cudaStream_t stream) {
  const int64_t B = store_.batch(), Hkv = store_.num_kv_heads(), D = store_.head_dim();
  const int64_t Hq = shape_.num_q_heads, group = group_size(), NB = num_bins(), cap = store_.capacity();
  check_decode(layer);
  const int64_t max_middle = this->max_middle();
  A2ATS_CUDA_TRY(ensure_selection(max_middle));
  int32_t* lengths = meta_;
  int32_t* resident_counts = meta_ + 2 * B;
  A2ATS_CUDA_TRY(switch_stream(stream));
  if (!plan_uploaded_) {
    // Once per step: lengths after the append, the append's starts, resident counts, one new row each.
    for (int64_t b = 0; b < B; ++b) {
      const int32_t n = step_lengths_[size_t(b)];
      host_meta_[size_t(b)] = n;
      host_meta_[size_t(B + b)] = n - 1;
      host_meta_[size_t(2 * B + b)] = int32_t(std::min<int64_t>(n, resident_rows_));
      host_meta_[size_t(3 * B + b)] = 1;
    }
    // Pageable source: staged before the call returns, so host_meta_ may change right after.
    A2ATS_CUDA_TRY(
        cudaMemcpyAsync(meta_, host_meta_.data(), host_meta_.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    plan_uploaded_ = true;
  }
  const int64_t pos2[2] = {pos_stride, 0};
  A2ATS_CUDA_TRY(encode_and_store(layer, k, v, 1, positions, pos2, nullptr, true, stream));
  finish_decode(layer);

  // The exact query in f32, its WRoPE forms (bin j at distance wrope_distances[j]) and their duals.
  A2ATS_CUDA_TRY(to_f32(ConstRows{q.data, {q.stride[0], q.stride[1], 0}}, store_.dtype(), B, Hq, 1, D, q_, stream));
  A2ATS_CUDA_TRY(rotations(positions, pos_stride, 0, B, NB, book_.wrope_distances.get(), rotate_by_, stream));
  A2ATS_CUDA_TRY(rotary_cuda(q_, q_wrope_, rotate_by_, book_.inv_freq.get(), query_rotation(), stream));
  A2ATS_CUDA_TRY(rows_times_matrix(q_wrope_, book_.chol_inv.get() + layer * Hkv * D * D, B * Hq * NB, group * NB, Hkv,
                                   D, true, q_dual_, stream));

  // Scores of every stored token from the codes; k middle rows per query head, united per KV head.
  A2ATS_CUDA_TRY(lut_scores_cuda(q_dual_, book_.centroids.get() + layer * Hkv * shape_.num_centroids * D, codes(layer),
                                 lengths, NB > 1 ? book_.bin_edges.get() : nullptr, scores_, scoring(), stream));
  const SelectTopkParams sp = selection(max_middle, false);  // sink and window are on the device already
  const float* selected_from = scores_;
  if (shape_.budget_per_kv_head) {
    A2ATS_CUDA_TRY(group_scores_cuda(scores_, lengths, grouped_, grouping(), stream));
    selected_from = grouped_;
  }
  A2ATS_CUDA_TRY(select_topk_cuda(selected_from, lengths, indices_, counts_, sp, stream));
  last_max_selected_ = max_middle;

  // The middle rows from the host store: the layer's one host synchronisation. None when k == 0.
  const RowsView gk{gathered_k_, {Hkv * max_middle * D, max_middle * D, D}};
  const RowsView gv{gathered_v_, {Hkv * max_middle * D, max_middle * D, D}};
  if (max_middle > 0) {
    A2ATS_CUDA_TRY(kv_gather_cuda(store_, layer, indices_, sp.indices_stride, true, counts_, sp.counts_stride, gk, gv,
                                  max_middle, stream, host_counts_.data()));
  } else {
    std::fill(host_counts_.begin(), host_counts_.end(), 0);
  }

  // Exact attention with the model's query over the middle rows and over the resident rows.
  AttendRowsParams ap = attending_rows(B, Hq, group, D, max_middle, scale, store_.dtype());
  A2ATS_CUDA_TRY(attend_rows_cuda(q_, gathered_k_, gathered_v_, counts_, out_middle_, lse_middle_, ap, stream));
  ap.max_rows = resident_rows_;
  ap.rows_stride[0] = Hkv * resident_rows_ * D;
  ap.rows_stride[1] = resident_rows_ * D;
  ap.counts_stride[0] = 1;
  ap.counts_stride[1] = 0;  // one count per batch row
  A2ATS_CUDA_TRY(attend_rows_cuda(q_, resident_k(layer), resident_v(layer), resident_counts, out_resident_,
                                  lse_resident_, ap, stream));
  MergeAttentionParams mp;
  mp.batch = B;
  mp.num_heads = Hq;
  mp.head_dim = D;
  mp.dtype = store_.dtype();
  mp.out_a_stride[0] = mp.out_b_stride[0] = Hq * D;
  mp.out_a_stride[1] = mp.out_b_stride[1] = D;
  mp.lse_a_stride[0] = mp.lse_b_stride[0] = Hq;
  mp.lse_a_stride[1] = mp.lse_b_stride[1] = 1;
  mp.out_stride[0] = out_stride[0];
  mp.out_stride[1] = out_stride[1];
  A2ATS_CUDA_TRY(merge_attention_cuda(out_middle_, lse_middle_, out_resident_, lse_resident_, out, mp, stream));
  count_step(host_counts_.data(), false);
  return cudaSuccess;
}

void CudaPipeline::plan(int64_t k) {
  PipelineBase::plan(k);
  plan_uploaded_ = false;
}

void CudaPipeline::reset() {
  if (has_stream_) cudaStreamSynchronize(last_stream_);  // no row in flight lands after the reset
  store_.reset();
  forget_plan();
  plan_uploaded_ = false;
}

}  // namespace a2ats
