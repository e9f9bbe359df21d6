// a2ats_core: validation and CPU/CUDA routing for the a2ats kernels. Torch-free: arrays come
// in through DLPack (see tensor_view.h) and every check happens here, before a kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>

#include "a2ats/kv_store.h"
#include "a2ats/pipeline.h"
#include "a2ats/rotary.h"
#include "a2ats/topk.h"
#include "a2ats/vq.h"
#include "tensor_view.h"

#ifdef A2ATS_WITH_CUDA
#include "a2ats_cuda.h"
#endif

namespace py = pybind11;
using namespace a2ats;
using namespace a2ats::bind;

namespace {

constexpr int64_t kInt32Max = 2147483647;

const std::initializer_list<DType> kFloatTypes = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// Wraps an optional `out=` argument, allocating like `like` when it is None.
struct Output {
  py::object object;
  TensorArg view;
  Output(py::handle out, const char* name, const TensorArg& like, const std::vector<int64_t>& shape, DType dtype) {
    object = out.is_none() ? empty_like_framework(like, shape, dtype) : py::reinterpret_borrow<py::object>(out);
    view = TensorArg(object, name);
    view.expect_dtype({dtype}).expect_shape(shape, "the output shape").expect_last_dim_contiguous();
    view.expect_no_internal_overlap().expect_device(like.device(), like);
  }
  // Refuses an output that shares memory with any of `inputs` (or earlier outputs).
  const Output& disjoint_from(std::initializer_list<const TensorArg*> inputs) const {
    for (const TensorArg* input : inputs)
      if (input) expect_disjoint(view, *input);
    return *this;
  }
};

[[noreturn]] void no_cuda(const TensorArg& t) {
  throw_value(t.name() + " is on " + t.device().str() +
              " but this a2ats_core was built without CUDA (built_with_cuda() is False); pass CPU arrays");
}

#ifdef A2ATS_WITH_CUDA
void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
  }
}

// Makes the device of `t` current for one call (kernels, scratch memory and the stream belong
// to it) and restores the caller's device afterwards.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const TensorArg& t) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != t.device().index) {
      check_cuda(cudaSetDevice(t.device().index), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~CudaDeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};
#endif

void expect_nonnegative(int64_t value, const char* name) {
  if (value < 0) throw_value(std::string(name) + " must be >= 0, got " + std::to_string(value));
}

// lengths (B,) int32 with 0 <= lengths[b] <= capacity; checked on the host for CPU arrays.
void check_lengths(const TensorArg& lengths, int64_t batch, int64_t capacity, const TensorArg& like) {
  // The kernels index lengths[b] directly, so it must be contiguous (it is tiny: copy it).
  lengths.expect_dtype({DType::kInt32}).expect_shape({batch}, "one length per batch row").expect_contiguous();
  lengths.expect_device(like.device(), like);
  if (lengths.is_cuda()) return;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t len = lengths.data<int32_t>()[b * lengths.stride(0)];
    if (len < 0 || len > capacity)
      throw_value("lengths[" + std::to_string(b) + "] must be in [0, " + std::to_string(capacity) +
                  "] (the token capacity), got " + std::to_string(len));
  }
}

// -------------------------------------------------------------------------------------------
py::object rotary(py::handle x_obj, py::handle positions_obj, py::handle inv_freq_obj, bool interleaved,
                  py::handle out_obj, py::handle stream_obj) {
  TensorArg x(x_obj, "x"), positions(positions_obj, "positions"), inv_freq(inv_freq_obj, "inv_freq");
  x.expect_dtype(kFloatTypes).expect_ndim(4).expect_last_dim_contiguous();
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  if (D > kMaxHeadDim) throw_value("x.shape[3] (head_dim) must be <= " + std::to_string(kMaxHeadDim) + ", got " + std::to_string(D));
  positions.expect_dtype({DType::kInt32, DType::kInt64}).expect_shape({B, T}, "(batch, tokens) of x");
  positions.expect_device(x.device(), x);
  inv_freq.expect_dtype({DType::kFloat32}).expect_ndim(1).expect_contiguous().expect_device(x.device(), x);
  const int64_t half = inv_freq.size(0);
  if (2 * half > D)
    throw_value("inv_freq has " + std::to_string(half) + " frequencies, so the rotary dim " + std::to_string(2 * half) +
                " exceeds head_dim " + std::to_string(D));
  Output out(out_obj, "out", x, {B, H, T, D}, x.dtype());
  const auto xr = x.byte_range(), orr = out.view.byte_range();
  const bool same = out.view.data() == x.data() && [&] {
    for (int d = 0; d < 4; ++d) if (x.size(d) > 1 && x.stride(d) != out.view.stride(d)) return false;
    return true;
  }();
  if (!same && xr.first < orr.second && orr.first < xr.second)
    throw_value("out overlaps x without being the very same view; pass out=x for in-place or a separate array");
  RotaryParams p;
  p.batch = B; p.num_heads = H; p.num_tokens = T; p.head_dim = D; p.rotary_dim = 2 * half;
  p.interleaved = interleaved; p.dtype = x.dtype(); p.pos_dtype = positions.dtype();
  for (int d = 0; d < 3; ++d) { p.x_stride[d] = x.stride(d); p.out_stride[d] = out.view.stride(d); }
  p.pos_stride[0] = positions.stride(0); p.pos_stride[1] = positions.stride(1);
  if (x.is_cuda()) {
#ifdef A2ATS_WITH_CUDA
    CudaDeviceGuard guard(x);
    const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, x));
    check_cuda(rotary_cuda(x.data(), out.view.data(), positions.data(), inv_freq.data<float>(), p, stream), "rotary");
#else
    no_cuda(x);
#endif
  } else {
    py::gil_scoped_release release;
    rotary_cpu(x.data(), out.view.data(), positions.data(), inv_freq.data<float>(), p);
  }
  return out.object;
}

