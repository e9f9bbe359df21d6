// CudaPagedPipeline: the paged decode step of a2ats_cuda.h, composed of the CUDA kernels of this
// folder plus the two placements below. Its specification is the CPU PagedPipeline
// (cpp/src/paged_pipeline.cpp); the shared checks, plan and parameters are PagedPipelineBase's.
#include <algorithm>
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

// New codes (n, Hkv, M) to their slots of the paged codes; slots < 0 or past num_slots are
// skipped. One block per key.
__global__ void __launch_bounds__(kThreads)
    place_paged_codes_kernel(const int16_t* __restrict__ new_codes, const int64_t* __restrict__ slots,
                             int64_t num_kv_heads, int64_t M, PagedCodes codes) {
  const int64_t i = blockIdx.x, slot = slots[i];
  if (slot < 0 || slot >= codes.num_blocks * codes.block_size) return;
  const int64_t block = slot / codes.block_size, offset = slot % codes.block_size;
  for (int64_t e = threadIdx.x; e < num_kv_heads * M; e += kThreads) {
    const int64_t g = e / M, m = e % M;
    codes.data[block * codes.stride[0] + g * codes.stride[1] + offset * codes.stride[2] + m] =
        new_codes[i * num_kv_heads * M + e];
  }
}

// Token indices (N, Hkv, Kmax) to slots through each request's block table; -1 past the count
// and for a block id outside [0, num_blocks) (the gather then refuses it). One block per (i, g).
__global__ void __launch_bounds__(kThreads)
    token_slots_kernel(const int32_t* __restrict__ indices, const int32_t* __restrict__ counts,
                       const int32_t* __restrict__ block_table, int64_t table_stride, int64_t num_kv_heads,
                       int64_t max_selected, int64_t block_size, int64_t num_blocks, int32_t* __restrict__ slots) {
  const int64_t ig = blockIdx.x, i = ig / num_kv_heads;
  const int64_t count = counts[ig];
  const int32_t* table = block_table + i * table_stride;
  for (int64_t j = threadIdx.x; j < max_selected; j += kThreads) {
    int32_t slot = -1;
    if (j < count) {
      const int32_t token = indices[ig * max_selected + j];
      const int64_t block = table[token / block_size];
      if (block >= 0 && block < num_blocks) slot = int32_t(block * block_size + token % block_size);
    }
    slots[ig * max_selected + j] = slot;
  }
}

}  // namespace

CudaPagedPipeline::CudaPagedPipeline(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook)
    : PagedPipelineBase(store, shape, std::move(codebook)) {
  cudaError_t err = cudaGetDevice(&device_);
  if (err == cudaSuccess) err = book_.upload(codebook_);
  if (err != cudaSuccess) {
    release();
    cudaGetLastError();
    throw std::runtime_error(failure("allocating device memory", err));
  }
}

CudaPagedPipeline::~CudaPagedPipeline() { release(); }

void CudaPagedPipeline::release() {
  OnDevice on(device_);
  cudaDeviceSynchronize();  // nothing of ours is still in flight
  book_.release();
  meta_.release();
  rotate_by_.release();
  for (DeviceBuffer<float>* b : {&keys_, &whitened_, &q_, &q_wrope_, &q_dual_, &scores_, &grouped_, &out_, &lse_})
    b->release();
  new_codes_.release();
  for (DeviceBuffer<int32_t>* b : {&indices_, &slots_, &counts_}) b->release();
  gathered_k_.release();
  gathered_v_.release();
  cudaGetLastError();  // teardown errors (e.g. at process exit) are not reported
}

