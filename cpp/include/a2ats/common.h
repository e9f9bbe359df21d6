// Shared scalar types for the a2ats kernels: element types, half/bfloat16 conversion, and the
// multiversioning that lets hot loops use AVX2/AVX-512 when the CPU has them while the wheel
// itself is built for the baseline ISA. Every CPU entry point throws std::invalid_argument for
// what it does not support; the bindings turn that into ValueError.
#pragma once

#include <cstdint>
#include <cstring>

// ISA levels of the hot loops. Each multiversioned function is compiled three times (AVX-512,
// AVX2+FMA, baseline x86-64) and dispatches on the active level at every call, so the wheel
// runs on any x86-64 and a test can run every clone the machine supports (set_isa).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && !defined(__CUDACC__)
#define A2ATS_HAS_ISA_CLONES 1
#else
#define A2ATS_HAS_ISA_CLONES 0
#endif

namespace a2ats {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };  // x86-64, x86-64-v3, x86-64-v4

// The level the multiversioned loops run at: A2ATS_ISA (baseline, avx2 or avx512) when set,
// else the best this CPU supports. The first call throws std::invalid_argument for an unknown
// or unsupported A2ATS_ISA.
Isa active_isa();
// The best level this CPU (and this build) supports; every level below it is supported too.
Isa best_isa();
// Switches the level for every later call; throws std::invalid_argument for an unsupported one.
// For tests and diagnostics: calls already running keep the clone they started with.
void set_isa(Isa isa);
const char* isa_name(Isa isa);
// The level named `name`; throws std::invalid_argument naming `what` for an unknown name.
Isa parse_isa(const char* name, const char* what);

}  // namespace a2ats

// Defines `ret name params` as the dispatcher over three clones of `body args`, where `body`
// is an A2ATS_INLINE function (inlined into each clone, so compiled once per ISA level).
#if A2ATS_HAS_ISA_CLONES
#define A2ATS_MULTIVERSIONED(ret, name, body, params, args)                                \
  __attribute__((target("arch=x86-64-v4"))) ret name##_avx512 params { return body args; } \
  __attribute__((target("arch=x86-64-v3"))) ret name##_avx2 params { return body args; }   \
  ret name##_baseline params { return body args; }                                         \
  ret name params {                                                                        \
    switch (::a2ats::active_isa()) {                                                       \
      case ::a2ats::Isa::kAvx512:                                                          \
        return name##_avx512 args;                                                         \
      case ::a2ats::Isa::kAvx2:                                                            \
        return name##_avx2 args;                                                           \
      default:                                                                             \
        return name##_baseline args;                                                       \
    }                                                                                      \
  }
#else
#define A2ATS_MULTIVERSIONED(ret, name, body, params, args) \
  ret name params { return body args; }
#endif

// Helpers called from multiversioned loops must be inlined into each clone to benefit.
#if defined(__GNUC__)
#define A2ATS_INLINE inline __attribute__((always_inline))
#else
#define A2ATS_INLINE inline
#endif

// A helper of both the CPU and the CUDA kernels: one definition, so both round alike.
#if defined(__CUDACC__)
#define A2ATS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define A2ATS_HOST_DEVICE A2ATS_INLINE
#endif

namespace a2ats {

// Largest head_dim the kernels accept; lets per-row scratch live on the stack.
constexpr int64_t kMaxHeadDim = 1024;

// Eight float lanes as a GCC/Clang vector: one AVX register in the AVX2/AVX-512 clones, two
// SSE registers in the baseline one. Used for register-blocked micro-kernels, where plain
// arrays of accumulators end up spilled to the stack.
// They are only ever inlined, so the AVX argument-passing ABI note (-Wpsabi) does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float f32x8 __attribute__((vector_size(32)));
A2ATS_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
A2ATS_INLINE f32x8 splat8(float x) { return f32x8{} + x; }
A2ATS_INLINE float sum8(f32x8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt16 = 3, kInt32 = 4, kInt64 = 5 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
      return 2;
    case DType::kBFloat16:
      return 2;
    case DType::kInt16:
      return 2;
    case DType::kInt32:
      return 4;
    case DType::kInt64:
      return 8;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kInt16:
      return "int16";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
  }
  return "?";
}

// Storage-only 16-bit floats; all arithmetic happens in float32.
struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

