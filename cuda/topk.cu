// Top-k token selection on the device, with exactly the semantics of select_topk_cpu.
//
// Per query-head row (b, h) whose candidate range [sink, len - window) holds more than k tokens,
// the k-th largest score_key is found by radix selection on 11 + 11 + 10 bits from the top, as on
// the CPU. Each level is one `histogram` kernel: every block takes a tile of 4096 tokens of one
// row, counts the digits of the keys that match the prefix so far in shared memory and adds them
// to the row's histogram; the last block of the row to finish (a completion counter, as in CUDA's
// threadFenceReduction sample) scans the histogram from the top and fixes the digit and how many
// keys of it still belong to the top k. A row is finished early when its bucket fits whole (as on
// the CPU), else after the third level, knowing its threshold key and how many keys equal to it
// to take. When that is fewer than all of them, every tie gets its rank in index order from the
// per-tile counts of the third level's histogram, so the lowest-index ties are taken. `mark`
// sets one bit per selected token in a per-(b, g) bitmap (atomicOr, so the heads of a group
// unite), and `compact` turns each (b, g) bitmap plus the sink and window ranges into ascending
// indices, padding with -1.
//
// Nothing is sorted; each kernel reads a scores row at most once (four passes at most: three
// histogram levels and mark). lengths stay on the device and are clamped to [0, Tcap].
#include <cub/block/block_scan.cuh>

#include <cfloat>

#include "a2ats_cuda.h"
#include "cuda_common.cuh"

namespace a2ats {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kRounds = 16;                // tokens per thread and tile
constexpr int kTile = kThreads * kRounds;  // 4096 tokens, a multiple of 32 (bitmap words)
constexpr int kHistBins = 2048;
constexpr int kCompactItems = 4;  // bitmap words per thread and round of `compact`

__host__ __device__ constexpr int level_shift(int level) { return level == 0 ? 21 : level == 1 ? 10 : 0; }
__host__ __device__ constexpr int level_bins(int level) { return level == 2 ? 1024 : 2048; }

struct RowState {
  uint32_t prefix;     // threshold bits fixed so far
  uint32_t remaining;  // keys of the current bucket that still belong to the top k (>= 1)
  uint32_t equal;      // keys in the current bucket (the chosen digit's count)
  uint16_t shift;      // bits below this are not part of the threshold
  uint16_t final;      // 1 once the threshold is known (the bucket fits whole, or level 2 is done)
};
// A key k of a finished row is taken when (k >> shift) > (prefix >> shift), and a tie
// ((k >> shift) == (prefix >> shift)) when it is among the first `remaining` ties in index
// order; when remaining == equal every tie is taken, as on the CPU when a bucket fits whole.

struct TopkArgs {
  int64_t batch, num_q_heads, group_size, num_kv_heads, capacity;
  int64_t k, sink, window, max_selected;
  const int32_t* k_per_row;  // (B,) or null
  bool add_resident;
  int64_t scores_stride[2], indices_stride[2], counts_stride[2];
  int64_t tiles, words;  // tiles of kTile tokens per row; 32-token bitmap words per (b, g)
};

struct Range {
  int64_t len, lo, hi;  // clamped length, candidate range [lo, hi)
  int64_t k;            // the row's k
  bool select;          // radix selection needed: more than k candidates
  bool take_all;        // 0 < candidates <= k: every candidate is taken
};

__device__ __forceinline__ Range row_range(const int32_t* lengths, int64_t b, const TopkArgs& a) {
  Range r;
  r.len = min(max(int64_t(lengths[b]), int64_t(0)), a.capacity);
  r.lo = a.sink;
  r.hi = r.len - a.window;
  r.k = a.k_per_row ? min(max(int64_t(a.k_per_row[b]), int64_t(0)), a.k) : a.k;
  const int64_t n = r.hi - r.lo;
  r.select = r.k > 0 && n > r.k;
  r.take_all = r.k > 0 && n > 0 && n <= r.k;
  return r;
}

// Fixes level kLevel's digit of one row from its finished histogram; run by every thread of one
// block. Thread i owns digits top - i * kPer - q (q = 0..kPer-1), so thread order is descending
// digit order and an exclusive scan gives the number of keys above each thread's digits.
template <int kLevel>
__device__ void pick_digit(int64_t row, uint32_t* hrow, RowState* state, unsigned long long remaining,
                           uint32_t prefix) {
  using BlockScan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  constexpr int kBins = level_bins(kLevel);
  constexpr int kPer = kBins / kThreads;  // 8 or 4 digits per thread
  constexpr int kShift = level_shift(kLevel);
  const int top = kBins - 1 - int(threadIdx.x) * kPer;
  uint32_t local[kPer];
  unsigned long long sum = 0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    local[q] = __ldcg(hrow + top - q);  // from L2, where the other blocks' atomics landed
    sum += local[q];
  }
  unsigned long long above = 0;  // keys in digits higher than this thread's
  BlockScan(scan_storage).ExclusiveSum(sum, above);
  if (above < remaining && remaining <= above + sum) {  // exactly one thread
    unsigned long long cum = above;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      if (cum + local[q] >= remaining) {
        RowState s;
        s.prefix = prefix | (uint32_t(top - q) << kShift);
        s.remaining = uint32_t(remaining - cum);
        s.equal = local[q];
        s.shift = uint16_t(kShift);
        s.final = uint16_t(kLevel == 2 || local[q] == s.remaining);
        state[row] = s;
        break;
      }
      cum += local[q];
    }
  }
  __syncthreads();                                                  // every thread has read its bins
  for (int i = threadIdx.x; i < kBins; i += kThreads) hrow[i] = 0;  // clean for the next level
}

