// CPU emulation of the slice of the CUDA runtime and device intrinsics that a2ats uses.
// Test-only (cuda/emu/run.sh): lets the kernels in cuda/*.cu run on the host, one OS thread per
// CUDA thread, blocks one after another, __syncthreads and warp collectives on std::barrier.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

// ---- qualifiers -----------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, so function statics are block-shared

using std::max;
using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;

struct BlockCtx {
  int n = 0;
  std::unique_ptr<std::barrier<>> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<uint64_t> block_slots, warp_slots;
  std::vector<char> dyn_smem;
};
inline BlockCtx* ctx = nullptr;
inline void* dyn_smem() { return ctx->dyn_smem.data(); }

template <typename T>
void block_gather(T v, std::vector<T>& out) {
  static_assert(sizeof(T) <= 8);
  const int t = int(thread_idx.x);
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  ctx->block_slots[size_t(t)] = slot;
  ctx->block_bar->arrive_and_wait();
  out.resize(size_t(ctx->n));
  for (int i = 0; i < ctx->n; ++i) std::memcpy(&out[size_t(i)], &ctx->block_slots[size_t(i)], sizeof(T));
  ctx->block_bar->arrive_and_wait();
}

template <typename T>
std::array<T, 32> warp_gather(T v) {
  static_assert(sizeof(T) <= 8);
  const int t = int(thread_idx.x), w = t / 32;
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  ctx->warp_slots[size_t(t)] = slot;
  ctx->warp_bars[size_t(w)]->arrive_and_wait();
  std::array<T, 32> out;
  for (int l = 0; l < 32; ++l) std::memcpy(&out[size_t(l)], &ctx->warp_slots[size_t(w * 32 + l)], sizeof(T));
  ctx->warp_bars[size_t(w)]->arrive_and_wait();
  return out;
}

inline long long launches = 0;

// 256 persistent workers (the largest block the kernels use); a block of n threads runs on the
// first n, the rest idle through the start/done barriers.
constexpr int kMaxThreads = 256;
struct Pool {
  std::vector<std::thread> workers;
  std::barrier<> start{kMaxThreads + 1}, done{kMaxThreads + 1};
  const std::function<void(int)>* job = nullptr;
  bool stop = false;
  Pool() {
    for (int t = 0; t < kMaxThreads; ++t)
      workers.emplace_back([this, t] {
        for (;;) {
          start.arrive_and_wait();
          if (stop) return;
          (*job)(t);
          done.arrive_and_wait();
        }
      });
  }
  void run(const std::function<void(int)>& j) {
    job = &j;
    start.arrive_and_wait();
    done.arrive_and_wait();
  }
  ~Pool() {
    stop = true;
    start.arrive_and_wait();
    for (auto& w : workers) w.join();
  }
};
inline Pool& pool() {
  static Pool p;
  return p;
}

template <typename F>
struct Launcher {
  F f;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const {
    ++launches;
    const int n = int(block.x * block.y * block.z);
    if (n % 32 != 0 || block.y != 1 || block.z != 1) std::abort();  // the kernels use 1-D blocks of whole warps
    grid_dim = grid;
    block_dim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          BlockCtx c;
          c.n = n;
          c.block_bar = std::make_unique<std::barrier<>>(n);
          for (int w = 0; w < n / 32; ++w) c.warp_bars.push_back(std::make_unique<std::barrier<>>(32));
          c.block_slots.resize(size_t(n));
          c.warp_slots.resize(size_t(n));
          c.dyn_smem.assign(smem + 16, char(0x7f));  // poison: 0x7f7f7f7f is a large float
          ctx = &c;
          const std::function<void(int)> job = [&](int t) {
            if (t >= n) return;
            thread_idx = dim3(unsigned(t));
            block_idx = dim3(bx, by, bz);
            f(args...);
            // An exited thread no longer takes part in barriers (as on Volta and later).
            c.warp_bars[size_t(t / 32)]->arrive_and_drop();
            c.block_bar->arrive_and_drop();
          };
          pool().run(job);
          ctx = nullptr;
        }
  }
};
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

template <typename F>
emu::Launcher<F> emu_launch(F f, dim3 grid, dim3 block, size_t smem = 0, void* /*stream*/ = nullptr) {
  return emu::Launcher<F>{f, grid, block, smem};
}

// ---- device intrinsics ----------------------------------------------------------------------
inline void __syncthreads() { emu::ctx->block_bar->arrive_and_wait(); }
inline int __syncthreads_count(int pred) {
  std::vector<int> all;
  emu::block_gather(pred ? 1 : 0, all);
  int s = 0;
  for (int v : all) s += v;
  return s;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) std::abort();
  const auto all = emu::warp_gather(pred ? 1 : 0);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= unsigned(all[size_t(l)]) << l;
  return bits;
}
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  if (mask != 0xffffffffu) std::abort();
  const auto all = emu::warp_gather(v);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= unsigned(all[size_t(l)] == v) << l;
  return bits;
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int off) {
  if (mask != 0xffffffffu) std::abort();
  const auto all = emu::warp_gather(v);
  return all[size_t((int(threadIdx.x) % 32) ^ off)];
}
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicMin(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// ---- runtime API ----------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidPitchValue = 12,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
constexpr unsigned cudaHostAllocPortable = 1, cudaEventDisableTiming = 2;

namespace emu {
inline long long memcpy_calls = 0, event_syncs = 0, stream_syncs = 0;
}

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) {
  *p = std::malloc(n);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  ++emu::memcpy_calls;
  std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2DAsync(void* d, size_t dp, const void* s, size_t sp, size_t w, size_t h, cudaMemcpyKind,
                                     cudaStream_t) {
  ++emu::memcpy_calls;
  if (dp < w || sp < w) return cudaErrorInvalidPitchValue;
  for (size_t r = 0; r < h; ++r) std::memmove(static_cast<char*>(d) + r * dp, static_cast<const char*>(s) + r * sp, w);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  ++emu::stream_syncs;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() {
  ++emu::stream_syncs;
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  ++emu::memcpy_calls;
  std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = reinterpret_cast<cudaEvent_t>(new int(0));
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<int*>(e);
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) {
  ++emu::event_syncs;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