// Checks centroids (Hkv, M, C, D/M) f32 contiguous against num_kv_heads and head_dim.
void check_centroids(const TensorArg& centroids, int64_t num_kv_heads, int64_t head_dim, const TensorArg& like) {
  centroids.expect_dtype({DType::kFloat32}).expect_ndim(4).expect_contiguous().expect_device(like.device(), like);
  centroids.expect_size(0, num_kv_heads, "num_kv_heads");
  const int64_t M = centroids.size(1), C = centroids.size(2), dsub = centroids.size(3);
  if (M < 1 || C < 1) throw_value("centroids must have M >= 1 subspaces and C >= 1 centroids, got shape " + centroids.shape_str());
  if (C > kMaxCentroids)
    throw_value("centroids.shape[2] (C) must be <= " + std::to_string(kMaxCentroids) + " so codes fit int16, got " + std::to_string(C));
  if (M * dsub != head_dim)
    throw_value("centroids.shape[1] * centroids.shape[3] (M * D/M) must equal head_dim " + std::to_string(head_dim) +
                ", got " + std::to_string(M) + " * " + std::to_string(dsub));
}

py::object vq_encode(py::handle x_obj, py::handle centroids_obj, py::handle out_obj, py::handle stream_obj) {
  TensorArg x(x_obj, "x"), centroids(centroids_obj, "centroids");
  x.expect_dtype(kFloatTypes).expect_ndim(4).expect_last_dim_contiguous();
  const int64_t B = x.size(0), Hkv = x.size(1), T = x.size(2), D = x.size(3);
  if (D > kMaxHeadDim) throw_value("x.shape[3] (head_dim) must be <= " + std::to_string(kMaxHeadDim) + ", got " + std::to_string(D));
  check_centroids(centroids, Hkv, D, x);
  const int64_t M = centroids.size(1);
  Output out(out_obj, "out", x, {B, Hkv, T, M}, DType::kInt16);
  out.disjoint_from({&x, &centroids});
  VQEncodeParams p;
  p.batch = B; p.num_kv_heads = Hkv; p.num_tokens = T; p.head_dim = D;
  p.num_subspaces = M; p.num_centroids = centroids.size(2); p.dtype = x.dtype();
  for (int d = 0; d < 3; ++d) { p.x_stride[d] = x.stride(d); p.codes_stride[d] = out.view.stride(d); }
  if (x.is_cuda()) {
#ifdef A2ATS_WITH_CUDA
    CudaDeviceGuard guard(x);
    const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, x));
    check_cuda(vq_encode_cuda(x.data(), centroids.data<float>(), out.view.data<int16_t>(), p, stream), "vq_encode");
#else
    no_cuda(x);
#endif
  } else {
    py::gil_scoped_release release;
    vq_encode_cpu(x.data(), centroids.data<float>(), out.view.data<int16_t>(), p);
  }
  return out.object;
}

py::object lut_scores(py::handle q_obj, py::handle centroids_obj, py::handle codes_obj, py::handle lengths_obj,
                      py::handle bin_edges_obj, py::handle out_obj, py::handle stream_obj) {
  TensorArg q(q_obj, "q"), centroids(centroids_obj, "centroids"), codes(codes_obj, "codes"),
      lengths(lengths_obj, "lengths");
  q.expect_dtype({DType::kFloat32});
  if (q.ndim() != 3 && q.ndim() != 4)
    throw_value("q must have shape (batch, num_q_heads, head_dim) or, distance-binned, (batch, num_q_heads, "
                "num_bins, head_dim); got " + std::to_string(q.ndim()) + " dimensions with shape " + q.shape_str());
  q.expect_last_dim_contiguous();
  const bool binned = q.ndim() == 4;
  const int64_t B = q.size(0), Hq = q.size(1), NB = binned ? q.size(2) : 1, D = q.size(-1);
  codes.expect_dtype({DType::kInt16}).expect_ndim(4).expect_last_dim_contiguous().expect_device(q.device(), q);
  const int64_t Hkv = codes.size(1), Tcap = codes.size(2);
  codes.expect_size(0, B, "batch of q");
  if (Hkv < 1 || Hq % Hkv != 0)
    throw_value("q.shape[1] (num_q_heads = " + std::to_string(Hq) + ") must be a multiple of codes.shape[1] (num_kv_heads = " +
                std::to_string(Hkv) + ")");
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
      throw_value("bin_edges is required when q has " + std::to_string(NB) + " distance bins (shape " + q.shape_str() + ")");
    bin_edges->expect_dtype({DType::kInt32}).expect_shape({NB - 1}, "num_bins - 1 edges").expect_contiguous();
    bin_edges->expect_device(q.device(), q);
    edges = bin_edges->data<int32_t>();
    if (!bin_edges->is_cuda())
      for (int64_t j = 1; j < NB - 1; ++j)
        if (edges[j] < edges[j - 1])
          throw_value("bin_edges must be ascending, got bin_edges[" + std::to_string(j - 1) + "] = " +
                      std::to_string(edges[j - 1]) + " > bin_edges[" + std::to_string(j) + "] = " + std::to_string(edges[j]));
  }
  Output out(out_obj, "out", q, {B, Hq, Tcap}, DType::kFloat32);
  out.disjoint_from({&q, &centroids, &codes, &lengths, bin_edges ? &*bin_edges : nullptr});
  LutScoresParams p;
  p.batch = B; p.num_q_heads = Hq; p.num_kv_heads = Hkv; p.head_dim = D; p.num_subspaces = M;
  p.num_centroids = centroids.size(2); p.capacity = Tcap; p.num_bins = NB;
  p.q_stride[0] = q.stride(0); p.q_stride[1] = q.stride(1); p.q_stride[2] = binned ? q.stride(2) : 0;
  for (int d = 0; d < 3; ++d) p.codes_stride[d] = codes.stride(d);
  p.scores_stride[0] = out.view.stride(0); p.scores_stride[1] = out.view.stride(1);
  bool ok = true;
  if (q.is_cuda()) {
#ifdef A2ATS_WITH_CUDA
    // Codes outside [0, C) give NaN scores here instead of an error (see a2ats_cuda.h).
    CudaDeviceGuard guard(q);
    const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, q));
    check_cuda(lut_scores_cuda(q.data<float>(), centroids.data<float>(), codes.data<int16_t>(), lengths.data<int32_t>(),
                               edges, out.view.data<float>(), p, stream), "lut_scores");
