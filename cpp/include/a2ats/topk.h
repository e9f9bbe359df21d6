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

// Order-preserving map of a float32 score to an unsigned key (larger score, larger key);
// NaN maps to 0 so it ranks below -inf. The key both radix selections (CPU and CUDA) rank by.
A2ATS_HOST_DEVICE uint32_t score_key(float s) {
  const uint32_t u = float_to_bits(s);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace a2ats
