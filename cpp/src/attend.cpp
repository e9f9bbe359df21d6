// KVStore::attend: softmax attention of a GQA group's query heads over selected store rows,
// without gathering them into an output tensor. Rows are taken in chunks of 128, staged in a
// per-thread buffer; each chunk yields one softmax state per head (max logit m, sum of exp s,
// unnormalised output o), and the states of a row's chunks are merged, so a long selection
// spreads over the pool's threads. The specification is reference.attend over
// reference.gather's rows (python/a2ats/reference.py).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "a2ats/common.h"
#include "a2ats/kv_store.h"

namespace a2ats {
namespace {

constexpr int64_t kAttendChunkRows = 128;  // rows per work item; (G, 128) logits stay in L1

typedef int32_t i32x8 __attribute__((vector_size(32)));

// e^x for x <= 0 (logits minus their maximum), eight lanes: x = n ln2 + r with |r| <= ln2 / 2,
// e^r from Cephes' degree-6 expf polynomial (about 1 ulp), 2^n through the exponent bits.
// Below -87 the result would be subnormal; it is flushed to e^-87, which no sum of at least
// one (the maximum's own e^0) can tell from zero.
A2ATS_INLINE f32x8 exp_nonpositive8(const f32x8& logit) {
  const f32x8 lowest = splat8(-87.0f);
  const f32x8 x = logit < lowest ? lowest : logit;
  const f32x8 magic = splat8(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f32x8 shifted = x * 1.44269504088896341f + magic;
  const f32x8 n = shifted - magic;
  const f32x8 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 in two parts
  f32x8 poly = splat8(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const f32x8 er = poly * r * r + r + 1.0f;
  const i32x8 exponent = (i32x8(shifted) - i32x8(magic) + 127) << 23;  // 2^n, n >= -126
  return er * f32x8(exponent);
}

// logits[h][i] = scale * q[h] . k_i for HB heads and n rows; row h of logits at
// logits + h * kAttendChunkRows. Two rows at a time: 2 * HB independent accumulator chains
// keep the FMA units busy where one chain per dot product would wait on its own latency.
template <int HB>
A2ATS_INLINE void logits_block(const float* const* q, const float* const* k_rows, int64_t n, int64_t head_dim,
                               float scale, float* logits) {
  const auto finish = [&](const f32x8& acc, int h, int64_t i, int64_t d) {
    float dot = sum8(acc);
    for (; d < head_dim; ++d) dot += q[h][d] * k_rows[i][d];
    logits[h * kAttendChunkRows + i] = dot * scale;
  };
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    f32x8 acc0[HB] = {}, acc1[HB] = {};
    int64_t d = 0;
    for (; d + 8 <= head_dim; d += 8) {
      const f32x8 k0 = load8(k_rows[i] + d), k1 = load8(k_rows[i + 1] + d);
      for (int h = 0; h < HB; ++h) {
        const f32x8 qv = load8(q[h] + d);
        acc0[h] += qv * k0;
        acc1[h] += qv * k1;
      }
    }
    for (int h = 0; h < HB; ++h) {
      finish(acc0[h], h, i, d);
      finish(acc1[h], h, i + 1, d);
    }
  }
  for (; i < n; ++i) {
    f32x8 acc[HB] = {};
    int64_t d = 0;
    for (; d + 8 <= head_dim; d += 8) {
      const f32x8 k0 = load8(k_rows[i] + d);
      for (int h = 0; h < HB; ++h) acc[h] += load8(q[h] + d) * k0;
    }
    for (int h = 0; h < HB; ++h) finish(acc[h], h, i, d);
  }
}

// out[h] = sum_i probs[h][i] * v_i for HB heads (out[h]: D floats, overwritten). Sixteen
// output dims at a time over all rows: 2 * HB accumulators stay in registers instead of
// a load and a store of the output per row.
template <int HB>
A2ATS_INLINE void values_block(const float* probs, const float* const* v_rows, int64_t n, int64_t head_dim,
                               float* const* out) {
  int64_t d = 0;
  for (; d + 16 <= head_dim; d += 16) {
    f32x8 acc0[HB] = {}, acc1[HB] = {};
    for (int64_t i = 0; i < n; ++i) {
      const f32x8 v0 = load8(v_rows[i] + d), v1 = load8(v_rows[i] + d + 8);
      for (int h = 0; h < HB; ++h) {
        const f32x8 p = splat8(probs[h * kAttendChunkRows + i]);
        acc0[h] += p * v0;
        acc1[h] += p * v1;
      }
    }
    for (int h = 0; h < HB; ++h) {
      std::memcpy(out[h] + d, &acc0[h], sizeof(f32x8));
      std::memcpy(out[h] + d + 8, &acc1[h], sizeof(f32x8));
    }
  }
  for (; d < head_dim; ++d)
    for (int h = 0; h < HB; ++h) {
      float sum = 0.f;
      for (int64_t i = 0; i < n; ++i) sum += probs[h * kAttendChunkRows + i] * v_rows[i][d];
      out[h][d] = sum;
    }
}

// HB heads from h: their logits, then (after the softmax) their outputs.
template <int HB>
A2ATS_INLINE void logits_heads(const float* const* q, int64_t h, const float* const* k_rows, int64_t n,
                               int64_t head_dim, float scale, float* logits) {
  logits_block<HB>(q + h, k_rows, n, head_dim, scale, logits + h * kAttendChunkRows);
}
template <int HB>
A2ATS_INLINE void values_heads(const float* probs, int64_t h, const float* const* v_rows, int64_t n, int64_t head_dim,
                               float* state) {
  float* out[HB];
  for (int j = 0; j < HB; ++j) out[j] = state + (h + j) * (head_dim + 2) + 2;
  values_block<HB>(probs + h * kAttendChunkRows, v_rows, n, head_dim, out);
}

// One chunk of one (b, g): logits (G, kAttendChunkRows) of its n rows for each head, then the
// chunk's softmax state per head into state (G, D + 2) = [m, s, o_0 .. o_{D-1}].
// k_rows/v_rows: n row pointers (f32, D contiguous). Heads go four at a time.
A2ATS_INLINE void attend_chunk_body(const float* const* q, int64_t group_size, int64_t head_dim, float scale,
                                    const float* const* k_rows, const float* const* v_rows, int64_t n, float* logits,
                                    float* state) {
  int64_t h = 0;
  for (; h + 4 <= group_size; h += 4) logits_heads<4>(q, h, k_rows, n, head_dim, scale, logits);
  for (; h < group_size; ++h) logits_heads<1>(q, h, k_rows, n, head_dim, scale, logits);
  for (h = 0; h < group_size; ++h) {
    float* row = logits + h * kAttendChunkRows;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, row[i]);
    // Padding lanes past n are computed and ignored: the row has kAttendChunkRows slots.
    f32x8 sum = {};
    for (int64_t i = 0; i < n; i += 8) {
      const f32x8 e = exp_nonpositive8(load8(row + i) - m);
      std::memcpy(row + i, &e, sizeof(e));
      for (int l = 0; l < 8; ++l) sum[l] += i + l < n ? e[l] : 0.f;
    }
    state[h * (head_dim + 2)] = m;
    state[h * (head_dim + 2) + 1] = sum8(sum);
  }
  for (h = 0; h + 4 <= group_size; h += 4) values_heads<4>(logits, h, v_rows, n, head_dim, state);
  for (; h < group_size; ++h) values_heads<1>(logits, h, v_rows, n, head_dim, state);
}
A2ATS_MULTIVERSIONED(void, attend_chunk, attend_chunk_body,
                     (const float* const* q, int64_t group_size, int64_t head_dim, float scale,
                      const float* const* k_rows, const float* const* v_rows, int64_t n, float* logits, float* state),
                     (q, group_size, head_dim, scale, k_rows, v_rows, n, logits, state))

// Rows of a 16-bit store widened to f32, so that attend_chunk has one element type. GCC does
// not vectorise half -> float conversions, so x86 CPUs with F16C (all AVX2 ones) take eight at
// a time through vcvtph2ps.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define A2ATS_F16C_WIDEN 1
__attribute__((target("avx,f16c"))) void widen_rows_f16c(const half_t* const* rows, int64_t n, int64_t head_dim,
                                                         float* out) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t d = 0;
    for (; d + 8 <= head_dim; d += 8)
      _mm256_storeu_ps(out + i * head_dim + d,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i] + d))));
    for (; d < head_dim; ++d) out[i * head_dim + d] = to_float(rows[i][d]);
  }
}
#endif

