#include "a2ats/topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "a2ats/common.h"
#include "a2ats/thread_pool.h"

namespace a2ats {
namespace {

// Marks the k best candidates of one row, ordered by (key descending, index ascending).
// Radix selection on the 32-bit keys, 11 + 11 + 10 bits from the top: the first pass builds
// the top-digit histogram; the second marks every candidate whose digit beats the bucket
// holding the k-th best and compacts the bucket's members (key and position) so the finer
// digits only look at those. keys/positions: (2 * n,) scratch.
A2ATS_INLINE void mark_top_k_body(const float* row, int64_t n, int64_t k, uint32_t* keys, int32_t* positions,
                                  uint8_t* mark) {
  static constexpr int kShift[3] = {21, 10, 0};
  static constexpr uint32_t kDigits[3] = {2048, 2048, 1024};
  uint32_t hist[2048];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) keys[i] = score_key(row[i]);  // vectorises
  for (int64_t i = 0; i < n; ++i) ++hist[keys[i] >> kShift[0]];
  uint32_t* key_buf[2] = {keys, keys + n};
  int32_t* pos_buf[2] = {positions, positions + n};
  const uint32_t* cur_keys = keys;
  const int32_t* cur_pos = nullptr;  // null at the first level: position == index
  int64_t cur_n = n;
  int64_t remaining = k;  // how many of the top k are still to be found inside the current bucket
  for (int level = 0;; ++level) {
    const int shift = kShift[level];
    const uint32_t mask = kDigits[level] - 1;
    uint32_t digit = mask;
    for (; int64_t(hist[digit]) < remaining; --digit) remaining -= hist[digit];
    if (level == 2 || int64_t(hist[digit]) == remaining) {
      // Final: digits above the bucket win; inside it the first `remaining` in position order
      // (all of them when the whole bucket fits).
      for (int64_t i = 0; i < cur_n; ++i) {
        const uint32_t d = (cur_keys[i] >> shift) & mask;
        const int32_t pos = cur_pos ? cur_pos[i] : int32_t(i);
        const bool tie = d == digit && remaining > 0;
        remaining -= tie;
        mark[pos] |= uint8_t(d > digit || tie);
      }
      return;
    }
    // Mark keys whose digit beats the bucket and compact the bucket's members. The top k are
    // a small share of the row, so almost every key fails the first test: a well-predicted branch.
    uint32_t* next_keys = key_buf[(level + 1) % 2];
    int32_t* next_pos = pos_buf[(level + 1) % 2];
    const int next_shift = kShift[level + 1];
    const uint32_t next_mask = kDigits[level + 1] - 1;
    std::memset(hist, 0, sizeof(uint32_t) * kDigits[level + 1]);
    int64_t kept = 0;
    for (int64_t i = 0; i < cur_n; ++i) {
      const uint32_t key = cur_keys[i];
      const uint32_t d = (key >> shift) & mask;
      if (d < digit) continue;
      const int32_t pos = cur_pos ? cur_pos[i] : int32_t(i);
      if (d > digit) {
        mark[pos] = 1;
      } else {
        next_keys[kept] = key;
        next_pos[kept] = pos;
        ++hist[(key >> next_shift) & next_mask];
        ++kept;
      }
    }
    cur_keys = next_keys;
    cur_pos = next_pos;
    cur_n = kept;
  }
}
A2ATS_MULTIVERSIONED(void, mark_top_k, mark_top_k_body,
                     (const float* row, int64_t n, int64_t k, uint32_t* keys, int32_t* positions, uint8_t* mark),
                     (row, n, k, keys, positions, mark))

// Rows at least this long, with k at most this share of them, take the sampled path below.
constexpr int64_t kSampledMinRow = 4096;
constexpr int64_t kSampledMaxShare = 16;  // k <= n / 16
constexpr int64_t kSampleSize = 2048;     // the most samples a row takes
constexpr int64_t kMinSampleSize = 512;   // the fewest: n / 16 of a 4k row would judge too coarsely

// The float whose score_key is `key` (key != 0, so not a NaN's).
A2ATS_INLINE float key_score(uint32_t key) { return bits_to_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key); }