// Level kLevel of the radix selection for every row (see the top of the file). Level 2 also
// stores each tile's histogram in tile_hist (rows, tiles, 1024) for the ranking of ties.
template <int kLevel>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const float* __restrict__ scores, const int32_t* __restrict__ lengths, RowState* state,
                     uint32_t* hist, uint32_t* __restrict__ done, uint32_t* __restrict__ tile_hist, TopkArgs a) {
  __shared__ uint32_t bins[kHistBins];
  __shared__ bool last_block;
  constexpr int kShift = level_shift(kLevel);
  constexpr int kBins = level_bins(kLevel);
  constexpr uint32_t kMask = uint32_t(kBins - 1);
  const int64_t tile = blockIdx.x % a.tiles, row = blockIdx.x / a.tiles;
  const int64_t b = row / a.num_q_heads, h = row % a.num_q_heads;
  const Range rg = row_range(lengths, b, a);
  const int64_t t_begin = tile * kTile;
  if (!rg.select || t_begin >= rg.hi || t_begin + kTile <= rg.lo) return;  // uniform per block
  unsigned long long remaining = (unsigned long long)rg.k;
  uint32_t prefix = 0u;
  if (kLevel > 0) {
    const RowState s = state[row];
    if (s.final) return;  // uniform per block
    remaining = s.remaining;
    prefix = s.prefix;
  }
  constexpr int kHigh = kLevel == 0 ? 0 : level_shift(kLevel - 1);  // bits >= kHigh are fixed
  for (int i = threadIdx.x; i < kBins; i += kThreads) bins[i] = 0;
  __syncthreads();
  const float* srow = scores + b * a.scores_stride[0] + h * a.scores_stride[1];
  const int lane = threadIdx.x % 32;
  for (int r = 0; r < kRounds; ++r) {
    const int64_t t = t_begin + int64_t(r) * kThreads + threadIdx.x;
    bool valid = t >= rg.lo && t < rg.hi;
    uint32_t digit = 0xffffffffu;
    if (valid) {
      const uint32_t key = score_key(srow[t]);
      if (kLevel == 0 || (key >> kHigh) == (prefix >> kHigh))
        digit = (key >> kShift) & kMask;
      else
        valid = false;
    }
    // Lanes with the same digit add once (ties and narrow score ranges hit few bins).
    const unsigned peers = __match_any_sync(0xffffffffu, digit);
    if (valid && lane == __ffs(peers) - 1) atomicAdd(&bins[digit], uint32_t(__popc(peers)));
  }
  __syncthreads();
  uint32_t* hrow = hist + row * kHistBins;
  for (int i = threadIdx.x; i < kBins; i += kThreads) {
    if (bins[i]) atomicAdd(&hrow[i], bins[i]);
    if (kLevel == 2) tile_hist[(row * a.tiles + tile) * 1024 + i] = bins[i];
  }
  // The last of the row's blocks picks the digit. Each thread fences its own histogram atomics
  // before the block signals completion, and the last block fences before reading.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t expected = uint32_t((rg.hi - 1) / kTile - rg.lo / kTile + 1);  // tiles meeting [lo, hi)
    last_block = atomicAdd(&done[kLevel * a.batch * a.num_q_heads + row], 1u) == expected - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  pick_digit<kLevel>(row, hrow, state, remaining, prefix);
}

