// Rotary position embedding (RoPE) with arbitrary, possibly negative, positions.
//
// Used three ways by A²ATS: un-rotating keys to pre-RoPE form (positions -n), moving a
// query to the WRoPE distance (positions b - m), and plain RoPE. Math is float32 with the
// angle computed as float(pos) * inv_freq[i], exactly as transformers does, so that
// rotating by -p undoes rotating by p up to the rounding of cos/sin.
#pragma once

#include <cmath>
#include <cstdint>

#include "a2ats/common.h"

namespace a2ats {

// sin and cos of a float32 angle, for the CPU and the CUDA kernels alike: the quadrant
// reduction and the polynomials run in double (|angle| < 2^31) and round to float, correctly
// rounded in practice. Unlike libm's sinf/cosf (or CUDA's sincosf) there is no slow
// large-argument path, which the first frequencies of every long-context position would hit,
// and on the CPU the loop over frequencies vectorises. rint rounds ties to even, like the
// default rounding mode.
A2ATS_HOST_DEVICE void sincos_angle(float angle, float* sin_out, float* cos_out) {
  const double x = angle;
  const double quadrant = rint(x * 0.63661977236758134308);  // x / (pi/2)
  const double r = (x - quadrant * 1.5707963267948966) - quadrant * 6.123233995736766e-17;
  const double r2 = r * r;
  const double s =
      r + r * r2 *
              (-1.0 / 6 +
               r2 * (1.0 / 120 +
                     r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 + r2 * (-1.0 / 39916800 + r2 * (1.0 / 6227020800.0))))));
  const double c =
      1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 +
                                                                   r2 * (-1.0 / 3628800 + r2 * (1.0 / 479001600.0))))));
  const int q = int(static_cast<long long>(quadrant) & 3);
  const double sv = (q & 1) ? c : s;
  const double cv = (q & 1) ? s : c;
  *sin_out = float((q & 2) ? -sv : sv);
  *cos_out = float(((q + 1) & 2) ? -cv : cv);
}

struct RotaryParams {
  int64_t batch = 0, num_heads = 0, num_tokens = 0, head_dim = 0;
  int64_t rotary_dim = 0;             // R <= head_dim, even; dims >= R pass through
  bool interleaved = false;           // pairs (2i, 2i+1) instead of (i, i + R/2)
  DType dtype = DType::kFloat32;      // of x and out
  DType pos_dtype = DType::kInt64;    // int32 or int64
  int64_t x_stride[3] = {0, 0, 0};    // (b, h, t) in elements; head_dim is contiguous
  int64_t out_stride[3] = {0, 0, 0};  // (b, h, t)
  int64_t pos_stride[2] = {0, 0};     // (b, t)
};

// x, out: (B, H, T, D) of params.dtype (out may alias x); positions: (B, T); inv_freq: (R/2,) f32.
void rotary_cpu(const void* x, void* out, const void* positions, const float* inv_freq, const RotaryParams& params);

}  // namespace a2ats
