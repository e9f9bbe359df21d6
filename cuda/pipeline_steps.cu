// The small kernels both CUDA pipelines use (pipeline_steps.cuh).
#include "cuda_common.cuh"
#include "pipeline_steps.cuh"

namespace a2ats::cuda_steps {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 128;

// One block per row: out[r] from x's row r, element by element.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    from_f32_kernel(const float* __restrict__ x, int64_t n1, int64_t D, T* __restrict__ out, int64_t s0, int64_t s1) {
  const int64_t r = blockIdx.x, i = r / n1, j = r % n1;
  T* row = out + i * s0 + j * s1;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) store_f32(row + d, x[r * D + d]);
}

// One block per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) to_f32_kernel(const T* __restrict__ x, int64_t s0, int64_t s1, int64_t s2,
                                                          int64_t n1, int64_t n2, int64_t D, float* __restrict__ out) {
  const int64_t r = blockIdx.x, i = r / (n1 * n2), j = (r / n2) % n1, t = r % n2;
  const T* row = x + i * s0 + j * s1 + t * s2;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) out[r * D + d] = load_f32(row + d);
}

__global__ void __launch_bounds__(kThreads)
    rotation_kernel(const int64_t* __restrict__ positions, int64_t s0, int64_t s1, int64_t B, int64_t T,
                    const int64_t* __restrict__ offsets, int64_t* __restrict__ out) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= B * T) return;
  const int64_t b = e / T, t = e % T;
  out[e] = offsets ? offsets[t] - positions[b * s0] : -positions[b * s0 + t * s1];
}

// One block per row, the row in shared memory.
__global__ void __launch_bounds__(kThreads)
    rows_times_matrix_kernel(const float* __restrict__ x, const float* __restrict__ matrices, int64_t rows_per_matrix,
                             int64_t num_matrices, int64_t D, bool transposed, float* __restrict__ y) {
  extern __shared__ float row[];  // (D,)
  const int64_t r = blockIdx.x;
  const float* m = matrices + ((r / rows_per_matrix) % num_matrices) * D * D;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) row[d] = x[r * D + d];
  __syncthreads();
  for (int64_t e = threadIdx.x; e < D; e += kThreads) {
    float acc = 0.f;
    if (transposed)
      for (int64_t k = 0; k < D; ++k) acc += m[e * D + k] * row[k];
    else
      for (int64_t k = 0; k < D; ++k) acc += row[k] * m[k * D + e];
    y[r * D + e] = acc;
  }
}

}  // namespace

cudaError_t to_f32(const ConstRows& x, DType dtype, int64_t n0, int64_t n1, int64_t n2, int64_t D, float* out,
                   cudaStream_t stream) {
  const int64_t rows = n0 * n1 * n2;
  if (rows == 0) return cudaSuccess;
  if (rows > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  const auto s = x.stride;
  switch (dtype) {
    case DType::kFloat32:
      to_f32_kernel<float><<<unsigned(rows), kThreads, 0, stream>>>(static_cast<const float*>(x.data), s[0], s[1], s[2],
                                                                    n1, n2, D, out);
      break;
    case DType::kFloat16:
      to_f32_kernel<half_t><<<unsigned(rows), kThreads, 0, stream>>>(static_cast<const half_t*>(x.data), s[0], s[1],
                                                                     s[2], n1, n2, D, out);
      break;
    case DType::kBFloat16:
      to_f32_kernel<bfloat16_t><<<unsigned(rows), kThreads, 0, stream>>>(static_cast<const bfloat16_t*>(x.data), s[0],
                                                                         s[1], s[2], n1, n2, D, out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t rotations(const int64_t* positions, int64_t s0, int64_t s1, int64_t B, int64_t T, const int64_t* offsets,
                      int64_t* out, cudaStream_t stream) {
  if (B * T == 0) return cudaSuccess;
  rotation_kernel<<<unsigned(ceil_div(B * T, kThreads)), kThreads, 0, stream>>>(positions, s0, s1, B, T, offsets, out);
  return cudaGetLastError();
}

cudaError_t rows_times_matrix(const float* x, const float* matrices, int64_t num_rows, int64_t rows_per_matrix,
                              int64_t num_matrices, int64_t D, bool transposed, float* y, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  if (num_rows > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  rows_times_matrix_kernel<<<unsigned(num_rows), kThreads, size_t(D) * sizeof(float), stream>>>(
      x, matrices, rows_per_matrix, num_matrices, D, transposed, y);
  return cudaGetLastError();
}

cudaError_t from_f32(const float* x, DType dtype, int64_t n0, int64_t n1, int64_t D, void* out,
                     const int64_t out_stride[2], cudaStream_t stream) {
  const int64_t rows = n0 * n1;
  if (rows == 0) return cudaSuccess;
  if (rows > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  const int64_t s0 = out_stride[0], s1 = out_stride[1];
  switch (dtype) {
    case DType::kFloat32:
      from_f32_kernel<float><<<unsigned(rows), kThreads, 0, stream>>>(x, n1, D, static_cast<float*>(out), s0, s1);
      break;
    case DType::kFloat16:
      from_f32_kernel<half_t><<<unsigned(rows), kThreads, 0, stream>>>(x, n1, D, static_cast<half_t*>(out), s0, s1);
      break;
    case DType::kBFloat16:
      from_f32_kernel<bfloat16_t>
          <<<unsigned(rows), kThreads, 0, stream>>>(x, n1, D, static_cast<bfloat16_t*>(out), s0, s1);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace a2ats::cuda_steps