// Appends (key << 32 | ~position) of every score of row (n,) whose key is >= threshold to
// candidates, in position order; returns how many. A few percent of the scores hit, too many
// for a per-score branch to predict well: with SSE2 (every x86-64), sixteen scores at a time
// are compared as floats against the threshold's score and most blocks are skipped by one
// test; each hit's key is then checked exactly (the float comparison also lets -0 pass +0).
A2ATS_INLINE int64_t collect_at_or_above(const float* row, int64_t n, uint32_t threshold, uint64_t* candidates) {
  // Key descending, then position ascending: one integer comparison orders both.
  const auto entry = [](uint32_t key, int64_t i) {
    return (uint64_t(key) << 32) | uint64_t(0xffffffffu - uint32_t(i));
  };
  int64_t found = 0, i = 0;
  const auto take = [&](int64_t at) {
    const uint32_t key = score_key(row[at]);
    candidates[found] = entry(key, at);
    found += key >= threshold;
  };
#if defined(__SSE2__)
  const __m128 bound = _mm_set1_ps(key_score(threshold));
  for (; i + 16 <= n; i += 16) {
    const int mask0 = _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(row + i), bound));
    const int mask1 = _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(row + i + 4), bound));
    const int mask2 = _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(row + i + 8), bound));
    const int mask3 = _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(row + i + 12), bound));
    for (int mask = mask0 | mask1 << 4 | mask2 << 8 | mask3 << 12; mask; mask &= mask - 1)
      take(i + __builtin_ctz(unsigned(mask)));
  }
#endif
  for (; i < n; ++i) take(i);
  return found;
}

// The rank-th largest (0-based) of sample[0, samples): a min-heap of the rank + 1 largest seen
// so far. Most samples fail the one comparison with the heap's minimum, a well-predicted
// branch, where nth_element's partitioning of random keys mispredicts about half the time.
// heap: (rank + 1,) scratch.
A2ATS_INLINE uint32_t kth_largest(const uint32_t* sample, int64_t samples, int64_t rank, uint32_t* heap) {
  const int64_t size = rank + 1;
  std::copy(sample, sample + size, heap);
  std::make_heap(heap, heap + size, std::greater<uint32_t>());  // smallest at heap[0]
  for (int64_t s = size; s < samples; ++s) {
    if (sample[s] <= heap[0]) continue;
    std::pop_heap(heap, heap + size, std::greater<uint32_t>());
    heap[size - 1] = sample[s];
    std::push_heap(heap, heap + size, std::greater<uint32_t>());
  }
  return heap[0];
}

// Marks the k best of candidates[0, found) (entries of collect_at_or_above, every key >=
// threshold, found >= k >= 1). One radix pass over key - threshold: candidates in buckets
// above the k-th best's are marked at once, branch-free, and only that bucket's members go
// through nth_element (compacted to the front of candidates).
A2ATS_INLINE void mark_best_candidates(uint64_t* candidates, int64_t found, int64_t k, uint32_t threshold,
                                       uint8_t* mark) {
  const auto key = [&](uint64_t entry) { return uint32_t(entry >> 32) - threshold; };
  const auto position = [](uint64_t entry) { return 0xffffffffu - uint32_t(entry & 0xffffffffu); };
  uint32_t span = 0;
  for (int64_t i = 0; i < found; ++i) span = std::max(span, key(candidates[i]));
  const int bits = span ? 32 - __builtin_clz(span) : 0;
  const int shift = bits > 11 ? bits - 11 : 0;  // digits fit 2048 buckets
  uint32_t hist[2048];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < found; ++i) ++hist[key(candidates[i]) >> shift];
  int64_t above = 0;
  uint32_t bucket = 2047;
  for (; above + int64_t(hist[bucket]) < k; --bucket) above += hist[bucket];  // stops: all found >= k
  int64_t members = 0;
  for (int64_t i = 0; i < found; ++i) {
    const uint64_t entry = candidates[i];
    const uint32_t digit = key(entry) >> shift;
    mark[position(entry)] |= uint8_t(digit > bucket);
    candidates[members] = entry;  // members <= i: never overwrites an unread entry
    members += digit == bucket;
  }
  const int64_t need = k - above;
  std::nth_element(candidates, candidates + (need - 1), candidates + members, std::greater<uint64_t>());
  for (int64_t j = 0; j < need; ++j) mark[position(candidates[j])] = 1;
}