#else
    no_cuda(q);
#endif
  } else {
    py::gil_scoped_release release;
    ok = lut_scores_cpu(q.data<float>(), centroids.data<float>(), codes.data<int16_t>(), lengths.data<int32_t>(), edges,
                        out.view.data<float>(), p);
  }
  if (!ok)
    throw_value("codes contains values outside [0, " + std::to_string(p.num_centroids) +
                ") (the number of centroids) among the first lengths[b] tokens");
  return out.object;
}

py::tuple select_topk(py::handle scores_obj, int64_t k, py::handle lengths_obj, int64_t group_size, int64_t sink,
                      int64_t window, bool add_resident, py::handle out_indices_obj, py::handle out_counts_obj, py::handle stream_obj) {
  TensorArg scores(scores_obj, "scores"), lengths(lengths_obj, "lengths");
  scores.expect_dtype({DType::kFloat32}).expect_ndim(3).expect_last_dim_contiguous();
  const int64_t B = scores.size(0), Hq = scores.size(1), Tcap = scores.size(2);
  expect_nonnegative(k, "k");
  expect_nonnegative(sink, "sink");
  expect_nonnegative(window, "window");
  if (group_size < 1 || Hq % group_size != 0)
    throw_value("group_size must be >= 1 and divide scores.shape[1] (num_q_heads = " + std::to_string(Hq) + "), got " +
                std::to_string(group_size));
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
  p.batch = B; p.num_q_heads = Hq; p.group_size = group_size; p.capacity = Tcap;
  p.k = k; p.sink = sink; p.window = window; p.max_selected = max_selected; p.add_resident = add_resident;
  p.scores_stride[0] = scores.stride(0); p.scores_stride[1] = scores.stride(1);
  p.indices_stride[0] = indices.view.stride(0); p.indices_stride[1] = indices.view.stride(1);
  p.counts_stride[0] = counts.view.stride(0); p.counts_stride[1] = counts.view.stride(1);
  if (scores.is_cuda()) {
#ifdef A2ATS_WITH_CUDA
    CudaDeviceGuard guard(scores);
    const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, scores));
    check_cuda(select_topk_cuda(scores.data<float>(), lengths.data<int32_t>(), indices.view.data<int32_t>(),
                                counts.view.data<int32_t>(), p, stream), "select_topk");
#else
    no_cuda(scores);
#endif
  } else {
    py::gil_scoped_release release;
    select_topk_cpu(scores.data<float>(), lengths.data<int32_t>(), indices.view.data<int32_t>(),
                    counts.view.data<int32_t>(), p);
  }
  return py::make_tuple(indices.object, counts.object);
}

// -------------------------------------------------------------------------------------------
DType parse_store_dtype(py::handle dtype) {
  std::string name = py::str(dtype);
  if (name.rfind("torch.", 0) == 0) name = name.substr(6);
  if (name == "float32" || name == "float") return DType::kFloat32;
  if (name == "float16" || name == "half") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw_type("dtype must be float32, float16 or bfloat16 (a torch dtype or its name), got " + std::string(py::str(dtype)));
}

// Python-facing KVStore: the C++ store plus a lock, so concurrent Python threads see whole operations.
class PyKVStore {
 public:
  PyKVStore(int64_t num_layers, int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t capacity,
            py::handle dtype, bool pinned, int threads) {
    const std::pair<const char*, int64_t> dims[] = {{"num_layers", num_layers}, {"batch", batch},
                                                    {"num_kv_heads", num_kv_heads}, {"head_dim", head_dim},
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
      throw_value("KVStore of " + std::to_string(bytes) + " bytes (num_layers x batch x num_kv_heads x capacity x "
                  "head_dim, K and V) could not be allocated; reduce capacity or batch");
    } catch (const std::system_error& error) {
      throw_value("KVStore could not start threads=" + std::to_string(threads) + " threads (" + error.what() +
                  "); pass fewer");
    }
  }