__global__ void __launch_bounds__(kThreads)
    mark_kernel(const float* __restrict__ scores, const int32_t* __restrict__ lengths,
                const RowState* __restrict__ state, const uint32_t* __restrict__ tile_hist,
                uint32_t* __restrict__ marks, TopkArgs a) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ unsigned long long tie_base;
  const int64_t tile = blockIdx.x % a.tiles, row = blockIdx.x / a.tiles;
  const int64_t b = row / a.num_q_heads, h = row % a.num_q_heads, g = h / a.group_size;
  const Range rg = row_range(lengths, b, a);
  const int64_t t_begin = tile * kTile;
  if (!rg.select || t_begin >= rg.hi || t_begin + kTile <= rg.lo) return;  // uniform per block
  const RowState s = state[row];
  // Only a row finished at level 2 can have more ties than it takes (earlier finishes take the
  // whole bucket); its shift is 0, so the ties are keys equal to the prefix.
  const bool rank_ties = s.remaining < s.equal;
  const uint32_t thr = s.prefix >> s.shift;
  unsigned long long running = 0;  // rank of this round's first tie among all ties of the row
  if (rank_ties) {
    // Ties in the earlier tiles of the row that meet [lo, hi) (the others hold no candidates).
    if (threadIdx.x == 0) tie_base = 0;
    __syncthreads();
    const uint32_t digit = s.prefix & 1023u;
    unsigned long long part = 0;
    for (int64_t i = rg.lo / kTile + threadIdx.x; i < tile; i += kThreads)
      part += tile_hist[(row * a.tiles + i) * 1024 + digit];
    if (part) atomicAdd(&tie_base, part);
    __syncthreads();
    running = tie_base;
  }
  const float* srow = scores + b * a.scores_stride[0] + h * a.scores_stride[1];
  uint32_t* words = marks + (b * a.num_kv_heads + g) * a.words;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = 0; r < kRounds; ++r) {
    const int64_t t = t_begin + int64_t(r) * kThreads + threadIdx.x;
    const bool valid = t >= rg.lo && t < rg.hi;
    const uint32_t key = valid ? score_key(srow[t]) >> s.shift : 0u;
    const bool tie = valid && key == thr;
    bool take = valid && key > thr;
    if (rank_ties) {  // uniform per block
      int before = 0, in_round = 0;
      BlockScan(scan_storage).ExclusiveSum(int(tie), before, in_round);
      __syncthreads();  // scan_storage is reused next round
      take = take || (tie && running + (unsigned long long)before < s.remaining);
      running += (unsigned long long)in_round;
    } else {
      take = take || tie;
    }
    const unsigned word = __ballot_sync(0xffffffffu, take);
    if (lane == 0 && word != 0u) atomicOr(&words[(t_begin + int64_t(r) * kThreads + warp * 32) / 32], word);
  }
}

// Bits of bitmap word w (tokens [32w, 32w + 32)) that lie in [begin, end).
__device__ __forceinline__ uint32_t range_bits(int64_t w, int64_t begin, int64_t end) {
  const int64_t lo = max(begin, w * 32), hi = min(end, w * 32 + 32);
  if (lo >= hi) return 0u;
  const int n = int(hi - lo);
  const uint32_t ones = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
  return ones << int(lo - w * 32);
}

