// Helpers shared by the CUDA sources: error propagation, element conversions that match the
// CPU path bit for bit, and stream-ordered scratch memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "a2ats/common.h"

// Returns the CUDA error of `expr` from the enclosing function.
#define A2ATS_CUDA_TRY(expr)                          \
  do {                                                \
    const cudaError_t a2ats_err_ = (expr);            \
    if (a2ats_err_ != cudaSuccess) return a2ats_err_; \
  } while (0)

namespace a2ats {
namespace cuda_detail {

constexpr int64_t kMaxGridBlocks = 2147483647;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- element loads and stores in f32 (storage types as in common.h) ----------------------
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const half_t* p) {
  return __half2float(__ushort_as_half(reinterpret_cast<const uint16_t*>(p)[0]));
}
__device__ __forceinline__ float load_f32(const bfloat16_t* p) {
  return __uint_as_float(uint32_t(reinterpret_cast<const uint16_t*>(p)[0]) << 16);
}

__device__ __forceinline__ void store_f32(float* p, float f) { *p = f; }
// IEEE round-to-nearest-even, as from_float<half_t> (only NaN payloads may differ).
__device__ __forceinline__ void store_f32(half_t* p, float f) {
  reinterpret_cast<uint16_t*>(p)[0] = __half_as_ushort(__float2half_rn(f));
}
// The rounding of from_float<bfloat16_t> on the CPU (common.h).
__device__ __forceinline__ void store_f32(bfloat16_t* p, float f) {
  reinterpret_cast<uint16_t*>(p)[0] = bfloat16_bits(f);
}

// ---- scratch memory ------------------------------------------------------------------------
// Stream-ordered allocation from a per-device pool that keeps its memory (release threshold
// = max), so steady-state decode steps do not map and unmap pages. Falls back to
// cudaMalloc/cudaFree where memory pools are unsupported.
cudaError_t scratch_alloc(void** ptr, size_t bytes, cudaStream_t stream);
cudaError_t scratch_free(void* ptr, cudaStream_t stream);

// Frees its allocation (stream-ordered) when it goes out of scope.
class Scratch {
 public:
  explicit Scratch(cudaStream_t stream) : stream_(stream) {}
  ~Scratch() {
    if (ptr_) scratch_free(ptr_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  cudaError_t allocate(size_t bytes) { return scratch_alloc(&ptr_, bytes == 0 ? 256 : bytes, stream_); }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }

 private:
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

// Rounds a byte offset up so that the next sub-buffer is 256-byte aligned.
inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace cuda_detail
}  // namespace a2ats