  void append(int64_t layer, py::handle k_obj, py::handle v_obj, py::handle num_tokens_obj, py::handle stream_obj) {
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
    try {
      if (k.is_cuda()) {
#ifdef A2ATS_WITH_CUDA
        CudaDeviceGuard guard(k);
        const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, k));
        s.check_append(layer, num_new, counts);
        py::gil_scoped_release release;
        check_cuda(kv_append_cuda(s, layer, kv, vv, num_new, counts, stream), "KVStore.append");
        s.commit_append(layer, num_new, counts);
#else
        no_cuda(k);
#endif
      } else {
        py::gil_scoped_release release;
        s.append(layer, kv, vv, num_new, counts);
      }
    } catch (const std::invalid_argument& e) {
      throw_value(e.what());
    }
  }

  void gather(int64_t layer, py::handle indices_obj, py::handle counts_obj, py::handle out_k_obj, py::handle out_v_obj,
              py::handle stream_obj) {
    KVStore& s = *store_;
    TensorArg indices(indices_obj, "indices"), counts(counts_obj, "counts"), out_k(out_k_obj, "out_k"),
        out_v(out_v_obj, "out_v");
    indices.expect_dtype({DType::kInt32}).expect_ndim(3).expect_last_dim_contiguous();
    indices.expect_size(0, s.batch(), "batch of the store").expect_size(1, s.num_kv_heads(), "num_kv_heads of the store");
    const int64_t kmax = indices.size(2);
    counts.expect_dtype({DType::kInt32}).expect_shape({s.batch(), s.num_kv_heads()}, "(batch, num_kv_heads) of the store");
    counts.expect_device(indices.device(), indices);
    const std::vector<int64_t> rows = {s.batch(), s.num_kv_heads(), kmax, s.head_dim()};
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
    auto lock = acquire();
    try {
      if (out_k.is_cuda()) {
#ifdef A2ATS_WITH_CUDA
        if (indices.is_cuda()) indices.expect_device(out_k.device(), out_k);
        CudaDeviceGuard guard(out_k);
        const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, out_k));
        py::gil_scoped_release release;
        check_cuda(kv_gather_cuda(s, layer, indices.data<int32_t>(), idx_stride, indices.is_cuda(),
                                  counts.data<int32_t>(), cnt_stride, kv, vv, kmax, stream), "KVStore.gather");
#else
        no_cuda(out_k);
#endif
      } else {
        indices.expect_cpu("gathering into CPU outputs").expect_device(out_k.device(), out_k);
        counts.expect_cpu("gathering into CPU outputs");
        py::gil_scoped_release release;
        s.check_gather(layer, indices.data<int32_t>(), idx_stride, counts.data<int32_t>(), cnt_stride, kmax);
        s.gather(layer, indices.data<int32_t>(), idx_stride, counts.data<int32_t>(), cnt_stride, kv, vv);
      }
    } catch (const std::invalid_argument& e) {
      throw_value(e.what());
    }
  }

  py::tuple attend(int64_t layer, py::handle q_obj, py::handle indices_obj, py::handle counts_obj, double scale,
                   py::handle out_obj, py::handle out_lse_obj) {
    KVStore& s = *store_;
    TensorArg q(q_obj, "q"), indices(indices_obj, "indices"), counts(counts_obj, "counts");
    q.expect_dtype({DType::kFloat32}).expect_ndim(3).expect_last_dim_contiguous();
    if (q.is_cuda())
      throw_value("q is on " + q.device().str() + ": KVStore.attend reads the rows in host memory and runs on the "
                  "CPU; with CUDA tensors, gather the rows to the device and attend there");
    q.expect_size(0, s.batch(), "batch of the store").expect_size(2, s.head_dim(), "head_dim of the store");
    const int64_t num_q_heads = q.size(1);
    if (num_q_heads % s.num_kv_heads() != 0)
      throw_value("q has " + std::to_string(num_q_heads) + " heads, not a multiple of the store's num_kv_heads " +
                  std::to_string(s.num_kv_heads()));
    if (!std::isfinite(scale)) throw_value("scale must be finite, got " + std::to_string(scale));
    indices.expect_dtype({DType::kInt32}).expect_ndim(3).expect_last_dim_contiguous();
    indices.expect_size(0, s.batch(), "batch of the store").expect_size(1, s.num_kv_heads(), "num_kv_heads of the store");
    indices.expect_cpu("KVStore.attend runs on the CPU");
    counts.expect_dtype({DType::kInt32}).expect_shape({s.batch(), s.num_kv_heads()}, "(batch, num_kv_heads) of the store");
    counts.expect_cpu("KVStore.attend runs on the CPU");
    Output out(out_obj, "out", q, {s.batch(), num_q_heads, s.head_dim()}, DType::kFloat32);
    Output lse(out_lse_obj, "out_lse", q, {s.batch(), num_q_heads}, DType::kFloat32);
    out.disjoint_from({&q, &indices, &counts});
    lse.disjoint_from({&q, &indices, &counts, &out.view});
    KVStore::AttendParams p;
    p.group_size = num_q_heads / s.num_kv_heads();
    p.scale = float(scale);
    p.q_stride[0] = q.stride(0), p.q_stride[1] = q.stride(1);
    p.indices_stride[0] = indices.stride(0), p.indices_stride[1] = indices.stride(1);
    p.counts_stride[0] = counts.stride(0), p.counts_stride[1] = counts.stride(1);
    p.out_stride[0] = out.view.stride(0), p.out_stride[1] = out.view.stride(1);
    p.lse_stride[0] = lse.view.stride(0), p.lse_stride[1] = lse.view.stride(1);
    auto lock = acquire();
    try {
      py::gil_scoped_release release;
      s.check_gather(layer, indices.data<int32_t>(), p.indices_stride, counts.data<int32_t>(), p.counts_stride,
                     indices.size(2));
      s.attend(layer, q.data<float>(), indices.data<int32_t>(), counts.data<int32_t>(), out.view.data<float>(),
               lse.view.data<float>(), p);
    } catch (const std::invalid_argument& e) {
      throw_value(e.what());
    }
    return py::make_tuple(out.object, lse.object);
  }

  py::array_t<int64_t> lengths() {
    auto lock = acquire();
    KVStore& s = *store_;
    py::array_t<int64_t> out({s.num_layers(), s.batch()});
    auto view = out.mutable_unchecked<2>();
    for (int64_t l = 0; l < s.num_layers(); ++l)
      for (int64_t b = 0; b < s.batch(); ++b) view(l, b) = s.length(l, b);
    return out;
  }

  void reset() {
    auto lock = acquire();
    refuse_if_owned("reset");
    store_->reset();
  }

  const KVStore& store() const { return *store_; }
  KVStore& store() { return *store_; }

  // A Pipeline keeps codes for exactly the rows of its store, so only it may change them while it
  // lives. set_owned is called with the store's lock held.
  void set_owned() {
    if (owned_) throw_value("store already belongs to another Pipeline; give each Pipeline its own KVStore");
    owned_ = true;
  }
  void release_owned() { owned_ = false; }
  void refuse_if_owned(const char* what) const {
    if (owned_)
      throw_value(std::string("this KVStore belongs to a Pipeline, which keeps codes for exactly its rows; ") + what +
                  " through the Pipeline (prefill, decode, reset) instead");
  }

  // Takes the store's lock with the GIL released. A thread holding the lock may be waiting to get
  // the GIL back (at the end of its gil_scoped_release), so waiting for the lock while holding the
  // GIL would deadlock two Python threads using one store.
  std::unique_lock<std::mutex> acquire() {
    std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
    py::gil_scoped_release release;
    lock.lock();
    return lock;
  }

 private:
  std::unique_ptr<KVStore> store_;
  std::mutex mutex_;
  std::atomic<bool> owned_{false};
};

