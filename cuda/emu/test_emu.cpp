// Runs the CUDA kernels and launchers of cuda/*.cu under the CPU emulation in include/ and
// compares them with the CPU implementations of cpp/src. Built and run by run.sh; exits 1 on a
// mismatch. "Device" memory is host memory here, so inputs are shared by both paths.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "a2ats_cuda.h"
#include "cuda_common.cuh"

namespace a2ats::cuda_detail {
cudaError_t scratch_alloc(void** ptr, size_t bytes, cudaStream_t) {
  // Poisoned, so a kernel relying on zeroed scratch would fail.
  *ptr = std::malloc(bytes);
  std::memset(*ptr, 0xa5, bytes);
  return cudaSuccess;
}
cudaError_t scratch_free(void* ptr, cudaStream_t) {
  std::free(ptr);
  return cudaSuccess;
}
}  // namespace a2ats::cuda_detail

using namespace a2ats;

static int g_failures = 0;
static std::mt19937 rng(1234);

#define CHECK(cond, ...)                               \
  do {                                                 \
    if (!(cond)) {                                     \
      ++g_failures;                                    \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)

#define CUDA_OK(expr) CHECK((expr) == cudaSuccess, "%s", #expr)

static double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
static double g_t0 = seconds();
static void section(const char* name) {
  const double now = seconds();
  std::printf("%s (%.1f s so far)\n", name, now - g_t0);
  std::fflush(stdout);
}

static float randn() { return std::normal_distribution<float>(0.f, 1.f)(rng); }
static int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

template <typename T>
static T to_t(float f) {
  return from_float<T>(f);
}
template <typename T>
static float as_f(T v) {
  return to_float(v);
}

// ---- rotary --------------------------------------------------------------------------------
template <typename T>
static void test_rotary(bool interleaved, bool in_place, int64_t R, bool pos32) {
  const int64_t B = 2, H = 3, T_ = 5, D = 16;
  // Strided x: token stride D + 3 (padding), head stride T*(D+3).
  const int64_t ts = D + 3, hs = T_ * ts, bs = H * hs;
  std::vector<T> x(size_t(B * bs)), out_cpu(x.size()), out_emu(x.size());
  for (auto& v : x) v = to_t<T>(randn());
  std::vector<int64_t> pos64(size_t(B * T_));
  std::vector<int32_t> pos32v(pos64.size());
  const int64_t specials[] = {0, -1, 7, -300000, 123456, 2000000, -5};
  for (size_t i = 0; i < pos64.size(); ++i) pos64[i] = specials[i % 7] + int64_t(i);
  for (size_t i = 0; i < pos64.size(); ++i) pos32v[i] = int32_t(pos64[i]);
  std::vector<float> inv_freq(size_t(R / 2));
  for (int64_t i = 0; i < R / 2; ++i) inv_freq[size_t(i)] = float(1.0 / std::pow(10000.0, 2.0 * double(i) / double(R)));
  RotaryParams p;
  p.batch = B;
  p.num_heads = H;
  p.num_tokens = T_;
  p.head_dim = D;
  p.rotary_dim = R;
  p.interleaved = interleaved;
  p.dtype = std::is_same<T, float>::value    ? DType::kFloat32
            : std::is_same<T, half_t>::value ? DType::kFloat16
                                             : DType::kBFloat16;
  p.pos_dtype = pos32 ? DType::kInt32 : DType::kInt64;
  p.x_stride[0] = bs;
  p.x_stride[1] = hs;
  p.x_stride[2] = ts;
  p.out_stride[0] = bs;
  p.out_stride[1] = hs;
  p.out_stride[2] = ts;
  p.pos_stride[0] = T_;
  p.pos_stride[1] = 1;
  const void* pos = pos32 ? static_cast<const void*>(pos32v.data()) : pos64.data();
  out_cpu = x;
  out_emu = x;
  if (in_place) {
    rotary_cpu(out_cpu.data(), out_cpu.data(), pos, inv_freq.data(), p);
    CUDA_OK(rotary_cuda(out_emu.data(), out_emu.data(), pos, inv_freq.data(), p, nullptr));
  } else {
    std::fill(out_cpu.begin(), out_cpu.end(), to_t<T>(-77.f));
    std::fill(out_emu.begin(), out_emu.end(), to_t<T>(-77.f));
    rotary_cpu(x.data(), out_cpu.data(), pos, inv_freq.data(), p);
    CUDA_OK(rotary_cuda(x.data(), out_emu.data(), pos, inv_freq.data(), p, nullptr));
  }
  // The CPU's FMA clones may round x1*c - x2*s differently by an ulp of the f32 result.
  double worst = 0;
  size_t bad = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double a = as_f(out_cpu[i]), b = as_f(out_emu[i]);
    const double tol = std::is_same<T, float>::value ? 1e-6 * (1 + std::fabs(a)) : 1e-2 * (1 + std::fabs(a));
    worst = std::max(worst, std::fabs(a - b));
    bad += !(std::fabs(a - b) <= tol);
  }
  CHECK(bad == 0, "rotary dtype=%s interleaved=%d in_place=%d R=%lld: %zu mismatches, max diff %g", dtype_name(p.dtype),
        interleaved, in_place, (long long)R, bad, worst);
}

// ---- vq_encode -----------------------------------------------------------------------------
template <typename T>
static void test_vq_encode(int64_t D, int64_t M, int64_t C, int64_t T_, bool duplicate_centroids) {
  const int64_t B = 2, Hkv = 2, dsub = D / M;
  std::vector<T> x(size_t(B * Hkv * T_ * D));
  for (auto& v : x) v = to_t<T>(randn());
  std::vector<float> cent(size_t(Hkv * M * C * dsub));
  for (auto& v : cent) v = randn();
  if (duplicate_centroids)  // every odd centroid equals its predecessor: ties must go to the lower index
    for (int64_t gm = 0; gm < Hkv * M; ++gm)
      for (int64_t c = 1; c < C; c += 2)
        std::memcpy(&cent[size_t((gm * C + c) * dsub)], &cent[size_t((gm * C + c - 1) * dsub)], size_t(dsub) * 4);
  // Some rows equal a centroid exactly.
  for (int64_t r = 0; r < std::min<int64_t>(T_, 5); ++r)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t d = 0; d < dsub; ++d)
        x[size_t(r * D + m * dsub + d)] = to_t<T>(cent[size_t((m * C + (r * 7) % C) * dsub + d)]);
  VQEncodeParams p;
  p.batch = B;
  p.num_kv_heads = Hkv;
  p.num_tokens = T_;
  p.head_dim = D;
  p.num_subspaces = M;
  p.num_centroids = C;
  p.dtype = std::is_same<T, float>::value    ? DType::kFloat32
            : std::is_same<T, half_t>::value ? DType::kFloat16
                                             : DType::kBFloat16;
  p.x_stride[0] = Hkv * T_ * D;
  p.x_stride[1] = T_ * D;
  p.x_stride[2] = D;
  // Codes with a padded token stride.
  const int64_t cts = M + 1;
  p.codes_stride[0] = Hkv * T_ * cts;
  p.codes_stride[1] = T_ * cts;
  p.codes_stride[2] = cts;
  std::vector<int16_t> c_cpu(size_t(B * Hkv * T_ * cts), -9), c_emu(c_cpu.size(), -9);
  vq_encode_cpu(x.data(), cent.data(), c_cpu.data(), p);
  CUDA_OK(vq_encode_cuda(x.data(), cent.data(), c_emu.data(), p, nullptr));
  size_t differ = 0, bad = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t m = 0; m < cts; ++m) {
          const size_t i = size_t(b * p.codes_stride[0] + g * p.codes_stride[1] + t * cts + m);
          if (m == M) {
            bad += c_emu[i] != -9;
            continue;
          }  // padding untouched
          if (c_cpu[i] == c_emu[i]) continue;
          ++differ;
          // A different code is fine only for a near-tie (distances computed in double).
          auto dist = [&](int c) {
            double s = 0;
            for (int64_t d = 0; d < dsub; ++d) {
              const double diff =
                  double(as_f(x[size_t(b * p.x_stride[0] + g * p.x_stride[1] + t * D + m * dsub + d)])) -
                  cent[size_t(((g * M + m) * C + c) * dsub + d)];
              s += diff * diff;
            }
            return s;
          };
          const double a = dist(c_cpu[i]), e = dist(c_emu[i]);
          if (c_emu[i] < 0 || c_emu[i] >= C || std::fabs(a - e) > 1e-5 * (1 + a)) ++bad;
        }
      }
  CHECK(bad == 0, "vq_encode D=%lld M=%lld C=%lld T=%lld dup=%d: %zu bad codes (%zu differ)", (long long)D,
        (long long)M, (long long)C, (long long)T_, duplicate_centroids, bad, differ);
  if (differ)
    std::printf("  note: vq_encode D=%lld M=%lld C=%lld: %zu near-tie codes differ\n", (long long)D, (long long)M,
                (long long)C, differ);
}