A2ATS_HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
A2ATS_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// float32 -> bfloat16 bits, round to nearest even; a NaN stays a (quiet) NaN.
A2ATS_HOST_DEVICE uint16_t bfloat16_bits(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

A2ATS_INLINE float to_float(float x) { return x; }
A2ATS_INLINE float to_float(bfloat16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
#if defined(__FLT16_MAX__) && !defined(__CUDACC__)
// The compiler's _Float16 converts exactly (F16C instructions where the target has them,
// e.g. in the AVX2 clones of multiversioned loops; a correctly rounded libgcc call otherwise).
#define A2ATS_HAVE_FLOAT16 1
#endif

A2ATS_INLINE float to_float(half_t x) {
#ifdef A2ATS_HAVE_FLOAT16
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return float(h);
#else
  // IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, nan).
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp_mant = (h & 0x7fffu) << 13;
  // Rebias the exponent by multiplying with 2^112; inf/nan get their exponent forced to max.
  float f = bits_to_float(exp_mant) * bits_to_float(0x77800000u);
  uint32_t u = float_to_bits(f);
  if (exp_mant >= 0x0f800000u) u = exp_mant | 0x7f800000u;
  return bits_to_float(u | sign);
#endif
}

template <typename T>
inline T from_float(float f);
template <>
A2ATS_INLINE float from_float<float>(float f) {
  return f;
}
template <>
A2ATS_INLINE bfloat16_t from_float<bfloat16_t>(float f) {
  return bfloat16_t{bfloat16_bits(f)};
}
template <>
A2ATS_INLINE half_t from_float<half_t>(float f) {
#ifdef A2ATS_HAVE_FLOAT16
  const _Float16 h = _Float16(f);
  half_t out;
  std::memcpy(&out.bits, &h, 2);
  return out;
#else
  // binary32 -> binary16 with round-to-nearest-even, overflow to inf, subnormals, nan kept.
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint16_t out;
  if (a >= 0x7f800000u) {
    out = uint16_t(a > 0x7f800000u ? 0x7e00u : 0x7c00u);
  } else if (a >= 0x477ff000u) {  // rounds to >= 65520 -> inf
    out = 0x7c00u;
  } else if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // Adding 0.5 (2^-1) aligns the mantissa so the FPU performs the rounding for us.
    const float shifted = bits_to_float(a) + 0.5f;
    out = uint16_t(float_to_bits(shifted) - 0x3f000000u);
  } else {
    const uint32_t mant_odd = (a >> 13) & 1u;
    uint32_t r = a + ((15u - 127u) << 23) + 0xfffu + mant_odd;
    out = uint16_t(r >> 13);
  }
  return half_t{uint16_t(out | sign)};
#endif
}

// Rows that a loop copying scattered store rows asks for ahead of the one it copies: enough
// misses in flight to cover the memory latency at a few hundred bytes per row (best from 4 to
// 8 in a copy-only benchmark of 512-byte K and V rows at 12% density on a 2-core EPYC VM,
// 7.3 -> 9.6 GB/s).
constexpr int64_t kPrefetchRows = 6;

// Asks for every cache line of one row, for reading once (no temporal locality).
A2ATS_INLINE void prefetch_row(const char* row, size_t row_bytes) {
  for (size_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(row + line, 0, 0);
}

// copy(i, k_row, v_row) for i in [begin, end), the K and V rows of store row idx[i] from the
// blocks k_block and v_block (rows of row_bytes), with the rows kPrefetchRows ahead prefetched.
template <typename Copy>
A2ATS_INLINE void for_each_row_prefetched(const char* k_block, const char* v_block, const int32_t* idx, int64_t begin,
                                          int64_t end, size_t row_bytes, const Copy& copy) {
  const auto prefetch = [&](int64_t i) {
    prefetch_row(k_block + size_t(idx[i]) * row_bytes, row_bytes);
    prefetch_row(v_block + size_t(idx[i]) * row_bytes, row_bytes);
  };
  for (int64_t i = begin; i < end && i < begin + kPrefetchRows; ++i) prefetch(i);
  for (int64_t i = begin; i < end; ++i) {
    if (i + kPrefetchRows < end) prefetch(i + kPrefetchRows);
    copy(i, k_block + size_t(idx[i]) * row_bytes, v_block + size_t(idx[i]) * row_bytes);
  }
}

}  // namespace a2ats
