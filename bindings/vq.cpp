// a2ats_core.vq_encode and lut_scores: codes of whitened keys and scores from them
// (cpp/include/a2ats/vq.h).
#include "a2ats/vq.h"

#include <optional>

#include "dispatch.h"

namespace a2ats::bind {
namespace {

// Checks centroids (Hkv, M, C, D/M) f32 contiguous against num_kv_heads and head_dim.
void check_centroids(const TensorArg& centroids, int64_t num_kv_heads, int64_t head_dim, const TensorArg& like) {
  centroids.expect_dtype({DType::kFloat32}).expect_ndim(4).expect_contiguous().expect_device(like.device(), like);
  centroids.expect_size(0, num_kv_heads, "num_kv_heads");
  const int64_t M = centroids.size(1), C = centroids.size(2), dsub = centroids.size(3);
  if (M < 1 || C < 1)
    throw_value("centroids must have M >= 1 subspaces and C >= 1 centroids, got shape " + centroids.shape_str());
  if (C > kMaxCentroids)
    throw_value("centroids.shape[2] (C) must be <= " + std::to_string(kMaxCentroids) + " so codes fit int16, got " +
                std::to_string(C));
  if (M * dsub != head_dim)
    throw_value("centroids.shape[1] * centroids.shape[3] (M * D/M) must equal head_dim " + std::to_string(head_dim) +
                ", got " + std::to_string(M) + " * " + std::to_string(dsub));
}

py::object vq_encode(py::handle x_obj, py::handle centroids_obj, py::handle out_obj, py::handle stream_obj) {
  TensorArg x(x_obj, "x"), centroids(centroids_obj, "centroids");
  x.expect_dtype(kFloatTypes).expect_ndim(4).expect_last_dim_contiguous();
  const int64_t B = x.size(0), Hkv = x.size(1), T = x.size(2), D = x.size(3);
  if (D > kMaxHeadDim)
    throw_value("x.shape[3] (head_dim) must be <= " + std::to_string(kMaxHeadDim) + ", got " + std::to_string(D));
  check_centroids(centroids, Hkv, D, x);
  const int64_t M = centroids.size(1);
  Output out(out_obj, "out", x, {B, Hkv, T, M}, DType::kInt16);
  out.disjoint_from({&x, &centroids});
  VQEncodeParams p;
  p.batch = B;
  p.num_kv_heads = Hkv;
  p.num_tokens = T;
  p.head_dim = D;
  p.num_subspaces = M;
  p.num_centroids = centroids.size(2);
  p.dtype = x.dtype();
  for (int d = 0; d < 3; ++d) {
    p.x_stride[d] = x.stride(d);
    p.codes_stride[d] = out.view.stride(d);
  }
  run_on_device(
      x, stream_obj, "vq_encode",
      [&] { vq_encode_cpu(x.data(), centroids.data<float>(), out.view.data<int16_t>(), p); },
      A2ATS_ON_CUDA(vq_encode_cuda(x.data(), centroids.data<float>(), out.view.data<int16_t>(), p, stream)));
  return out.object;
}

py::object lut_scores(py::handle q_obj, py::handle centroids_obj, py::handle codes_obj, py::handle lengths_obj,
                      py::handle bin_edges_obj, py::handle block_table_obj, py::handle out_obj, py::handle stream_obj) {
  TensorArg q(q_obj, "q"), centroids(centroids_obj, "centroids"), codes(codes_obj, "codes"),
      lengths(lengths_obj, "lengths");
  q.expect_dtype({DType::kFloat32});
  if (q.ndim() != 3 && q.ndim() != 4)
    throw_value(
        "q must have shape (batch, num_q_heads, head_dim) or, distance-binned, (batch, num_q_heads, "
        "num_bins, head_dim); got " +
        std::to_string(q.ndim()) + " dimensions with shape " + q.shape_str());
  q.expect_last_dim_contiguous();
  const bool binned = q.ndim() == 4;
  const int64_t B = q.size(0), Hq = q.size(1), NB = binned ? q.size(2) : 1, D = q.size(-1);
  codes.expect_dtype({DType::kInt16}).expect_ndim(4).expect_last_dim_contiguous().expect_device(q.device(), q);
  const int64_t Hkv = codes.size(1);
  // Paged: codes (num_blocks, Hkv, block_size, M) and block_table (B, max_blocks) int32, so
  // the scores cover max_blocks * block_size tokens. Unpaged: codes (B, Hkv, Tcap, M).
  std::optional<TensorArg> block_table;
  if (!block_table_obj.is_none()) block_table.emplace(block_table_obj, "block_table");
  int64_t Tcap = codes.size(2);
  if (block_table) {
    block_table->expect_dtype({DType::kInt32}).expect_ndim(2).expect_last_dim_contiguous();
    block_table->expect_device(q.device(), q).expect_size(0, B, "batch of q");
    if (codes.size(2) < 1) throw_value("codes.shape[2] (block_size) must be >= 1 for paged codes, got 0");
    Tcap = block_table->size(1) * codes.size(2);
  } else {
    codes.expect_size(0, B, "batch of q");
  }
  if (Hkv < 1 || Hq % Hkv != 0)
    throw_value("q.shape[1] (num_q_heads = " + std::to_string(Hq) +
                ") must be a multiple of codes.shape[1] (num_kv_heads = " + std::to_string(Hkv) + ")");
  check_centroids(centroids, Hkv, D, q);
  const int64_t M = centroids.size(1);
  codes.expect_size(3, M, "subspaces M of centroids");
  if (NB < 1) throw_value("q.shape[2] (num_bins) must be >= 1, got 0");
  check_lengths(lengths, B, Tcap, q);
  std::optional<TensorArg> bin_edges;
  if (!bin_edges_obj.is_none()) bin_edges.emplace(bin_edges_obj, "bin_edges");
  const int32_t* edges = nullptr;
  if (NB > 1 || (bin_edges && bin_edges->numel() > 0)) {
    if (!bin_edges)
      throw_value("bin_edges is required when q has " + std::to_string(NB) + " distance bins (shape " + q.shape_str() +
                  ")");
    bin_edges->expect_dtype({DType::kInt32}).expect_shape({NB - 1}, "num_bins - 1 edges").expect_contiguous();
    bin_edges->expect_device(q.device(), q);
    edges = bin_edges->data<int32_t>();
    if (!bin_edges->is_cuda())
      for (int64_t j = 1; j < NB - 1; ++j)
        if (edges[j] < edges[j - 1])
          throw_value("bin_edges must be ascending, got bin_edges[" + std::to_string(j - 1) +
                      "] = " + std::to_string(edges[j - 1]) + " > bin_edges[" + std::to_string(j) +
                      "] = " + std::to_string(edges[j]));
  }
  Output out(out_obj, "out", q, {B, Hq, Tcap}, DType::kFloat32);
  out.disjoint_from(
      {&q, &centroids, &codes, &lengths, bin_edges ? &*bin_edges : nullptr, block_table ? &*block_table : nullptr});
  LutScoresParams p;
  p.batch = B;
  p.num_q_heads = Hq;
  p.num_kv_heads = Hkv;
  p.head_dim = D;
  p.num_subspaces = M;
  p.num_centroids = centroids.size(2);
  p.capacity = Tcap;
  p.num_bins = NB;
  p.q_stride[0] = q.stride(0);
  p.q_stride[1] = q.stride(1);
  p.q_stride[2] = binned ? q.stride(2) : 0;
  for (int d = 0; d < 3; ++d) p.codes_stride[d] = codes.stride(d);
  p.scores_stride[0] = out.view.stride(0);
  p.scores_stride[1] = out.view.stride(1);
  if (block_table) {
    p.block_table = block_table->data<int32_t>();
    p.block_table_stride = block_table->stride(0);
    p.block_size = codes.size(2);
    p.num_blocks = codes.size(0);
  }
  // Codes outside [0, C): the CPU kernel refuses them (ValueError); CUDA gives NaN scores (a2ats_cuda.h).
  run_on_device(
      q, stream_obj, "lut_scores",
      [&] {
        lut_scores_cpu(q.data<float>(), centroids.data<float>(), codes.data<int16_t>(), lengths.data<int32_t>(), edges,
                       out.view.data<float>(), p);
      },
      A2ATS_ON_CUDA(lut_scores_cuda(q.data<float>(), centroids.data<float>(), codes.data<int16_t>(),
                                    lengths.data<int32_t>(), edges, out.view.data<float>(), p, stream)));
  return out.object;
}

}  // namespace

void bind_vq(py::module_& m) {
  m.def("vq_encode", &vq_encode, py::arg("x"), py::arg("centroids"), py::kw_only(), py::arg("out") = py::none(),
        py::arg("stream") = py::none(),
        R"doc(Codes (B, Hkv, T, M) int16 of whitened keys x (B, Hkv, T, D) under centroids (Hkv, M, C, D/M) f32.)doc");
  m.def("lut_scores", &lut_scores, py::arg("q"), py::arg("centroids"), py::arg("codes"), py::arg("lengths"),
        py::kw_only(), py::arg("bin_edges") = py::none(), py::arg("block_table") = py::none(),
        py::arg("out") = py::none(), py::arg("stream") = py::none(),
        R"doc(Approximate scores (B, Hq, Tcap) f32 from codes (B, Hkv, Tcap, M) int16.

q (B, Hq, D) f32 in the dual space, or (B, Hq, NB, D) with bin_edges (NB - 1,) int32 ascending:
token n of row b at distance d = lengths[b] - 1 - n uses bin j = #{edges <= d}. lengths (B,) int32.
Scores are -inf at and past each length. A code outside [0, C) raises ValueError on CPU inputs; on
CUDA inputs (not read back to the host) it gives that token a NaN score, which select_topk ranks lowest.
Paged (vLLM's layout): codes (num_blocks, Hkv, block_size, M) and block_table (B, max_blocks) int32,
token n of row b in block block_table[b, n // block_size]; Tcap = max_blocks * block_size. A block
id outside [0, num_blocks) holding a token below the length is refused like a bad code.)doc");
}

}  // namespace a2ats::bind