// ---- lut_scores ----------------------------------------------------------------------------
// Params for contiguous q (B, Hq, NB, D), codes (*, Hkv, code_rows, M) whose first dimension is
// the batch row (code_rows = Tcap) or the block (code_rows = block_size), scores (B, Hq, score_row).
static LutScoresParams lut_params(int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t M, int64_t C, int64_t NB,
                                  int64_t Tcap, int64_t code_rows, int64_t score_row) {
  const int64_t Hq = Hkv * G;
  LutScoresParams p;
  p.batch = B;
  p.num_q_heads = Hq;
  p.num_kv_heads = Hkv;
  p.head_dim = D;
  p.num_subspaces = M;
  p.num_centroids = C;
  p.capacity = Tcap;
  p.num_bins = NB;
  p.q_stride[0] = Hq * NB * D;
  p.q_stride[1] = NB * D;
  p.q_stride[2] = NB > 1 ? D : 0;
  p.codes_stride[0] = Hkv * code_rows * M;
  p.codes_stride[1] = code_rows * M;
  p.codes_stride[2] = M;
  p.scores_stride[0] = Hq * score_row;
  p.scores_stride[1] = score_row;
  return p;
}

static void test_lut_scores(int64_t B, int64_t D, int64_t M, int64_t C, int64_t NB, int64_t Tcap, bool bad_codes) {
  const int64_t Hkv = 2, G = 3, Hq = Hkv * G, dsub = D / M;
  std::vector<float> q(size_t(B * Hq * NB * D));
  for (auto& v : q) v = randn();
  std::vector<float> cent(size_t(Hkv * M * C * dsub));
  for (auto& v : cent) v = randn();
  const int64_t cts = M;  // codes contiguous
  std::vector<int16_t> codes(size_t(B * Hkv * Tcap * cts));
  for (auto& v : codes) v = int16_t(randint(0, int(C - 1)));
  std::vector<int32_t> lengths = {int32_t(Tcap), int32_t(Tcap * 2 / 3 + 1), 0};
  lengths.resize(size_t(B));
  std::vector<int32_t> edges;
  for (int64_t j = 1; j < NB; ++j) edges.push_back(int32_t(j * j * 37));
  if (bad_codes) {
    codes[size_t(5 * cts)] = int16_t(C);            // b = 0, g = 0, t = 5
    codes[size_t((Tcap + 9) * cts)] = int16_t(-3);  // b = 0, g = 1, t = 9
  }
  const int64_t ss = Tcap + 5;  // padded rows
  const LutScoresParams p = lut_params(B, Hkv, G, D, M, C, NB, Tcap, Tcap, ss);
  std::vector<float> s_cpu(size_t(B * Hq * ss), 42.f), s_emu(s_cpu.size(), 42.f);
  const auto cpu_scores = [&](const std::vector<int16_t>& c) {
    try {
      lut_scores_cpu(q.data(), cent.data(), c.data(), lengths.data(), edges.empty() ? nullptr : edges.data(),
                     s_cpu.data(), p);
      return true;
    } catch (const std::invalid_argument&) {
      return false;
    }
  };
  const bool ok = cpu_scores(codes);
  CHECK(ok == !bad_codes, "lut_scores_cpu ok=%d", ok);
  if (bad_codes) {
    // The CPU kernel checks every code before it writes: a refused call leaves scores untouched.
    CHECK(std::all_of(s_cpu.begin(), s_cpu.end(), [](float v) { return v == 42.f; }),
          "lut_scores_cpu wrote scores before refusing bad codes");
    // The CUDA kernel has no way to refuse (NaN at bad tokens); compare the other tokens with
    // the CPU scores of the same codes with the two bad ones made valid.
    std::vector<int16_t> fixed = codes;
    fixed[size_t(5 * cts)] = fixed[size_t((Tcap + 9) * cts)] = 0;
    CHECK(cpu_scores(fixed), "lut_scores_cpu refused valid codes");
  }
  CUDA_OK(lut_scores_cuda(q.data(), cent.data(), codes.data(), lengths.data(), edges.empty() ? nullptr : edges.data(),
                          s_emu.data(), p, nullptr));
  size_t exact = 0, close = 0, bad = 0, nan_ok = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t t = 0; t < ss; ++t) {
        const size_t i = size_t(b * p.scores_stride[0] + h * ss + t);
        const float a = s_cpu[i], e = s_emu[i];
        const bool bad_token = bad_codes && b == 0 && ((h / G == 0 && t == 5) || (h / G == 1 && t == 9));
        if (bad_token) {
          if (std::isnan(e))
            ++nan_ok;
          else
            ++bad;
          continue;
        }
        if (std::memcmp(&a, &e, 4) == 0)
          ++exact;
        else if (std::fabs(a - e) <= 1e-5f * (1 + std::fabs(a)))
          ++close;
        else
          ++bad;
      }
  CHECK(bad == 0, "lut_scores D=%lld M=%lld C=%lld NB=%lld Tcap=%lld: %zu bad, %zu exact, %zu close", (long long)D,
        (long long)M, (long long)C, (long long)NB, (long long)Tcap, bad, exact, close);
  if (bad_codes)
    CHECK(nan_ok == size_t(2 * G), "lut_scores: %zu NaN scores for bad codes, expected %lld", nan_ok,
          (long long)(2 * G));
  if (close)
    std::printf("  note: lut_scores D=%lld M=%lld C=%lld NB=%lld: %zu scores differ in the last bits (%zu bit-equal)\n",
                (long long)D, (long long)M, (long long)C, (long long)NB, close, exact);
}

