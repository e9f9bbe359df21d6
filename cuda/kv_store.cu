// The KVStore's CUDA path: page-locked allocation, append from device tensors, and the
// double-buffered host->device gather.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "a2ats_cuda.h"
#include "cuda_common.cuh"

namespace a2ats {

void* pinned_alloc(size_t bytes) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the "no driver / no device" error
    return nullptr;
  }
  void* ptr = nullptr;
  // Portable: page-locked for every device and context, not just the current one.
  if (cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return ptr;
}

bool pinned_free(void* ptr) {
  if (ptr == nullptr) return false;
  if (cudaFreeHost(ptr) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

namespace {

using namespace cuda_detail;

// ---- staging state, one per store ---------------------------------------------------------
constexpr size_t kDefaultChunkBytes = size_t(4) << 20;  // K + V bytes per chunk

struct RowMeta {
  int32_t bg;  // b * Hkv + g
  int32_t i;   // slot in the output row
};

size_t chunk_bytes_setting() {
  // A2ATS_GATHER_CHUNK_BYTES overrides the chunk size (for benchmarking); read once.
  static const size_t bytes = [] {
    if (const char* env = std::getenv("A2ATS_GATHER_CHUNK_BYTES")) {
      const long long v = std::atoll(env);
      if (v >= 4096) return size_t(v);
    }
    return kDefaultChunkBytes;
  }();
  return bytes;
}

struct Slot {
  char* host = nullptr;  // K rows | V rows | RowMeta, packed for the chunk's row count
  bool host_pinned = false;
  char* dev = nullptr;
  cudaEvent_t done = nullptr;  // recorded after the chunk's scatter kernel
  bool pending = false;
};

struct CudaStoreState {
  std::mutex mutex;  // one gather at a time per store
  int device = -1;   // owner of dev buffers and events
  int64_t chunk_rows = 0;
  size_t slot_bytes = 0;
  Slot slots[2];
  // Host copies of device-resident indices and counts.
  int32_t* index_host = nullptr;
  size_t index_capacity = 0;  // int32 elements
  bool index_pinned = false;
  std::vector<int64_t> seg_start;  // (B * Hkv + 1,) prefix sums of counts

  cudaError_t wait_slots() {
    cudaError_t first = cudaSuccess;
    for (Slot& s : slots) {
      if (s.pending) {
        const cudaError_t err = cudaEventSynchronize(s.done);
        if (first == cudaSuccess) first = err;
        s.pending = false;
      }
    }
    return first;
  }

  void release_slots() {
    wait_slots();
    int current = -1;
    const bool switch_device = device >= 0 && cudaGetDevice(&current) == cudaSuccess && current != device;
    if (switch_device) cudaSetDevice(device);
    for (Slot& s : slots) {
      if (s.host) s.host_pinned ? (void)cudaFreeHost(s.host) : std::free(s.host);
      if (s.dev) cudaFree(s.dev);
      if (s.done) cudaEventDestroy(s.done);
      s = Slot();
    }
    if (switch_device) cudaSetDevice(current);
    cudaGetLastError();  // teardown errors (e.g. at process exit) are not reported
    device = -1;
    slot_bytes = 0;
    chunk_rows = 0;
  }

  void release_index() {
    if (index_host) index_pinned ? (void)cudaFreeHost(index_host) : std::free(index_host);
    index_host = nullptr;
    index_capacity = 0;
    cudaGetLastError();
  }

  ~CudaStoreState() {
    release_slots();
    release_index();
  }

  // Slots for `row_bytes`-byte rows on the current device (reallocated if either changed).
  cudaError_t ensure_slots(int64_t row_bytes) {
    int current = 0;
    A2ATS_CUDA_TRY(cudaGetDevice(&current));
    const int64_t rows = std::max<int64_t>(1, int64_t(chunk_bytes_setting()) / (2 * row_bytes));
    const size_t bytes = size_t(rows) * (2 * size_t(row_bytes) + sizeof(RowMeta));
    if (device == current && chunk_rows == rows && slot_bytes == bytes) return cudaSuccess;
    release_slots();
    for (Slot& s : slots) {
      if (cudaHostAlloc(reinterpret_cast<void**>(&s.host), bytes, cudaHostAllocPortable) == cudaSuccess) {
        s.host_pinned = true;
      } else {
        cudaGetLastError();
        s.host = static_cast<char*>(std::malloc(bytes));  // pageable: copies then stage synchronously
        if (s.host == nullptr) {
          release_slots();
          return cudaErrorMemoryAllocation;
        }
      }
      cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&s.dev), bytes);
      if (err == cudaSuccess) err = cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming);
      if (err != cudaSuccess) {
        device = current;  // so release_slots frees on the right device
        release_slots();
        return err;
      }
    }
    device = current;
    chunk_rows = rows;
    slot_bytes = bytes;
    return cudaSuccess;
  }

  cudaError_t ensure_index(size_t elements) {
    if (index_capacity >= elements) return cudaSuccess;
    release_index();
    const size_t bytes = elements * sizeof(int32_t);
    if (cudaHostAlloc(reinterpret_cast<void**>(&index_host), bytes, cudaHostAllocPortable) == cudaSuccess) {
      index_pinned = true;
    } else {
      cudaGetLastError();
      index_host = static_cast<int32_t*>(std::malloc(bytes));
      index_pinned = false;
      if (index_host == nullptr) return cudaErrorMemoryAllocation;
    }
    index_capacity = elements;
    return cudaSuccess;
  }
};

