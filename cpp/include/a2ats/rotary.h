// Rotary position embedding (RoPE) with arbitrary, possibly negative, positions.
//
// Used three ways by A²ATS: un-rotating keys to pre-RoPE form (positions -n), moving a
// query to the WRoPE distance (positions b - m), and plain RoPE. Math is float32 with the
// angle computed as float(pos) * inv_freq[i], exactly as transformers does, so that
// rotating by -p undoes rotating by p up to the rounding of cos/sin.
#pragma once

#include <cstdint>

#include "a2ats/common.h"

namespace a2ats {

struct RotaryParams {
  int64_t batch = 0, num_heads = 0, num_tokens = 0, head_dim = 0;
  int64_t rotary_dim = 0;    // R <= head_dim, even; dims >= R pass through
  bool interleaved = false;  // pairs (2i, 2i+1) instead of (i, i + R/2)
  DType dtype = DType::kFloat32;      // of x and out
  DType pos_dtype = DType::kInt64;    // int32 or int64
  int64_t x_stride[3] = {0, 0, 0};    // (b, h, t) in elements; head_dim is contiguous
  int64_t out_stride[3] = {0, 0, 0};  // (b, h, t)
  int64_t pos_stride[2] = {0, 0};     // (b, t)
};

// x, out: (B, H, T, D) of params.dtype (out may alias x); positions: (B, T); inv_freq: (R/2,) f32.
void rotary_cpu(const void* x, void* out, const void* positions, const float* inv_freq,
                const RotaryParams& params);

}  // namespace a2ats