// Paged codes (num_blocks, Hkv, block_size, M) through a block table whose entries past each
// row's length are invalid (never read). CPU and CUDA agree; a bad block id of a valid token
// makes the CPU refuse and CUDA give NaN for that block's tokens only.
static void test_lut_scores_paged(int64_t B, int64_t M, int64_t C, int64_t NB, int64_t block_size, bool bad_block) {
  const int64_t Hkv = 2, G = 3, Hq = Hkv * G, D = 64, dsub = D / M, num_blocks = 7, max_blocks = 6;
  const int64_t Tcap = max_blocks * block_size;
  std::vector<float> q(size_t(B * Hq * NB * D)), cent(size_t(Hkv * M * C * dsub));
  for (auto& v : q) v = randn();
  for (auto& v : cent) v = randn();
  std::vector<int16_t> codes(size_t(num_blocks * Hkv * block_size * M));
  for (auto& v : codes) v = int16_t(randint(0, int(C - 1)));
  std::vector<int32_t> lengths = {int32_t(Tcap), int32_t(Tcap / 2 + 1), 0};
  lengths.resize(size_t(B));
  std::vector<int32_t> table(size_t(B * max_blocks));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < max_blocks; ++i)
      table[size_t(b * max_blocks + i)] =
          i * block_size < lengths[size_t(b)] ? randint(0, int(num_blocks - 1)) : (i % 2 ? -1 : int32_t(num_blocks));
  if (bad_block) table[1] = int32_t(num_blocks);  // row 0's second block: tokens [bs, 2 bs)
  std::vector<int32_t> edges;
  for (int64_t j = 1; j < NB; ++j) edges.push_back(int32_t(j * 5));
  LutScoresParams p = lut_params(B, Hkv, G, D, M, C, NB, Tcap, block_size, Tcap);
  p.block_table = table.data();
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.block_table_stride = max_blocks;
  std::vector<float> s_cpu(size_t(B * Hq * Tcap), 42.f), s_emu(s_cpu.size(), 42.f);
  const int32_t* e = edges.empty() ? nullptr : edges.data();
  bool refused = false;
  try {
    lut_scores_cpu(q.data(), cent.data(), codes.data(), lengths.data(), e, s_cpu.data(), p);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused == bad_block, "paged lut_scores_cpu refused=%d", refused);
  if (bad_block) {
    CHECK(std::all_of(s_cpu.begin(), s_cpu.end(), [](float v) { return v == 42.f; }),
          "paged lut_scores_cpu wrote scores before refusing a bad block");
    std::vector<int32_t> fixed = table;
    fixed[1] = 0;
    p.block_table = fixed.data();
    lut_scores_cpu(q.data(), cent.data(), codes.data(), lengths.data(), e, s_cpu.data(), p);
    p.block_table = table.data();
  }
  CUDA_OK(lut_scores_cuda(q.data(), cent.data(), codes.data(), lengths.data(), e, s_emu.data(), p, nullptr));
  size_t bad = 0, nan_ok = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t t = 0; t < Tcap; ++t) {
        const size_t i = size_t((b * Hq + h) * Tcap + t);
        if (bad_block && b == 0 && t / block_size == 1) {
          nan_ok += std::isnan(s_emu[i]);
          continue;
        }
        bad += !(std::memcmp(&s_cpu[i], &s_emu[i], 4) == 0 ||
                 std::fabs(s_cpu[i] - s_emu[i]) <= 1e-5f * (1 + std::fabs(s_cpu[i])));
      }
  CHECK(bad == 0, "paged lut_scores M=%lld C=%lld NB=%lld bs=%lld: %zu bad", (long long)M, (long long)C, (long long)NB,
        (long long)block_size, bad);
  if (bad_block)
    CHECK(nan_ok == size_t(Hq * block_size), "paged lut_scores: %zu NaN scores for a bad block, expected %lld", nan_ok,
          (long long)(Hq * block_size));
}

// ---- select_topk ---------------------------------------------------------------------------
enum class ScoreKind { kRandom, kFewValues, kAllEqual, kSpecials };

static void test_select_topk(int64_t B, int64_t Hkv, int64_t G, int64_t Tcap, int64_t k, int64_t sink, int64_t window,
                             ScoreKind kind, const std::vector<int32_t>& lengths) {
  const int64_t Hq = Hkv * G;
  const int64_t ss = Tcap + 3;
  std::vector<float> scores(size_t(B * Hq * ss));
  for (auto& v : scores) {
    switch (kind) {
      case ScoreKind::kRandom:
        v = randn();
        break;
      case ScoreKind::kFewValues:
        v = float(randint(0, 6)) * 0.5f - 1.f;
        break;
      case ScoreKind::kAllEqual:
        v = 0.25f;
        break;
      case ScoreKind::kSpecials: {
        const int r = randint(0, 9);
        v = r == 0 ? NAN : r == 1 ? -INFINITY : r == 2 ? INFINITY : r == 3 ? -0.f : r == 4 ? 0.f : randn();
        break;
      }
    }
  }
  SelectTopkParams p;
  p.batch = B;
  p.num_q_heads = Hq;
  p.group_size = G;
  p.capacity = Tcap;
  p.k = k;
  p.sink = sink;
  p.window = window;
  p.max_selected = G * k + sink + window;
  p.scores_stride[0] = Hq * ss;
  p.scores_stride[1] = ss;
  const int64_t is = p.max_selected + 2;  // padded index rows
  p.indices_stride[0] = Hkv * is;
  p.indices_stride[1] = is;
  p.counts_stride[0] = Hkv * 2;
  p.counts_stride[1] = 2;
  std::vector<int32_t> i_cpu(size_t(B * Hkv * is), -5), i_emu(i_cpu.size(), -5), c_cpu(size_t(B * Hkv * 2), -5),
      c_emu(c_cpu.size(), -5);
  select_topk_cpu(scores.data(), lengths.data(), i_cpu.data(), c_cpu.data(), p);
  CUDA_OK(select_topk_cuda(scores.data(), lengths.data(), i_emu.data(), c_emu.data(), p, nullptr));
  const bool same = i_cpu == i_emu && c_cpu == c_emu;
  CHECK(same, "select_topk B=%lld Hkv=%lld G=%lld Tcap=%lld k=%lld sink=%lld window=%lld kind=%d differs", (long long)B,
        (long long)Hkv, (long long)G, (long long)Tcap, (long long)k, (long long)sink, (long long)window, int(kind));
  if (!same) {
    for (size_t i = 0; i < c_cpu.size(); ++i)
      if (c_cpu[i] != c_emu[i]) std::printf("  counts[%zu]: cpu %d emu %d\n", i, c_cpu[i], c_emu[i]);
    int shown = 0;
    for (size_t i = 0; i < i_cpu.size() && shown < 10; ++i)
      if (i_cpu[i] != i_emu[i]) {
        std::printf("  indices[%zu]: cpu %d emu %d\n", i, i_cpu[i], i_emu[i]);
        ++shown;
      }
  }
}