void destroy_state(void* state) { delete static_cast<CudaStoreState*>(state); }

std::mutex g_state_mutex;  // creation of a store's state

CudaStoreState& state_of(KVStore& store) {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  if (store.accel_state() == nullptr) store.set_accel_state(new CudaStoreState(), &destroy_state);
  return *static_cast<CudaStoreState*>(store.accel_state());
}

// ---- copies -------------------------------------------------------------------------------
// `height` rows of `width` bytes between pitched buffers, in as few calls as the pitches allow.
cudaError_t copy_rows(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, int64_t height,
                      cudaMemcpyKind kind, cudaStream_t stream) {
  if (height <= 0 || width == 0) return cudaSuccess;
  if (height == 1 || (dpitch == width && spitch == width))
    return cudaMemcpyAsync(dst, src, width * size_t(height), kind, stream);
  if (dpitch >= width && spitch >= width) {
    const cudaError_t err = cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, size_t(height), kind, stream);
    if (err != cudaErrorInvalidPitchValue) return err;
    cudaGetLastError();  // pitch beyond the device limit: fall through to row copies
  }
  for (int64_t r = 0; r < height; ++r)
    A2ATS_CUDA_TRY(cudaMemcpyAsync(static_cast<char*>(dst) + size_t(r) * dpitch,
                                   static_cast<const char*>(src) + size_t(r) * spitch, width, kind, stream));
  return cudaSuccess;
}

// Device (B, G, width) int32 with element strides (s0, s1) and unit last stride -> dense host copy.
cudaError_t copy_int32_to_host(int32_t* dst, const int32_t* src, int64_t B, int64_t G, const int64_t stride[2],
                               int64_t width, cudaStream_t stream) {
  if (B == 0 || G == 0 || width == 0) return cudaSuccess;
  const bool dense = (G == 1 || stride[1] == width) && (B == 1 || stride[0] == G * width);
  if (dense) return cudaMemcpyAsync(dst, src, size_t(B * G * width) * 4, cudaMemcpyDeviceToHost, stream);
  for (int64_t b = 0; b < B; ++b)
    A2ATS_CUDA_TRY(copy_rows(dst + b * G * width, size_t(width) * 4, src + b * stride[0], size_t(stride[1]) * 4,
                             size_t(width) * 4, G, cudaMemcpyDeviceToHost, stream));
  return cudaSuccess;
}

// ---- scatter ------------------------------------------------------------------------------
constexpr int kScatterThreads = 256;  // one warp per row

template <typename V>
__device__ __forceinline__ void copy_row(char* dst, const char* src, int64_t bytes, int lane) {
  V* d = reinterpret_cast<V*>(dst);
  const V* s = reinterpret_cast<const V*>(src);
  for (int64_t i = lane; i < bytes / int64_t(sizeof(V)); i += 32) d[i] = s[i];
}

