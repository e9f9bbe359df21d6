#include "a2ats/rotary.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "a2ats/thread_pool.h"

namespace a2ats {
namespace {

template <typename T>
A2ATS_INLINE void rotate_token(const T* x, int64_t x_head_stride, T* out, int64_t out_head_stride, int64_t num_heads,
                               float position, const float* inv_freq, int64_t half, int64_t head_dim,
                               bool interleaved) {
  float cos_t[kMaxHeadDim / 2], sin_t[kMaxHeadDim / 2];
  for (int64_t i = 0; i < half; ++i) sincos_angle(position * inv_freq[i], &sin_t[i], &cos_t[i]);
  const int64_t rot = 2 * half;
  for (int64_t h = 0; h < num_heads; ++h, x += x_head_stride, out += out_head_stride) {
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
}

// One multiversioned entry per element type (the clones are plain functions, not templates).
#define A2ATS_ROTATE_TOKEN(NAME, T)                                                                                  \
  A2ATS_MULTIVERSIONED(void, NAME, rotate_token,                                                                     \
                       (const T* x, int64_t xs, T* out, int64_t os, int64_t heads, float pos, const float* inv_freq, \
                        int64_t half, int64_t head_dim, bool interleaved),                                           \
                       (x, xs, out, os, heads, pos, inv_freq, half, head_dim, interleaved))
A2ATS_ROTATE_TOKEN(rotate_token_f32, float)
A2ATS_ROTATE_TOKEN(rotate_token_f16, half_t)
A2ATS_ROTATE_TOKEN(rotate_token_bf16, bfloat16_t)
#undef A2ATS_ROTATE_TOKEN

inline void rotate_token_any(const float* x, int64_t xs, float* o, int64_t os, int64_t n, float p, const float* f,
                             int64_t h, int64_t d, bool i) {
  rotate_token_f32(x, xs, o, os, n, p, f, h, d, i);
}
inline void rotate_token_any(const half_t* x, int64_t xs, half_t* o, int64_t os, int64_t n, float p, const float* f,
                             int64_t h, int64_t d, bool i) {
  rotate_token_f16(x, xs, o, os, n, p, f, h, d, i);
}
inline void rotate_token_any(const bfloat16_t* x, int64_t xs, bfloat16_t* o, int64_t os, int64_t n, float p,
                             const float* f, int64_t h, int64_t d, bool i) {
  rotate_token_bf16(x, xs, o, os, n, p, f, h, d, i);
}

template <typename T, typename P>
void rotary_typed(const T* x, T* out, const P* positions, const float* inv_freq, const RotaryParams& p) {
  // One work item per (b, t): its cos/sin are computed once and applied to all heads.
  ThreadPool::global().parallel_for(
      p.batch * p.num_tokens,
      [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / p.num_tokens, t = item % p.num_tokens;
          const float pos = float(positions[b * p.pos_stride[0] + t * p.pos_stride[1]]);
          rotate_token_any(x + b * p.x_stride[0] + t * p.x_stride[2], p.x_stride[1],
                           out + b * p.out_stride[0] + t * p.out_stride[2], p.out_stride[1], p.num_heads, pos, inv_freq,
                           p.rotary_dim / 2, p.head_dim, p.interleaved);
        }
      },
      ThreadPool::min_chunk_for(p.num_heads * p.head_dim * 4));
}

template <typename T>
void rotary_dispatch_pos(const void* x, void* out, const void* positions, const float* inv_freq,
                         const RotaryParams& p) {
  if (p.pos_dtype == DType::kInt32)
    rotary_typed(static_cast<const T*>(x), static_cast<T*>(out), static_cast<const int32_t*>(positions), inv_freq, p);
  else if (p.pos_dtype == DType::kInt64)
    rotary_typed(static_cast<const T*>(x), static_cast<T*>(out), static_cast<const int64_t*>(positions), inv_freq, p);
}

}  // namespace

void rotary_cpu(const void* x, void* out, const void* positions, const float* inv_freq, const RotaryParams& p) {
  if (p.pos_dtype != DType::kInt32 && p.pos_dtype != DType::kInt64)
    throw std::invalid_argument(std::string("rotary: positions must be int32 or int64, got ") +
                                dtype_name(p.pos_dtype));
  if (p.head_dim > kMaxHeadDim || p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim)
    throw std::invalid_argument("rotary: rotary_dim " + std::to_string(p.rotary_dim) +
                                " must be even and <= head_dim " + std::to_string(p.head_dim) +
                                " <= " + std::to_string(kMaxHeadDim));
  switch (p.dtype) {
    case DType::kFloat32:
      rotary_dispatch_pos<float>(x, out, positions, inv_freq, p);
      break;
    case DType::kFloat16:
      rotary_dispatch_pos<half_t>(x, out, positions, inv_freq, p);
      break;
    case DType::kBFloat16:
      rotary_dispatch_pos<bfloat16_t>(x, out, positions, inv_freq, p);
      break;
    default:
      throw std::invalid_argument(std::string("rotary: x must be float32, float16 or bfloat16, got ") +
                                  dtype_name(p.dtype));
  }
}

}  // namespace a2ats