// ---- group_scores --------------------------------------------------------------------------
// CPU and emulated CUDA must agree bit for bit except where a head's log sum exp (in double, in
// another order) rounds to another float: then every value of that head may differ by an ulp.
static void test_group_scores(int64_t B, int64_t Hkv, int64_t G, int64_t Tcap, int64_t sink, int64_t window,
                              ScoreKind kind, const std::vector<int32_t>& lengths) {
  const int64_t Hq = Hkv * G, ss = Tcap + 3, os = Tcap + 2;
  std::vector<float> scores(size_t(B * Hq * ss));
  for (auto& v : scores) {
    const int r = randint(0, 19);
    v = kind == ScoreKind::kSpecials && r == 0   ? NAN
        : kind == ScoreKind::kSpecials && r == 1 ? -INFINITY
                                                 : randn() * 4.f;
  }
  GroupScoresParams p;
  p.batch = B;
  p.num_q_heads = Hq;
  p.group_size = G;
  p.capacity = Tcap;
  p.sink = sink;
  p.window = window;
  p.scores_stride[0] = Hq * ss;
  p.scores_stride[1] = ss;
  p.out_stride[0] = Hkv * os;
  p.out_stride[1] = os;
  std::vector<float> o_cpu(size_t(B * Hkv * os), 42.f), o_emu(o_cpu.size(), 42.f);
  group_scores_cpu(scores.data(), lengths.data(), o_cpu.data(), p);
  CUDA_OK(group_scores_cuda(scores.data(), lengths.data(), o_emu.data(), p, nullptr));
  int64_t exact = 0, close = 0, bad = 0;
  for (size_t i = 0; i < o_cpu.size(); ++i) {
    const float a = o_cpu[i], e = o_emu[i];
    if (std::memcmp(&a, &e, 4) == 0)
      ++exact;
    else if (std::isfinite(a) && std::isfinite(e) && std::fabs(a - e) <= 1e-6f * std::max(1.f, std::fabs(a)))
      ++close;
    else
      ++bad;
  }
  CHECK(bad == 0 && close * 100 <= int64_t(o_cpu.size()),
        "group_scores B=%lld Hkv=%lld G=%lld Tcap=%lld sink=%lld window=%lld: %lld exact, %lld close, %lld differ",
        (long long)B, (long long)Hkv, (long long)G, (long long)Tcap, (long long)sink, (long long)window,
        (long long)exact, (long long)close, (long long)bad);
}

// ---- KV store ------------------------------------------------------------------------------
static void test_kv_store(DType dtype, int64_t D) {
  const int64_t L = 2, B = 2, Hkv = 3, cap = 700;
  const int64_t elem = dtype_size(dtype);
  KVStore cpu(L, B, Hkv, D, cap, dtype, false, 2), emu(L, B, Hkv, D, cap, dtype, true, 3);
  // Append twice from "device" tensors with a padded token stride, the second with num_tokens.
  for (int step = 0; step < 2; ++step) {
    const int64_t t = step == 0 ? 500 : 130;
    const int64_t ts = D + 8;
    std::vector<uint16_t> kb(size_t(B * Hkv * t * ts * elem / 2)), vb(kb.size());
    for (auto& v : kb) v = uint16_t(randint(0, 65535));
    for (auto& v : vb) v = uint16_t(randint(0, 65535));
    RowsView k{kb.data(), {Hkv * t * ts, t * ts, ts}}, v{vb.data(), {Hkv * t * ts, t * ts, ts}};
    std::vector<int32_t> num_tokens = {int32_t(t), int32_t(t / 2)};
    const int32_t* nt = step == 0 ? nullptr : num_tokens.data();
    for (int64_t layer = 0; layer < L; ++layer) {
      cpu.append(layer, k, v, t, nt);
      emu.check_append(layer, t, nt);
      CUDA_OK(kv_append_cuda(emu, layer, k, v, t, nt, nullptr));
      emu.commit_append(layer, t, nt);
    }
  }
  for (int64_t layer = 0; layer < L; ++layer)
    for (int64_t b = 0; b < B; ++b) {
      CHECK(cpu.length(layer, b) == emu.length(layer, b), "append lengths");
      for (int64_t g = 0; g < Hkv; ++g)
        CHECK(std::memcmp(cpu.k_rows(layer, b, g), emu.k_rows(layer, b, g),
                          size_t(cpu.length(layer, b) * cpu.row_bytes())) == 0 &&
                  std::memcmp(cpu.v_rows(layer, b, g), emu.v_rows(layer, b, g),
                              size_t(cpu.length(layer, b) * cpu.row_bytes())) == 0,
              "append rows differ at layer %lld b %lld g %lld", (long long)layer, (long long)b, (long long)g);
    }
  // Gathers: ragged counts (one empty row), strided indices and outputs, several calls in a row.
  for (int rep = 0; rep < 3; ++rep) {
    const int64_t kmax = 300, is = kmax + 4;
    std::vector<int32_t> idx(size_t(B * Hkv * is), -1), cnt(size_t(B * Hkv));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t c = (b == 1 && g == 1) ? 0 : randint(1, int(kmax));
        cnt[size_t(b * Hkv + g)] = int32_t(c);
        for (int64_t i = 0; i < c; ++i) idx[size_t((b * Hkv + g) * is + i)] = randint(0, int(cpu.length(1, b) - 1));
      }
    const int64_t istride[2] = {Hkv * is, is}, cstride[2] = {Hkv, 1};
    const int64_t os = D + 2;  // padded output rows
    std::vector<char> ok_cpu(size_t(B * Hkv * kmax * os * elem), 3), ov_cpu(ok_cpu.size(), 3), ok_emu(ok_cpu.size(), 3),
        ov_emu(ok_cpu.size(), 3);
    RowsView okc{ok_cpu.data(), {Hkv * kmax * os, kmax * os, os}}, ovc{ov_cpu.data(), {Hkv * kmax * os, kmax * os, os}};
    RowsView oke{ok_emu.data(), {Hkv * kmax * os, kmax * os, os}}, ove{ov_emu.data(), {Hkv * kmax * os, kmax * os, os}};
    cpu.check_gather(1, idx.data(), istride, cnt.data(), cstride, kmax);
    cpu.gather(1, idx.data(), istride, cnt.data(), cstride, okc, ovc);
    CUDA_OK(kv_gather_cuda(emu, 1, idx.data(), istride, rep != 1, cnt.data(), cstride, oke, ove, kmax, nullptr));
    CHECK(ok_cpu == ok_emu && ov_cpu == ov_emu, "gather dtype=%s D=%lld rep=%d differs", dtype_name(dtype),
          (long long)D, rep);
  }
  // Out-of-range index: std::invalid_argument, outputs untouched.
  {
    std::vector<int32_t> idx = {0, 1, int32_t(cap + 5)}, cnt(size_t(B * Hkv), 0);
    cnt[0] = 3;
    const int64_t istride[2] = {0, 0}, cstride[2] = {Hkv, 1};
    std::vector<char> o(size_t(B * Hkv * 3 * D * elem), 7);
    RowsView ov{o.data(), {Hkv * 3 * D, 3 * D, D}};
    bool threw = false;
    try {
      kv_gather_cuda(emu, 0, idx.data(), istride, true, cnt.data(), cstride, ov, ov, 3, nullptr);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK(threw, "gather with an index past the length must throw");
    CHECK(std::all_of(o.begin(), o.end(), [](char c) { return c == 7; }), "rejected gather wrote output");
  }
}