// staging: K rows [0, n), V rows [n, 2n), then n RowMeta. Row w of the 2n goes to its output slot.
__global__ void __launch_bounds__(kScatterThreads)
    scatter_rows_kernel(const char* __restrict__ staging, int64_t n, int64_t row_bytes, int64_t elem,
                        int64_t num_kv_heads, RowsView out_k, RowsView out_v) {
  const int64_t w = (int64_t(blockIdx.x) * kScatterThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= 2 * n) return;
  const bool is_v = w >= n;
  const RowMeta meta = reinterpret_cast<const RowMeta*>(staging + 2 * n * row_bytes)[is_v ? w - n : w];
  const int64_t b = meta.bg / num_kv_heads, g = meta.bg % num_kv_heads;
  char* const base = static_cast<char*>(is_v ? out_v.data : out_k.data);
  const int64_t s0 = is_v ? out_v.stride[0] : out_k.stride[0];
  const int64_t s1 = is_v ? out_v.stride[1] : out_k.stride[1];
  const int64_t s2 = is_v ? out_v.stride[2] : out_k.stride[2];
  char* dst = base + (b * s0 + g * s1 + int64_t(meta.i) * s2) * elem;
  const char* src = staging + w * row_bytes;
  const uintptr_t align = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | uintptr_t(row_bytes);
  if (align % 16 == 0)
    copy_row<uint4>(dst, src, row_bytes, lane);
  else if (align % 4 == 0)
    copy_row<uint32_t>(dst, src, row_bytes, lane);
  else
    copy_row<uint16_t>(dst, src, row_bytes, lane);  // rows are whole 2- or 4-byte elements
}

}  // namespace

cudaError_t kv_append_cuda(KVStore& store, int64_t layer, const RowsView& k, const RowsView& v, int64_t num_new,
                           const int32_t* num_tokens, cudaStream_t stream, bool synchronize) {
  const int64_t elem = dtype_size(store.dtype());
  const size_t row = size_t(store.row_bytes());
  for (int64_t b = 0; b < store.batch(); ++b) {
    const int64_t n = num_tokens ? num_tokens[b] : num_new;
    if (n <= 0) continue;
    const int64_t start = store.length(layer, b);
    for (int64_t g = 0; g < store.num_kv_heads(); ++g) {
      const char* src_k = static_cast<const char*>(k.data) + (b * k.stride[0] + g * k.stride[1]) * elem;
      const char* src_v = static_cast<const char*>(v.data) + (b * v.stride[0] + g * v.stride[1]) * elem;
      A2ATS_CUDA_TRY(copy_rows(store.k_rows(layer, b, g) + start * int64_t(row), row, src_k, size_t(k.stride[2] * elem),
                               row, n, cudaMemcpyDeviceToHost, stream));
      A2ATS_CUDA_TRY(copy_rows(store.v_rows(layer, b, g) + start * int64_t(row), row, src_v, size_t(v.stride[2] * elem),
                               row, n, cudaMemcpyDeviceToHost, stream));
    }
  }
  // The rows must be in host memory before the caller advances the lengths (or, without
  // synchronize, before anything on the host reads them).
  return synchronize ? cudaStreamSynchronize(stream) : cudaSuccess;
}

