// a2ats_core.select_topk and group_scores: the rows each KV head attends over (cpp/include/a2ats/topk.h).
#include "a2ats/topk.h"

#include "dispatch.h"

namespace a2ats::bind {
namespace {

// group_size: the query heads per KV head in scores (B, Hq, Tcap).
void check_group_size(int64_t group_size, int64_t Hq) {
  if (group_size < 1 || Hq % group_size != 0)
    throw_value("group_size must be >= 1 and divide scores.shape[1] (num_q_heads = " + std::to_string(Hq) + "), got " +
                std::to_string(group_size));
}

py::tuple select_topk(py::handle scores_obj, int64_t k, py::handle lengths_obj, int64_t group_size, int64_t sink,
                      int64_t window, bool add_resident, py::handle out_indices_obj, py::handle out_counts_obj,
                      py::handle stream_obj) {
  TensorArg scores(scores_obj, "scores"), lengths(lengths_obj, "lengths");
  scores.expect_dtype({DType::kFloat32}).expect_ndim(3).expect_last_dim_contiguous();
  const int64_t B = scores.size(0), Hq = scores.size(1), Tcap = scores.size(2);
  expect_nonnegative(k, "k");
  expect_nonnegative(sink, "sink");
  expect_nonnegative(window, "window");
  check_group_size(group_size, Hq);
  // Each term is checked before the sum, so no product or sum can overflow int64.
  if (k > kInt32Max || sink > kInt32Max || window > kInt32Max || group_size * k + sink + window > kInt32Max)
    throw_value("group_size * k + sink + window (the selected rows per KV head) must fit int32, got group_size = " +
                std::to_string(group_size) + ", k = " + std::to_string(k) + ", sink = " + std::to_string(sink) +
                ", window = " + std::to_string(window));
  const int64_t max_selected = group_size * k + (add_resident ? sink + window : 0);
  check_lengths(lengths, B, Tcap, scores);
  const int64_t Hkv = Hq / group_size;
  Output indices(out_indices_obj, "out_indices", scores, {B, Hkv, max_selected}, DType::kInt32);
  Output counts(out_counts_obj, "out_counts", scores, {B, Hkv}, DType::kInt32);
  indices.disjoint_from({&scores, &lengths});
  counts.disjoint_from({&scores, &lengths, &indices.view});
  SelectTopkParams p;
  p.batch = B;
  p.num_q_heads = Hq;
  p.group_size = group_size;
  p.capacity = Tcap;
  p.k = k;
  p.sink = sink;
  p.window = window;
  p.max_selected = max_selected;
  p.add_resident = add_resident;
  p.scores_stride[0] = scores.stride(0);
  p.scores_stride[1] = scores.stride(1);
  p.indices_stride[0] = indices.view.stride(0);
  p.indices_stride[1] = indices.view.stride(1);
  p.counts_stride[0] = counts.view.stride(0);
  p.counts_stride[1] = counts.view.stride(1);
  run_on_device(
      scores, stream_obj, "select_topk",
      [&] {
        select_topk_cpu(scores.data<float>(), lengths.data<int32_t>(), indices.view.data<int32_t>(),
                        counts.view.data<int32_t>(), p);
      },
      A2ATS_ON_CUDA(select_topk_cuda(scores.data<float>(), lengths.data<int32_t>(), indices.view.data<int32_t>(),
                                     counts.view.data<int32_t>(), p, stream)));
  return py::make_tuple(indices.object, counts.object);
}

py::object group_scores(py::handle scores_obj, py::handle lengths_obj, int64_t group_size, int64_t sink, int64_t window,
                        py::handle out_obj, py::handle stream_obj) {
  TensorArg scores(scores_obj, "scores"), lengths(lengths_obj, "lengths");
  scores.expect_dtype({DType::kFloat32}).expect_ndim(3).expect_last_dim_contiguous();
  const int64_t B = scores.size(0), Hq = scores.size(1), Tcap = scores.size(2);
  expect_nonnegative(sink, "sink");
  expect_nonnegative(window, "window");
  check_group_size(group_size, Hq);
  check_lengths(lengths, B, Tcap, scores);
  const int64_t Hkv = Hq / group_size;
  Output out(out_obj, "out", scores, {B, Hkv, Tcap}, DType::kFloat32);
  out.disjoint_from({&scores, &lengths});
  GroupScoresParams p;
  p.batch = B;
  p.num_q_heads = Hq;
  p.group_size = group_size;
  p.capacity = Tcap;
  p.sink = sink;
  p.window = window;
  for (int d = 0; d < 2; ++d) {
    p.scores_stride[d] = scores.stride(d);
    p.out_stride[d] = out.view.stride(d);
  }
  run_on_device(
      scores, stream_obj, "group_scores",
      [&] { group_scores_cpu(scores.data<float>(), lengths.data<int32_t>(), out.view.data<float>(), p); },
      A2ATS_ON_CUDA(
          group_scores_cuda(scores.data<float>(), lengths.data<int32_t>(), out.view.data<float>(), p, stream)));
  return out.object;
}

}  // namespace

void bind_topk(py::module_& m) {
  m.def(
      "select_topk", &select_topk, py::arg("scores"), py::arg("k"), py::arg("lengths"), py::kw_only(),
      py::arg("group_size"), py::arg("sink"), py::arg("window"), py::arg("add_resident") = true,
      py::arg("out_indices") = py::none(), py::arg("out_counts") = py::none(), py::arg("stream") = py::none(),
      R"doc(Rows to attend over: (indices (B, Hkv, G*k + sink + window) int32 ascending, padded with -1; counts (B, Hkv) int32).

Per query head the top k of tokens [sink, length - window) (all when fewer), united over the
group_size heads of each KV head, plus the first sink and last window tokens. add_resident=False
leaves those out (indices (B, Hkv, G*k)): for a caller that holds the sink and window rows itself.)doc");
  m.def("group_scores", &group_scores, py::arg("scores"), py::arg("lengths"), py::kw_only(), py::arg("group_size"),
        py::arg("sink"), py::arg("window"), py::arg("out") = py::none(), py::arg("stream") = py::none(),
        R"doc(One score row per KV head, (B, Hkv, Tcap) f32, for a per-KV-head budget.

scores (B, Hq, Tcap) f32, lengths (B,) int32. out[b, g, t] = max over the group_size query heads h
of KV head g of log softmax_h(t), softmax_h over the candidates [sink, length - window) of
scores[b, h]; -inf outside the candidates, NaN scores ignored. select_topk(out, k, lengths,
group_size=1, ...) then reads exactly k middle rows per KV head.)doc");
}

}  // namespace a2ats::bind