// ---- attend_rows / merge_attention against a double-precision scalar reference ----------------
template <typename T>
static void test_attend_merge(int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t max_rows) {
  const int64_t Hq = Hkv * G, rs = D + 3;  // padded rows
  std::vector<T> keys(size_t(B * Hkv * max_rows * rs)), values(keys.size());
  for (auto& x : keys) x = to_t<T>(randn());
  for (auto& x : values) x = to_t<T>(randn());
  std::vector<float> q(size_t(B * Hq * D));
  for (auto& x : q) x = randn();
  std::vector<int32_t> counts(size_t(B * Hkv));
  for (int64_t i = 0; i < B * Hkv; ++i)
    counts[size_t(i)] = i == 1 || max_rows == 0 ? 0 : randint(1, int(max_rows));  // one empty
  AttendRowsParams p;
  p.batch = B;
  p.num_q_heads = Hq;
  p.group_size = G;
  p.head_dim = D;
  p.max_rows = max_rows;
  p.scale = 0.3f;
  p.dtype = std::is_same_v<T, float> ? DType::kFloat32 : std::is_same_v<T, half_t> ? DType::kFloat16 : DType::kBFloat16;
  p.q_stride[0] = Hq * D;
  p.q_stride[1] = D;
  p.rows_stride[0] = Hkv * max_rows * rs;
  p.rows_stride[1] = max_rows * rs;
  p.rows_stride[2] = rs;
  p.counts_stride[0] = Hkv;
  p.counts_stride[1] = 1;
  p.out_stride[0] = Hq * D;
  p.out_stride[1] = D;
  p.lse_stride[0] = Hq;
  p.lse_stride[1] = 1;
  std::vector<float> out(size_t(B * Hq * D), 7.f), lse(size_t(B * Hq), 7.f);
  CUDA_OK(attend_rows_cuda(q.data(), keys.data(), values.data(), counts.data(), out.data(), lse.data(), p, nullptr));
  double worst = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t g = h / G, n = counts[size_t(b * Hkv + g)];
      const T* kr = keys.data() + b * p.rows_stride[0] + g * p.rows_stride[1];
      const T* vr = values.data() + b * p.rows_stride[0] + g * p.rows_stride[1];
      std::vector<double> logit(static_cast<size_t>(n));
      double m = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(as_f(kr[i * rs + d])) * q[size_t((b * Hq + h) * D + d)];
        logit[size_t(i)] = dot * 0.3f;
        m = std::max(m, logit[size_t(i)]);
      }
      double sum = 0;
      for (auto& l : logit) sum += std::exp(l - m);
      const double ref_lse = n ? m + std::log(sum) : -INFINITY;
      const float got_lse = lse[size_t(b * Hq + h)];
      if (n == 0)
        CHECK(got_lse == -INFINITY, "attend: empty rows must give lse -inf, got %g", got_lse);
      else
        worst = std::max(worst, std::fabs(got_lse - ref_lse));
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t i = 0; i < n; ++i) acc += std::exp(logit[size_t(i)] - m) / sum * as_f(vr[i * rs + d]);
        worst = std::max(worst, std::fabs(out[size_t((b * Hq + h) * D + d)] - acc));
      }
    }
  CHECK(worst < 2e-4, "attend B=%lld Hkv=%lld G=%lld D=%lld rows=%lld: max error %g", (long long)B, (long long)Hkv,
        (long long)G, (long long)D, (long long)max_rows, worst);
  // Merge with a second state (the first one again, a different "row set"): both halves equal
  // weights where lse are equal; check against the formula, and the empty cases.
  std::vector<float> out_b(out.size()), lse_b(lse.size());
  for (auto& x : out_b) x = randn();
  for (size_t i = 0; i < lse_b.size(); ++i) lse_b[i] = i % 5 == 0 ? -INFINITY : randn() * 3.f;
  MergeAttentionParams mp;
  mp.batch = B;
  mp.num_heads = Hq;
  mp.head_dim = D;
  mp.dtype = p.dtype;
  mp.out_a_stride[0] = mp.out_b_stride[0] = Hq * D;
  mp.out_a_stride[1] = mp.out_b_stride[1] = D;
  mp.lse_a_stride[0] = mp.lse_b_stride[0] = Hq;
  mp.lse_a_stride[1] = mp.lse_b_stride[1] = 1;
  mp.out_stride[0] = Hq * (D + 1);
  mp.out_stride[1] = D + 1;
  std::vector<T> merged(size_t(B * Hq * (D + 1)), to_t<T>(9.f));
  CUDA_OK(merge_attention_cuda(out.data(), lse.data(), out_b.data(), lse_b.data(), merged.data(), mp, nullptr));
  double worst_merge = 0;
  for (int64_t bh = 0; bh < B * Hq; ++bh) {
    const double la = lse[size_t(bh)], lb = lse_b[size_t(bh)], m = std::max(la, lb);
    const double wa = m == -INFINITY ? 0 : std::exp(la - m), wb = m == -INFINITY ? 0 : std::exp(lb - m);
    for (int64_t d = 0; d < D; ++d) {
      const double ref = wa + wb > 0 ? (wa * out[size_t(bh * D + d)] + wb * out_b[size_t(bh * D + d)]) / (wa + wb) : 0;
      const double got = as_f(merged[size_t(bh * (D + 1) + d)]);
      worst_merge = std::max(worst_merge, std::fabs(got - ref) / (1 + std::fabs(ref)));
    }
    CHECK(as_f(merged[size_t(bh * (D + 1) + D)]) == 9.f, "merge wrote past head_dim");
  }
  const double tol = std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, half_t> ? 1e-3 : 8e-3;
  CHECK(worst_merge < tol, "merge dtype=%s: max error %g", dtype_name(p.dtype), worst_merge);
}

// ---- the CUDA pipeline against the CPU pipeline, step by step -----------------------------------
template <typename T>
static DType dtype_of() {
  return std::is_same_v<T, float> ? DType::kFloat32 : std::is_same_v<T, half_t> ? DType::kFloat16 : DType::kBFloat16;
}

// A random codebook of L layers for a pipeline of these heads (rotary over the whole head),
// NB WRoPE distances from the window on, bins split every 8 tokens past it.
static std::pair<PipelineShape, PipelineCodebook> random_pipeline(int64_t L, int64_t Hkv, int64_t Hq, int64_t D,
                                                                  int64_t M, int64_t C, int64_t NB, int64_t sink,
                                                                  int64_t window, bool per_kv_head) {
  const int64_t R = D;
  PipelineShape shape;
  shape.num_q_heads = Hq;
  shape.rotary_dim = R;
  shape.num_subspaces = M;
  shape.num_centroids = C;
  shape.sink = sink;
  shape.window = window;
  shape.budget_per_kv_head = per_kv_head;
  PipelineCodebook book;
  book.chol.resize(size_t(L * Hkv * D * D));
  book.chol_inv.resize(book.chol.size());
  for (auto& x : book.chol) x = randn() * 0.2f;
  for (auto& x : book.chol_inv) x = randn() * 0.2f;
  book.centroids.resize(size_t(L * Hkv * C * D));
  for (auto& x : book.centroids) x = randn();
  for (int64_t i = 0; i < R / 2; ++i) book.inv_freq.push_back(std::pow(10000.f, -2.f * float(i) / float(R)));
  for (int64_t j = 0; j < NB; ++j) book.wrope_distances.push_back(window + 16 * j);
  for (int64_t j = 1; j < NB; ++j) book.bin_edges.push_back(int32_t(window + 8 * j));
  return {shape, book};
}

