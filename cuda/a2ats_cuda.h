// Host launchers of the CUDA kernels. Framework-free like the CPU headers: raw device pointers,
// the same *Params structs as the CPU path, and a caller-provided stream. Each launcher returns
// the first CUDA error it met (cudaSuccess otherwise); kernels are asynchronous on `stream`
// unless a comment says the call synchronises.
//
// All array arguments of the kernels live on the current CUDA device (the binding sets it to
// the device of the inputs). Values that the CPU path validates on the host (lengths, bin
// edges, codes) are not read back from the device here; the kernels clamp them instead so that
// no access ever leaves its array, and document what garbage-in produces.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "a2ats/kv_store.h"
#include "a2ats/paged_pipeline.h"
#include "a2ats/pipeline.h"
#include "a2ats/rotary.h"
#include "a2ats/topk.h"
#include "a2ats/vq.h"

namespace a2ats {

// x, out: (B, H, T, D) of params.dtype (out may alias x); positions: (B, T) int32/int64;
// inv_freq: (R/2,) f32. Same f32 math as rotary_cpu: angle = float(pos) * inv_freq[i], its sin
// and cos from the shared sincos_angle (rotary.h), products and differences rounded separately
// (no FMA contraction).
cudaError_t rotary_cuda(const void* x, void* out, const void* positions, const float* inv_freq,
                        const RotaryParams& params, cudaStream_t stream);

// x: (B, Hkv, T, D) of params.dtype; centroids: (Hkv, M, C, D/M) f32; codes: (B, Hkv, T, M) int16.
// argmin over centroids of the squared distance, lowest index on exact ties (as vq_encode_cpu;
// the summation order differs, so near-ties may resolve differently in the last ulp).
cudaError_t vq_encode_cuda(const void* x, const float* centroids, int16_t* codes, const VQEncodeParams& params,
                           cudaStream_t stream);

// Same contract as lut_scores_cpu, with lengths (B,) and bin_edges (NB-1,) on the device.
// Differences forced by not reading device memory back on the host:
//  * a code outside [0, C) of a valid token, or (paged) a block id outside [0, num_blocks) of a
//    valid token, yields a NaN score (which select_topk ranks lowest) instead of an error; no
//    out-of-range lookup ever happens;
//  * lengths are clamped to [0, Tcap];
//  * a token's bin is #{edges <= distance} even when the edges are not ascending.
// The lookup tables are built in a device scratch buffer (stream-ordered allocation) and each
// scoring block stages its (b, h, bin) table in shared memory when it fits (M*C <= 24576).
cudaError_t lut_scores_cuda(const float* q, const float* centroids, const int16_t* codes, const int32_t* lengths,
                            const int32_t* bin_edges, float* scores, const LutScoresParams& params,
                            cudaStream_t stream);

// Same contract and results as select_topk_cpu (ties to the lower index, NaN lowest, union over
// the group, sink and window added, ascending, padded with -1), lengths (B,) on the device and
// clamped to [0, Tcap]. Per-row radix selection (11 + 11 + 10 bits) over tiles of the row, no sort.
cudaError_t select_topk_cuda(const float* scores, const int32_t* lengths, int32_t* indices, int32_t* counts,
                             const SelectTopkParams& params, cudaStream_t stream);

// Same contract as group_scores_cpu, lengths (B,) on the device and clamped to [0, Tcap]. Each
// head's log sum exp is reduced in a fixed order (in double, rounded to float as on the CPU), so
// the results match the CPU's except where the two sums round to different floats.
cudaError_t group_scores_cuda(const float* scores, const int32_t* lengths, float* out, const GroupScoresParams& params,
                              cudaStream_t stream);

// Appends k, v (B, Hkv, num_new, D) on the device to `layer` of the host store: one
// cudaMemcpy2DAsync per (b, g) block and tensor, then, when `synchronize`, synchronises `stream`
// so that the rows are in host memory when the call returns. Without it they arrive in stream
// order: the caller must not let the host read them before the stream gets there (the pipeline
// reads them only in a later kv_gather_cuda, whose index copy synchronises the same stream).
// Does NOT advance the lengths: the caller runs store.check_append before and
// store.commit_append after a successful return.
// num_tokens: host (B,) or null (all num_new rows of every batch row).
cudaError_t kv_append_cuda(KVStore& store, int64_t layer, const RowsView& k, const RowsView& v, int64_t num_new,
                           const int32_t* num_tokens, cudaStream_t stream, bool synchronize = true);

// Gathers rows indices[b, g, :counts[b, g]] of `layer` into device outputs out_k, out_v
// (B, Hkv, max_selected, D). indices (B, Hkv, max_selected) / counts (B, Hkv) int32 live on the
// current device when indices_on_device (they are then copied to the host and `stream` is
// synchronised once), else on the host. Validated with store.check_gather, which throws
// std::invalid_argument before anything is written. The store's thread pool fills pinned staging
// buffers chunk by chunk; each chunk goes to the device with one cudaMemcpyAsync on `stream` and
// a scatter kernel puts its rows in place. Two staging slots, each guarded by an event, so that
// filling chunk i overlaps the copy of chunk i-1 and no slot is refilled while in flight.
// Returns once the last chunk is enqueued (the outputs are ready in `stream` order).
// Slots of the outputs past counts are left untouched. host_counts, when not null, receives the
// counts (B, Hkv) dense on the host. num_queries: the B of indices, counts and outputs as for
// KVStore::gather (0: the store's batch; any number on a batch-1, slot-indexed store).
cudaError_t kv_gather_cuda(KVStore& store, int64_t layer, const int32_t* indices, const int64_t indices_stride[2],
                           bool indices_on_device, const int32_t* counts, const int64_t counts_stride[2],
                           const RowsView& out_k, const RowsView& out_v, int64_t max_selected, cudaStream_t stream,
                           int32_t* host_counts = nullptr, int64_t num_queries = 0);

// KVStore::write_slots from device rows: row i of k, v (n, Hkv, D) on the device (element
// strides (i, g) in stride[0..1], head_dim contiguous) goes to slot slots[i] of every KV head
// of `layer` of the host store; slots[i] < 0 skips row i. slots (n,) int64 live on the device
// when slots_on_device (copied to the host first: one synchronisation), else on the host.
// Checked with store.check_write_slots, which throws std::invalid_argument before anything is
// written. The rows pass through the store's pinned staging buffers, chunk by chunk, the host
// threads placing chunk i while chunk i + 1 is copied; the rows are in the store when it returns.
cudaError_t kv_write_slots_cuda(KVStore& store, int64_t layer, const int64_t* slots, bool slots_on_device, int64_t n,
                                const RowsView& k, const RowsView& v, cudaStream_t stream);

// Exact attention of each query head over the rows of its KV head that are on the device.
// For (b, h), with g = h / group_size and n = counts[b, g] (clamped to [0, max_rows]):
//   out[b, h] = softmax(scale * K q) V     // (B, Hq, D) f32, K = keys[b, g, :n], V likewise
//   lse[b, h] = log sum exp(scale * K q)  // (B, Hq) f32; -inf and out = 0 when n == 0
struct AttendRowsParams {
  int64_t batch = 0, num_q_heads = 0, group_size = 1, head_dim = 0;
  int64_t max_rows = 0;  // rows per (b, g) the buffers hold
  float scale = 1.f;
  DType dtype = DType::kFloat32;       // of keys and values
  int64_t q_stride[2] = {0, 0};        // q (B, Hq, D) f32, head_dim contiguous
  int64_t rows_stride[3] = {0, 0, 0};  // keys, values (B, Hkv, max_rows, D), head_dim contiguous
  int64_t counts_stride[2] = {0, 0};   // counts (B, Hkv) int32
  int64_t out_stride[2] = {0, 0};      // out (B, Hq, D) f32, head_dim contiguous
  int64_t lse_stride[2] = {0, 0};      // lse (B, Hq) f32
};
cudaError_t attend_rows_cuda(const float* q, const void* keys, const void* values, const int32_t* counts, float* out,
                             float* lse, const AttendRowsParams& params, cudaStream_t stream);

// Attention over the union of two disjoint row sets from their states:
//   out = (e^(lse_a - m) out_a + e^(lse_b - m) out_b) / (e^(lse_a - m) + e^(lse_b - m)),
// m = max(lse_a, lse_b); 0 when both sets are empty. out_a, out_b (B, H, D) f32, lse (B, H) f32;
// out (B, H, D) of dtype, head_dim contiguous everywhere.
struct MergeAttentionParams {
  int64_t batch = 0, num_heads = 0, head_dim = 0;
  DType dtype = DType::kFloat32;  // of out
  int64_t out_a_stride[2] = {0, 0}, lse_a_stride[2] = {0, 0};
  int64_t out_b_stride[2] = {0, 0}, lse_b_stride[2] = {0, 0};
  int64_t out_stride[2] = {0, 0};
};
cudaError_t merge_attention_cuda(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b,
                                 void* out, const MergeAttentionParams& params, cudaStream_t stream);

// A device array of T that only grows (its contents are lost when it does). release() and the
// destructor free it on the current device: an owner makes its device current first.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  cudaError_t grow(int64_t elements) {
    if (data_ != nullptr && elements <= capacity_) return cudaSuccess;
    release();
    const int64_t n = elements < 1 ? 1 : elements;
    const cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&data_), size_t(n) * sizeof(T));
    if (err != cudaSuccess) {
      data_ = nullptr;
      return err;
    }
    capacity_ = n;
    return cudaSuccess;
  }
  // grow(host.size()), then a synchronous copy of host.
  cudaError_t upload(const std::vector<T>& host) {
    const cudaError_t err = grow(int64_t(host.size()));
    if (err != cudaSuccess || host.empty()) return err;
    return cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  void release() {
    if (data_) cudaFree(data_);
    data_ = nullptr;
    capacity_ = 0;
  }
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  int64_t capacity_ = 0;
};

