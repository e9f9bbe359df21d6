// What the two CUDA decode pipelines (pipeline.cu: the contiguous store; paged_pipeline.cu: a
// serving engine's paged codes) share: row conversions, rotation positions, the codebook's
// matrix products and device buffers. The twin of cpp/src/pipeline_steps.h; private to cuda/.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "a2ats/common.h"
#include "a2ats/pipeline.h"
#include "a2ats_cuda.h"

namespace a2ats::cuda_steps {

// out (n0, n1, n2, D) f32 contiguous from strided rows of `dtype` (head_dim contiguous).
cudaError_t to_f32(const ConstRows& x, DType dtype, int64_t n0, int64_t n1, int64_t n2, int64_t D, float* out,
                   cudaStream_t stream);

// out (n0, n1, D) of `dtype` with element strides out_stride (head_dim contiguous) from x
// (n0, n1, D) f32 contiguous, rounded as steps::from_f32 on the CPU.
cudaError_t from_f32(const float* x, DType dtype, int64_t n0, int64_t n1, int64_t D, void* out,
                     const int64_t out_stride[2], cudaStream_t stream);

// Rotation positions: with offsets null, out[b, t] = -positions[b * s0 + t * s1] (un-rotating
// keys); otherwise out[b, j] = offsets[j] - positions[b * s0] (the WRoPE query of bin j).
cudaError_t rotations(const int64_t* positions, int64_t s0, int64_t s1, int64_t B, int64_t T, const int64_t* offsets,
                      int64_t* out, cudaStream_t stream);

// y[r] = x[r] @ M (transposed: M @ x[r]) for rows of D floats; rows_per_matrix consecutive rows
// share one (D, D) matrix and matrices cycle every num_matrices groups, as steps::rows_times_matrix
// on the CPU (same summation order).
cudaError_t rows_times_matrix(const float* x, const float* matrices, int64_t num_rows, int64_t rows_per_matrix,
                              int64_t num_matrices, int64_t D, bool transposed, float* y, cudaStream_t stream);

// Attending q (batch, Hq, D) f32 over rows (batch, Hkv, max_rows, D) of `dtype` with counts
// (batch, Hkv) into out (batch, Hq, D) f32 and lse (batch, Hq), all contiguous.
inline AttendRowsParams attending_rows(int64_t batch, int64_t num_q_heads, int64_t group_size, int64_t head_dim,
                                       int64_t max_rows, float scale, DType dtype) {
  const int64_t Hkv = num_q_heads / group_size;
  AttendRowsParams ap;
  ap.batch = batch;
  ap.num_q_heads = num_q_heads;
  ap.group_size = group_size;
  ap.head_dim = head_dim;
  ap.max_rows = max_rows;
  ap.scale = scale;
  ap.dtype = dtype;
  ap.q_stride[0] = ap.out_stride[0] = num_q_heads * head_dim;
  ap.q_stride[1] = ap.out_stride[1] = head_dim;
  ap.rows_stride[0] = Hkv * max_rows * head_dim;
  ap.rows_stride[1] = max_rows * head_dim;
  ap.rows_stride[2] = head_dim;
  ap.counts_stride[0] = Hkv;
  ap.counts_stride[1] = 1;
  ap.lse_stride[0] = num_q_heads;
  ap.lse_stride[1] = 1;
  return ap;
}

template <typename T>
cudaError_t device_alloc(T** ptr, int64_t elements) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), size_t(std::max<int64_t>(elements, 1)) * sizeof(T));
}

template <typename T>
void device_free(T*& ptr) {
  if (ptr) cudaFree(ptr);
  ptr = nullptr;
}

inline std::string failure(const char* what, cudaError_t err) {
  return std::string("CUDA pipeline: ") + what + " failed: " + cudaGetErrorString(err);
}

// Makes `device` current for its scope and restores the previous one (teardown paths).
class OnDevice {
 public:
  explicit OnDevice(int device) {
    switched_ = device >= 0 && cudaGetDevice(&previous_) == cudaSuccess && previous_ != device;
    if (switched_) cudaSetDevice(device);
  }
  ~OnDevice() {
    if (switched_) cudaSetDevice(previous_);
  }
  OnDevice(const OnDevice&) = delete;
  OnDevice& operator=(const OnDevice&) = delete;

 private:
  int previous_ = -1;
  bool switched_ = false;
};

}  // namespace a2ats::cuda_steps
