// Token selection: per query head top-k over the candidate range, united over the GQA
// group, plus the always-kept sink and window tokens.
#pragma once

#include <cstdint>

#include "a2ats/common.h"

namespace a2ats {

struct SelectTopkParams {
  int64_t batch = 0, num_q_heads = 0, group_size = 1;
  int64_t capacity = 0;  // Tcap
  int64_t k = 0, sink = 0, window = 0;
  int64_t max_selected = 0;  // Kmax = group_size * k + sink + window (+ 0 without add_resident)
  // (B,) int32 or null: batch row b takes k_per_row[b] in [0, k] instead of k (a serving
  // engine's requests each have their own budget; k is then their maximum). On the CPU it is
  // read on the host, on CUDA on the device (clamped to [0, k] there).
  const int32_t* k_per_row = nullptr;
  // false: only the selected candidates, for a caller that holds the sink and window rows
  // elsewhere (the CUDA pipeline keeps them on the device).
  bool add_resident = true;
  int64_t scores_stride[2] = {0, 0};   // (b, h); tokens contiguous
  int64_t indices_stride[2] = {0, 0};  // (b, g); slots contiguous
  int64_t counts_stride[2] = {0, 0};   // (b, g)
};

// Candidates of row b are tokens [sink, lengths[b] - window). Per query head the k
// highest-scoring candidates are taken (all when there are <= k; ties go to the lower
// index; NaN ranks lowest), the group_size heads of a KV head are united, and tokens
// [0, sink) and [lengths[b] - window, lengths[b]) are added (when add_resident).
// scores: (B, Hq, Tcap) f32; lengths: (B,) with 0 <= lengths[b] <= Tcap;
// indices: (B, Hkv, Kmax) int32 ascending, padded with -1; counts: (B, Hkv) int32.
void select_topk_cpu(const float* scores, const int32_t* lengths, int32_t* indices, int32_t* counts,
                     const SelectTopkParams& params);

// The per-KV-head budget: one score row per KV head from its group's query heads, so that
// selecting k rows of it reads exactly k rows (the union of per-head top-k reads up to G k).
struct GroupScoresParams {
  int64_t batch = 0, num_q_heads = 0, group_size = 1;
  int64_t capacity = 0;  // Tcap
  int64_t sink = 0, window = 0;
  int64_t scores_stride[2] = {0, 0};  // (b, h); tokens contiguous
  int64_t out_stride[2] = {0, 0};     // (b, g); tokens contiguous
};

// out[b, g, t] = max over the group's heads h of log softmax_h(t), where softmax_h runs over the
// candidates [sink, lengths[b] - window) of scores[b, h]: each head's scores normalised to the
// log of its attention distribution over the far tokens, so no head dominates by scale. -inf
// outside the candidates; NaN scores are ignored (a token whose heads are all NaN gets -inf).
// scores: (B, Hq, Tcap) f32; lengths: (B,) with 0 <= lengths[b] <= Tcap; out: (B, Hkv, Tcap) f32.
void group_scores_cpu(const float* scores, const int32_t* lengths, float* out, const GroupScoresParams& params);

// e^x for x <= 0 in double, branch-free so that loops over it vectorise, and one definition for
// the CPU and CUDA sums of group_scores. Relative error about 1e-16 near 0 and below 1e-13 down
// to -708 (the softmax sums are dominated by terms near 0); ~0 below -745. NaN: callers skip it.
// Rounds x / ln 2 to n with the 1.5 * 2^52 shifter, then e^x = 2^n e^r, |r| <= ln 2 / 2, from a
// degree-12 Taylor polynomial.
A2ATS_HOST_DEVICE double exp_nonpositive(double x) {
  x = x > -745.0 ? x : -745.0;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: t's low mantissa bits hold round(x / ln 2)
  const double t = x * 1.4426950408889634 + shifter;
  const double n = t - shifter;  // round(x / ln 2), as a double
  const double r = (x - n * 0.6931471805599453) - n * 2.3190468138462996e-17;
  double p = 1.0 / 479001600.0;  // 1/12!
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // n from t's bits (integer lanes, no float-to-int conversion), then 2^n in two halves so that
  // n down to -1075 (subnormal results) stays exact.
  uint64_t tb;
#if defined(__CUDA_ARCH__)
  tb = uint64_t(__double_as_longlong(t));
#else
  std::memcpy(&tb, &t, 8);
#endif
  const int64_t ni = int64_t(tb) - int64_t(0x4338000000000000ull), half = ni >> 1;
  const uint64_t a = uint64_t(half + 1023) << 52, b = uint64_t(ni - half + 1023) << 52;
  double sa, sb;
#if defined(__CUDA_ARCH__)
  sa = __longlong_as_double((long long)a);
  sb = __longlong_as_double((long long)b);
#else
  std::memcpy(&sa, &a, 8);
  std::memcpy(&sb, &b, 8);
#endif
  return p * sa * sb;
}

// Order-preserving map of a float32 score to an unsigned key (larger score, larger key);
// NaN maps to 0 so it ranks below -inf. The key both radix selections (CPU and CUDA) rank by.
A2ATS_HOST_DEVICE uint32_t score_key(float s) {
  const uint32_t u = float_to_bits(s);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace a2ats