// Codes of the rows `store` holds, equal in both pipelines.
template <typename A, typename B_>
static bool same_codes(const A& x, const B_& y, const KVStore& store, int64_t layer, int64_t M) {
  for (int64_t b = 0; b < store.batch(); ++b)
    for (int64_t g = 0; g < store.num_kv_heads(); ++g) {
      const int64_t off = (b * store.num_kv_heads() + g) * store.capacity() * M;
      if (std::memcmp(x.codes(layer) + off, y.codes(layer) + off, size_t(store.length(layer, b) * M) * 2) != 0)
        return false;
    }
  return true;
}

template <typename T>
static void test_pipeline(int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t NB, int64_t sink, int64_t window,
                          int64_t k, std::vector<int32_t> prompt, int steps, bool per_kv_head = false) {
  const int64_t L = 2, Hq = Hkv * G, M = 2, C = 64, cap = 400;
  const int64_t middle_k = per_kv_head ? k : G * k;  // middle rows a KV head may select
  const DType dtype = dtype_of<T>();
  const auto [shape, book] = random_pipeline(L, Hkv, Hq, D, M, C, NB, sink, window, per_kv_head);
  KVStore cpu_store(L, B, Hkv, D, cap, dtype, false, 2), dev_store(L, B, Hkv, D, cap, dtype, true, 3);
  Pipeline cpu(cpu_store, shape, book);
  CudaPipeline dev(dev_store, shape, book);
  const auto rand_rows = [](int64_t n) {
    std::vector<T> rows(static_cast<size_t>(n));
    for (auto& x : rows) x = to_t<T>(randn());
    return rows;
  };
  // Prefill: ragged prompts (num_tokens), positions 0.. per row.
  const int64_t t = *std::max_element(prompt.begin(), prompt.end());
  std::vector<int64_t> pos(size_t(B * t));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < t; ++i) pos[size_t(b * t + i)] = i;
  const int64_t pos_stride[2] = {t, 1};
  for (int64_t layer = 0; layer < L; ++layer) {
    auto kr = rand_rows(B * Hkv * t * D), vr = rand_rows(B * Hkv * t * D);
    const ConstRows kc{kr.data(), {Hkv * t * D, t * D, D}}, vc{vr.data(), {Hkv * t * D, t * D, D}};
    cpu.prefill(layer, kc, vc, t, pos.data(), pos_stride, prompt.data());
    CUDA_OK(dev.prefill(layer, kc, vc, t, pos.data(), pos_stride, prompt.data(), nullptr));
    CHECK(same_codes(cpu, dev, dev_store, layer, M), "prefill codes differ at layer %lld", (long long)layer);
  }
  double worst = 0;
  for (int step = 0; step < steps; ++step) {
    cpu.plan(k);
    dev.plan(k);
    for (int64_t layer = 0; layer < L; ++layer) {
      std::vector<int64_t> dpos(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) dpos[size_t(b)] = dev_store.length(layer, b);
      auto q = rand_rows(B * Hq * D), kr = rand_rows(B * Hkv * D), vr = rand_rows(B * Hkv * D);
      const ConstRows qc{q.data(), {Hq * D, D, 0}}, kc{kr.data(), {Hkv * D, D, D}}, vc{vr.data(), {Hkv * D, D, D}};
      const int64_t os[2] = {Hq * (D + 2), D + 2};  // strided output
      std::vector<T> out_cpu(size_t(B * Hq * (D + 2)), to_t<T>(5.f)), out_dev(out_cpu);
      cpu.decode(layer, qc, kc, vc, dpos.data(), 1, 0.125f, out_cpu.data(), os);
      const long long syncs = emu::stream_syncs;
      CUDA_OK(dev.decode(layer, qc, kc, vc, dpos.data(), 1, 0.125f, out_dev.data(), os, nullptr));
      CHECK(emu::stream_syncs - syncs == (middle_k > 0 ? 1 : 0), "decode synchronised %lld times",
            emu::stream_syncs - syncs);
      CHECK(same_codes(cpu, dev, dev_store, layer, M), "codes differ at step %d layer %lld", step, (long long)layer);
      // The CUDA selection is the CPU selection without its sink and window rows.
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = cpu_store.length(layer, b);
        for (int64_t g = 0; g < Hkv; ++g) {
          std::vector<int32_t> middle;
          const int32_t* ci = cpu.last_indices() + (b * Hkv + g) * cpu.last_max_selected();
          for (int64_t i = 0; i < cpu.last_counts()[b * Hkv + g]; ++i)
            if (ci[i] >= sink && ci[i] < len - window) middle.push_back(ci[i]);
          const int32_t* di = dev.last_indices() + (b * Hkv + g) * dev.last_max_selected();
          const int64_t n = dev.last_counts()[b * Hkv + g];
          CHECK(int64_t(middle.size()) == n && std::equal(middle.begin(), middle.end(), di),
                "selection differs at step %d layer %lld b %lld g %lld (%zu vs %lld rows)", step, (long long)layer,
                (long long)b, (long long)g, middle.size(), (long long)n);
        }
      }
      for (int64_t bh = 0; bh < B * Hq; ++bh) {
        for (int64_t d = 0; d < D; ++d) {
          const double a = as_f(out_cpu[size_t(bh * (D + 2) + d)]), e = as_f(out_dev[size_t(bh * (D + 2) + d)]);
          worst = std::max(worst, std::fabs(a - e) / (1 + std::fabs(a)));
        }
        CHECK(as_f(out_dev[size_t(bh * (D + 2) + D)]) == 5.f, "decode wrote past head_dim");
      }
    }
  }
  const double tol = std::is_same_v<T, float> ? 2e-5 : std::is_same_v<T, half_t> ? 2e-3 : 1.6e-2;
  CHECK(worst < tol, "pipeline dtype=%s B=%lld G=%lld NB=%lld k=%lld: outputs differ by %g", dtype_name(dtype),
        (long long)B, (long long)G, (long long)NB, (long long)k, worst);
  CHECK(dev.stats().rows_read == cpu.stats().rows_read && dev.stats().rows_fetched == cpu.stats().rows_fetched &&
            dev.stats().rows_cached == cpu.stats().rows_cached,
        "stats differ: read %lld vs %lld, fetched %lld vs %lld", (long long)dev.stats().rows_read,
        (long long)cpu.stats().rows_read, (long long)dev.stats().rows_fetched, (long long)cpu.stats().rows_fetched);
  // The host stores hold the same rows.
  for (int64_t layer = 0; layer < L; ++layer)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < Hkv; ++g) {
        const size_t bytes = size_t(cpu_store.length(layer, b) * cpu_store.row_bytes());
        CHECK(cpu_store.length(layer, b) == dev_store.length(layer, b) &&
                  std::memcmp(cpu_store.k_rows(layer, b, g), dev_store.k_rows(layer, b, g), bytes) == 0 &&
                  std::memcmp(cpu_store.v_rows(layer, b, g), dev_store.v_rows(layer, b, g), bytes) == 0,
              "host store rows differ at layer %lld b %lld g %lld", (long long)layer, (long long)b, (long long)g);
      }
}

