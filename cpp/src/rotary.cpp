#include "a2ats/rotary.h"

#include <cmath>

#include "a2ats/thread_pool.h"

namespace a2ats {
namespace {

// Rotates one (D,) row; cos/sin hold the R/2 angles of this token.
template <typename T>
inline void rotate_row(const T* x, T* out, const float* cos_t, const float* sin_t, int64_t half,
                       int64_t head_dim, bool interleaved) {
  const int64_t rot = 2 * half;
  if (interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(x[2 * i]), x2 = to_float(x[2 * i + 1]);
      out[2 * i] = from_float<T>(x1 * cos_t[i] - x2 * sin_t[i]);
      out[2 * i + 1] = from_float<T>(x2 * cos_t[i] + x1 * sin_t[i]);
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
      out[i] = from_float<T>(x1 * cos_t[i] - x2 * sin_t[i]);
      out[i + half] = from_float<T>(x2 * cos_t[i] + x1 * sin_t[i]);
    }
  }
  if (out != x)
    for (int64_t i = rot; i < head_dim; ++i) out[i] = x[i];
}

template <typename T, typename P>
void rotary_typed(const T* x, T* out, const P* positions, const float* inv_freq, const RotaryParams& p) {
  const int64_t half = p.rotary_dim / 2;
  // One work item per (b, t): its cos/sin are computed once and applied to all heads.
  ThreadPool::global().parallel_for(p.batch * p.num_tokens, [&](int64_t begin, int64_t end) {
    float cos_t[kMaxHeadDim / 2], sin_t[kMaxHeadDim / 2];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.num_tokens, t = item % p.num_tokens;
      const float pos = float(positions[b * p.pos_stride[0] + t * p.pos_stride[1]]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = pos * inv_freq[i];
        cos_t[i] = std::cos(angle);
        sin_t[i] = std::sin(angle);
      }
      for (int64_t h = 0; h < p.num_heads; ++h) {
        rotate_row(x + b * p.x_stride[0] + h * p.x_stride[1] + t * p.x_stride[2],
                   out + b * p.out_stride[0] + h * p.out_stride[1] + t * p.out_stride[2],
                   cos_t, sin_t, half, p.head_dim, p.interleaved);
      }
    }
  }, 4);
}

template <typename T>
void rotary_dispatch_pos(const void* x, void* out, const void* positions, const float* inv_freq,
                         const RotaryParams& p) {
  if (p.pos_dtype == DType::kInt32)
    rotary_typed(static_cast<const T*>(x), static_cast<T*>(out), static_cast<const int32_t*>(positions), inv_freq, p);
  else
    rotary_typed(static_cast<const T*>(x), static_cast<T*>(out), static_cast<const int64_t*>(positions), inv_freq, p);
}

}  // namespace

void rotary_cpu(const void* x, void* out, const void* positions, const float* inv_freq, const RotaryParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: rotary_dispatch_pos<float>(x, out, positions, inv_freq, p); break;
    case DType::kFloat16: rotary_dispatch_pos<half_t>(x, out, positions, inv_freq, p); break;
    case DType::kBFloat16: rotary_dispatch_pos<bfloat16_t>(x, out, positions, inv_freq, p); break;
    default: break;
  }
}

}  // namespace a2ats
