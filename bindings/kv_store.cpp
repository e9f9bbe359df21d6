// a2ats_core.KVStore: the host K/V rows of a model (cpp/include/a2ats/kv_store.h).
#include "kv_store.h"

#include <system_error>

namespace a2ats::bind {
namespace {

DType parse_store_dtype(py::handle dtype) {
  std::string name = py::str(dtype);
  if (name.rfind("torch.", 0) == 0) name = name.substr(6);
  if (name == "float32" || name == "float") return DType::kFloat32;
  if (name == "float16" || name == "half") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw_type("dtype must be float32, float16 or bfloat16 (a torch dtype or its name), got " +
             std::string(py::str(dtype)));
}

}  // namespace

PyKVStore::PyKVStore(int64_t num_layers, int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t capacity,
                     py::handle dtype, bool pinned, int threads) {
  const std::pair<const char*, int64_t> dims[] = {{"num_layers", num_layers},
                                                  {"batch", batch},
                                                  {"num_kv_heads", num_kv_heads},
                                                  {"head_dim", head_dim},
                                                  {"capacity", capacity}};
  for (auto& [name, value] : dims)
    if (value < 1) throw_value(std::string(name) + " must be >= 1, got " + std::to_string(value));
  if (capacity > kInt32Max) throw_value("capacity must fit int32 (indices are int32), got " + std::to_string(capacity));
  if (threads < 0 || threads > ThreadPool::kMaxThreads)
    throw_value("threads must be in [0, " + std::to_string(ThreadPool::kMaxThreads) + "] (0 = one per core), got " +
                std::to_string(threads));
  const DType dt = parse_store_dtype(dtype);
  // 2 (K and V) x num_layers x batch x num_kv_heads x capacity x head_dim x element size, checked
  // step by step: a wrapped product would allocate a tiny store that appends then overrun.
  int64_t bytes = 2 * int64_t(dtype_size(dt));
  for (auto& [name, value] : dims)
    if (__builtin_mul_overflow(bytes, value, &bytes) || bytes > KVStore::kMaxBytes)
      throw_value("KVStore(num_layers=" + std::to_string(num_layers) + ", batch=" + std::to_string(batch) +
                  ", num_kv_heads=" + std::to_string(num_kv_heads) + ", head_dim=" + std::to_string(head_dim) +
                  ", capacity=" + std::to_string(capacity) + ") would need more than " +
                  std::to_string(KVStore::kMaxBytes >> 40) + " TiB; reduce capacity or batch");
  try {
    store_ = std::make_unique<KVStore>(num_layers, batch, num_kv_heads, head_dim, capacity, dt, pinned, threads);
  } catch (const std::bad_alloc&) {
    throw_value("KVStore of " + std::to_string(bytes) +
                " bytes (num_layers x batch x num_kv_heads x capacity x "
                "head_dim, K and V) could not be allocated; reduce capacity or batch");
  } catch (const std::system_error& error) {
    throw_value("KVStore could not start threads=" + std::to_string(threads) + " threads (" + error.what() +
                "); pass fewer");
  }
}

void PyKVStore::append(int64_t layer, py::handle k_obj, py::handle v_obj, py::handle num_tokens_obj,
                       py::handle stream_obj) {
  KVStore& s = *store_;
  TensorArg k(k_obj, "k"), v(v_obj, "v");
  const std::vector<int64_t> expected = {s.batch(), s.num_kv_heads(), k.ndim() == 4 ? k.size(2) : 0, s.head_dim()};
  k.expect_dtype({s.dtype()}).expect_shape(expected, "(batch, num_kv_heads, new tokens, head_dim) of the store");
  k.expect_last_dim_contiguous();
  v.expect_dtype({s.dtype()}).expect_shape(expected, "the shape of k").expect_last_dim_contiguous();
  v.expect_device(k.device(), k);
  const int64_t num_new = k.size(2);
  std::optional<TensorArg> num_tokens;
  if (!num_tokens_obj.is_none()) {
    num_tokens.emplace(num_tokens_obj, "num_tokens");
    num_tokens->expect_dtype({DType::kInt32}).expect_shape({s.batch()}, "one count per batch row").expect_contiguous();
    num_tokens->expect_cpu("counts are read on the host");
  }
  const int32_t* counts = num_tokens ? num_tokens->data<int32_t>() : nullptr;
  RowsView kv{k.data(), {k.stride(0), k.stride(1), k.stride(2)}}, vv{v.data(), {v.stride(0), v.stride(1), v.stride(2)}};
  auto lock = acquire();
  refuse_if_owned("append");  // under the lock: a Pipeline may take the store meanwhile
  run_on_device(
      k, stream_obj, "KVStore.append", [&] { s.append(layer, kv, vv, num_new, counts); }, A2ATS_ON_CUDA([&] {
        s.check_append(layer, num_new, counts);
        const cudaError_t err = kv_append_cuda(s, layer, kv, vv, num_new, counts, stream);
        if (err == cudaSuccess) s.commit_append(layer, num_new, counts);
        return err;
      }()));
}

void PyKVStore::gather(int64_t layer, py::handle indices_obj, py::handle counts_obj, py::handle out_k_obj,
                       py::handle out_v_obj, py::handle stream_obj) {
  KVStore& s = *store_;
  TensorArg indices(indices_obj, "indices"), counts(counts_obj, "counts"), out_k(out_k_obj, "out_k"),
      out_v(out_v_obj, "out_v");
  indices.expect_dtype({DType::kInt32}).expect_ndim(3).expect_last_dim_contiguous();
  const int64_t num_queries = expect_num_queries(indices);
  const int64_t kmax = indices.size(2);
  counts.expect_dtype({DType::kInt32})
      .expect_shape({num_queries, s.num_kv_heads()}, "(batch of indices, num_kv_heads of the store)");
  counts.expect_device(indices.device(), indices);
  const std::vector<int64_t> rows = {num_queries, s.num_kv_heads(), kmax, s.head_dim()};
  out_k.expect_dtype({s.dtype()}).expect_shape(rows, "(batch, num_kv_heads, Kmax of indices, head_dim)");
  out_k.expect_last_dim_contiguous();
  out_v.expect_dtype({s.dtype()}).expect_shape(rows, "the shape of out_k").expect_last_dim_contiguous();
  out_v.expect_device(out_k.device(), out_k);
  for (const TensorArg* out : {&out_k, &out_v}) {
    out->expect_no_internal_overlap();
    expect_disjoint(*out, indices);
    expect_disjoint(*out, counts);
  }
  expect_disjoint(out_v, out_k);
  const int64_t idx_stride[2] = {indices.stride(0), indices.stride(1)};
  const int64_t cnt_stride[2] = {counts.stride(0), counts.stride(1)};
  RowsView kv{out_k.data(), {out_k.stride(0), out_k.stride(1), out_k.stride(2)}};
  RowsView vv{out_v.data(), {out_v.stride(0), out_v.stride(1), out_v.stride(2)}};
  if (out_k.is_cuda()) {
    if (num_queries != s.batch())
      throw_value("indices: the CUDA gather takes batch " + std::to_string(s.batch()) + " (the store's), got " +
                  std::to_string(num_queries));
    if (indices.is_cuda()) indices.expect_device(out_k.device(), out_k);
  } else {
    indices.expect_cpu("gathering into CPU outputs").expect_device(out_k.device(), out_k);
    counts.expect_cpu("gathering into CPU outputs");
  }
  auto lock = acquire();
  run_on_device(
      out_k, stream_obj, "KVStore.gather",
      [&] {
        s.check_gather(layer, indices.data<int32_t>(), idx_stride, counts.data<int32_t>(), cnt_stride, kmax,
                       num_queries);
        s.gather(layer, indices.data<int32_t>(), idx_stride, counts.data<int32_t>(), cnt_stride, kv, vv, num_queries);
      },
      A2ATS_ON_CUDA(kv_gather_cuda(s, layer, indices.data<int32_t>(), idx_stride, indices.is_cuda(),
                                   counts.data<int32_t>(), cnt_stride, kv, vv, kmax, stream)));
}

py::tuple PyKVStore::attend(int64_t layer, py::handle q_obj, py::handle indices_obj, py::handle counts_obj,
                            double scale, py::handle out_obj, py::handle out_lse_obj) {
  KVStore& s = *store_;
  TensorArg q(q_obj, "q"), indices(indices_obj, "indices"), counts(counts_obj, "counts");
  q.expect_dtype({DType::kFloat32}).expect_ndim(3).expect_last_dim_contiguous();
  if (q.is_cuda())
    throw_value("q is on " + q.device().str() +
                ": KVStore.attend reads the rows in host memory and runs on the "
                "CPU; with CUDA tensors, gather the rows to the device and attend there");
  const int64_t num_queries = expect_num_queries(q);
  q.expect_size(2, s.head_dim(), "head_dim of the store");
  const int64_t num_q_heads = q.size(1);
  if (num_q_heads % s.num_kv_heads() != 0)
    throw_value("q has " + std::to_string(num_q_heads) + " heads, not a multiple of the store's num_kv_heads " +
                std::to_string(s.num_kv_heads()));
  if (!std::isfinite(scale)) throw_value("scale must be finite, got " + std::to_string(scale));
  indices.expect_dtype({DType::kInt32}).expect_ndim(3).expect_last_dim_contiguous();
  indices.expect_size(0, num_queries, "batch of q").expect_size(1, s.num_kv_heads(), "num_kv_heads of the store");
  indices.expect_cpu("KVStore.attend runs on the CPU");
  counts.expect_dtype({DType::kInt32}).expect_shape({num_queries, s.num_kv_heads()}, "(batch of q, num_kv_heads)");
  counts.expect_cpu("KVStore.attend runs on the CPU");
  Output out(out_obj, "out", q, {num_queries, num_q_heads, s.head_dim()}, DType::kFloat32);
  Output lse(out_lse_obj, "out_lse", q, {num_queries, num_q_heads}, DType::kFloat32);
  out.disjoint_from({&q, &indices, &counts});
  lse.disjoint_from({&q, &indices, &counts, &out.view});
  KVStore::AttendParams p;
  p.num_queries = num_queries;
  p.group_size = num_q_heads / s.num_kv_heads();
  p.scale = float(scale);
  p.q_stride[0] = q.stride(0), p.q_stride[1] = q.stride(1);
  p.indices_stride[0] = indices.stride(0), p.indices_stride[1] = indices.stride(1);
  p.counts_stride[0] = counts.stride(0), p.counts_stride[1] = counts.stride(1);
  p.out_stride[0] = out.view.stride(0), p.out_stride[1] = out.view.stride(1);
  p.lse_stride[0] = lse.view.stride(0), p.lse_stride[1] = lse.view.stride(1);
  auto lock = acquire();
  run_on_cpu([&] {
    s.check_gather(layer, indices.data<int32_t>(), p.indices_stride, counts.data<int32_t>(), p.counts_stride,
                   indices.size(2), num_queries);
    s.attend(layer, q.data<float>(), indices.data<int32_t>(), counts.data<int32_t>(), out.view.data<float>(),
             lse.view.data<float>(), p);
  });
  return py::make_tuple(out.object, lse.object);
}

int64_t PyKVStore::expect_num_queries(const TensorArg& arg) const {
  const int64_t batch = store_->batch();
  if (batch != 1) arg.expect_size(0, batch, "batch of the store");
  return arg.size(0);
}

void PyKVStore::write_slots(int64_t layer, py::handle slots_obj, py::handle k_obj, py::handle v_obj,
                            py::handle stream_obj) {
  KVStore& s = *store_;
  TensorArg slots(slots_obj, "slots"), k(k_obj, "k"), v(v_obj, "v");
  slots.expect_dtype({DType::kInt64}).expect_ndim(1).expect_contiguous();
  const std::vector<int64_t> rows = {slots.size(0), s.num_kv_heads(), s.head_dim()};
  k.expect_dtype({s.dtype()}).expect_shape(rows, "(len(slots), num_kv_heads, head_dim) of the store");
  k.expect_last_dim_contiguous();
  v.expect_dtype({s.dtype()}).expect_shape(rows, "the shape of k").expect_last_dim_contiguous();
  v.expect_device(k.device(), k);
  if (slots.is_cuda()) slots.expect_device(k.device(), k);  // else read on the host
  RowsView kv{k.data(), {k.stride(0), k.stride(1), 0}}, vv{v.data(), {v.stride(0), v.stride(1), 0}};
  if (!k.is_cuda()) slots.expect_cpu("the rows are on the CPU");
  auto lock = acquire();
  refuse_if_owned("write_slots");
  run_on_device(
      k, stream_obj, "KVStore.write_slots", [&] { s.write_slots(layer, slots.data<int64_t>(), slots.size(0), kv, vv); },
      A2ATS_ON_CUDA(
          kv_write_slots_cuda(s, layer, slots.data<int64_t>(), slots.is_cuda(), slots.size(0), kv, vv, stream)));
}

py::array_t<int64_t> PyKVStore::lengths() {
  auto lock = acquire();
  KVStore& s = *store_;
  py::array_t<int64_t> out({s.num_layers(), s.batch()});
  auto view = out.mutable_unchecked<2>();
  for (int64_t l = 0; l < s.num_layers(); ++l)
    for (int64_t b = 0; b < s.batch(); ++b) view(l, b) = s.length(l, b);
  return out;
}

void PyKVStore::reset() {
  auto lock = acquire();
  refuse_if_owned("reset");
  store_->reset();
}

void bind_kv_store(py::module_& m) {
  py::class_<PyKVStore>(m, "KVStore", R"doc(Host-memory K/V store (num_layers, batch, num_kv_heads, capacity, head_dim).

KVStore(num_layers, batch, num_kv_heads, head_dim, capacity, dtype, *, pinned=True, threads=0).
dtype: a torch dtype or "float32" / "float16" / "bfloat16". pinned uses page-locked memory when a
CUDA device is usable (see .pinned); threads is the size of the store's own pool, which runs its
append, gather and attend work (0 = one per core, at most 1024). Thread safety: every method holds
the store's lock for the whole call, so one store shared by several Python threads sees each call
whole; calls on one store run one at a time.)doc")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, py::handle, bool, int>(), py::arg("num_layers"),
           py::arg("batch"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("capacity"), py::arg("dtype"),
           py::kw_only(), py::arg("pinned") = true, py::arg("threads") = 0)
      .def("append", &PyKVStore::append, py::arg("layer"), py::arg("k"), py::arg("v"), py::kw_only(),
           py::arg("num_tokens") = py::none(), py::arg("stream") = py::none(),
           R"doc(Append k, v (B, Hkv, t, D) (CPU or CUDA) to `layer`; num_tokens (B,) int32 appends only the first
num_tokens[b] of the t rows of batch row b. Raises ValueError, storing nothing, on capacity overflow.)doc")
      .def(
          "gather", &PyKVStore::gather, py::arg("layer"), py::arg("indices"), py::arg("counts"), py::arg("out_k"),
          py::arg("out_v"), py::kw_only(), py::arg("stream") = py::none(),
          R"doc(Copy rows indices[b, g, :counts[b, g]] of `layer` into out_k, out_v (B, Hkv, Kmax, D); slots past counts are untouched.)doc")
      .def("attend", &PyKVStore::attend, py::arg("layer"), py::arg("q"), py::arg("indices"), py::arg("counts"),
           py::kw_only(), py::arg("scale"), py::arg("out") = py::none(), py::arg("out_lse") = py::none(),
           R"doc(Exact attention over the selected rows of `layer`, read straight from the store (CPU only;
no gathered copy).

q (B, Hq, D) float32 with Hq a multiple of num_kv_heads (head h reads KV head h // (Hq / Hkv));
indices (B, Hkv, Kmax) int32 and counts (B, Hkv) int32 as for gather. Returns (out, lse):
out (B, Hq, D) float32 = softmax(scale * q K_S^T) V_S over S = indices[b, g, :counts[b, g]], and
lse (B, Hq) float32 = log sum exp(scale * q K_S^T), the state that merges with attention over other
rows; a row with no selected rows gives out = 0 and lse = -inf.)doc")
      .def("write_slots", &PyKVStore::write_slots, py::arg("layer"), py::arg("slots"), py::arg("k"), py::arg("v"),
           py::kw_only(), py::arg("stream") = py::none(),
           R"doc(Slot-indexed write (a store of batch 1 whose capacity is an engine's number of slots): row i of
k, v (N, Hkv, D) (CPU or CUDA) goes to slot slots[i] ((N,) int64, on the CPU or on k's device; < 0
skips the row) of `layer`. The length becomes the highest slot written + 1. ValueError, writing
nothing, for a slot >= capacity or named twice. From CUDA rows it returns once they are stored.)doc")
      .def("lengths", &PyKVStore::lengths, "Rows stored, (num_layers, batch) int64.")
      .def("reset", &PyKVStore::reset, "Forget all rows (lengths to 0); memory is kept.")
      .def_property_readonly("nbytes", [](const PyKVStore& s) { return s.store().nbytes(); })
      .def_property_readonly("pinned", [](const PyKVStore& s) { return s.store().pinned(); })
      .def_property_readonly("num_layers", [](const PyKVStore& s) { return s.store().num_layers(); })
      .def_property_readonly("batch", [](const PyKVStore& s) { return s.store().batch(); })
      .def_property_readonly("num_kv_heads", [](const PyKVStore& s) { return s.store().num_kv_heads(); })
      .def_property_readonly("head_dim", [](const PyKVStore& s) { return s.store().head_dim(); })
      .def_property_readonly("capacity", [](const PyKVStore& s) { return s.store().capacity(); })
      .def_property_readonly("dtype", [](const PyKVStore& s) { return std::string(dtype_name(s.store().dtype())); })
      .def_property_readonly("num_threads", [](const PyKVStore& s) { return s.store().num_threads(); });
}

}  // namespace a2ats::bind