// A PipelineCodebook on the device, for both CUDA pipelines (layouts as in pipeline.h).
struct DeviceCodebook {
  DeviceBuffer<float> chol, chol_inv, centroids, inv_freq;
  DeviceBuffer<int32_t> bin_edges;        // (max(NB - 1, 1),)
  DeviceBuffer<int64_t> wrope_distances;  // (NB,)

  cudaError_t upload(const PipelineCodebook& book) {
    cudaError_t err = chol.upload(book.chol);
    if (err == cudaSuccess) err = chol_inv.upload(book.chol_inv);
    if (err == cudaSuccess) err = centroids.upload(book.centroids);
    if (err == cudaSuccess) err = inv_freq.upload(book.inv_freq);
    if (err == cudaSuccess) err = bin_edges.upload(book.bin_edges);
    if (err == cudaSuccess) err = wrope_distances.upload(book.wrope_distances);
    return err;
  }
  void release() {
    chol.release();
    chol_inv.release();
    centroids.release();
    inv_freq.release();
    bin_edges.release();
    wrope_distances.release();
  }
};

// The decode pipeline on one CUDA device, the twin of the CPU Pipeline (pipeline.h). The
// codebook, the codes and the resident rows live on the device; the full K/V in the host store.
//   resident rows   // (L, B, Hkv, sink + window, D) of K and of V, the store's dtype: slot n
//                   // holds row n < sink, slot sink + (n - sink) % window a window row; a row
//                   // of length len holds its min(len, sink + window) resident rows in a prefix
// decode() appends the new row (to the host store asynchronously, and to the resident rows),
// encodes its key, builds the binned WRoPE dual query, scores, selects k middle rows per query
// head, gathers them from the host store (the one host synchronisation of a layer: the host
// threads need the indices), attends them and the resident rows, and merges the two by their
// log-sum-exp into out. No other host synchronisation happens in plan() or decode(); prefill()
// synchronises once (its rows must be in host memory). All arrays are on the pipeline's device
// except num_tokens (host). Checks throw std::invalid_argument before any work; CUDA failures are
// returned as errors.
class CudaPipeline : public PipelineBase {
 public:
  // Runs on the current device, which becomes the pipeline's. Throws std::invalid_argument as
  // PipelineBase, std::runtime_error when the device memory cannot be had.
  CudaPipeline(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook);
  ~CudaPipeline();
  CudaPipeline(const CudaPipeline&) = delete;
  CudaPipeline& operator=(const CudaPipeline&) = delete;