// The device a Pipeline runs on: None or "cpu", "cuda" (the current device), "cuda:N", N, or
// anything whose str() is one of those (torch.device).
Device parse_pipeline_device(py::handle obj) {
  if (obj.is_none()) return Device{};
  std::string text = py::isinstance<py::int_>(obj) ? "cuda:" + std::to_string(obj.cast<int64_t>())
                                                   : std::string(py::str(obj));
  if (text == "cpu") return Device{};
  if (text.rfind("cuda", 0) != 0)
    throw_value("device must be None, \"cpu\", \"cuda\", \"cuda:N\" or a device index, got " + text);
#ifdef A2ATS_WITH_CUDA
  Device d{DeviceKind::kCUDA, 0};
  if (text != "cuda") {
    const std::string index = text.substr(text.rfind(':') + 1);
    if (text.size() < 6 || text[4] != ':' || index.empty() || index.size() > 6 ||
        index.find_first_not_of("0123456789") != std::string::npos)
      throw_value("device must be None, \"cpu\", \"cuda\", \"cuda:N\" or a device index, got " + text);
    d.index = std::stoi(index);
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver: no device
    count = 0;
  }
  if (count == 0 || d.index >= count)
    throw_value("device " + text + " is not available: cuda_device_count() is " + std::to_string(count));
  if (text == "cuda") check_cuda(cudaGetDevice(&d.index), "cudaGetDevice");  // the current device
  return d;
#else
  throw_value("device " + text + " needs CUDA, but this a2ats_core was built without it (built_with_cuda() is False)");
#endif
}

// Python-facing Pipeline: validates every array, then runs the step with the store's lock held
// and the GIL released. One class for both devices, as the ops: the CPU Pipeline or, with
// device="cuda...", the CudaPipeline.
class PyPipeline {
 public:
  PyPipeline(py::object store_obj, int64_t num_q_heads, py::handle inv_freq_obj, py::handle chol_obj,
             py::handle chol_inv_obj, py::handle centroids_obj, int64_t sink, int64_t window,
             std::vector<int64_t> wrope_distances, std::vector<int32_t> bin_edges, bool interleaved,
             py::handle device_obj)
      : store_obj_(std::move(store_obj)), py_store_(store_obj_.cast<PyKVStore&>()),
        device_(parse_pipeline_device(device_obj)) {
    KVStore& s = py_store_.store();
    const int64_t L = s.num_layers(), Hkv = s.num_kv_heads(), D = s.head_dim();
    TensorArg inv_freq(inv_freq_obj, "inv_freq"), chol(chol_obj, "chol"), chol_inv(chol_inv_obj, "chol_inv"),
        centroids(centroids_obj, "centroids");
    for (const TensorArg* t : {&inv_freq, &chol, &chol_inv, &centroids})
      t->expect_dtype({DType::kFloat32}).expect_contiguous().expect_cpu("the pipeline copies the codebook");
    inv_freq.expect_ndim(1);
    chol.expect_shape({L, Hkv, D, D}, "(num_layers, num_kv_heads, head_dim, head_dim) of the store");
    chol_inv.expect_shape({L, Hkv, D, D}, "the shape of chol");
    centroids.expect_ndim(5).expect_size(0, L, "num_layers of the store").expect_size(1, Hkv, "num_kv_heads of the store");
    const int64_t M = centroids.size(2), C = centroids.size(3);  // C checked by the Pipeline
    if (M < 1 || centroids.size(4) * M != D)
      throw_value("centroids must be (num_layers, num_kv_heads, M, C, head_dim / M), got " + centroids.shape_str());
    // Sizes and values (num_q_heads, C, inv_freq, sink, window, WRoPE distances, bins) are the
    // Pipeline's own checks, raised as ValueError below; here only what it cannot see: the arrays.
    const auto copy = [](const TensorArg& t) {
      return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
    };
    PipelineShape shape;
    shape.num_q_heads = num_q_heads; shape.rotary_dim = 2 * inv_freq.size(0); shape.interleaved = interleaved;
    shape.num_subspaces = M; shape.num_centroids = C; shape.sink = sink; shape.window = window;
    PipelineCodebook book{copy(chol), copy(chol_inv), copy(centroids), copy(inv_freq), std::move(wrope_distances),
                          std::move(bin_edges)};
    auto lock = py_store_.acquire();
    py_store_.set_owned();  // first: refuses a store another Pipeline has
    try {
      if (device_.kind == DeviceKind::kCPU) {
        cpu_ = std::make_unique<Pipeline>(s, shape, std::move(book));
      } else {
#ifdef A2ATS_WITH_CUDA
        int previous = 0;
        check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
        check_cuda(cudaSetDevice(device_.index), "cudaSetDevice");
        try {
          cuda_ = std::make_unique<CudaPipeline>(s, shape, std::move(book));
        } catch (...) {
          cudaSetDevice(previous);
          throw;
        }
        cudaSetDevice(previous);
#endif
      }
    } catch (const std::invalid_argument& e) {
      py_store_.release_owned();
      throw_value(e.what());
    } catch (...) {
      py_store_.release_owned();
      throw;
    }
  }