__global__ void __launch_bounds__(kThreads)
    compact_kernel(const int32_t* __restrict__ lengths, const uint32_t* __restrict__ marks,
                   int32_t* __restrict__ indices, int32_t* __restrict__ counts, TopkArgs a) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int64_t bg = blockIdx.x;
  const int64_t b = bg / a.num_kv_heads, g = bg % a.num_kv_heads;
  const Range rg = row_range(lengths, b, a);
  const int64_t sink_end = min(a.sink, rg.len);
  const int64_t window_begin = max(int64_t(0), rg.len - a.window);
  const uint32_t* words = rg.select ? marks + bg * a.words : nullptr;  // marks is null when no row selects
  int32_t* out = indices + b * a.indices_stride[0] + g * a.indices_stride[1];
  const int64_t num_words = (rg.len + 31) / 32;
  int64_t offset = 0;
  for (int64_t w0 = 0; w0 < num_words; w0 += int64_t(kThreads) * kCompactItems) {
    uint32_t word[kCompactItems];
    int pop[kCompactItems], before[kCompactItems];
#pragma unroll
    for (int q = 0; q < kCompactItems; ++q) {
      const int64_t w = w0 + int64_t(threadIdx.x) * kCompactItems + q;
      uint32_t bits = 0;
      if (w < num_words) {
        if (rg.select) bits = words[w];
        if (a.add_resident) bits |= range_bits(w, 0, sink_end) | range_bits(w, window_begin, rg.len);
        if (rg.take_all) bits |= range_bits(w, rg.lo, rg.hi);
        bits &= range_bits(w, 0, rg.len);
      }
      word[q] = bits;
      pop[q] = __popc(bits);
    }
    int round_total = 0;
    BlockScan(scan_storage).ExclusiveSum(pop, before, round_total);
    __syncthreads();  // scan_storage is reused next round
#pragma unroll
    for (int q = 0; q < kCompactItems; ++q) {
      const int64_t w = w0 + int64_t(threadIdx.x) * kCompactItems + q;
      int64_t pos = offset + before[q];
      uint32_t bits = word[q];
      while (bits) {
        const int bit = __ffs(bits) - 1;
        bits &= bits - 1u;
        if (pos < a.max_selected) out[pos] = int32_t(w * 32 + bit);
        ++pos;
      }
    }
    offset += round_total;
  }
  const int64_t count = min(offset, a.max_selected);
  for (int64_t i = count + threadIdx.x; i < a.max_selected; i += kThreads) out[i] = -1;
  if (threadIdx.x == 0) counts[b * a.counts_stride[0] + g * a.counts_stride[1]] = int32_t(count);
}

// ---- group_scores: one row per KV head for the per-KV-head budget (see topk.h) ------------

constexpr int kGroupTile = kThreads * 4;  // tokens per block of group_max_kernel

struct GroupArgs {
  int64_t num_q_heads, group_size, num_kv_heads, capacity, sink, window;
  int64_t scores_stride[2], out_stride[2];
  int64_t tiles;  // kGroupTile-token tiles per row
};

// Candidates [lo, hi) of batch row b, as group_scores_cpu clamps them.
__device__ __forceinline__ void candidates(const int32_t* lengths, int64_t b, const GroupArgs& a, int64_t& lo,
                                           int64_t& hi) {
  const int64_t len = min(max(int64_t(lengths[b]), int64_t(0)), a.capacity);
  lo = min(a.sink, len);
  hi = max(lo, len - a.window);
}

// Reduces v over the block in a fixed order (warp trees, then the warps in turn), so the result
// does not depend on timing. shared: kThreads / 32 slots.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* shared) {
  for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kThreads / 32; ++w) v = op(v, shared[w]);
  __syncthreads();  // the slots are reused by the next reduction
  return v;
}