  // k, v (B, Hkv, t, D) of the store's dtype, post-RoPE at positions (B, t) int64 (strides
  // pos_stride); num_tokens host (B,) or null.
  void plan(int64_t k);  // PipelineBase::plan; the step's lengths go to the device with its first decode
  cudaError_t prefill(int64_t layer, const ConstRows& k, const ConstRows& v, int64_t num_new, const int64_t* positions,
                      const int64_t pos_stride[2], const int32_t* num_tokens, cudaStream_t stream);
  // q (B, Hq, D), k, v (B, Hkv, 1, D), positions (B,) int64, out (B, Hq, D): as Pipeline::decode.
  cudaError_t decode(int64_t layer, const ConstRows& q, const ConstRows& k, const ConstRows& v,
                     const int64_t* positions, int64_t pos_stride, float scale, void* out, const int64_t out_stride[2],
                     cudaStream_t stream);
  void reset();

  int device() const { return device_; }
  // Device arrays: codes (B, Hkv, capacity, M) int16 of `layer`; the last decode's middle
  // selection, indices (B, Hkv, G * k) int32 ascending, padded with -1, and counts (B, Hkv).
  const int16_t* codes(int64_t layer) const { return codes_ + layer * layer_codes_; }
  const int32_t* last_indices() const { return indices_; }
  const int32_t* last_counts() const { return counts_; }
  int64_t last_max_selected() const { return last_max_selected_; }
  // Resident rows of `layer` (B, Hkv, sink + window, D).
  const void* resident_k(int64_t layer) const;
  const void* resident_v(int64_t layer) const;