  // The store may outlive its pipeline (Python holds it too): it is an ordinary store again. No
  // lock: nothing else can be using a pipeline that is being destroyed, and owned_ is atomic.
  ~PyPipeline() {
#ifdef A2ATS_WITH_CUDA
    cuda_.reset();  // waits for rows in flight to the store
#endif
    py_store_.release_owned();
  }
  PyPipeline(const PyPipeline&) = delete;
  PyPipeline& operator=(const PyPipeline&) = delete;

  void prefill(int64_t layer, py::handle k_obj, py::handle v_obj, py::handle positions_obj, py::handle num_tokens_obj,
               py::handle stream_obj) {
    const KVStore& s = py_store_.store();
    TensorArg k(k_obj, "k"), v(v_obj, "v"), positions(positions_obj, "positions");
    const int64_t t = k.ndim() == 4 ? k.size(2) : 0;
    check_rows(k, {s.batch(), s.num_kv_heads(), t, s.head_dim()}, "(batch, num_kv_heads, new tokens, head_dim) of the store");
    check_rows(v, {s.batch(), s.num_kv_heads(), t, s.head_dim()}, "the shape of k");
    positions.expect_dtype({DType::kInt64}).expect_shape({s.batch(), t}, "(batch, new tokens) of k");
    expect_on_device(positions);
    std::optional<TensorArg> num_tokens;
    if (!num_tokens_obj.is_none()) {
      num_tokens.emplace(num_tokens_obj, "num_tokens");
      num_tokens->expect_dtype({DType::kInt32}).expect_shape({s.batch()}, "one count per batch row").expect_contiguous();
      num_tokens->expect_cpu("counts are read on the host");
    }
    const int64_t pos_stride[2] = {positions.stride(0), positions.stride(1)};
    const int32_t* counts = num_tokens ? num_tokens->data<int32_t>() : nullptr;
    auto lock = py_store_.acquire();
    if (cpu_) {
      run([&] { cpu_->prefill(layer, rows(k), rows(v), t, positions.data<int64_t>(), pos_stride, counts); });
      return;
    }
#ifdef A2ATS_WITH_CUDA
    CudaDeviceGuard guard(k);
    const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, k));
    run([&] {
      check_cuda(cuda_->prefill(layer, rows(k), rows(v), t, positions.data<int64_t>(), pos_stride, counts, stream),
                 "Pipeline.prefill");
    });
#endif
  }

  void plan(int64_t k) {
    auto lock = py_store_.acquire();
    run([&] {
      if (cpu_) cpu_->plan(k);
#ifdef A2ATS_WITH_CUDA
      else cuda_->plan(k);
#endif
    });
  }

  py::object decode(int64_t layer, py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle positions_obj,
                    double scale, py::handle out_obj, py::handle stream_obj) {
    const KVStore& s = py_store_.store();
    const int64_t B = s.batch(), Hkv = s.num_kv_heads(), D = s.head_dim(), Hq = base().shape().num_q_heads;
    TensorArg q(q_obj, "q"), k(k_obj, "k"), v(v_obj, "v"), positions(positions_obj, "positions");
    check_rows(q, {B, Hq, D}, "(batch, num_q_heads, head_dim) of the pipeline");
    check_rows(k, {B, Hkv, 1, D}, "(batch, num_kv_heads, 1, head_dim) of the store");
    check_rows(v, {B, Hkv, 1, D}, "the shape of k");
    positions.expect_dtype({DType::kInt64}).expect_shape({B}, "one position per batch row");
    expect_on_device(positions);
    if (!std::isfinite(scale)) throw_value("scale must be finite, got " + std::to_string(scale));
    Output out(out_obj, "out", q, {B, Hq, D}, s.dtype());
    out.disjoint_from({&q, &k, &v, &positions});
    const int64_t out_stride[2] = {out.view.stride(0), out.view.stride(1)};
    const ConstRows q_rows{q.data(), {q.stride(0), q.stride(1), 0}};
    auto lock = py_store_.acquire();
    if (cpu_) {
      run([&] {
        cpu_->decode(layer, q_rows, rows(k), rows(v), positions.data<int64_t>(), positions.stride(0), float(scale),
                     out.view.data(), out_stride);
      });
      return out.object;
    }
#ifdef A2ATS_WITH_CUDA
    CudaDeviceGuard guard(q);
    const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, q));
    run([&] {
      check_cuda(cuda_->decode(layer, q_rows, rows(k), rows(v), positions.data<int64_t>(), positions.stride(0),
                               float(scale), out.view.data(), out_stride, stream),
                 "Pipeline.decode");
    });
