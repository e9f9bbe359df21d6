#pragma once
#include "cuda_runtime.h"
#include "a2ats/common.h"
struct __half {
  uint16_t x;
};
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) { return a2ats::to_float(a2ats::half_t{h.x}); }
inline __half __float2half_rn(float f) { return __half{a2ats::from_float<a2ats::half_t>(f).bits}; }