 private:
  cudaError_t encode_and_store(int64_t layer, const ConstRows& k, const ConstRows& v, int64_t num_new,
                               const int64_t* positions, const int64_t pos_stride[2], const int32_t* num_tokens,
                               bool decoding, cudaStream_t stream);
  cudaError_t allocate();
  cudaError_t switch_stream(cudaStream_t stream);
  cudaError_t ensure_selection(int64_t max_middle);
  void release();

  int device_ = -1;
  int64_t layer_codes_ = 0, resident_rows_ = 0, layer_resident_ = 0;  // B*Hkv*cap*M, S+W, B*Hkv*(S+W)*D
  int64_t last_max_selected_ = 0;
  bool plan_uploaded_ = false;
  cudaStream_t last_stream_ = nullptr;  // of the last prefill or decode
  bool has_stream_ = false;
  std::vector<int32_t> host_meta_, host_counts_;  // staged metadata; counts (B, Hkv) of the gather
  // Device memory.
  DeviceCodebook book_;
  int16_t* codes_ = nullptr;  // (L, B, Hkv, capacity, M)
  char *resident_k_ = nullptr, *resident_v_ = nullptr;
  int32_t* meta_ = nullptr;  // (4, B): step lengths, step starts, resident counts, scratch
  float *q_ = nullptr, *q_wrope_ = nullptr, *q_dual_ = nullptr;  // (B, Hq, D), (B, Hq, NB, D) x 2
  int64_t* rotate_by_ = nullptr;                                 // (B, NB) and, in decode, (B,)
  float *keys_ = nullptr, *whitened_ = nullptr;                  // (B, Hkv, D)
  int16_t* new_codes_ = nullptr;                                 // (B, Hkv, M)
  float* scores_ = nullptr;                                      // (B, Hq, capacity)
  float* grouped_ = nullptr;                                     // (B, Hkv, capacity), per-KV-head budget
  float *out_middle_ = nullptr, *lse_middle_ = nullptr, *out_resident_ = nullptr, *lse_resident_ = nullptr;
  int64_t selection_capacity_ = -1;  // G * k the selection buffers hold
  int32_t *indices_ = nullptr, *counts_ = nullptr;
  char *gathered_k_ = nullptr, *gathered_v_ = nullptr;  // (B, Hkv, G * k, D)
};