// The same marks as mark_top_k, faster for long rows and small k. A threshold key below the
// k-th best is read off a strided sample; one pass collects the keys at or above it (a few
// percent more than k), and the exact top k are chosen among those. When the sample
// misjudges (fewer than k at or above the threshold) it returns false and marks nothing.
// Correct whenever it returns true: the k-th best key is >= the threshold, so every member of
// the top k, ties at the k-th key included, is among the candidates.
// candidates: (n,) scratch.
A2ATS_INLINE bool mark_top_k_sampled_body(const float* row, int64_t n, int64_t k, uint64_t* candidates, uint8_t* mark) {
  // About n / 16 samples: the threshold's rank then sits some 4 standard deviations above the
  // k-th best's expected rank, and the heap pass stays a small share of the row's cost.
  const int64_t wanted = std::clamp<int64_t>(n / 16, kMinSampleSize, kSampleSize);
  const int64_t stride = (n + wanted - 1) / wanted;  // so that samples <= wanted
  const int64_t samples = n / stride;
  uint32_t sample[kSampleSize];
  for (int64_t s = 0; s < samples; ++s) sample[s] = score_key(row[s * stride + stride / 2]);
  // Rank of the threshold in the sample: the expected rank of the k-th best plus 20% and four
  // standard deviations, so that the whole top k falls above it except with tiny probability.
  const double expected = double(k) * double(samples) / double(n);
  const int64_t rank = std::min<int64_t>(samples - 1, int64_t(1.2 * expected + 4.0 * std::sqrt(expected) + 4.0));
  uint32_t heap[kSampleSize];
  const uint32_t threshold = kth_largest(sample, samples, rank, heap);
  if (threshold == 0) return false;  // the sample is mostly NaN: leave such rows to the radix path
  const int64_t found = collect_at_or_above(row, n, threshold, candidates);
  if (found < k) return false;
  mark_best_candidates(candidates, found, k, threshold, mark);
  return true;
}
A2ATS_MULTIVERSIONED(bool, mark_top_k_sampled, mark_top_k_sampled_body,
                     (const float* row, int64_t n, int64_t k, uint64_t* candidates, uint8_t* mark),
                     (row, n, k, candidates, mark))

// sum over t of e^(row[t] - top) for the non-NaN row[t] <= top, in double, in eight lanes (a
// fixed order, so the same bits at every thread count) that vectorise.
A2ATS_INLINE double sum_exp_body(const float* row, int64_t n, double top) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int l = 0; l < 8; ++l) {
      const double e = exp_nonpositive(double(row[t + l]) - top);
      lanes[l] += row[t + l] == row[t + l] ? e : 0.0;
    }
  for (; t < n; ++t) lanes[t % 8] += row[t] == row[t] ? exp_nonpositive(double(row[t]) - top) : 0.0;
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}
A2ATS_MULTIVERSIONED(double, sum_exp, sum_exp_body, (const float* row, int64_t n, double top), (row, n, top))

// log sum exp of the non-NaN values of row (n); -inf when none is finite or n == 0, +inf for +inf.
double log_sum_exp(const float* row, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) top = row[t] > top ? row[t] : top;
  if (!(top > -std::numeric_limits<float>::infinity()) || top == std::numeric_limits<float>::infinity()) return top;
  return double(top) + std::log(sum_exp(row, n, double(top)));
}

// out[t] = max(out[t], row[t] - shift) over n tokens, NaN never winning.
A2ATS_INLINE void max_shifted_body(const float* row, int64_t n, float shift, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const float v = row[t] - shift;
    out[t] = v > out[t] ? v : out[t];
  }
}
A2ATS_MULTIVERSIONED(void, max_shifted, max_shifted_body, (const float* row, int64_t n, float shift, float* out),
                     (row, n, shift, out))

}  // namespace

void group_scores_cpu(const float* scores, const int32_t* lengths, float* out, const GroupScoresParams& p) {
  if (p.group_size < 1 || p.num_q_heads % p.group_size != 0 || p.sink < 0 || p.window < 0)
    throw std::invalid_argument("group_scores: needs group_size >= 1 dividing num_q_heads and sink, window >= 0");
  const int64_t num_kv_heads = p.num_q_heads / p.group_size;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  ThreadPool::global().parallel_for(
      p.batch * num_kv_heads,
      [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / num_kv_heads, g = item % num_kv_heads;
          const int64_t length = lengths[b], lo = std::min(p.sink, length);
          const int64_t hi = std::max(lo, length - p.window);
          float* row_out = out + b * p.out_stride[0] + g * p.out_stride[1];
          std::fill(row_out, row_out + p.capacity, kNegInf);
          for (int64_t h = g * p.group_size; h < (g + 1) * p.group_size; ++h) {
            const float* row = scores + b * p.scores_stride[0] + h * p.scores_stride[1];
            const double lse = log_sum_exp(row + lo, hi - lo);
            // A head with no finite candidate (or an infinite one) has no distribution to add.
            if (std::isfinite(lse)) max_shifted(row + lo, hi - lo, float(lse), row_out + lo);
          }
        }
      },
      ThreadPool::min_chunk_for(p.group_size * p.capacity * 8));
}