// lse[row] = float(log sum exp) of the non-NaN candidates of scores row (b, h); non-finite when
// no candidate is finite (the head then adds nothing). One block per row; the sum in double with
// the CPU's exp_nonpositive.
__global__ void __launch_bounds__(kThreads)
    head_lse_kernel(const float* __restrict__ scores, const int32_t* __restrict__ lengths, float* lse, GroupArgs a) {
  __shared__ float top_slots[kThreads / 32];
  __shared__ double sum_slots[kThreads / 32];
  const int64_t row = blockIdx.x, b = row / a.num_q_heads, h = row % a.num_q_heads;
  int64_t lo, hi;
  candidates(lengths, b, a, lo, hi);
  const float* srow = scores + b * a.scores_stride[0] + h * a.scores_stride[1];
  float top = -INFINITY;
  for (int64_t t = lo + threadIdx.x; t < hi; t += kThreads) top = srow[t] > top ? srow[t] : top;
  top = block_reduce(top, [](float x, float y) { return y > x ? y : x; }, top_slots);
  if (!(top > -INFINITY) || top == INFINITY) {
    if (threadIdx.x == 0) lse[row] = top;
    return;
  }
  double sum = 0;
  for (int64_t t = lo + threadIdx.x; t < hi; t += kThreads)
    if (srow[t] == srow[t]) sum += exp_nonpositive(double(srow[t]) - double(top));
  sum = block_reduce(sum, [](double x, double y) { return x + y; }, sum_slots);
  if (threadIdx.x == 0) lse[row] = float(double(top) + log(sum));
}

// out[b, g, t] = max over the group's heads of scores[b, h, t] - lse[b, h], as group_scores_cpu.
__global__ void __launch_bounds__(kThreads)
    group_max_kernel(const float* __restrict__ scores, const int32_t* __restrict__ lengths,
                     const float* __restrict__ lse, float* __restrict__ out, GroupArgs a) {
  const int64_t group = blockIdx.x / a.tiles, tile = blockIdx.x % a.tiles;
  const int64_t b = group / a.num_kv_heads, g = group % a.num_kv_heads;
  int64_t lo, hi;
  candidates(lengths, b, a, lo, hi);
  float* orow = out + b * a.out_stride[0] + g * a.out_stride[1];
  const int64_t end = min(a.capacity, (tile + 1) * kGroupTile);
  for (int64_t t = tile * kGroupTile + threadIdx.x; t < end; t += kThreads) {
    float best = -INFINITY;
    if (t >= lo && t < hi)
      for (int64_t h = g * a.group_size; h < (g + 1) * a.group_size; ++h) {
        const float shift = lse[b * a.num_q_heads + h];
        if (!(fabsf(shift) <= FLT_MAX)) continue;  // a head without a distribution
        const float v = scores[b * a.scores_stride[0] + h * a.scores_stride[1] + t] - shift;
        best = v > best ? v : best;
      }
    orow[t] = best;
  }
}

}  // namespace

