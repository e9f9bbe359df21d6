#include "a2ats/topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "a2ats/common.h"
#include "a2ats/thread_pool.h"

namespace a2ats {
namespace {

// Marks the k best candidates of one row, ordered by (key descending, index ascending).
// Radix selection on the 32-bit keys, 11 + 11 + 10 bits from the top: the first pass builds
// the top-digit histogram; the second marks every candidate whose digit beats the bucket
// holding the k-th best and compacts the bucket's members (key and position) so the finer
// digits only look at those. keys/positions: (2 * n,) scratch.
A2ATS_MULTIVERSION
void mark_top_k(const float* row, int64_t n, int64_t k, uint32_t* keys, int32_t* positions, uint8_t* mark) {
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

// Rows at least this long, with k at most this share of them, take the sampled path below.
constexpr int64_t kSampledMinRow = 4096;
constexpr int64_t kSampledMaxShare = 16;  // k <= n / 16
constexpr int64_t kSampleSize = 2048;

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// Appends (key << 32 | ~position) of every score of row (n,) whose key is >= threshold to
// candidates, in position order; returns how many. Keys of eight scores at a time (score_key
// on vector lanes), a bit mask of the hits, one store per hit: a few percent of the scores hit,
// too many for a per-score branch to predict well.
A2ATS_INLINE int64_t collect_at_or_above(const float* row, int64_t n, uint32_t threshold, uint64_t* candidates) {
  // Key descending, then position ascending: one integer comparison orders both.
  const auto entry = [](uint32_t key, int64_t i) { return (uint64_t(key) << 32) | uint64_t(0xffffffffu - uint32_t(i)); };
  const u32x8 lane_bit = {1, 2, 4, 8, 16, 32, 64, 128};
  int64_t found = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    u32x8 bits;
    std::memcpy(&bits, row + i, sizeof(bits));
    const u32x8 negative = u32x8(i32x8(bits) >> 31);
    const u32x8 nan = u32x8((bits & 0x7fffffffu) > 0x7f800000u);
    const u32x8 key = (bits ^ (negative | 0x80000000u)) & ~nan;  // score_key, lane-wise
    const u32x8 hit = u32x8(key >= threshold) & lane_bit;
    uint32_t mask = hit[0] | hit[1] | hit[2] | hit[3] | hit[4] | hit[5] | hit[6] | hit[7];
    for (; mask; mask &= mask - 1) {
      const int lane = __builtin_ctz(mask);
      candidates[found++] = entry(key[lane], i + lane);
    }
  }
  for (; i < n; ++i) {
    const uint32_t key = score_key(row[i]);
    if (key >= threshold) candidates[found++] = entry(key, i);
  }
  return found;
}

// The same marks as mark_top_k, faster for long rows and small k. A threshold key below the
// k-th best is read off a strided sample; one pass collects the keys at or above it (a few
// percent more than k), and the exact top k are chosen among those. When the sample
// misjudges (fewer than k at or above the threshold) it returns false and marks nothing.
// Correct whenever it returns true: the k-th best key is >= the threshold, so every member of
// the top k, ties at the k-th key included, is among the candidates.
// candidates: (n,) scratch.
A2ATS_MULTIVERSION
bool mark_top_k_sampled(const float* row, int64_t n, int64_t k, uint64_t* candidates, uint8_t* mark) {
  const int64_t stride = (n + kSampleSize - 1) / kSampleSize;  // so that samples <= kSampleSize
  const int64_t samples = n / stride;
  uint32_t sample[kSampleSize];
  for (int64_t s = 0; s < samples; ++s) sample[s] = score_key(row[s * stride + stride / 2]);
  // Rank of the threshold in the sample: the expected rank of the k-th best plus 20% and four
  // standard deviations, so that the whole top k falls above it except with tiny probability.
  const double expected = double(k) * double(samples) / double(n);
  const int64_t rank = std::min<int64_t>(samples - 1, int64_t(1.2 * expected + 4.0 * std::sqrt(expected) + 4.0));
  std::nth_element(sample, sample + rank, sample + samples, std::greater<uint32_t>());
  const uint32_t threshold = sample[rank];
  if (threshold == 0) return false;  // the sample is mostly NaN: leave such rows to the radix path
  const int64_t found = collect_at_or_above(row, n, threshold, candidates);
  if (found < k) return false;
  std::nth_element(candidates, candidates + (k - 1), candidates + found, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) mark[0xffffffffu - uint32_t(candidates[j] & 0xffffffffu)] = 1;
  return true;
}

}  // namespace

void select_topk_cpu(const float* scores, const int32_t* lengths, int32_t* indices, int32_t* counts,
                     const SelectTopkParams& p) {
  const int64_t num_kv_heads = p.num_q_heads / p.group_size;
  ThreadPool::global().parallel_for(p.batch * num_kv_heads, [&](int64_t begin, int64_t end) {
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
      std::memset(mark, 1, size_t(std::min(p.sink, length)));
      const int64_t window_begin = std::max<int64_t>(0, length - p.window);
      std::memset(mark + window_begin, 1, size_t(length - window_begin));
      const int64_t lo = p.sink, hi = length - p.window, num_candidates = hi - lo;
      if (num_candidates > 0 && p.k > 0) {
        if (num_candidates <= p.k) {
          std::memset(mark + lo, 1, size_t(num_candidates));
        } else {
          for (int64_t h = g * p.group_size; h < (g + 1) * p.group_size; ++h) {
            const float* row = scores + b * p.scores_stride[0] + h * p.scores_stride[1] + lo;
            const bool sampled = num_candidates >= kSampledMinRow && p.k * kSampledMaxShare <= num_candidates &&
                                 mark_top_k_sampled(row, num_candidates, p.k, candidates.data(), mark + lo);
            if (!sampled) mark_top_k(row, num_candidates, p.k, keys.data(), positions.data(), mark + lo);
          }
        }
      }
      int32_t* out = indices + b * p.indices_stride[0] + g * p.indices_stride[1];
      int64_t count = 0;
      // Branch-free compaction; at most max_selected rows are marked, so stopping there loses
      // nothing and never writes past the row.
      for (int64_t t = 0; t < length && count < p.max_selected; ++t) {
        out[count] = int32_t(t);
        count += mark[t];
      }
      std::fill(out + count, out + p.max_selected, -1);
      counts[b * p.counts_stride[0] + g * p.counts_stride[1]] = int32_t(count);
    }
  }, ThreadPool::min_chunk_for(p.group_size * p.capacity * 2));
}

}  // namespace a2ats