void select_topk_cpu(const float* scores, const int32_t* lengths, int32_t* indices, int32_t* counts,
                     const SelectTopkParams& p) {
  if (p.group_size < 1 || p.num_q_heads % p.group_size != 0 || p.k < 0 || p.sink < 0 || p.window < 0)
    throw std::invalid_argument("select_topk: needs group_size >= 1 dividing num_q_heads and k, sink, window >= 0");
  if (p.max_selected != p.group_size * p.k + (p.add_resident ? p.sink + p.window : 0))
    throw std::invalid_argument("select_topk: max_selected must be group_size * k (+ sink + window with add_resident)");
  const int64_t num_kv_heads = p.num_q_heads / p.group_size;
  if (p.k_per_row)
    for (int64_t b = 0; b < p.batch; ++b)
      if (p.k_per_row[b] < 0 || p.k_per_row[b] > p.k)
        throw std::invalid_argument("select_topk: k_per_row[" + std::to_string(b) +
                                    "] = " + std::to_string(p.k_per_row[b]) +
                                    " must be in [0, k = " + std::to_string(p.k) + "]");
  ThreadPool::global().parallel_for(
      p.batch * num_kv_heads,
      [&](int64_t begin, int64_t end) {
        // Per-thread scratch, grown once to the largest capacity seen.
        thread_local std::vector<uint8_t> keep;
        thread_local std::vector<uint32_t> keys;
        thread_local std::vector<int32_t> positions;
        thread_local std::vector<uint64_t> candidates;
        if (int64_t(keep.size()) < p.capacity) {
          keep.resize(size_t(p.capacity));
          keys.resize(size_t(2 * p.capacity));
          positions.resize(size_t(2 * p.capacity));
          candidates.resize(size_t(p.capacity));
        }
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / num_kv_heads, g = item % num_kv_heads;
          const int64_t length = lengths[b];
          uint8_t* mark = keep.data();
          std::memset(mark, 0, size_t(length));
          if (p.add_resident) {
            std::memset(mark, 1, size_t(std::min(p.sink, length)));
            const int64_t window_begin = std::max<int64_t>(0, length - p.window);
            std::memset(mark + window_begin, 1, size_t(length - window_begin));
          }
          const int64_t lo = p.sink, hi = length - p.window, num_candidates = hi - lo;
          const int64_t k = p.k_per_row ? p.k_per_row[b] : p.k;
          if (num_candidates > 0 && k > 0) {
            if (num_candidates <= k) {
              std::memset(mark + lo, 1, size_t(num_candidates));
            } else {
              for (int64_t h = g * p.group_size; h < (g + 1) * p.group_size; ++h) {
                const float* row = scores + b * p.scores_stride[0] + h * p.scores_stride[1] + lo;
                const bool sampled = num_candidates >= kSampledMinRow && k * kSampledMaxShare <= num_candidates &&
                                     mark_top_k_sampled(row, num_candidates, k, candidates.data(), mark + lo);
                if (!sampled) mark_top_k(row, num_candidates, k, keys.data(), positions.data(), mark + lo);
              }
            }
          }
          int32_t* out = indices + b * p.indices_stride[0] + g * p.indices_stride[1];
          int64_t count = 0, t = 0;
      // At most max_selected rows are marked, so stopping there loses nothing and never writes
      // past the row. Sixteen marks per test where SSE2 has it, then branch-free.
#if defined(__SSE2__)
          for (; t + 16 <= length && count + 16 <= p.max_selected; t += 16) {
            const __m128i marks = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mark + t));
            for (unsigned bits = unsigned(_mm_movemask_epi8(_mm_cmpgt_epi8(marks, _mm_setzero_si128()))); bits;
                 bits &= bits - 1)
              out[count++] = int32_t(t + __builtin_ctz(bits));
          }
#endif
          for (; t < length && count < p.max_selected; ++t) {
            out[count] = int32_t(t);
            count += mark[t];
          }
          std::fill(out + count, out + p.max_selected, -1);
          counts[b * p.counts_stride[0] + g * p.counts_stride[1]] = int32_t(count);
        }
      },
      ThreadPool::min_chunk_for(p.group_size * p.capacity * 2));
}

}  // namespace a2ats