// The PagedPipeline (paged_pipeline.h) on one CUDA device, its twin: the engine's paged codes,
// block tables, queries and outputs on the device, the full K/V in the slot-indexed host store
// (pinned, written by kv_write_slots_cuda). Same results as the CPU PagedPipeline, selection
// and codes bit for bit; the sink and window rows are gathered with the middle ones (the
// engine's cache holds only codes). Per decode call, the one host synchronisation is the
// gather's copy of the selected slots (the host threads need them); none when no request
// selects a row. Values the CPU checks on the host but that live on the device here are
// clamped instead: an encode slot past the codes' slots is skipped, a block id outside
// [0, num_blocks) scores NaN and, for the sink and window rows, makes the gather throw.
class CudaPagedPipeline : public PagedPipelineBase {
 public:
  // Runs on the current device, which becomes the pipeline's. Throws as PagedPipeline, and
  // std::runtime_error when the device memory cannot be had.
  CudaPagedPipeline(KVStore& store, const PipelineShape& shape, PipelineCodebook codebook);
  ~CudaPagedPipeline();
  CudaPagedPipeline(const CudaPagedPipeline&) = delete;
  CudaPagedPipeline& operator=(const CudaPagedPipeline&) = delete;

  // As PagedPipeline::encode, with k (n, Hkv, D), positions (n,) int64 and slots (n,) int64 on
  // the device.
  cudaError_t encode(int64_t layer, const ConstRows& k, int64_t n, const int64_t* positions, const int64_t* slots,
                     const PagedCodes& codes, cudaStream_t stream);
  // As PagedPipeline::decode, with q (N, Hq, D), the block table and out on the device;
  // requests.lengths and requests.k on the host (the step's plan: they size the selection).
  cudaError_t decode(int64_t layer, const ConstRows& q, const PagedRequests& requests, const PagedCodes& codes,
                     float scale, void* out, const int64_t out_stride[2], cudaStream_t stream);

  int device() const { return device_; }
  // The last decode's selection on the device, as token indices of each request:
  // indices (N, Hkv, Kmax) int32 ascending, padded with -1, and counts (N, Hkv) int32.
  const int32_t* last_indices() const { return indices_.get(); }
  const int32_t* last_counts() const { return counts_.get(); }

 private:
  void release();

  int device_ = -1;
  std::vector<int32_t> host_meta_, host_counts_;  // staged (2, N) lengths and k; counts (N, Hkv)
  std::vector<int64_t> host_rotate_by_;           // (N, NB)
  // Device memory: the codebook, then scratch grown on demand.
  DeviceCodebook book_;
  DeviceBuffer<int32_t> meta_;                      // (2, N) lengths, k
  DeviceBuffer<int64_t> rotate_by_;                 // (n,) in encode, (N, NB) in decode
  DeviceBuffer<float> keys_, whitened_;             // (n, Hkv, D)
  DeviceBuffer<int16_t> new_codes_;                 // (n, Hkv, M)
  DeviceBuffer<float> q_, q_wrope_, q_dual_;        // (N, Hq, D), (N, Hq, NB, D) x 2
  DeviceBuffer<float> scores_, grouped_;            // (N, Hq, Tmax), (N, Hkv, Tmax)
  DeviceBuffer<int32_t> indices_, slots_, counts_;  // (N, Hkv, Kmax) x 2, (N, Hkv)
  DeviceBuffer<char> gathered_k_, gathered_v_;      // (N, Hkv, Kmax, D) of the store's dtype
  DeviceBuffer<float> out_, lse_;                   // (N, Hq, D), (N, Hq)
};

}  // namespace a2ats