cudaError_t CudaPagedPipeline::encode(int64_t layer, const ConstRows& k, int64_t n, const int64_t* positions,
                                      const int64_t* slots, const PagedCodes& codes, cudaStream_t stream) {
  check_layer(layer);
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (n == 0) return cudaSuccess;
  check_codes(codes);
  if (n > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  const int64_t Hkv = store_.num_kv_heads(), D = store_.head_dim(), M = shape_.num_subspaces, rows = n * Hkv;
  A2ATS_CUDA_TRY(keys_.grow(rows * D));
  A2ATS_CUDA_TRY(whitened_.grow(rows * D));
  A2ATS_CUDA_TRY(rotate_by_.grow(n));
  A2ATS_CUDA_TRY(new_codes_.grow(rows * M));
  // Pre-RoPE keys in f32 (n "batch rows" of one token), whitened by the layer's L per KV head,
  // then the nearest centroids, placed at their slots.
  A2ATS_CUDA_TRY(
      to_f32(ConstRows{k.data, {k.stride[0], k.stride[1], 0}}, store_.dtype(), n, Hkv, 1, D, keys_.get(), stream));
  A2ATS_CUDA_TRY(rotations(positions, 1, 0, n, 1, nullptr, rotate_by_.get(), stream));
  A2ATS_CUDA_TRY(
      rotary_cuda(keys_.get(), keys_.get(), rotate_by_.get(), book_.inv_freq.get(), key_rotation(n), stream));
  A2ATS_CUDA_TRY(rows_times_matrix(keys_.get(), book_.chol.get() + layer * Hkv * D * D, rows, 1, Hkv, D, false,
                                   whitened_.get(), stream));
  const float* centroids = book_.centroids.get() + layer * Hkv * shape_.num_centroids * D;
  A2ATS_CUDA_TRY(vq_encode_cuda(whitened_.get(), centroids, new_codes_.get(), key_encoding(n), stream));
  place_paged_codes_kernel<<<unsigned(n), kThreads, 0, stream>>>(new_codes_.get(), slots, Hkv, M, codes);
  return cudaGetLastError();
}

cudaError_t CudaPagedPipeline::decode(int64_t layer, const ConstRows& q, const PagedRequests& requests,
                                      const PagedCodes& codes, float scale, void* out, const int64_t out_stride[2],
                                      cudaStream_t stream) {
  check_layer(layer);
  last_num_requests_ = 0;
  last_max_selected_ = 0;
  const DecodePlan plan = plan_decode(requests, codes);
  const int64_t N = plan.num_requests;
  if (N == 0) return cudaSuccess;
  const int64_t Hkv = store_.num_kv_heads(), D = store_.head_dim(), Hq = shape_.num_q_heads, G = Hq / Hkv;
  const int64_t NB = num_bins(), Tmax = plan.max_length, Kmax = plan.max_selected;
  const int64_t row_bytes = store_.row_bytes();
  // Every buffer first.
  A2ATS_CUDA_TRY(meta_.grow(2 * N));
  A2ATS_CUDA_TRY(rotate_by_.grow(N * NB));
  A2ATS_CUDA_TRY(q_.grow(N * Hq * D));
  A2ATS_CUDA_TRY(q_wrope_.grow(N * Hq * NB * D));
  A2ATS_CUDA_TRY(q_dual_.grow(N * Hq * NB * D));
  A2ATS_CUDA_TRY(scores_.grow(N * Hq * Tmax));
  if (shape_.budget_per_kv_head) A2ATS_CUDA_TRY(grouped_.grow(N * Hkv * Tmax));
  A2ATS_CUDA_TRY(indices_.grow(N * Hkv * Kmax));
  A2ATS_CUDA_TRY(slots_.grow(N * Hkv * Kmax));
  A2ATS_CUDA_TRY(counts_.grow(N * Hkv));
  A2ATS_CUDA_TRY(gathered_k_.grow(N * Hkv * Kmax * row_bytes));
  A2ATS_CUDA_TRY(gathered_v_.grow(N * Hkv * Kmax * row_bytes));
  A2ATS_CUDA_TRY(out_.grow(N * Hq * D));
  A2ATS_CUDA_TRY(lse_.grow(N * Hq));

  // The step's host plan to the device: lengths, k, and the WRoPE rotations. Pageable sources
  // are staged before each call returns.
  host_meta_.resize(size_t(2 * N));
  std::copy_n(requests.lengths, N, host_meta_.begin());
  std::copy_n(requests.k, N, host_meta_.begin() + N);
  host_rotate_by_.resize(size_t(N * NB));
  wrope_rotations(requests, host_rotate_by_.data());
  A2ATS_CUDA_TRY(
      cudaMemcpyAsync(meta_.get(), host_meta_.data(), size_t(2 * N) * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  A2ATS_CUDA_TRY(cudaMemcpyAsync(rotate_by_.get(), host_rotate_by_.data(), size_t(N * NB) * sizeof(int64_t),
                                 cudaMemcpyHostToDevice, stream));
  const int32_t* lengths = meta_.get();
  PagedRequests on_device = requests;  // the device copies, for the ops' parameters
  on_device.lengths = lengths;
  on_device.k = lengths + N;

  // The exact query in f32, its WRoPE forms and their duals.
  A2ATS_CUDA_TRY(
      to_f32(ConstRows{q.data, {q.stride[0], q.stride[1], 0}}, store_.dtype(), N, Hq, 1, D, q_.get(), stream));
  A2ATS_CUDA_TRY(
      rotary_cuda(q_.get(), q_wrope_.get(), rotate_by_.get(), book_.inv_freq.get(), query_rotation(N), stream));
  A2ATS_CUDA_TRY(rows_times_matrix(q_wrope_.get(), book_.chol_inv.get() + layer * Hkv * D * D, N * Hq * NB, G * NB, Hkv,
                                   D, true, q_dual_.get(), stream));

  // Scores of every context token from the paged codes, then each request's own selection.
  const float* centroids = book_.centroids.get() + layer * Hkv * shape_.num_centroids * D;
  A2ATS_CUDA_TRY(lut_scores_cuda(q_dual_.get(), centroids, codes.data, lengths,
                                 NB > 1 ? book_.bin_edges.get() : nullptr, scores_.get(),
                                 scoring(plan, on_device, codes), stream));
  const float* selected_from = scores_.get();
  if (shape_.budget_per_kv_head) {
    A2ATS_CUDA_TRY(group_scores_cuda(scores_.get(), lengths, grouped_.get(), grouping(plan), stream));
    selected_from = grouped_.get();
  }
  const SelectTopkParams sp = selection(plan, on_device);
  A2ATS_CUDA_TRY(select_topk_cuda(selected_from, lengths, indices_.get(), counts_.get(), sp, stream));
  last_num_requests_ = N;
  last_max_selected_ = Kmax;
  host_counts_.assign(size_t(N * Hkv), 0);
  if (Kmax > 0) {
    token_slots_kernel<<<unsigned(N * Hkv), kThreads, 0, stream>>>(indices_.get(), counts_.get(), requests.block_table,
                                                                   requests.table_stride, Hkv, Kmax, codes.block_size,
                                                                   codes.num_blocks, slots_.get());
    A2ATS_CUDA_TRY(cudaGetLastError());
    // The selected rows from the host store: the call's one host synchronisation.
    const RowsView gk{gathered_k_.get(), {Hkv * Kmax * D, Kmax * D, D}};
    const RowsView gv{gathered_v_.get(), {Hkv * Kmax * D, Kmax * D, D}};
    A2ATS_CUDA_TRY(kv_gather_cuda(store_, layer, slots_.get(), sp.indices_stride, true, counts_.get(), sp.counts_stride,
                                  gk, gv, Kmax, stream, host_counts_.data(), N));
  }

  // Exact attention with the model's own query over the selected rows, sink and window included.
  const AttendRowsParams ap = attending_rows(N, Hq, G, D, Kmax, scale, store_.dtype());
  A2ATS_CUDA_TRY(attend_rows_cuda(q_.get(), gathered_k_.get(), gathered_v_.get(), counts_.get(), out_.get(), lse_.get(),
                                  ap, stream));
  A2ATS_CUDA_TRY(from_f32(out_.get(), store_.dtype(), N, Hq, D, out, out_stride, stream));
  count_step(requests, host_counts_.data());
  return cudaSuccess;
}

}  // namespace a2ats