// The CUDA paged pipeline against the CPU one on an engine's layout: requests own shuffled
// blocks of a slot-indexed store; rows written by slot (one padded), codes encoded into the
// paged cache, then decode calls with each request's own k. Codes, selections, stats and the
// store must match exactly, outputs to rounding; one host synchronisation per decode.
template <typename T>
static void test_paged_pipeline(int64_t Hkv, int64_t G, int64_t D, int64_t NB, int64_t sink, int64_t window,
                                int64_t block_size, std::vector<int32_t> lengths, std::vector<int32_t> ks,
                                bool per_kv_head = false) {
  const int64_t L = 2, Hq = Hkv * G, M = 2, C = 64, N = int64_t(lengths.size());
  const DType dtype = dtype_of<T>();
  const auto [shape, book] = random_pipeline(L, Hkv, Hq, D, M, C, NB, sink, window, per_kv_head);
  // Blocks: each request's, shuffled over the cache, plus two spare.
  int64_t table_width = 0, used_blocks = 0;
  for (int32_t len : lengths) table_width = std::max<int64_t>(table_width, (len + block_size - 1) / block_size);
  for (int32_t len : lengths) used_blocks += (len + block_size - 1) / block_size;
  const int64_t num_blocks = used_blocks + 2, cap = num_blocks * block_size;
  std::vector<int32_t> order(static_cast<size_t>(num_blocks));
  for (int64_t b = 0; b < num_blocks; ++b) order[size_t(b)] = int32_t(b);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> table(size_t(N * table_width), 0);
  std::vector<int64_t> slots, positions;
  for (int64_t i = 0, next = 0; i < N; ++i) {
    for (int64_t c = 0; c * block_size < lengths[size_t(i)]; ++c)
      table[size_t(i * table_width + c)] = order[size_t(next++)];
    for (int64_t t = 0; t < lengths[size_t(i)]; ++t) {
      slots.push_back(int64_t(table[size_t(i * table_width + t / block_size)]) * block_size + t % block_size);
      positions.push_back(t);
    }
  }
  slots.insert(slots.begin() + int64_t(slots.size()) / 2, -1);  // the engine's padding
  positions.insert(positions.begin() + int64_t(positions.size()) / 2, 0);
  const int64_t n = int64_t(slots.size());
  KVStore cpu_store(L, 1, Hkv, D, cap, dtype, false, 2), dev_store(L, 1, Hkv, D, cap, dtype, true, 3);
  PagedPipeline cpu(cpu_store, shape, book);
  CudaPagedPipeline dev(dev_store, shape, book);
  std::vector<int16_t> cpu_codes(size_t(num_blocks * Hkv * block_size * M), 0), dev_codes(cpu_codes);
  PagedCodes cpu_paged{cpu_codes.data(), num_blocks, block_size, {Hkv * block_size * M, block_size * M, M}};
  PagedCodes dev_paged = cpu_paged;
  dev_paged.data = dev_codes.data();
  const auto rand_rows = [](int64_t count) {
    std::vector<T> rows(static_cast<size_t>(count));
    for (auto& x : rows) x = to_t<T>(randn());
    return rows;
  };
  PagedRequests requests{N, lengths.data(), table.data(), table_width, ks.data()};
  double worst = 0;
  for (int64_t layer = 0; layer < L; ++layer) {
    // Rows strided per token (one spare head's room), as an engine's fused qkv would give.
    auto kr = rand_rows(n * (Hkv + 1) * D), vr = rand_rows(n * (Hkv + 1) * D);
    const RowsView kv{kr.data(), {(Hkv + 1) * D, D, 0}}, vv{vr.data(), {(Hkv + 1) * D, D, 0}};
    cpu_store.write_slots(layer, slots.data(), n, kv, vv);
    const long long syncs = emu::stream_syncs;
    CUDA_OK(kv_write_slots_cuda(dev_store, layer, slots.data(), true, n, kv, vv, nullptr));
    CHECK(emu::stream_syncs - syncs == 1, "write_slots synchronised %lld times", emu::stream_syncs - syncs);
    CHECK(cpu_store.length(layer, 0) == dev_store.length(layer, 0), "store lengths differ");
    const int64_t row = cpu_store.row_bytes();
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t slot : slots) {
        if (slot < 0) continue;  // unwritten slots hold whatever the allocation had
        CHECK(std::memcmp(cpu_store.k_rows(layer, 0, g) + slot * row, dev_store.k_rows(layer, 0, g) + slot * row,
                          size_t(row)) == 0 &&
                  std::memcmp(cpu_store.v_rows(layer, 0, g) + slot * row, dev_store.v_rows(layer, 0, g) + slot * row,
                              size_t(row)) == 0,
              "written rows differ at layer %lld g %lld slot %lld", (long long)layer, (long long)g, (long long)slot);
      }
    const ConstRows kc{kr.data(), {(Hkv + 1) * D, D, 0}};
    cpu.encode(layer, kc, n, positions.data(), slots.data(), cpu_paged);
    CUDA_OK(dev.encode(layer, kc, n, positions.data(), slots.data(), dev_paged, nullptr));
    CHECK(cpu_codes == dev_codes, "paged codes differ at layer %lld", (long long)layer);

    auto q = rand_rows(N * Hq * D);
    const ConstRows qc{q.data(), {Hq * D, D, 0}};
    const int64_t os[2] = {Hq * (D + 2), D + 2};  // strided output
    std::vector<T> out_cpu(size_t(N * Hq * (D + 2)), to_t<T>(5.f)), out_dev(out_cpu);
    cpu.decode(layer, qc, requests, cpu_paged, 0.125f, out_cpu.data(), os);
    const long long before = emu::stream_syncs;
    CUDA_OK(dev.decode(layer, qc, requests, dev_paged, 0.125f, out_dev.data(), os, nullptr));
    CHECK(emu::stream_syncs - before == (cpu.last_max_selected() > 0 ? 1 : 0), "decode synchronised %lld times",
          emu::stream_syncs - before);
    const int64_t kmax = cpu.last_max_selected();
    CHECK(dev.last_max_selected() == kmax && dev.last_num_requests() == N, "selection shapes differ");
    CHECK(std::memcmp(cpu.last_counts(), dev.last_counts(), size_t(N * Hkv) * 4) == 0 &&
              std::memcmp(cpu.last_indices(), dev.last_indices(), size_t(N * Hkv * kmax) * 4) == 0,
          "paged selection differs at layer %lld", (long long)layer);
    for (int64_t bh = 0; bh < N * Hq; ++bh) {
      for (int64_t d = 0; d < D; ++d) {
        const double a = as_f(out_cpu[size_t(bh * (D + 2) + d)]), e = as_f(out_dev[size_t(bh * (D + 2) + d)]);
        worst = std::max(worst, std::fabs(a - e) / (1 + std::fabs(a)));
      }
      CHECK(as_f(out_dev[size_t(bh * (D + 2) + D)]) == 5.f, "paged decode wrote past head_dim");
    }
  }
  const double tol = std::is_same_v<T, float> ? 2e-5 : std::is_same_v<T, half_t> ? 2e-3 : 1.6e-2;
  CHECK(worst < tol, "paged pipeline dtype=%s N=%lld G=%lld NB=%lld: outputs differ by %g", dtype_name(dtype),
        (long long)N, (long long)G, (long long)NB, worst);
  CHECK(dev.stats().rows_read == cpu.stats().rows_read && dev.stats().rows_fetched == cpu.stats().rows_fetched &&
            dev.stats().rows_cached == cpu.stats().rows_cached && dev.stats().decode_calls == cpu.stats().decode_calls,
        "paged stats differ");
  // A block id outside the cache under a window token: refused before any output is written.
  std::vector<int32_t> bad = table;
  bad[size_t((lengths[0] - 1) / block_size)] = int32_t(num_blocks + 3);
  PagedRequests bad_requests = requests;
  bad_requests.block_table = bad.data();
  auto q = rand_rows(N * Hq * D);
  std::vector<T> out(size_t(N * Hq * D), to_t<T>(5.f));
  const int64_t os[2] = {Hq * D, D};
  bool refused = false;
  try {
    CUDA_OK(
        dev.decode(0, ConstRows{q.data(), {Hq * D, D, 0}}, bad_requests, dev_paged, 0.125f, out.data(), os, nullptr));
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused || window == 0, "a bad block id under the window was not refused");
  CHECK(std::all_of(out.begin(), out.end(), [](T x) { return as_f(x) == 5.f; }), "a refused decode wrote output");
}

