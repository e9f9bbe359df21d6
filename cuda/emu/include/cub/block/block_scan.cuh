// Emulated cub::BlockScan (sums only), see cuda_runtime.h in this folder.
#pragma once
#include <vector>
#include "cuda_runtime.h"
namespace cub {
template <typename T, int kThreads>
class BlockScan {
 public:
  struct TempStorage {};
  explicit BlockScan(TempStorage&) {}
  void ExclusiveSum(T in, T& out) {
    T agg;
    ExclusiveSum(in, out, agg);
  }
  void ExclusiveSum(T in, T& out, T& aggregate) {
    if (emu::ctx->n != kThreads) std::abort();
    std::vector<T> all;
    emu::block_gather(in, all);
    T run = T(0);
    for (int i = 0; i < int(threadIdx.x); ++i) run += all[size_t(i)];
    out = run;
    aggregate = T(0);
    for (T v : all) aggregate += v;
  }
  template <int I>
  void ExclusiveSum(T (&in)[I], T (&out)[I], T& aggregate) {
    T total = T(0);
    for (int i = 0; i < I; ++i) total += in[i];
    T base;
    ExclusiveSum(total, base, aggregate);
    for (int i = 0; i < I; ++i) {
      out[i] = base;
      base += in[i];
    }
  }
};
}  // namespace cub
