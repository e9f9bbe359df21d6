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

#include "a2ats/kv_store.h"
#include "a2ats/rotary.h"
#include "a2ats/topk.h"
#include "a2ats/vq.h"

namespace a2ats {

// x, out: (B, H, T, D) of params.dtype (out may alias x); positions: (B, T) int32/int64;
// inv_freq: (R/2,) f32. Same f32 math as rotary_cpu: angle = float(pos) * inv_freq[i] with
// precise sincosf, products and differences rounded separately (no FMA contraction).
cudaError_t rotary_cuda(const void* x, void* out, const void* positions, const float* inv_freq,
                        const RotaryParams& params, cudaStream_t stream);

// x: (B, Hkv, T, D) of params.dtype; centroids: (Hkv, M, C, D/M) f32; codes: (B, Hkv, T, M) int16.
// argmin over centroids of the squared distance, lowest index on exact ties (as vq_encode_cpu;
// the summation order differs, so near-ties may resolve differently in the last ulp).
cudaError_t vq_encode_cuda(const void* x, const float* centroids, int16_t* codes, const VQEncodeParams& params,
                           cudaStream_t stream);

// Same contract as lut_scores_cpu, with lengths (B,) and bin_edges (NB-1,) on the device.
// Differences forced by not reading device memory back on the host:
//  * a code outside [0, C) of a valid token yields a NaN score (which select_topk ranks lowest)
//    instead of an error; no out-of-range lookup ever happens;
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

// Appends k, v (B, Hkv, num_new, D) on the device to `layer` of the host store: one
// cudaMemcpy2DAsync per (b, g) block and tensor, then synchronises `stream`, so that the rows are
// in host memory when the call returns. Does NOT advance the lengths: the caller runs
// store.check_append before and store.commit_append after a successful return.
// num_tokens: host (B,) or null (all num_new rows of every batch row).
cudaError_t kv_append_cuda(KVStore& store, int64_t layer, const RowsView& k, const RowsView& v, int64_t num_new,
                           const int32_t* num_tokens, cudaStream_t stream);

// Gathers rows indices[b, g, :counts[b, g]] of `layer` into device outputs out_k, out_v
// (B, Hkv, max_selected, D). indices (B, Hkv, max_selected) / counts (B, Hkv) int32 live on the
// current device when indices_on_device (they are then copied to the host and `stream` is
// synchronised once), else on the host. Validated with store.check_gather, which throws
// std::invalid_argument before anything is written. The store's thread pool fills pinned staging
// buffers chunk by chunk; each chunk goes to the device with one cudaMemcpyAsync on `stream` and
// a scatter kernel puts its rows in place. Two staging slots, each guarded by an event, so that
// filling chunk i overlaps the copy of chunk i-1 and no slot is refilled while in flight.
// Returns once the last chunk is enqueued (the outputs are ready in `stream` order).
// Slots of the outputs past counts are left untouched.
cudaError_t kv_gather_cuda(KVStore& store, int64_t layer, const int32_t* indices, const int64_t indices_stride[2],
                           bool indices_on_device, const int32_t* counts, const int64_t counts_stride[2],
                           const RowsView& out_k, const RowsView& out_v, int64_t max_selected, cudaStream_t stream);

}  // namespace a2ats
