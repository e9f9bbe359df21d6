#include "a2ats/topk.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "a2ats/thread_pool.h"

namespace a2ats {
namespace {

// Radix selection of the k-th largest key, 11 + 11 + 10 bits from the top. Returns the
// threshold key and, through take_equal, how many keys equal to it belong to the top k.
// keys: (n,) scratch of the row's keys; work: (n,) scratch for the surviving bucket.
uint32_t kth_largest_key(const uint32_t* keys, int64_t n, int64_t k, uint32_t* work, int64_t* take_equal) {
  static constexpr int kShift[3] = {21, 10, 0};
  static constexpr uint32_t kMask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  uint32_t hist[2048];
  const uint32_t* cur = keys;
  int64_t cur_n = n;
  uint32_t prefix = 0;
  int64_t remaining = k;  // how many of the top k are still to be found inside the current bucket
  for (int level = 0; level < 3; ++level) {
    const int shift = kShift[level];
    const uint32_t mask = kMask[level];
    std::memset(hist, 0, sizeof(uint32_t) * (mask + 1));
    for (int64_t i = 0; i < cur_n; ++i) ++hist[(cur[i] >> shift) & mask];
    uint32_t digit = mask;
    for (;; --digit) {
      if (int64_t(hist[digit]) >= remaining) break;
      remaining -= hist[digit];
    }
    prefix |= digit << shift;
    if (level == 2) break;
    // Keep only keys of the chosen bucket for the next, finer digit.
    int64_t kept = 0;
    for (int64_t i = 0; i < cur_n; ++i)
      if (((cur[i] >> shift) & mask) == digit) work[kept++] = cur[i];
    cur = work;
    cur_n = kept;
  }
  *take_equal = remaining;
  return prefix;
}

}  // namespace

void select_topk_cpu(const float* scores, const int32_t* lengths, int32_t* indices, int32_t* counts,
                     const SelectTopkParams& p) {
  const int64_t num_kv_heads = p.num_q_heads / p.group_size;
  ThreadPool::global().parallel_for(p.batch * num_kv_heads, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, grown once to the largest capacity seen.
    thread_local std::vector<uint8_t> keep;
    thread_local std::vector<uint32_t> keys, work;
    if (int64_t(keep.size()) < p.capacity) {
      keep.resize(size_t(p.capacity));
      keys.resize(size_t(p.capacity));
      work.resize(size_t(p.capacity));
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
            uint32_t* key = keys.data();
            for (int64_t i = 0; i < num_candidates; ++i) key[i] = score_key(row[i]);
            int64_t take_equal = 0;
            const uint32_t threshold = kth_largest_key(key, num_candidates, p.k, work.data(), &take_equal);
            for (int64_t i = 0; i < num_candidates; ++i) {
              const bool above = key[i] > threshold;
              const bool tie = key[i] == threshold && take_equal > 0;
              take_equal -= tie;
              mark[lo + i] |= uint8_t(above | tie);
            }
          }
        }
      }
      int32_t* out = indices + b * p.indices_stride[0] + g * p.indices_stride[1];
      int64_t count = 0;
      for (int64_t t = 0; t < length; ++t)
        if (mark[t]) out[count++] = int32_t(t);
      std::fill(out + count, out + p.max_selected, -1);
      counts[b * p.counts_stride[0] + g * p.counts_stride[1]] = int32_t(count);
    }
  });
}

}  // namespace a2ats