cudaError_t kv_gather_cuda(KVStore& store, int64_t layer, const int32_t* indices, const int64_t indices_stride[2],
                           bool indices_on_device, const int32_t* counts, const int64_t counts_stride[2],
                           const RowsView& out_k, const RowsView& out_v, int64_t max_selected, cudaStream_t stream,
                           int32_t* host_counts, int64_t num_queries) {
  CudaStoreState& st = state_of(store);
  std::lock_guard<std::mutex> lock(st.mutex);
  const int64_t B = num_queries > 0 ? num_queries : store.batch(), Hkv = store.num_kv_heads();

  // 1. Indices and counts on the host.
  const int32_t* idx = indices;
  const int32_t* cnt = counts;
  int64_t idx_stride[2] = {indices_stride[0], indices_stride[1]};
  int64_t cnt_stride[2] = {counts_stride[0], counts_stride[1]};
  if (indices_on_device) {
    const size_t index_elems = size_t(B * Hkv * max_selected), count_elems = size_t(B * Hkv);
    A2ATS_CUDA_TRY(st.ensure_index(index_elems + count_elems));
    int32_t* idx_host = st.index_host;
    int32_t* cnt_host = st.index_host + index_elems;
    A2ATS_CUDA_TRY(copy_int32_to_host(idx_host, indices, B, Hkv, indices_stride, max_selected, stream));
    A2ATS_CUDA_TRY(copy_int32_to_host(cnt_host, counts, B, Hkv, counts_stride, 1, stream));
    A2ATS_CUDA_TRY(cudaStreamSynchronize(stream));
    idx = idx_host;
    cnt = cnt_host;
    idx_stride[0] = Hkv * max_selected;
    idx_stride[1] = max_selected;
    cnt_stride[0] = Hkv;
    cnt_stride[1] = 1;
  }

  // 2. Validation (throws std::invalid_argument before anything is written).
  store.check_gather(layer, idx, idx_stride, cnt, cnt_stride, max_selected, num_queries);
  if (host_counts)
    for (int64_t bg = 0; bg < B * Hkv; ++bg)
      host_counts[bg] = cnt[(bg / Hkv) * cnt_stride[0] + (bg % Hkv) * cnt_stride[1]];

  // 3. Rows flattened over (b, g, i) in order; chunks of chunk_rows of them.
  std::vector<int64_t>& seg = st.seg_start;
  seg.assign(size_t(B * Hkv + 1), 0);
  for (int64_t bg = 0; bg < B * Hkv; ++bg)
    seg[size_t(bg + 1)] = seg[size_t(bg)] + cnt[(bg / Hkv) * cnt_stride[0] + (bg % Hkv) * cnt_stride[1]];
  const int64_t total = seg.back();
  if (total == 0) return cudaSuccess;
  const int64_t row_bytes = store.row_bytes(), elem = dtype_size(store.dtype());
  A2ATS_CUDA_TRY(st.ensure_slots(row_bytes));
  const int64_t chunk_rows = st.chunk_rows;

  // After a failure with work already enqueued, drain the stream so no slot is left in flight.
  auto fail = [&](cudaError_t err) {
    cudaStreamSynchronize(stream);
    cudaGetLastError();
    return err;
  };
  for (int64_t r0 = 0, chunk = 0; r0 < total; r0 += chunk_rows, ++chunk) {
    const int64_t n = std::min(chunk_rows, total - r0);
    Slot& slot = st.slots[chunk & 1];
    if (slot.pending) {  // the copy and scatter that last used this slot must be done
      const cudaError_t err = cudaEventSynchronize(slot.done);
      slot.pending = false;
      if (err != cudaSuccess) return fail(err);
    }
    char* host_k = slot.host;
    char* host_v = slot.host + n * row_bytes;
    RowMeta* meta = reinterpret_cast<RowMeta*>(slot.host + 2 * n * row_bytes);
    store.pool().parallel_for(
        n,
        [&](int64_t begin, int64_t end) {
          int64_t r = r0 + begin;
          int64_t bg = int64_t(std::upper_bound(seg.begin(), seg.end(), r) - seg.begin()) - 1;
          for (int64_t e = begin; e < end; ++e, ++r) {
            while (r >= seg[size_t(bg + 1)]) ++bg;
            const int64_t b = bg / Hkv, g = bg % Hkv, i = r - seg[size_t(bg)];
            const int64_t row_index = idx[b * idx_stride[0] + g * idx_stride[1] + i];
            const int64_t from = store.store_row(b);
            std::memcpy(host_k + e * row_bytes, store.k_rows(layer, from, g) + row_index * row_bytes,
                        size_t(row_bytes));
            std::memcpy(host_v + e * row_bytes, store.v_rows(layer, from, g) + row_index * row_bytes,
                        size_t(row_bytes));
            meta[e] = RowMeta{int32_t(bg), int32_t(i)};
          }
        },
        64);
    const size_t bytes = size_t(n) * (2 * size_t(row_bytes) + sizeof(RowMeta));
    cudaError_t err = cudaMemcpyAsync(slot.dev, slot.host, bytes, cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return fail(err);
    const int64_t blocks = ceil_div(2 * n * 32, kScatterThreads);
    scatter_rows_kernel<<<unsigned(blocks), kScatterThreads, 0, stream>>>(slot.dev, n, row_bytes, elem, Hkv, out_k,
                                                                          out_v);
    err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaEventRecord(slot.done, stream);
    if (err != cudaSuccess) return fail(err);
    slot.pending = true;
  }
  return cudaSuccess;
}

cudaError_t kv_write_slots_cuda(KVStore& store, int64_t layer, const int64_t* slots, bool slots_on_device, int64_t n,
                                const RowsView& k, const RowsView& v, cudaStream_t stream) {
  if (n <= 0) {
    store.check_write_slots(layer, slots, 0);
    return cudaSuccess;
  }
  CudaStoreState& st = state_of(store);
  std::lock_guard<std::mutex> lock(st.mutex);
  const int64_t* host_slots = slots;
  if (slots_on_device) {
    A2ATS_CUDA_TRY(st.ensure_index(size_t(2 * n)));  // n int64 in int32 units
    A2ATS_CUDA_TRY(cudaMemcpyAsync(st.index_host, slots, size_t(n) * sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
    A2ATS_CUDA_TRY(cudaStreamSynchronize(stream));
    host_slots = reinterpret_cast<const int64_t*>(st.index_host);
  }
  store.check_write_slots(layer, host_slots, n);  // throws before anything is written

  // Whole tokens per chunk: all Hkv rows of K, then of V. The gather's slots serve as staging;
  // only when a chunk cannot hold one token (a tiny A2ATS_GATHER_CHUNK_BYTES) are they sized
  // for tokens instead of rows.
  const int64_t Hkv = store.num_kv_heads(), row = store.row_bytes(), elem = dtype_size(store.dtype());
  const int64_t token_bytes = 2 * Hkv * row;
  A2ATS_CUDA_TRY(st.ensure_slots(row));
  if (int64_t(st.slot_bytes) < token_bytes) A2ATS_CUDA_TRY(st.ensure_slots(Hkv * row));
  A2ATS_CUDA_TRY(st.wait_slots());
  const int64_t per_chunk = int64_t(st.slot_bytes) / token_bytes;
  auto fail = [&](cudaError_t err) {
    st.wait_slots();
    cudaGetLastError();
    return err;
  };
  // Device rows [t0, t0 + nt) of x into staging (nt, Hkv, row): one pitched copy when the
  // heads of a token are adjacent, else one per head.
  const auto stage = [&](const RowsView& x, char* dst, int64_t t0, int64_t nt) -> cudaError_t {
    const char* src = static_cast<const char*>(x.data) + t0 * x.stride[0] * elem;
    const size_t spitch = size_t(x.stride[0] * elem);
    if (Hkv == 1 || x.stride[1] * elem == row)
      return copy_rows(dst, size_t(Hkv * row), src, spitch, size_t(Hkv * row), nt, cudaMemcpyDeviceToHost, stream);
    for (int64_t g = 0; g < Hkv; ++g)
      A2ATS_CUDA_TRY(copy_rows(dst + g * row, size_t(Hkv * row), src + g * x.stride[1] * elem, spitch, size_t(row), nt,
                               cudaMemcpyDeviceToHost, stream));
    return cudaSuccess;
  };
  // Staged chunk [t0, t0 + nt) into the store rows of its slots, by the store's threads.
  const auto place = [&](Slot& slot, int64_t t0, int64_t nt) -> cudaError_t {
    const cudaError_t err = cudaEventSynchronize(slot.done);
    slot.pending = false;
    A2ATS_CUDA_TRY(err);
    const char* staged_k = slot.host;
    const char* staged_v = slot.host + nt * Hkv * row;
    store.pool().parallel_for(
        nt * Hkv,
        [&](int64_t begin, int64_t end) {
          for (int64_t e = begin; e < end; ++e) {
            const int64_t i = t0 + e / Hkv, g = e % Hkv, to = host_slots[i];
            if (to < 0) continue;  // the engine's padding
            std::memcpy(store.k_rows(layer, 0, g) + to * row, staged_k + e * row, size_t(row));
            std::memcpy(store.v_rows(layer, 0, g) + to * row, staged_v + e * row, size_t(row));
          }
        },
        ThreadPool::min_chunk_for(2 * row));
    return cudaSuccess;
  };
  int64_t previous_t0 = 0, previous_nt = 0;
  for (int64_t t0 = 0, chunk = 0; t0 < n; t0 += per_chunk, ++chunk) {
    const int64_t nt = std::min(per_chunk, n - t0);
    Slot& slot = st.slots[chunk & 1];
    cudaError_t err = stage(k, slot.host, t0, nt);
    if (err == cudaSuccess) err = stage(v, slot.host + nt * Hkv * row, t0, nt);
    if (err == cudaSuccess) err = cudaEventRecord(slot.done, stream);
    if (err != cudaSuccess) return fail(err);
    slot.pending = true;
    // While this chunk copies, the previous one is placed.
    if (previous_nt > 0 && (err = place(st.slots[(chunk - 1) & 1], previous_t0, previous_nt)) != cudaSuccess)
      return fail(err);
    previous_t0 = t0;
    previous_nt = nt;
  }
  const int64_t last = (n - 1) / per_chunk;
  const cudaError_t err = place(st.slots[last & 1], previous_t0, previous_nt);
  if (err != cudaSuccess) return fail(err);
  store.commit_write_slots(layer, host_slots, n);
  return cudaSuccess;
}

}  // namespace a2ats