#endif
    return out.object;
  }

  py::array_t<int16_t> codes(int64_t layer) {
    const KVStore& s = py_store_.store();
    if (layer < 0 || layer >= s.num_layers())
      throw_value("layer must be in [0, " + std::to_string(s.num_layers()) + "), got " + std::to_string(layer));
    auto lock = py_store_.acquire();
    py::array_t<int16_t> out({s.batch(), s.num_kv_heads(), s.capacity(), base().shape().num_subspaces});
    copy_out(out.mutable_data(), cpu_ ? static_cast<const void*>(cpu_->codes(layer)) : device_codes(layer),
             size_t(out.size()) * sizeof(int16_t));
    return out;
  }

  py::tuple last_selection() {
    auto lock = py_store_.acquire();
    const KVStore& s = py_store_.store();
    if (base().stats().decode_calls == 0) throw_value("no decode step has run yet");
    int64_t kmax = 0;
    const int32_t *indices_src = nullptr, *counts_src = nullptr;
    if (cpu_) {
      kmax = cpu_->last_max_selected(); indices_src = cpu_->last_indices(); counts_src = cpu_->last_counts();
    }
#ifdef A2ATS_WITH_CUDA
    else {
      kmax = cuda_->last_max_selected(); indices_src = cuda_->last_indices(); counts_src = cuda_->last_counts();
    }
#endif
    py::array_t<int32_t> indices({s.batch(), s.num_kv_heads(), kmax}), counts({s.batch(), s.num_kv_heads()});
    copy_out(indices.mutable_data(), indices_src, size_t(indices.size()) * sizeof(int32_t));
    copy_out(counts.mutable_data(), counts_src, size_t(counts.size()) * sizeof(int32_t));
    return py::make_tuple(indices, counts);
  }

  py::dict stats() {
    auto lock = py_store_.acquire();
    const PipelineStats& st = base().stats();
    py::dict d;
    d["decode_calls"] = st.decode_calls;
    d["rows_read"] = st.rows_read;
    d["rows_fetched"] = st.rows_fetched;
    d["rows_cached"] = st.rows_cached;
    return d;
  }

  void reset() {
    auto lock = py_store_.acquire();
    if (cpu_) cpu_->reset();
#ifdef A2ATS_WITH_CUDA
    else cuda_->reset();
#endif
  }

  py::object store() const { return store_obj_; }
  const PipelineBase& base() const {
#ifdef A2ATS_WITH_CUDA
    if (cuda_) return *cuda_;
#endif
    return *cpu_;
  }
  std::string device() const { return device_.str(); }

 private:
  void expect_on_device(const TensorArg& t) const {
    if (!(t.device() == device_))
      throw_value(t.name() + " is on " + t.device().str() + " but the pipeline runs on " + device_.str() +
                  (device_.kind == DeviceKind::kCPU ? " (Pipeline(..., device=\"cuda\") runs on a GPU)" : ""));
  }
  void check_rows(const TensorArg& t, const std::vector<int64_t>& shape, const std::string& what) const {
    t.expect_dtype({py_store_.store().dtype()}).expect_shape(shape, what).expect_last_dim_contiguous();
    expect_on_device(t);
  }
  const void* device_codes(int64_t layer) const {
#ifdef A2ATS_WITH_CUDA
    return cuda_->codes(layer);
#else
    (void)layer;
    return nullptr;
#endif
  }
  // A host copy of pipeline memory (device memory on CUDA, after the device's work is done).
  void copy_out(void* dst, const void* src, size_t bytes) const {
    if (bytes == 0) return;
    if (cpu_) {
      std::memcpy(dst, src, bytes);
      return;
    }
#ifdef A2ATS_WITH_CUDA
    int previous = 0;
    check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
    check_cuda(cudaSetDevice(device_.index), "cudaSetDevice");
    const cudaError_t err = cudaDeviceSynchronize();
    const cudaError_t copy = err == cudaSuccess ? cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost) : err;
    cudaSetDevice(previous);
    check_cuda(copy, "copying pipeline state to the host");
#endif
  }
  static ConstRows rows(const TensorArg& t) {
    return ConstRows{t.data(), {t.stride(0), t.stride(1), t.ndim() > 3 ? t.stride(2) : 0}};
  }
  template <typename F> static void run(F&& f) {
    try {
      py::gil_scoped_release release;
      f();
    } catch (const std::invalid_argument& e) {
      throw_value(e.what());
    }
  }

  py::object store_obj_;  // keeps the store alive
  PyKVStore& py_store_;
  Device device_;
  std::unique_ptr<Pipeline> cpu_;
#ifdef A2ATS_WITH_CUDA
  std::unique_ptr<CudaPipeline> cuda_;
#endif
};