void widen_rows(const half_t* const* rows, int64_t n, int64_t head_dim, float* out) {
#ifdef A2ATS_F16C_WIDEN
  // F16C is part of the AVX2 level (x86-64-v3), so the baseline clone never uses it.
  if (active_isa() != Isa::kBaseline) return widen_rows_f16c(rows, n, head_dim, out);
#endif
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < head_dim; ++d) out[i * head_dim + d] = to_float(rows[i][d]);
}
A2ATS_INLINE void widen_rows_body(const bfloat16_t* const* rows, int64_t n, int64_t head_dim, float* out) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < head_dim; ++d) out[i * head_dim + d] = to_float(rows[i][d]);
}
A2ATS_MULTIVERSIONED(void, widen_rows, widen_rows_body,
                     (const bfloat16_t* const* rows, int64_t n, int64_t head_dim, float* out), (rows, n, head_dim, out))

// The n K and V rows of one chunk as f32 in `scratch` (2, kAttendChunkRows, D), with their
// pointers in `k_rows` and `v_rows`. They are copied out of the store first, a memcpy per row,
// K and V of a row together, with the rows kPrefetchRows ahead prefetched: that keeps many
// sparse rows' misses in flight, where computing on (or converting) rows straight from the
// store leaves the core waiting on about one row at a time (measured about 2x slower with the
// store out of cache). 16-bit rows land in `staging` (2, kAttendChunkRows, row bytes) and are
// widened from there.
template <typename T>
void chunk_rows(const char* k_block, const char* v_block, const int32_t* idx, int64_t n, int64_t head_dim,
                float* scratch, char* staging, const float** k_rows, const float** v_rows) {
  const size_t row_bytes = size_t(head_dim) * sizeof(T), plane = size_t(kAttendChunkRows) * row_bytes;
  char* copies = std::is_same_v<T, float> ? reinterpret_cast<char*>(scratch) : staging;
  for_each_row_prefetched(k_block, v_block, idx, 0, n, row_bytes, [&](int64_t i, const char* k, const char* v) {
    std::memcpy(copies + size_t(i) * row_bytes, k, row_bytes);
    std::memcpy(copies + plane + size_t(i) * row_bytes, v, row_bytes);
  });
  if constexpr (!std::is_same_v<T, float>) {
    const T* typed[2 * kAttendChunkRows];
    for (int64_t i = 0; i < n; ++i) {
      typed[i] = reinterpret_cast<const T*>(copies + size_t(i) * row_bytes);
      typed[n + i] = reinterpret_cast<const T*>(copies + plane + size_t(i) * row_bytes);
    }
    widen_rows(typed, n, head_dim, scratch);
    widen_rows(typed + n, n, head_dim, scratch + kAttendChunkRows * head_dim);
  }
  for (int64_t i = 0; i < n; ++i) {
    k_rows[i] = scratch + i * head_dim;
    v_rows[i] = scratch + (kAttendChunkRows + i) * head_dim;
  }
}

}  // namespace

