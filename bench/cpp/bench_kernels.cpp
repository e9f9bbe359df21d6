// Google Benchmark microbenchmarks of the CPU kernels, called through the framework-free
// C++ API (no Python, no torch), at the shapes of one Llama-3-8B layer:
// Hq = 32, Hkv = 8, D = 128, C = 4096, M = 1, batch 1, 3% budget, sink 8, window 64.
//
//   cmake -S . -B build/bench -DA2ATS_BUILD_BENCHMARKS=ON -DA2ATS_BUILD_PYTHON=OFF
//   cmake --build build/bench && build/bench/a2ats_bench --benchmark_counters_tabular=true
//
// Each benchmark reports bytes_per_second for the bytes the kernel must read and write;
// BM_Memcpy gives the machine's copy bandwidth in the same run for comparison.
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "a2ats/kv_store.h"
#include "a2ats/rotary.h"
#include "a2ats/topk.h"
#include "a2ats/vq.h"

namespace {

constexpr int64_t kQHeads = 32, kKVHeads = 8, kHeadDim = 128, kCentroids = 4096, kSink = 8, kWindow = 64;

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

std::vector<int16_t> random_codes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(0, kCentroids - 1);
  std::vector<int16_t> v(n);
  for (auto& x : v) x = int16_t(dist(rng));
  return v;
}

a2ats::LutScoresParams lut_params(int64_t tokens) {
  a2ats::LutScoresParams p;
  p.batch = 1;
  p.num_q_heads = kQHeads;
  p.num_kv_heads = kKVHeads;
  p.head_dim = kHeadDim;
  p.num_subspaces = 1;
  p.num_centroids = kCentroids;
  p.capacity = tokens;
  p.num_bins = 1;
  p.q_stride[0] = kQHeads * kHeadDim;
  p.q_stride[1] = kHeadDim;
  p.q_stride[2] = 0;
  p.codes_stride[0] = kKVHeads * tokens;
  p.codes_stride[1] = tokens;
  p.codes_stride[2] = 1;
  p.scores_stride[0] = kQHeads * tokens;
  p.scores_stride[1] = tokens;
  return p;
}

a2ats::SelectTopkParams topk_params(int64_t tokens) {
  a2ats::SelectTopkParams p;
  const int64_t group = kQHeads / kKVHeads;
  p.batch = 1;
  p.num_q_heads = kQHeads;
  p.group_size = group;
  p.capacity = tokens;
  p.k = tokens * 3 / 100;
  p.sink = kSink;
  p.window = kWindow;
  p.max_selected = group * p.k + kSink + kWindow;
  p.scores_stride[0] = kQHeads * tokens;
  p.scores_stride[1] = tokens;
  p.indices_stride[0] = kKVHeads * p.max_selected;
  p.indices_stride[1] = p.max_selected;
  p.counts_stride[0] = kKVHeads;
  p.counts_stride[1] = 1;
  return p;
}