cudaError_t select_topk_cuda(const float* scores, const int32_t* lengths, int32_t* indices, int32_t* counts,
                             const SelectTopkParams& p, cudaStream_t stream) {
  if (p.group_size < 1 || p.num_q_heads % p.group_size != 0 || p.k < 0 || p.sink < 0 || p.window < 0 ||
      p.k > 2147483647 || p.max_selected > 2147483647)
    return cudaErrorInvalidValue;
  TopkArgs a;
  a.batch = p.batch;
  a.num_q_heads = p.num_q_heads;
  a.group_size = p.group_size;
  a.num_kv_heads = p.num_q_heads / p.group_size;
  a.capacity = p.capacity;
  a.k = p.k;
  a.k_per_row = p.k_per_row;
  a.sink = p.sink;
  a.window = p.window;
  a.max_selected = p.max_selected;
  a.add_resident = p.add_resident;
  for (int d = 0; d < 2; ++d) {
    a.scores_stride[d] = p.scores_stride[d];
    a.indices_stride[d] = p.indices_stride[d];
    a.counts_stride[d] = p.counts_stride[d];
  }
  a.tiles = ceil_div(p.capacity, kTile);
  a.words = ceil_div(p.capacity, 32);
  const int64_t rows = p.batch * p.num_q_heads;
  const int64_t groups = p.batch * a.num_kv_heads;
  if (groups == 0) return cudaSuccess;
  if (groups > kMaxGridBlocks || rows * a.tiles > kMaxGridBlocks) return cudaErrorInvalidConfiguration;

  // Some row may need radix selection only if the largest possible candidate count exceeds its
  // k (any k at or below the maximum, with k_per_row: those stay on the device).
  const bool any_select = p.k > 0 && p.capacity - p.sink - p.window > (p.k_per_row ? 0 : p.k);

  Scratch scratch(stream);
  const size_t hist_bytes = align_up(size_t(rows) * kHistBins * sizeof(uint32_t));
  const size_t done_bytes = align_up(size_t(3 * rows) * sizeof(uint32_t));
  const size_t marks_bytes = align_up(size_t(groups * a.words) * sizeof(uint32_t));
  const size_t state_bytes = align_up(size_t(rows) * sizeof(RowState));
  const size_t tile_hist_bytes = align_up(size_t(rows * a.tiles) * 1024 * sizeof(uint32_t));
  uint32_t* marks = nullptr;
  if (any_select) {
    A2ATS_CUDA_TRY(scratch.allocate(hist_bytes + done_bytes + marks_bytes + state_bytes + tile_hist_bytes));
    char* base = scratch.get<char>();
    uint32_t* hist = reinterpret_cast<uint32_t*>(base);
    uint32_t* done = reinterpret_cast<uint32_t*>(base + hist_bytes);
    marks = reinterpret_cast<uint32_t*>(base + hist_bytes + done_bytes);
    RowState* state = reinterpret_cast<RowState*>(base + hist_bytes + done_bytes + marks_bytes);
    uint32_t* tile_hist = reinterpret_cast<uint32_t*>(base + hist_bytes + done_bytes + marks_bytes + state_bytes);
    // Histograms and completion counters start at zero (each level's last block re-zeroes its
    // histogram), the bitmaps empty. state and tile_hist are written before they are read.
    A2ATS_CUDA_TRY(cudaMemsetAsync(base, 0, hist_bytes + done_bytes + marks_bytes, stream));
    const unsigned tile_blocks = unsigned(rows * a.tiles);
    histogram_kernel<0><<<tile_blocks, kThreads, 0, stream>>>(scores, lengths, state, hist, done, tile_hist, a);
    histogram_kernel<1><<<tile_blocks, kThreads, 0, stream>>>(scores, lengths, state, hist, done, tile_hist, a);
    histogram_kernel<2><<<tile_blocks, kThreads, 0, stream>>>(scores, lengths, state, hist, done, tile_hist, a);
    mark_kernel<<<tile_blocks, kThreads, 0, stream>>>(scores, lengths, state, tile_hist, marks, a);
    A2ATS_CUDA_TRY(cudaGetLastError());
  }
  // With no selection anywhere, compact never reads the bitmap (Range::select is false).
  compact_kernel<<<unsigned(groups), kThreads, 0, stream>>>(lengths, marks, indices, counts, a);
  return cudaGetLastError();
}

cudaError_t group_scores_cuda(const float* scores, const int32_t* lengths, float* out, const GroupScoresParams& p,
                              cudaStream_t stream) {
  if (p.group_size < 1 || p.num_q_heads % p.group_size != 0 || p.sink < 0 || p.window < 0 || p.capacity < 0)
    return cudaErrorInvalidValue;
  GroupArgs a;
  a.num_q_heads = p.num_q_heads;
  a.group_size = p.group_size;
  a.num_kv_heads = p.num_q_heads / p.group_size;
  a.capacity = p.capacity;
  a.sink = p.sink;
  a.window = p.window;
  for (int d = 0; d < 2; ++d) {
    a.scores_stride[d] = p.scores_stride[d];
    a.out_stride[d] = p.out_stride[d];
  }
  a.tiles = ceil_div(p.capacity, kGroupTile);
  const int64_t rows = p.batch * p.num_q_heads, groups = p.batch * a.num_kv_heads;
  if (rows == 0 || a.tiles == 0) return cudaSuccess;
  if (rows > kMaxGridBlocks || groups * a.tiles > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  Scratch scratch(stream);
  A2ATS_CUDA_TRY(scratch.allocate(size_t(rows) * sizeof(float)));
  float* lse = scratch.get<float>();
  head_lse_kernel<<<unsigned(rows), kThreads, 0, stream>>>(scores, lengths, lse, a);
  group_max_kernel<<<unsigned(groups * a.tiles), kThreads, 0, stream>>>(scores, lengths, lse, out, a);
  return cudaGetLastError();
}

}  // namespace a2ats
