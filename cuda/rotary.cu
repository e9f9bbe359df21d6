// RoPE on the device. One block per (b, t): the sines and cosines of that token's R/2 angles
// are computed once into shared memory and applied to every head.
//
// sin/cos come from the CPU's own sincos_angle (a2ats/rotary.h), so both devices round alike.
// The angle is float(pos) * inv_freq[i] in f32, and the rotation rounds each product and
// difference separately, like the reference.
#include "a2ats_cuda.h"
#include "cuda_common.cuh"

namespace a2ats {
namespace {

using namespace cuda_detail;

constexpr int kRotaryThreads = 128;

template <typename T, typename P>
__global__ void __launch_bounds__(kRotaryThreads)
    rotary_kernel(const T* x, T* out,  // out may alias x
                  const P* __restrict__ positions, const float* __restrict__ inv_freq, RotaryParams p) {
  __shared__ float cos_t[kMaxHeadDim / 2];
  __shared__ float sin_t[kMaxHeadDim / 2];
  const int64_t item = blockIdx.x;
  const int64_t b = item / p.num_tokens, t = item % p.num_tokens;
  const int half = int(p.rotary_dim / 2);
  const float pos = float(positions[b * p.pos_stride[0] + t * p.pos_stride[1]]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(pos, inv_freq[i]);
    float s, c;
    sincos_angle(angle, &s, &c);
    cos_t[i] = c;
    sin_t[i] = s;
  }
  __syncthreads();
  // Per head: `half` rotated pairs, then (out != x only) the pass-through dims [R, D).
  const bool in_place = static_cast<const void*>(x) == static_cast<const void*>(out) &&
                        p.x_stride[0] == p.out_stride[0] && p.x_stride[1] == p.out_stride[1] &&
                        p.x_stride[2] == p.out_stride[2];
  const int pass = in_place ? 0 : int(p.head_dim - p.rotary_dim);
  const int per_head = half + pass;
  const int64_t total = p.num_heads * int64_t(per_head);
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int64_t h = idx / per_head;
    const int j = int(idx % per_head);
    const T* xr = x + b * p.x_stride[0] + h * p.x_stride[1] + t * p.x_stride[2];
    T* orow = out + b * p.out_stride[0] + h * p.out_stride[1] + t * p.out_stride[2];
    if (j < half) {
      const int i1 = p.interleaved ? 2 * j : j;
      const int i2 = p.interleaved ? 2 * j + 1 : j + half;
      const float x1 = load_f32(xr + i1), x2 = load_f32(xr + i2);
      const float c = cos_t[j], s = sin_t[j];
      // Rounded like the CPU's x1 * c - x2 * s (no fused multiply-add).
      store_f32(orow + i1, __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
      store_f32(orow + i2, __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
    } else {
      const int d = int(p.rotary_dim) + (j - half);
      orow[d] = xr[d];
    }
  }
}

template <typename T, typename P>
cudaError_t launch(const void* x, void* out, const void* positions, const float* inv_freq, const RotaryParams& p,
                   cudaStream_t stream) {
  const int64_t blocks = p.batch * p.num_tokens;
  if (blocks == 0 || p.num_heads == 0) return cudaSuccess;
  if (blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  rotary_kernel<T, P><<<unsigned(blocks), kRotaryThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out),
                                                                       static_cast<const P*>(positions), inv_freq, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pos(const void* x, void* out, const void* positions, const float* inv_freq, const RotaryParams& p,
                       cudaStream_t stream) {
  if (p.pos_dtype == DType::kInt32) return launch<T, int32_t>(x, out, positions, inv_freq, p, stream);
  if (p.pos_dtype == DType::kInt64) return launch<T, int64_t>(x, out, positions, inv_freq, p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rotary_cuda(const void* x, void* out, const void* positions, const float* inv_freq, const RotaryParams& p,
                        cudaStream_t stream) {
  if (p.rotary_dim < 0 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0 || p.head_dim > kMaxHeadDim)
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_pos<float>(x, out, positions, inv_freq, p, stream);
    case DType::kFloat16:
      return launch_pos<half_t>(x, out, positions, inv_freq, p, stream);
    case DType::kBFloat16:
      return launch_pos<bfloat16_t>(x, out, positions, inv_freq, p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace a2ats