void KVStore::attend(int64_t layer, const float* q, const int32_t* indices, const int32_t* counts, float* out,
                     float* lse, const AttendParams& p) {
  const int64_t num_queries = queries_or_batch(p.num_queries), group_size = p.group_size, head_dim = head_dim_;
  const int64_t state_floats = group_size * (head_dim + 2);
  const int64_t chunks =
      std::max<int64_t>(1, (max_count(counts, p.counts_stride, num_queries) + kAttendChunkRows - 1) / kAttendChunkRows);
  const int64_t num_items = num_queries * num_kv_heads_ * chunks;
  if (int64_t(attend_partials_.size()) < num_items * state_floats)
    attend_partials_.resize(size_t(num_items * state_floats));
  float* partials = attend_partials_.data();
  const auto count_of = [&](int64_t b, int64_t g) {
    return int64_t(counts[b * p.counts_stride[0] + g * p.counts_stride[1]]);
  };
  const auto run = [&](auto element) {
    using T = decltype(element);
    pool_->parallel_for(
        num_items,
        [&](int64_t begin, int64_t end) {
          thread_local std::vector<float> logits, scratch;
          thread_local std::vector<char> staging;
          staging.resize(std::max(size_t(2 * kAttendChunkRows * head_dim) * sizeof(T), staging.size()));
          thread_local std::vector<const float*> q_heads;
          q_heads.resize(size_t(group_size));
          logits.resize(size_t(std::max<int64_t>(group_size * kAttendChunkRows, int64_t(logits.size()))));
          scratch.resize(size_t(std::max<int64_t>(2 * kAttendChunkRows * head_dim, int64_t(scratch.size()))));
          const float* k_chunk[kAttendChunkRows];
          const float* v_chunk[kAttendChunkRows];
          for (int64_t item = begin; item < end; ++item) {
            // Work item -> (b, g, rows [lo, hi) of its selection).
            const int64_t chunk = item % chunks, bg = item / chunks;
            const int64_t b = bg / num_kv_heads_, g = bg % num_kv_heads_;
            const int64_t lo = chunk * kAttendChunkRows, hi = std::min(count_of(b, g), lo + kAttendChunkRows);
            float* state = partials + item * state_floats;
            if (lo >= hi) {
              for (int64_t h = 0; h < group_size; ++h) {
                state[h * (head_dim + 2)] = -std::numeric_limits<float>::infinity();
                state[h * (head_dim + 2) + 1] = 0.f;
              }
              continue;
            }
            for (int64_t h = 0; h < group_size; ++h)
              q_heads[h] = q + b * p.q_stride[0] + (g * group_size + h) * p.q_stride[1];
            const int32_t* idx = indices + b * p.indices_stride[0] + g * p.indices_stride[1] + lo;
            chunk_rows<T>(k_rows(layer, store_row(b), g), v_rows(layer, store_row(b), g), idx, hi - lo, head_dim,
                          scratch.data(), staging.data(), k_chunk, v_chunk);
            attend_chunk(q_heads.data(), group_size, head_dim, p.scale, k_chunk, v_chunk, hi - lo, logits.data(),
                         state);
          }
        },
        ThreadPool::min_chunk_for(4 * kAttendChunkRows * head_dim * group_size));
  };
  switch (dtype_) {
    case DType::kFloat16:
      run(half_t{});
      break;
    case DType::kBFloat16:
      run(bfloat16_t{});
      break;
    default:
      run(float{});
      break;
  }
  // Merge each (b, h)'s chunk states: M = max m_c, S = sum s_c e^(m_c - M), out = sum o_c e^(m_c - M) / S.
  for (int64_t bg = 0; bg < num_queries * num_kv_heads_; ++bg) {
    const int64_t b = bg / num_kv_heads_, g = bg % num_kv_heads_;
    for (int64_t h = 0; h < group_size; ++h) {
      const int64_t head = g * group_size + h;
      float* o = out + b * p.out_stride[0] + head * p.out_stride[1];
      float* l = lse + b * p.lse_stride[0] + head * p.lse_stride[1];
      const auto chunk_state = [&](int64_t c) {
        return partials + (bg * chunks + c) * state_floats + h * (head_dim + 2);
      };
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, chunk_state(c)[0]);
      std::fill(o, o + head_dim, 0.f);
      if (m == -std::numeric_limits<float>::infinity()) {
        *l = m;
        continue;
      }
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* st = chunk_state(c);
        if (st[1] == 0.f) continue;
        const float w = std::exp(st[0] - m);
        total += st[1] * w;
        for (int64_t d = 0; d < head_dim; ++d) o[d] += st[2 + d] * w;
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < head_dim; ++d) o[d] *= inv;
      *l = m + std::log(total);
    }
  }
}

}  // namespace a2ats