int main() {
  setenv("A2ATS_GATHER_CHUNK_BYTES", "8192", 1);  // many chunks, so both slots are reused
  section("rotary...");
  for (bool inter : {false, true})
    for (bool inplace : {false, true}) {
      test_rotary<float>(inter, inplace, 16, false);
      test_rotary<half_t>(inter, inplace, 12, true);
      test_rotary<bfloat16_t>(inter, inplace, 8, false);
    }
  section("vq_encode...");
  test_vq_encode<float>(64, 1, 16, 70, false);
  test_vq_encode<float>(64, 2, 100, 9, true);
  test_vq_encode<half_t>(48, 2, 130, 3, false);  // dsub 24: partial dim tile
  test_vq_encode<bfloat16_t>(128, 1, 256, 65, false);
  test_vq_encode<float>(40, 1, 7, 1, true);
  section("lut_scores...");
  test_lut_scores(3, 64, 1, 16, 1, 100, false);
  test_lut_scores(2, 64, 2, 300, 1, 5000, true);     // 2 tiles, M = 2, bad codes
  test_lut_scores(2, 128, 1, 1024, 3, 4500, false);  // binned
  test_lut_scores(1, 24, 1, 25000, 1, 300, true);    // table past shared memory: global path; dsub % 8 == 0
  test_lut_scores(3, 20, 2, 50, 4, 2000, false);     // dsub 10: 16-lane tail path
  test_lut_scores_paged(3, 1, 16, 1, 16, false);
  test_lut_scores_paged(2, 2, 40, 3, 128, true);   // binned, vLLM's CPU block size, a bad block
  test_lut_scores_paged(1, 1, 30000, 1, 5, true);  // table past shared memory: global path
  section("select_topk...");
  test_select_topk(2, 2, 3, 10000, 100, 8, 64, ScoreKind::kRandom, {10000, 7000});
  test_select_topk(2, 2, 3, 10000, 3000, 8, 64, ScoreKind::kFewValues, {9999, 4100});
  test_select_topk(1, 1, 2, 9000, 37, 4, 16, ScoreKind::kAllEqual, {9000});
  test_select_topk(2, 3, 1, 5000, 5, 0, 0, ScoreKind::kSpecials, {5000, 17});
  test_select_topk(3, 1, 2, 300, 20, 8, 64, ScoreKind::kRandom, {0, 50, 300});  // lengths < sink + window
  test_select_topk(2, 2, 2, 300, 1000, 8, 64, ScoreKind::kRandom, {300, 100});  // k >= candidates
  test_select_topk(1, 2, 2, 200, 0, 8, 64, ScoreKind::kRandom, {200});          // k = 0
  test_select_topk(1, 1, 3, 5000, 1, 0, 0, ScoreKind::kFewValues, {5000});
  test_select_topk(1, 1, 1, 12000, 4095, 1, 1, ScoreKind::kFewValues, {12000});
  test_select_topk(1, 1, 1, 0, 3, 2, 2, ScoreKind::kRandom, {0});  // empty capacity
  section("group_scores...");
  test_group_scores(2, 2, 3, 10000, 8, 64, ScoreKind::kRandom, {10000, 7000});  // 3 tiles of a row
  test_group_scores(3, 1, 7, 300, 8, 64, ScoreKind::kSpecials, {0, 50, 300});   // lengths < sink + window
  test_group_scores(1, 3, 1, 500, 0, 0, ScoreKind::kSpecials, {500});
  test_group_scores(1, 1, 2, 0, 2, 2, ScoreKind::kRandom, {0});  // empty capacity
  section("kv store...");
  test_kv_store(DType::kFloat16, 64);
  test_kv_store(DType::kFloat32, 6);   // 24-byte rows: 4-byte copies in the scatter kernel
  test_kv_store(DType::kBFloat16, 3);  // 6-byte rows: 2-byte copies
  section("attend and merge...");
  test_attend_merge<float>(2, 2, 3, 64, 600);  // 3 tiles, ragged, one empty (b, g)
  test_attend_merge<half_t>(3, 1, 7, 40, 100);
  test_attend_merge<bfloat16_t>(1, 3, 1, 128, 257);
  test_attend_merge<float>(2, 1, 2, 16, 0);  // no rows at all
  section("pipeline...");
  test_pipeline<float>(3, 2, 3, 32, 1, 4, 16, 6, {120, 7, 60}, 3);         // row 1 shorter than sink + window
  test_pipeline<half_t>(2, 1, 7, 32, 3, 2, 8, 4, {90, 150}, 2);            // binned
  test_pipeline<bfloat16_t>(1, 2, 1, 64, 2, 0, 4, 3, {100}, 2);            // no sink
  test_pipeline<float>(2, 1, 2, 32, 1, 4, 16, 0, {50, 3}, 2);              // k = 0: no gather, no sync
  test_pipeline<float>(5, 1, 3, 16, 1, 2, 4, 500, {30, 1, 0, 17, 64}, 2);  // every row; an empty prompt
  test_pipeline<float>(3, 2, 3, 32, 1, 4, 16, 6, {120, 7, 60}, 3, true);   // per-KV-head budget
  test_pipeline<half_t>(2, 1, 7, 32, 3, 2, 8, 9, {90, 150}, 2, true);      // ... binned, G = 7
  section("paged pipeline...");
  test_paged_pipeline<float>(2, 3, 32, 1, 4, 16, 16, {120, 7, 60}, {6, 0, 40});             // ragged, a short request
  test_paged_pipeline<half_t>(1, 7, 32, 3, 2, 8, 128, {90, 150}, {4, 9});                   // binned, vLLM's CPU block
  test_paged_pipeline<bfloat16_t>(2, 1, 64, 2, 0, 4, 5, {100}, {3});                        // no sink, odd block size
  test_paged_pipeline<float>(1, 2, 16, 1, 2, 4, 4, {30, 1, 17, 64, 5}, {500, 2, 0, 7, 1});  // k >= length
  test_paged_pipeline<float>(2, 3, 32, 1, 4, 16, 16, {120, 7, 60}, {6, 0, 40}, true);       // per-KV-head budget
  test_paged_pipeline<half_t>(1, 7, 32, 3, 2, 8, 16, {90, 150}, {9, 3}, true);              // ... binned, G = 7
  std::printf("%lld kernel launches, %lld memcpys, %lld event syncs, %lld stream syncs\n", emu::launches,
              emu::memcpy_calls, emu::event_syncs, emu::stream_syncs);
  if (g_failures) {
    std::printf("%d FAILURES\n", g_failures);
    return 1;
  }
  std::printf("all emulated CUDA checks passed\n");
  return 0;
}