void BM_Memcpy(benchmark::State& state) {
  const size_t bytes = size_t(state.range(0)) << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(2 * bytes));  // read + write
}
BENCHMARK(BM_Memcpy)->Arg(256)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_LutScores(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const auto p = lut_params(tokens);
  auto q = random_floats(size_t(kQHeads * kHeadDim), 1);
  auto centroids = random_floats(size_t(kKVHeads * kCentroids * kHeadDim), 2);
  auto codes = random_codes(size_t(kKVHeads * tokens), 3);
  std::vector<float> scores(size_t(kQHeads * tokens));
  const int32_t length = int32_t(tokens);
  for (auto _ : state) {
    a2ats::lut_scores_cpu(q.data(), centroids.data(), codes.data(), &length, nullptr, scores.data(), p);
    benchmark::DoNotOptimize(scores.data());
  }
  const int64_t bytes = int64_t(codes.size() * 2 + centroids.size() * 4 + scores.size() * 4);
  state.SetBytesProcessed(int64_t(state.iterations()) * bytes);
}
BENCHMARK(BM_LutScores)->Arg(8192)->Arg(32768)->Arg(131072)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_SelectTopk(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const auto p = topk_params(tokens);
  auto scores = random_floats(size_t(kQHeads * tokens), 4);
  std::vector<int32_t> indices(size_t(kKVHeads * p.max_selected)), counts(kKVHeads);
  const int32_t length = int32_t(tokens);
  for (auto _ : state) {
    a2ats::select_topk_cpu(scores.data(), &length, indices.data(), counts.data(), p);
    benchmark::DoNotOptimize(indices.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(scores.size() * 4 + indices.size() * 4));
}
BENCHMARK(BM_SelectTopk)->Arg(8192)->Arg(32768)->Arg(131072)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_Rotary(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  a2ats::RotaryParams p;
  p.batch = 1;
  p.num_heads = kKVHeads;
  p.num_tokens = tokens;
  p.head_dim = kHeadDim;
  p.rotary_dim = kHeadDim;
  p.dtype = a2ats::DType::kFloat32;
  p.pos_dtype = a2ats::DType::kInt64;
  p.x_stride[0] = kKVHeads * tokens * kHeadDim;
  p.x_stride[1] = tokens * kHeadDim;
  p.x_stride[2] = kHeadDim;
  std::copy(p.x_stride, p.x_stride + 3, p.out_stride);
  p.pos_stride[0] = tokens;
  p.pos_stride[1] = 1;
  auto x = random_floats(size_t(kKVHeads * tokens * kHeadDim), 5);
  std::vector<float> out(x.size()), inv_freq(kHeadDim / 2);
  std::vector<int64_t> positions(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) positions[size_t(t)] = -t;
  for (int64_t i = 0; i < kHeadDim / 2; ++i) inv_freq[size_t(i)] = std::pow(500000.f, -2.f * float(i) / kHeadDim);
  for (auto _ : state) {
    a2ats::rotary_cpu(x.data(), out.data(), positions.data(), inv_freq.data(), p);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(2 * x.size() * 4));
}
BENCHMARK(BM_Rotary)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_VqEncode(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  a2ats::VQEncodeParams p;
  p.batch = 1;
  p.num_kv_heads = kKVHeads;
  p.num_tokens = tokens;
  p.head_dim = kHeadDim;
  p.num_subspaces = 1;
  p.num_centroids = kCentroids;
  p.x_stride[0] = kKVHeads * tokens * kHeadDim;
  p.x_stride[1] = tokens * kHeadDim;
  p.x_stride[2] = kHeadDim;
  p.codes_stride[0] = kKVHeads * tokens;
  p.codes_stride[1] = tokens;
  p.codes_stride[2] = 1;
  auto x = random_floats(size_t(kKVHeads * tokens * kHeadDim), 6);
  auto centroids = random_floats(size_t(kKVHeads * kCentroids * kHeadDim), 7);
  std::vector<int16_t> codes(size_t(kKVHeads * tokens));
  for (auto _ : state) {
    a2ats::vq_encode_cpu(x.data(), centroids.data(), codes.data(), p);
    benchmark::DoNotOptimize(codes.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(double(2 * kKVHeads * tokens * kCentroids * kHeadDim),
                         benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_VqEncode)->Arg(1)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_KVStoreGather(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  a2ats::KVStore store(1, 1, kKVHeads, kHeadDim, tokens, a2ats::DType::kFloat16, false, 0);
  std::vector<uint16_t> rows(size_t(kKVHeads * tokens * kHeadDim), 0x3c00);  // 1.0 in half
  a2ats::RowsView src{rows.data(), {kKVHeads * tokens * kHeadDim, tokens * kHeadDim, kHeadDim}};
  store.append(0, src, src, tokens, nullptr);
  const auto tp = topk_params(tokens);
  auto scores = random_floats(size_t(kQHeads * tokens), 8);
  std::vector<int32_t> indices(size_t(kKVHeads * tp.max_selected)), counts(kKVHeads);
  const int32_t length = int32_t(tokens);
  a2ats::select_topk_cpu(scores.data(), &length, indices.data(), counts.data(), tp);
  std::vector<uint16_t> out_k(size_t(kKVHeads * tp.max_selected * kHeadDim)), out_v(out_k.size());
  a2ats::RowsView ok{out_k.data(), {kKVHeads * tp.max_selected * kHeadDim, tp.max_selected * kHeadDim, kHeadDim}};
  a2ats::RowsView ov{out_v.data(), {ok.stride[0], ok.stride[1], ok.stride[2]}};
  const int64_t idx_stride[2] = {tp.indices_stride[0], tp.indices_stride[1]};
  const int64_t cnt_stride[2] = {tp.counts_stride[0], tp.counts_stride[1]};
  int64_t selected = 0;
  for (int32_t c : counts) selected += c;
  for (auto _ : state) {
    store.gather(0, indices.data(), idx_stride, counts.data(), cnt_stride, ok, ov);
    benchmark::DoNotOptimize(out_k.data());
  }
  // K and V rows, each read once and written once.
  state.SetBytesProcessed(int64_t(state.iterations()) * selected * kHeadDim * 2 * 2 * 2);
}
BENCHMARK(BM_KVStoreGather)->Arg(32768)->Arg(131072)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
