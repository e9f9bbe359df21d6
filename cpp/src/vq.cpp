#include "a2ats/vq.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "a2ats/thread_pool.h"

namespace a2ats {
namespace {

constexpr int kLanes = 16;  // independent accumulators so the reduction vectorises without -ffast-math

A2ATS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

A2ATS_INLINE float squared_distance(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float d = a[i + l] - b[i + l];
      acc[l] += d * d;
    }
  float s = 0.f;
  for (; i < n; ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

constexpr int kEncodeRows = 4;  // rows encoded together so each centroid is loaded once per block

// Encodes rows [t0, t0 + num_rows) of one (b, g); x_rows are already float32.
A2ATS_INLINE void encode_block_body(const float (*x_rows)[kMaxHeadDim], int num_rows, const float* centroids_g,
                                    int64_t num_subspaces, int64_t num_centroids, int64_t dsub,
                                    int16_t* const* code_rows) {
  for (int64_t m = 0; m < num_subspaces; ++m) {
    const float* cent = centroids_g + m * num_centroids * dsub;  // (C, D/M)
    float best[kEncodeRows];
    int32_t best_c[kEncodeRows];
    for (int r = 0; r < kEncodeRows; ++r) {
      best[r] = std::numeric_limits<float>::infinity();
      best_c[r] = 0;
    }
    for (int64_t c = 0; c < num_centroids; ++c) {
      for (int r = 0; r < num_rows; ++r) {
        const float d = squared_distance(x_rows[r] + m * dsub, cent + c * dsub, dsub);
        if (d < best[r]) {
          best[r] = d;
          best_c[r] = int32_t(c);
        }
      }
    }
    for (int r = 0; r < num_rows; ++r) code_rows[r][m] = int16_t(best_c[r]);
  }
}
A2ATS_MULTIVERSIONED(void, encode_block, encode_block_body,
                     (const float (*x_rows)[kMaxHeadDim], int num_rows, const float* centroids_g, int64_t num_subspaces,
                      int64_t num_centroids, int64_t dsub, int16_t* const* code_rows),
                     (x_rows, num_rows, centroids_g, num_subspaces, num_centroids, dsub, code_rows))

// Prefill-sized inputs: distances as ||c||^2 - 2 x.c with a register-blocked product. The
// codebook is repacked into panels of kPanel centroids, (Hkv, M, C/kPanel, D/M, kPanel), so one
// panel (8 KiB at D/M = 128) stays in L1 while every 4-row block of a chunk of rows uses it.
// C is padded to whole panels with +inf norms, which never win.
constexpr int kPanel = 16;
constexpr int64_t kChunkRows = 64;  // rows of one (b, g) encoded together

struct Panels {
  std::vector<float> data;   // (Hkv, M, P, D/M, kPanel)
  std::vector<float> norms;  // (Hkv, M, P * kPanel)
  int64_t num_panels = 0;
};

Panels pack_panels(const float* centroids, int64_t num_heads_subspaces, int64_t num_centroids, int64_t dsub) {
  Panels out;
  out.num_panels = (num_centroids + kPanel - 1) / kPanel;
  const int64_t padded = out.num_panels * kPanel;
  out.data.assign(size_t(num_heads_subspaces * padded * dsub), 0.f);
  out.norms.assign(size_t(num_heads_subspaces * padded), std::numeric_limits<float>::infinity());
  for (int64_t gm = 0; gm < num_heads_subspaces; ++gm)
    for (int64_t c = 0; c < num_centroids; ++c) {
      const float* src = centroids + (gm * num_centroids + c) * dsub;  // (D/M,)
      float* dst = out.data.data() + (gm * padded + (c / kPanel) * kPanel) * dsub + c % kPanel;
      float norm = 0.f;
      for (int64_t d = 0; d < dsub; ++d) {
        dst[d * kPanel] = src[d];
        norm += src[d] * src[d];
      }
      out.norms[size_t(gm * padded + c)] = norm;
    }
  return out;
}

// Codes of num_rows (<= kChunkRows) float rows x_rows (num_rows, D) against one head's panels.
A2ATS_INLINE void encode_chunk_panels_body(const float* x_rows, int64_t num_rows, const float* panels,
                                           const float* norms, int64_t num_subspaces, int64_t num_panels, int64_t dsub,
                                           int16_t* const* code_rows) {
  const int64_t head_dim = num_subspaces * dsub;
  const int64_t padded = num_panels * kPanel;
  for (int64_t m = 0; m < num_subspaces; ++m) {
    float best[kChunkRows];
    int32_t best_c[kChunkRows];
    for (int64_t r = 0; r < num_rows; ++r) {
      best[r] = std::numeric_limits<float>::infinity();
      best_c[r] = 0;
    }
    for (int64_t pnl = 0; pnl < num_panels; ++pnl) {
      const float* panel = panels + (m * padded + pnl * kPanel) * dsub;  // (D/M, kPanel)
      const float* nm = norms + m * padded + pnl * kPanel;
      for (int64_t r0 = 0; r0 < num_rows; r0 += kEncodeRows) {
        // Rows past num_rows read zero padding of x_rows and are discarded.
        const float* x0 = x_rows + r0 * head_dim + m * dsub;
        f32x8 acc[kEncodeRows][2] = {};
        for (int64_t d = 0; d < dsub; ++d) {
          const f32x8 lo = load8(panel + d * kPanel), hi = load8(panel + d * kPanel + 8);
          for (int r = 0; r < kEncodeRows; ++r) {
            const f32x8 xv = splat8(x0[r * head_dim + d]);
            acc[r][0] += xv * lo;
            acc[r][1] += xv * hi;
          }
        }
        const int rows = int(std::min<int64_t>(kEncodeRows, num_rows - r0));
        for (int r = 0; r < rows; ++r)
          for (int l = 0; l < kPanel; ++l) {
            const float dist = nm[l] - 2.0f * acc[r][l / 8][l % 8];
            if (dist < best[r0 + r]) {
              best[r0 + r] = dist;
              best_c[r0 + r] = int32_t(pnl * kPanel + l);
            }
          }
      }
    }
    for (int64_t r = 0; r < num_rows; ++r) code_rows[r][m] = int16_t(best_c[r]);
  }
}
A2ATS_MULTIVERSIONED(void, encode_chunk_panels, encode_chunk_panels_body,
                     (const float* x_rows, int64_t num_rows, const float* panels, const float* norms,
                      int64_t num_subspaces, int64_t num_panels, int64_t dsub, int16_t* const* code_rows),
                     (x_rows, num_rows, panels, norms, num_subspaces, num_panels, dsub, code_rows))

// Rows per call above which repacking the codebook pays for itself.
constexpr int64_t kPanelMinRows = 64;

template <typename T>
void vq_encode_typed(const T* x, const float* centroids, int16_t* codes, const VQEncodeParams& p) {
  const int64_t dsub = p.head_dim / p.num_subspaces;
  const int64_t per_head = p.num_subspaces * p.num_centroids * dsub;
  if (p.batch * p.num_tokens < kPanelMinRows) {
    // Decode-sized: compare against the codebook as stored, no repacking.
    const int64_t blocks_per_head = (p.num_tokens + kEncodeRows - 1) / kEncodeRows;
    ThreadPool::global().parallel_for(
        p.batch * p.num_kv_heads * blocks_per_head,
        [&](int64_t begin, int64_t end) {
          float x_rows[kEncodeRows][kMaxHeadDim];
          int16_t* code_rows[kEncodeRows];
          for (int64_t item = begin; item < end; ++item) {
            const int64_t block = item % blocks_per_head, bg = item / blocks_per_head;
            const int64_t b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
            const int64_t t0 = block * kEncodeRows;
            const int num_rows = int(std::min<int64_t>(kEncodeRows, p.num_tokens - t0));
            for (int r = 0; r < num_rows; ++r) {
              const T* row = x + b * p.x_stride[0] + g * p.x_stride[1] + (t0 + r) * p.x_stride[2];
              for (int64_t d = 0; d < p.head_dim; ++d) x_rows[r][d] = to_float(row[d]);
              code_rows[r] = codes + b * p.codes_stride[0] + g * p.codes_stride[1] + (t0 + r) * p.codes_stride[2];
            }
            encode_block(x_rows, num_rows, centroids + g * per_head, p.num_subspaces, p.num_centroids, dsub, code_rows);
          }
        },
        ThreadPool::min_chunk_for(std::min<int64_t>(kEncodeRows, p.num_tokens) * p.num_centroids * p.head_dim));
    return;
  }
  const Panels panels = pack_panels(centroids, p.num_kv_heads * p.num_subspaces, p.num_centroids, dsub);
  const int64_t padded = panels.num_panels * kPanel;
  const int64_t chunks_per_head = (p.num_tokens + kChunkRows - 1) / kChunkRows;
  ThreadPool::global().parallel_for(
      p.batch * p.num_kv_heads * chunks_per_head,
      [&](int64_t begin, int64_t end) {
        // (kChunkRows + kEncodeRows, D): the extra zero rows feed the last partial 4-row block.
        std::vector<float> x_rows(size_t((kChunkRows + kEncodeRows) * p.head_dim), 0.f);
        int16_t* code_rows[kChunkRows];
        for (int64_t item = begin; item < end; ++item) {
          const int64_t chunk = item % chunks_per_head, bg = item / chunks_per_head;
          const int64_t b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
          const int64_t t0 = chunk * kChunkRows;
          const int64_t num_rows = std::min<int64_t>(kChunkRows, p.num_tokens - t0);
          for (int64_t r = 0; r < num_rows; ++r) {
            const T* row = x + b * p.x_stride[0] + g * p.x_stride[1] + (t0 + r) * p.x_stride[2];
            for (int64_t d = 0; d < p.head_dim; ++d) x_rows[size_t(r * p.head_dim + d)] = to_float(row[d]);
            code_rows[r] = codes + b * p.codes_stride[0] + g * p.codes_stride[1] + (t0 + r) * p.codes_stride[2];
          }
          encode_chunk_panels(x_rows.data(), num_rows, panels.data.data() + g * p.num_subspaces * padded * dsub,
                              panels.norms.data() + g * p.num_subspaces * padded, p.num_subspaces, panels.num_panels,
                              dsub, code_rows);
        }
      },
      ThreadPool::min_chunk_for(kChunkRows * p.num_centroids * p.head_dim));
}

// LUT rows of HB heads against centroids (C, dsub): out[h][c] = q[h] . cent[c] * scale.
// Each centroid load serves HB heads (the table is the largest read of a decode step: 2 MiB
// per KV head at C = 4096, D = 128), and CB centroids share each load of q; HB * CB
// accumulators plus the q and centroid registers fit the 16 vector registers of AVX2. The
// 8-lane accumulators let the reduction vectorise without reassociation flags.
template <int HB, int CB>
A2ATS_INLINE void lut_rows(const float* const* q, const float* cent, int64_t num_centroids, int64_t dsub, float scale,
                           float* const* out, int64_t out_stride) {
  int64_t c = 0;
  if (dsub % 8 == 0) {
    for (; c + CB <= num_centroids; c += CB) {
      f32x8 acc[HB][CB] = {};
      for (int64_t i = 0; i < dsub; i += 8) {
        f32x8 qv[HB];
        for (int h = 0; h < HB; ++h) qv[h] = load8(q[h] + i);
        for (int cc = 0; cc < CB; ++cc) {
          const f32x8 cv = load8(cent + (c + cc) * dsub + i);
          for (int h = 0; h < HB; ++h) acc[h][cc] += qv[h] * cv;
        }
      }
      for (int h = 0; h < HB; ++h)
        for (int cc = 0; cc < CB; ++cc) out[h][(c + cc) * out_stride] = sum8(acc[h][cc]) * scale;
    }
  }
  for (; c < num_centroids; ++c)
    for (int h = 0; h < HB; ++h) out[h][c * out_stride] = dot(q[h], cent + c * dsub, dsub) * scale;
}

// Where LUT entry (h, m, c) lives. With M = 1 the table is (ceil(G / 4), C, 4): the four heads
// of a quad side by side, so that one 16-byte load per token serves four heads when scoring.
// With M > 1 it is (G, M, C): a token's M entries of one head lie in one row.
struct LutLayout {
  int64_t num_subspaces, num_centroids;
  bool quads() const { return num_subspaces == 1; }
  float* row(float* lut, int64_t h, int64_t m) const {
    return quads() ? lut + (h / 4) * num_centroids * 4 + h % 4 : lut + (h * num_subspaces + m) * num_centroids;
  }
  int64_t stride() const { return quads() ? 4 : 1; }
  int64_t floats(int64_t num_heads) const {  // a table of num_heads heads
    return quads() ? (num_heads + 3) / 4 * 4 * num_centroids : num_heads * num_subspaces * num_centroids;
  }
};

template <int HB>
A2ATS_INLINE void lut_block(const float* const* q_heads, int64_t h, int64_t m, int64_t dsub, const float* cent,
                            const LutLayout& layout, float scale, float* lut) {
  const float* q[HB];
  float* out[HB];
  for (int j = 0; j < HB; ++j) {
    q[j] = q_heads[h + j] + m * dsub;
    out[j] = layout.row(lut, h + j, m);
  }
  lut_rows<HB, HB == 4 ? 2 : 4>(q, cent, layout.num_centroids, dsub, scale, out, layout.stride());
}

// Builds the LUT of the group's query heads at one bin, laid out as LutLayout says.
A2ATS_INLINE void build_lut_body(const float* const* q_heads, int64_t group_size, const float* centroids_g,
                                 const LutLayout& layout, int64_t dsub, float scale, float* lut) {
  for (int64_t m = 0; m < layout.num_subspaces; ++m) {
    const float* cent = centroids_g + m * layout.num_centroids * dsub;  // (C, D/M)
    int64_t h = 0;
    for (; h + 4 <= group_size; h += 4) lut_block<4>(q_heads, h, m, dsub, cent, layout, scale, lut);
    if (h + 2 <= group_size) {
      lut_block<2>(q_heads, h, m, dsub, cent, layout, scale, lut);
      h += 2;
    }
    if (h < group_size) lut_block<1>(q_heads, h, m, dsub, cent, layout, scale, lut);
  }
}
A2ATS_MULTIVERSIONED(void, build_lut, build_lut_body,
                     (const float* const* q_heads, int64_t group_size, const float* centroids_g,
                      const LutLayout& layout, int64_t dsub, float scale, float* lut),
                     (q_heads, group_size, centroids_g, layout, dsub, scale, lut))

typedef float f32x4 __attribute__((vector_size(16)));

// scores of lanes [lane_begin, lane_begin + lanes) of one quad (C, 4) of an M = 1 table into
// rows[0, lanes), for tokens [t_begin, t_end). Four tokens at a time: their 4-lane entries are
// loaded whole and transposed into one 4-token store per lane. The codes were checked before;
// the clamp only keeps a caller that rewrites them meanwhile from reading outside the table.
A2ATS_INLINE void score_tokens_quad_body(const float* quad, const int16_t* codes, int64_t codes_t_stride,
                                         int64_t num_centroids, int64_t t_begin, int64_t t_end, float* const* rows,
                                         int lane_begin, int lanes) {
  const uint32_t limit = uint32_t(num_centroids);
  const auto entry = [&](int64_t t) {
    const uint32_t c = uint16_t(codes[t * codes_t_stride]);
    return quad + (c < limit ? c : 0) * 4;
  };
  int64_t t = t_begin;
  for (; t + 4 <= t_end; t += 4) {
    f32x4 r[4];
    for (int j = 0; j < 4; ++j) std::memcpy(&r[j], entry(t + j), sizeof(f32x4));
    const f32x4 lo01 = __builtin_shufflevector(r[0], r[1], 0, 4, 1, 5);  // (t0 l0, t1 l0, t0 l1, t1 l1)
    const f32x4 hi01 = __builtin_shufflevector(r[0], r[1], 2, 6, 3, 7);
    const f32x4 lo23 = __builtin_shufflevector(r[2], r[3], 0, 4, 1, 5);
    const f32x4 hi23 = __builtin_shufflevector(r[2], r[3], 2, 6, 3, 7);
    const f32x4 column[4] = {
        __builtin_shufflevector(lo01, lo23, 0, 1, 4, 5), __builtin_shufflevector(lo01, lo23, 2, 3, 6, 7),
        __builtin_shufflevector(hi01, hi23, 0, 1, 4, 5), __builtin_shufflevector(hi01, hi23, 2, 3, 6, 7)};
    for (int h = 0; h < lanes; ++h) std::memcpy(rows[h] + t, &column[lane_begin + h], sizeof(f32x4));
  }
  for (; t < t_end; ++t) {
    const float* e = entry(t);
    for (int h = 0; h < lanes; ++h) rows[h][t] = e[lane_begin + h];
  }
}
A2ATS_MULTIVERSIONED(void, score_tokens_quad, score_tokens_quad_body,
                     (const float* quad, const int16_t* codes, int64_t codes_t_stride, int64_t num_centroids,
                      int64_t t_begin, int64_t t_end, float* const* rows, int lane_begin, int lanes),
                     (quad, codes, codes_t_stride, num_centroids, t_begin, t_end, rows, lane_begin, lanes))

// M > 1: scores[t] = sum_m lut[m][codes[t][m]] for t in [t_begin, t_end) from one head's
// (M, C) table; codes clamped as in score_tokens_quad.
A2ATS_INLINE void score_tokens_body(const float* lut, const int16_t* codes, int64_t codes_t_stride,
                                    int64_t num_subspaces, int64_t num_centroids, int64_t t_begin, int64_t t_end,
                                    float* scores) {
  const uint32_t limit = uint32_t(num_centroids);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int16_t* code = codes + t * codes_t_stride;
    float s = 0.f;
    for (int64_t m = 0; m < num_subspaces; ++m) {
      const uint32_t c = uint16_t(code[m]);
      s += lut[m * num_centroids + (c < limit ? c : 0)];
    }
    scores[t] = s;
  }
}
A2ATS_MULTIVERSIONED(void, score_tokens, score_tokens_body,
                     (const float* lut, const int16_t* codes, int64_t codes_t_stride, int64_t num_subspaces,
                      int64_t num_centroids, int64_t t_begin, int64_t t_end, float* scores),
                     (lut, codes, codes_t_stride, num_subspaces, num_centroids, t_begin, t_end, scores))

// Calls fn(run, n, t0) for each run of row b's tokens [t_begin, t_end) of KV head g whose codes
// lie at one stride: run[i * codes_stride[2]] is the code of token t0 + i, i < n. One run when
// the codes are not paged; one per block (clipped to the range) when they are.
template <class Fn>
A2ATS_INLINE void for_each_code_run(const LutScoresParams& p, const int16_t* codes, int64_t b, int64_t g,
                                    int64_t t_begin, int64_t t_end, Fn&& fn) {
  if (p.block_table == nullptr) {
    if (t_begin < t_end)
      fn(codes + b * p.codes_stride[0] + g * p.codes_stride[1] + t_begin * p.codes_stride[2], t_end - t_begin, t_begin);
    return;
  }
  for (int64_t t0 = t_begin; t0 < t_end;) {
    const int64_t i = t0 / p.block_size, t1 = std::min(t_end, (i + 1) * p.block_size);
    const int64_t block = p.block_table[b * p.block_table_stride + i];
    fn(codes + block * p.codes_stride[0] + g * p.codes_stride[1] + (t0 - i * p.block_size) * p.codes_stride[2], t1 - t0,
       t0);
    t0 = t1;
  }
}

}  // namespace

void vq_encode_cpu(const void* x, const float* centroids, int16_t* codes, const VQEncodeParams& p) {
  if (p.head_dim > kMaxHeadDim || p.num_subspaces < 1 || p.head_dim % p.num_subspaces != 0 || p.num_centroids < 1 ||
      p.num_centroids > kMaxCentroids)
    throw std::invalid_argument("vq_encode: needs head_dim <= " + std::to_string(kMaxHeadDim) +
                                " split into M equal subspaces and 1 <= C <= " + std::to_string(kMaxCentroids) +
                                ", got head_dim " + std::to_string(p.head_dim) + ", M " +
                                std::to_string(p.num_subspaces) + ", C " + std::to_string(p.num_centroids));
  switch (p.dtype) {
    case DType::kFloat32:
      vq_encode_typed(static_cast<const float*>(x), centroids, codes, p);
      break;
    case DType::kFloat16:
      vq_encode_typed(static_cast<const half_t*>(x), centroids, codes, p);
      break;
    case DType::kBFloat16:
      vq_encode_typed(static_cast<const bfloat16_t*>(x), centroids, codes, p);
      break;
    default:
      throw std::invalid_argument(std::string("vq_encode: x must be float32, float16 or bfloat16, got ") +
                                  dtype_name(p.dtype));
  }
}

void lut_scores_cpu(const float* q, const float* centroids, const int16_t* codes, const int32_t* lengths,
                    const int32_t* bin_edges, float* scores, const LutScoresParams& p) {
  const bool paged = p.block_table != nullptr;
  if (paged && p.block_size < 1)
    throw std::invalid_argument("lut_scores: paged codes need block_size >= 1, got " + std::to_string(p.block_size));
  // Every block id and code is checked before any score is written, so a rejected call leaves
  // `scores` as it was. The codes are 1/(2 G D) of the bytes a step reads: the pass is cheap.
  if (paged)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t i = 0; i * p.block_size < lengths[b]; ++i) {
        const int32_t block = p.block_table[b * p.block_table_stride + i];
        if (block < 0 || block >= p.num_blocks)
          throw std::invalid_argument(
              "block_table[" + std::to_string(b) + ", " + std::to_string(i) + "] = " + std::to_string(block) +
              " is outside [0, " + std::to_string(p.num_blocks) +
              ") (the blocks of codes) and holds tokens below lengths[" + std::to_string(b) + "]");
      }
  std::atomic<bool> in_range{true};
  const uint32_t limit = uint32_t(p.num_centroids);
  ThreadPool::global().parallel_for(
      p.batch * p.num_kv_heads,
      [&](int64_t begin, int64_t end) {
        uint32_t bad = 0;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / p.num_kv_heads, g = item % p.num_kv_heads;
          for_each_code_run(p, codes, b, g, 0, lengths[b], [&](const int16_t* run, int64_t n, int64_t) {
            for (int64_t t = 0; t < n; ++t)
              for (int64_t m = 0; m < p.num_subspaces; ++m)
                bad |= uint32_t(uint16_t(run[t * p.codes_stride[2] + m]) >= limit);
          });
        }
        if (bad) in_range.store(false, std::memory_order_relaxed);
      },
      ThreadPool::min_chunk_for(p.capacity * p.num_subspaces));
  if (!in_range.load())
    throw std::invalid_argument("codes contains values outside [0, " + std::to_string(p.num_centroids) +
                                ") (the number of centroids) among the first lengths[b] tokens");
  const int64_t group_size = p.num_q_heads / p.num_kv_heads;
  const int64_t dsub = p.head_dim / p.num_subspaces;
  const int64_t table = p.num_subspaces * p.num_centroids;
  const float scale = 1.0f / std::sqrt(float(p.head_dim));
  const LutLayout layout{p.num_subspaces, p.num_centroids};
  // One LUT build covers up to kLutHeads query heads of one KV head: the whole group of several
  // batch rows, so that the centroid table (2 MiB per KV head at C = 4096, D = 128: the
  // largest read of a step) is read once for all of them; groups larger than that in blocks.
  // Slot (b - b0) * block_heads + (h - h0) holds head h of batch row b.
  constexpr int64_t kLutHeads = 64;
  const int64_t block_heads = std::min(group_size, kLutHeads);
  const int64_t head_blocks = (group_size + block_heads - 1) / block_heads;
  const int64_t rows_per_build = head_blocks == 1 ? kLutHeads / block_heads : 1;
  const int64_t row_blocks = (p.batch + rows_per_build - 1) / rows_per_build;
  ThreadPool::global().parallel_for(
      p.num_kv_heads * row_blocks,
      [&](int64_t begin, int64_t end) {
        // Grows once per thread; no allocation in steady state.
        thread_local std::vector<float> lut;
        if (int64_t(lut.size()) < layout.floats(kLutHeads)) lut.resize(size_t(layout.floats(kLutHeads)));
        const float* q_heads[kLutHeads];
        for (int64_t item = begin; item < end; ++item) {
          const int64_t g = item / row_blocks;
          const int64_t b0 = (item % row_blocks) * rows_per_build, b1 = std::min(p.batch, b0 + rows_per_build);
          const float* centroids_g = centroids + g * table * dsub;
          // Bin j of row b holds distances [edge[j-1], edge[j]): tokens [length - edge[j], length - edge[j-1]).
          const auto bin_tokens = [&](int64_t b, int64_t j, int64_t& t_begin, int64_t& t_end) {
            const int64_t length = lengths[b];
            t_begin = j == p.num_bins - 1 ? 0 : std::max<int64_t>(0, length - bin_edges[j]);
            t_end = j == 0 ? length : std::min<int64_t>(length, length - bin_edges[j - 1]);
            return t_begin < t_end;
          };
          for (int64_t j = 0; j < p.num_bins; ++j) {
            for (int64_t h0 = 0; h0 < group_size; h0 += block_heads) {
              const int64_t heads = std::min(block_heads, group_size - h0);
              int64_t t_begin, t_end;
              bool any = false;
              for (int64_t b = b0; b < b1; ++b) {
                any |= bin_tokens(b, j, t_begin, t_end);
                for (int64_t h = 0; h < heads; ++h)
                  q_heads[(b - b0) * heads + h] =
                      q + b * p.q_stride[0] + (g * group_size + h0 + h) * p.q_stride[1] + j * p.q_stride[2];
              }
              if (!any) continue;
              build_lut(q_heads, (b1 - b0) * heads, centroids_g, layout, dsub, scale, lut.data());
              for (int64_t b = b0; b < b1; ++b) {
                if (!bin_tokens(b, j, t_begin, t_end)) continue;
                const auto row = [&](int64_t h) {
                  return scores + b * p.scores_stride[0] + (g * group_size + h0 + h) * p.scores_stride[1];
                };
                const int64_t first = (b - b0) * heads;  // this row's first slot
                for_each_code_run(p, codes, b, g, t_begin, t_end, [&](const int16_t* run, int64_t n, int64_t t0) {
                  if (layout.quads()) {
                    // Its slots [first, first + heads) may start and end inside quads.
                    for (int64_t slot = first; slot < first + heads;) {
                      const int64_t quad_end = std::min(first + heads, (slot / 4 + 1) * 4);
                      float* rows[4];
                      for (int64_t s = slot; s < quad_end; ++s) rows[s - slot] = row(s - first) + t0;
                      score_tokens_quad(layout.row(lut.data(), slot / 4 * 4, 0), run, p.codes_stride[2],
                                        p.num_centroids, 0, n, rows, int(slot % 4), int(quad_end - slot));
                      slot = quad_end;
                    }
                  } else {
                    for (int64_t h = 0; h < heads; ++h)
                      score_tokens(layout.row(lut.data(), first + h, 0), run, p.codes_stride[2], p.num_subspaces,
                                   p.num_centroids, 0, n, row(h) + t0);
                  }
                });
              }
            }
          }
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t h = 0; h < group_size; ++h) {
              float* row = scores + b * p.scores_stride[0] + (g * group_size + h) * p.scores_stride[1];
              std::fill(row + lengths[b], row + p.capacity, -std::numeric_limits<float>::infinity());
            }
        }
      },
      ThreadPool::min_chunk_for(std::min(rows_per_build, p.batch) * group_size *
                                (table * dsub + p.capacity * p.num_subspaces)));
}

}  // namespace a2ats