int cuda_device_count() {
#ifdef A2ATS_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(a2ats_core, m) {
  m.doc() = "Native kernels of a2ats (A²ATS): RoPE, VQ codes, LUT scores, top-K selection and the host KV store.\n\n"
            "Every check runs before anything is written: a refused call leaves its outputs and the store as they "
            "were. Outputs must not share memory with the inputs or with each other (rotary's out=x excepted); "
            "empty arrays are accepted whatever their strides.";
#ifdef A2ATS_VERSION
  m.attr("__version__") = A2ATS_VERSION;
#else
  m.attr("__version__") = "0.0.0";
#endif
  m.def("built_with_cuda", [] {
#ifdef A2ATS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible to this process (0 without CUDA or a driver).");
  m.def("num_threads", [] { return ThreadPool::global().num_threads(); },
        "Threads the CPU kernels use (A2ATS_NUM_THREADS or the core count).");

  m.def("rotary", &rotary, py::arg("x"), py::arg("positions"), py::arg("inv_freq"), py::kw_only(),
        py::arg("interleaved") = false, py::arg("out") = py::none(), py::arg("stream") = py::none(),
        R"doc(Rotate x (B, H, T, D) by positions (B, T) int32/int64 (may be negative) with inv_freq (R/2,) f32.

Dims >= R pass through. Pairs are (x[i], x[i + R/2]) as in transformers' rotate_half, or
(x[2i], x[2i+1]) when interleaved. Math in f32; out may be x itself. Returns out (B, H, T, D).)doc");
  m.def("vq_encode", &vq_encode, py::arg("x"), py::arg("centroids"), py::kw_only(), py::arg("out") = py::none(),
        py::arg("stream") = py::none(),
        R"doc(Codes (B, Hkv, T, M) int16 of whitened keys x (B, Hkv, T, D) under centroids (Hkv, M, C, D/M) f32.)doc");
  m.def("lut_scores", &lut_scores, py::arg("q"), py::arg("centroids"), py::arg("codes"), py::arg("lengths"),
        py::kw_only(), py::arg("bin_edges") = py::none(), py::arg("out") = py::none(), py::arg("stream") = py::none(),
        R"doc(Approximate scores (B, Hq, Tcap) f32 from codes (B, Hkv, Tcap, M) int16.

q (B, Hq, D) f32 in the dual space, or (B, Hq, NB, D) with bin_edges (NB - 1,) int32 ascending:
token n of row b at distance d = lengths[b] - 1 - n uses bin j = #{edges <= d}. lengths (B,) int32.
Scores are -inf at and past each length. A code outside [0, C) raises ValueError on CPU inputs; on
CUDA inputs (not read back to the host) it gives that token a NaN score, which select_topk ranks lowest.)doc");
  m.def("select_topk", &select_topk, py::arg("scores"), py::arg("k"), py::arg("lengths"), py::kw_only(),
        py::arg("group_size"), py::arg("sink"), py::arg("window"), py::arg("add_resident") = true,
        py::arg("out_indices") = py::none(), py::arg("out_counts") = py::none(), py::arg("stream") = py::none(),
        R"doc(Rows to attend over: (indices (B, Hkv, G*k + sink + window) int32 ascending, padded with -1; counts (B, Hkv) int32).

Per query head the top k of tokens [sink, length - window) (all when fewer), united over the
group_size heads of each KV head, plus the first sink and last window tokens. add_resident=False
leaves those out (indices (B, Hkv, G*k)): for a caller that holds the sink and window rows itself.)doc");

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
      .def("gather", &PyKVStore::gather, py::arg("layer"), py::arg("indices"), py::arg("counts"), py::arg("out_k"),
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

  py::class_<PyPipeline>(m, "Pipeline", R"doc(The A²ATS decode step of a model as one native call per layer (CPU or CUDA).

Pipeline(store, *, num_q_heads, inv_freq, chol, chol_inv, centroids, sink, window, wrope_distances,
bin_edges=(), interleaved=False, device=None) owns `store` (a KVStore: from then on only the pipeline
changes it) and keeps a code for every stored key. Codebook arrays are float32 CPU, copied (to the
device on CUDA): inv_freq (R/2,); chol, chol_inv (L, Hkv, D, D) with whitened = k_pre @ chol[l, g] and
chol_inv = chol^-1; centroids (L, Hkv, M, C, D/M). WRoPE: far tokens are scored at distance
wrope_distances[j] of their bin j = #{bin_edges <= d} (d = length - 1 - n; one distance and no edges
is the paper's method).

device: None or "cpu" attends the selected rows straight from the host store. "cuda", "cuda:N" or N
keeps the codes and the sink and window rows on that GPU, gathers the selected middle rows from the
host store through pinned double-buffered copies, and takes every array of prefill/decode on that
device (num_tokens stays on the host); its one host synchronisation per layer is the gather's index
copy (none when k = 0), and decode's new rows reach the host store in stream order.

Per step: plan(k) once, then decode(layer, ...) for every layer. Rows are those of the store: the
store's lengths are the one count of what the pipeline holds, codes included. Thread safety: every
method holds the store's lock for the whole call, as the store's own methods do; the steps of one
pipeline are a sequence, so share one only to read it (stats, codes) while another thread decodes.)doc")
      .def(py::init<py::object, int64_t, py::handle, py::handle, py::handle, py::handle, int64_t, int64_t,
                    std::vector<int64_t>, std::vector<int32_t>, bool, py::handle>(),
           py::arg("store"), py::kw_only(), py::arg("num_q_heads"), py::arg("inv_freq"), py::arg("chol"),
           py::arg("chol_inv"), py::arg("centroids"), py::arg("sink"), py::arg("window"), py::arg("wrope_distances"),
           py::arg("bin_edges") = std::vector<int32_t>{}, py::arg("interleaved") = false,
           py::arg("device") = py::none())
      .def("prefill", &PyPipeline::prefill, py::arg("layer"), py::arg("k"), py::arg("v"), py::arg("positions"),
           py::kw_only(), py::arg("num_tokens") = py::none(), py::arg("stream") = py::none(),
           R"doc(Store the first num_tokens[b] (all when None) rows of k, v (B, Hkv, t, D) of each batch row, keys
post-RoPE at positions (B, t) int64, and encode them: un-rotated, whitened, nearest centroid.)doc")
      .def("plan", &PyPipeline::plan, py::arg("k"),
           R"doc(Start a decode step selecting k middle rows per query head in every layer. Raises ValueError when the
layers hold different rows (an earlier step stopped partway: reset()) or a row is full.)doc")
      .def("decode", &PyPipeline::decode, py::arg("layer"), py::arg("q"), py::arg("k"), py::arg("v"),
           py::arg("positions"), py::kw_only(), py::arg("scale"), py::arg("out") = py::none(),
           py::arg("stream") = py::none(),
           R"doc(One decode step of `layer` → out (B, Hq, D) of the store's dtype.

q (B, Hq, D), k, v (B, Hkv, 1, D) post-RoPE at positions (B,) int64. Appends and encodes the new row,
scores every row from the codes with the WRoPE dual query, selects the top k per query head (united
per KV head) plus the sink and window rows, and attends exactly over them with q, softmax in float32.)doc")
      .def("codes", &PyPipeline::codes, py::arg("layer"), "Codes (B, Hkv, capacity, M) int16 of `layer` (a copy).")
      .def("last_selection", &PyPipeline::last_selection,
           R"doc((indices (B, Hkv, Kmax) int32, counts (B, Hkv) int32) the last decode call attended over (copies). On
CUDA only the middle rows (Kmax = G * k): the sink and window rows are resident on the device.)doc")
      .def("stats", &PyPipeline::stats, "Counters: decode_calls, rows_read, rows_fetched, rows_cached.")
      .def("reset", &PyPipeline::reset, "Forget every row (the store's too) and the current plan.")
      .def_property_readonly("store", &PyPipeline::store)
      .def_property_readonly("device", &PyPipeline::device, "\"cpu\" or \"cuda:N\".")
      .def_property_readonly("num_bins", [](const PyPipeline& p) { return p.base().num_bins(); })
      .def_property_readonly("planned_k", [](const PyPipeline& p) { return p.base().planned_k(); })
      .def_property_readonly("num_q_heads", [](const PyPipeline& p) { return p.base().shape().num_q_heads; });
}
