// a2ats_core.Pipeline: the whole A²ATS decode step of a layer in one call
// (cpp/include/a2ats/pipeline.h; cuda/a2ats_cuda.h for the CudaPipeline).
#include "a2ats/pipeline.h"

#include "a2ats/paged_pipeline.h"

#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <optional>

#include "kv_store.h"

namespace a2ats::bind {
namespace {

// The device a Pipeline runs on: None or "cpu", "cuda" (the current device), "cuda:N", N, or
// anything whose str() is one of those (torch.device).
Device parse_pipeline_device(py::handle obj) {
  if (obj.is_none()) return Device{};
  std::string text =
      py::isinstance<py::int_>(obj) ? "cuda:" + std::to_string(obj.cast<int64_t>()) : std::string(py::str(obj));
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

// The shape and codebook of a Pipeline or PagedPipeline over `s`, from the Python arguments.
// Sizes and values (num_q_heads, C, inv_freq, sink, window, WRoPE distances, bins) are the native
// constructors' own checks, raised as ValueError; here only what they cannot see: the arrays.
std::pair<PipelineShape, PipelineCodebook> parse_setup(const KVStore& s, int64_t num_q_heads, py::handle inv_freq_obj,
                                                       py::handle chol_obj, py::handle chol_inv_obj,
                                                       py::handle centroids_obj, int64_t sink, int64_t window,
                                                       std::vector<int64_t> wrope_distances,
                                                       std::vector<int32_t> bin_edges, bool interleaved,
                                                       const std::string& budget_per) {
  const int64_t L = s.num_layers(), Hkv = s.num_kv_heads(), D = s.head_dim();
  TensorArg inv_freq(inv_freq_obj, "inv_freq"), chol(chol_obj, "chol"), chol_inv(chol_inv_obj, "chol_inv"),
      centroids(centroids_obj, "centroids");
  for (const TensorArg* t : {&inv_freq, &chol, &chol_inv, &centroids})
    t->expect_dtype({DType::kFloat32}).expect_contiguous().expect_cpu("the pipeline copies the codebook");
  inv_freq.expect_ndim(1);
  chol.expect_shape({L, Hkv, D, D}, "(num_layers, num_kv_heads, head_dim, head_dim) of the store");
  chol_inv.expect_shape({L, Hkv, D, D}, "the shape of chol");
  centroids.expect_ndim(5)
      .expect_size(0, L, "num_layers of the store")
      .expect_size(1, Hkv, "num_kv_heads of the store");
  const int64_t M = centroids.size(2), C = centroids.size(3);
  if (M < 1 || centroids.size(4) * M != D)
    throw_value("centroids must be (num_layers, num_kv_heads, M, C, head_dim / M), got " + centroids.shape_str());
  const auto copy = [](const TensorArg& t) { return std::vector<float>(t.data<float>(), t.data<float>() + t.numel()); };
  PipelineShape shape;
  shape.num_q_heads = num_q_heads;
  shape.rotary_dim = 2 * inv_freq.size(0);
  shape.interleaved = interleaved;
  if (budget_per != "query_head" && budget_per != "kv_head")
    throw_value("budget_per must be \"query_head\" or \"kv_head\", got \"" + budget_per + "\"");
  shape.budget_per_kv_head = budget_per == "kv_head";
  shape.num_subspaces = M;
  shape.num_centroids = C;
  shape.sink = sink;
  shape.window = window;
  PipelineCodebook book{
      copy(chol), copy(chol_inv), copy(centroids), copy(inv_freq), std::move(wrope_distances), std::move(bin_edges)};
  return {shape, std::move(book)};
}

// What the Python-facing Pipeline and PagedPipeline share: the store they serve, the device they
// run on, the device checks and host copies of their state.
class BoundPipeline {
 public:
  py::object store() const { return store_obj_; }
  std::string device() const { return device_.str(); }

 protected:
  BoundPipeline(py::object store_obj, py::handle device_obj)
      : store_obj_(std::move(store_obj)),
        py_store_(store_obj_.cast<PyKVStore&>()),
        device_(parse_pipeline_device(device_obj)) {}

  bool on_cpu() const { return device_.kind == DeviceKind::kCPU; }
  void expect_on_device(const TensorArg& t, const char* cls) const {
    if (!(t.device() == device_))
      throw_value(t.name() + " is on " + t.device().str() + " but the " + cls + " runs on " + device_.str() +
                  (on_cpu() ? std::string(" (") + cls + "(..., device=\"cuda\") runs on a GPU)" : ""));
  }
  // A host copy of pipeline memory (device memory on CUDA, after the device's work is done).
  void copy_out(void* dst, const void* src, size_t bytes) const {
    if (bytes == 0) return;
    if (on_cpu()) {
      std::memcpy(dst, src, bytes);
      return;
    }
#ifdef A2ATS_WITH_CUDA
    CudaDeviceGuard guard(device_.index);
    const cudaError_t err = cudaDeviceSynchronize();
    check_cuda(err == cudaSuccess ? cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost) : err,
               "copying pipeline state to the host");
#endif
  }
  static py::dict stats_dict(const PipelineStats& st) {
    py::dict d;
    d["decode_calls"] = st.decode_calls;
    d["rows_read"] = st.rows_read;
    d["rows_fetched"] = st.rows_fetched;
    d["rows_cached"] = st.rows_cached;
    return d;
  }

  py::object store_obj_;  // keeps the store alive
  PyKVStore& py_store_;
  Device device_;
};

// Python-facing Pipeline: validates every array, then runs the step with the store's lock held
// and the GIL released. One class for both devices, as the ops: the CPU Pipeline or, with
// device="cuda...", the CudaPipeline.
class PyPipeline : public BoundPipeline {
 public:
  PyPipeline(py::object store_obj, int64_t num_q_heads, py::handle inv_freq_obj, py::handle chol_obj,
             py::handle chol_inv_obj, py::handle centroids_obj, int64_t sink, int64_t window,
             std::vector<int64_t> wrope_distances, std::vector<int32_t> bin_edges, bool interleaved,
             const std::string& budget_per, py::handle device_obj)
      : BoundPipeline(std::move(store_obj), device_obj) {
    KVStore& s = py_store_.store();
    auto [shape, book] = parse_setup(s, num_q_heads, inv_freq_obj, chol_obj, chol_inv_obj, centroids_obj, sink, window,
                                     std::move(wrope_distances), std::move(bin_edges), interleaved, budget_per);
    auto lock = py_store_.acquire();
    py_store_.set_owned();  // first: refuses a store another Pipeline has
    try {
      if (device_.kind == DeviceKind::kCPU) {
        cpu_ = std::make_unique<Pipeline>(s, shape, std::move(book));
      } else {
#ifdef A2ATS_WITH_CUDA
        CudaDeviceGuard guard(device_.index);
        cuda_ = std::make_unique<CudaPipeline>(s, shape, std::move(book));
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
    check_rows(k, {s.batch(), s.num_kv_heads(), t, s.head_dim()},
               "(batch, num_kv_heads, new tokens, head_dim) of the store");
    check_rows(v, {s.batch(), s.num_kv_heads(), t, s.head_dim()}, "the shape of k");
    positions.expect_dtype({DType::kInt64}).expect_shape({s.batch(), t}, "(batch, new tokens) of k");
    expect_on_device(positions);
    std::optional<TensorArg> num_tokens;
    if (!num_tokens_obj.is_none()) {
      num_tokens.emplace(num_tokens_obj, "num_tokens");
      num_tokens->expect_dtype({DType::kInt32})
          .expect_shape({s.batch()}, "one count per batch row")
          .expect_contiguous();
      num_tokens->expect_cpu("counts are read on the host");
    }
    const int64_t pos_stride[2] = {positions.stride(0), positions.stride(1)};
    const int32_t* counts = num_tokens ? num_tokens->data<int32_t>() : nullptr;
    auto lock = py_store_.acquire();
    run_on_device(
        k, stream_obj, "Pipeline.prefill",
        [&] { cpu_->prefill(layer, rows(k), rows(v), t, positions.data<int64_t>(), pos_stride, counts); },
        A2ATS_ON_CUDA(
            cuda_->prefill(layer, rows(k), rows(v), t, positions.data<int64_t>(), pos_stride, counts, stream)));
  }

  void plan(int64_t k) {
    auto lock = py_store_.acquire();
    run_on_cpu([&] {
      if (cpu_)
        cpu_->plan(k);
#ifdef A2ATS_WITH_CUDA
      else
        cuda_->plan(k);
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
    run_on_device(
        q, stream_obj, "Pipeline.decode",
        [&] {
          cpu_->decode(layer, q_rows, rows(k), rows(v), positions.data<int64_t>(), positions.stride(0), float(scale),
                       out.view.data(), out_stride);
        },
        A2ATS_ON_CUDA(cuda_->decode(layer, q_rows, rows(k), rows(v), positions.data<int64_t>(), positions.stride(0),
                                    float(scale), out.view.data(), out_stride, stream)));
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
      kmax = cpu_->last_max_selected();
      indices_src = cpu_->last_indices();
      counts_src = cpu_->last_counts();
    }
#ifdef A2ATS_WITH_CUDA
    else {
      kmax = cuda_->last_max_selected();
      indices_src = cuda_->last_indices();
      counts_src = cuda_->last_counts();
    }
#endif
    py::array_t<int32_t> indices({s.batch(), s.num_kv_heads(), kmax}), counts({s.batch(), s.num_kv_heads()});
    copy_out(indices.mutable_data(), indices_src, size_t(indices.size()) * sizeof(int32_t));
    copy_out(counts.mutable_data(), counts_src, size_t(counts.size()) * sizeof(int32_t));
    return py::make_tuple(indices, counts);
  }

  py::dict stats() {
    auto lock = py_store_.acquire();
    return stats_dict(base().stats());
  }

  void reset() {
    auto lock = py_store_.acquire();
    if (cpu_) cpu_->reset();
#ifdef A2ATS_WITH_CUDA
    else
      cuda_->reset();
#endif
  }

  const PipelineBase& base() const {
#ifdef A2ATS_WITH_CUDA
    if (cuda_) return *cuda_;
#endif
    return *cpu_;
  }

 private:
  void expect_on_device(const TensorArg& t) const { BoundPipeline::expect_on_device(t, "Pipeline"); }
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
  static ConstRows rows(const TensorArg& t) {
    return ConstRows{t.data(), {t.stride(0), t.stride(1), t.ndim() > 3 ? t.stride(2) : 0}};
  }
  std::unique_ptr<Pipeline> cpu_;
#ifdef A2ATS_WITH_CUDA
  std::unique_ptr<CudaPipeline> cuda_;
#endif
};

// Python-facing PagedPipeline: validates every array, then runs with the store's lock held and
// the GIL released, the CPU PagedPipeline or, with device="cuda...", the CudaPagedPipeline. The
// store stays an ordinary slot-indexed store (the engine writes its rows with write_slots); the
// codes are the engine's paged cache, passed to every call.
class PyPagedPipeline : public BoundPipeline {
 public:
  PyPagedPipeline(py::object store_obj, int64_t num_q_heads, py::handle inv_freq_obj, py::handle chol_obj,
                  py::handle chol_inv_obj, py::handle centroids_obj, int64_t sink, int64_t window,
                  std::vector<int64_t> wrope_distances, std::vector<int32_t> bin_edges, bool interleaved,
                  const std::string& budget_per, py::handle device_obj)
      : BoundPipeline(std::move(store_obj), device_obj) {
    KVStore& s = py_store_.store();
    auto [shape, book] = parse_setup(s, num_q_heads, inv_freq_obj, chol_obj, chol_inv_obj, centroids_obj, sink, window,
                                     std::move(wrope_distances), std::move(bin_edges), interleaved, budget_per);
    auto lock = py_store_.acquire();
    try {
      if (on_cpu()) {
        cpu_ = std::make_unique<PagedPipeline>(s, shape, std::move(book));
      } else {
#ifdef A2ATS_WITH_CUDA
        CudaDeviceGuard guard(device_.index);
        cuda_ = std::make_unique<CudaPagedPipeline>(s, shape, std::move(book));
#endif
      }
    } catch (const std::invalid_argument& e) {
      throw_value(e.what());
    }
  }

  void encode(int64_t layer, py::handle k_obj, py::handle positions_obj, py::handle slots_obj, py::handle codes_obj,
              py::handle stream_obj) {
    const KVStore& s = py_store_.store();
    TensorArg k(k_obj, "k"), positions(positions_obj, "positions"), slots(slots_obj, "slots");
    const int64_t n = k.ndim() == 3 ? k.size(0) : 0;
    check_rows(k, {n, s.num_kv_heads(), s.head_dim()}, "(new tokens, num_kv_heads, head_dim) of the store");
    for (TensorArg* t : {&positions, &slots}) {
      t->expect_dtype({DType::kInt64}).expect_shape({n}, "one per row of k").expect_contiguous();
      expect_on_device(*t);
    }
    TensorArg codes(codes_obj, "codes");
    const PagedCodes paged = check_codes(codes);
    const ConstRows rows{k.data(), {k.stride(0), k.stride(1), 0}};
    const int64_t* pos = positions.data<int64_t>();
    const int64_t* to = slots.data<int64_t>();
    auto lock = py_store_.acquire();
    run_on_device(
        k, stream_obj, "PagedPipeline.encode", [&] { cpu_->encode(layer, rows, n, pos, to, paged); },
        A2ATS_ON_CUDA(cuda_->encode(layer, rows, n, pos, to, paged, stream)));
  }

  py::object decode(int64_t layer, py::handle q_obj, py::handle codes_obj, py::handle lengths_obj,
                    py::handle block_table_obj, py::handle k_obj, double scale, py::handle out_obj,
                    py::handle stream_obj) {
    const KVStore& s = py_store_.store();
    const int64_t Hq = base().shape().num_q_heads, D = s.head_dim();
    TensorArg q(q_obj, "q"), codes(codes_obj, "codes"), lengths(lengths_obj, "lengths"),
        block_table(block_table_obj, "block_table"), k(k_obj, "k");
    const int64_t n = q.ndim() == 3 ? q.size(0) : 0;
    check_rows(q, {n, Hq, D}, "(requests, num_q_heads, head_dim) of the pipeline");
    const PagedCodes paged = check_codes(codes);
    for (TensorArg* t : {&lengths, &k})
      t->expect_dtype({DType::kInt32})
          .expect_shape({n}, "one per request")
          .expect_contiguous()
          .expect_cpu("the step's plan is read on the host");
    block_table.expect_dtype({DType::kInt32}).expect_ndim(2).expect_size(0, n, "one row per request");
    block_table.expect_contiguous();
    expect_on_device(block_table);
    if (!std::isfinite(scale)) throw_value("scale must be finite, got " + std::to_string(scale));
    Output out(out_obj, "out", q, {n, Hq, D}, s.dtype());
    out.disjoint_from({&q, &codes, &lengths, &block_table, &k});
    const int64_t out_stride[2] = {out.view.stride(0), out.view.stride(1)};
    PagedRequests requests;
    requests.num_requests = n;
    requests.lengths = lengths.data<int32_t>();
    requests.block_table = block_table.data<int32_t>();
    requests.table_stride = block_table.size(1);
    requests.k = k.data<int32_t>();
    const ConstRows q_rows{q.data(), {q.stride(0), q.stride(1), 0}};
    auto lock = py_store_.acquire();
    run_on_device(
        q, stream_obj, "PagedPipeline.decode",
        [&] { cpu_->decode(layer, q_rows, requests, paged, float(scale), out.view.data(), out_stride); },
        A2ATS_ON_CUDA(
            cuda_->decode(layer, q_rows, requests, paged, float(scale), out.view.data(), out_stride, stream)));
    return out.object;
  }

  py::tuple last_selection() {
    auto lock = py_store_.acquire();
    const int64_t n = base().last_num_requests(), kmax = base().last_max_selected();
    const int64_t Hkv = py_store_.store().num_kv_heads();
    const int32_t *indices_src = nullptr, *counts_src = nullptr;
    if (cpu_) {
      indices_src = cpu_->last_indices();
      counts_src = cpu_->last_counts();
    }
#ifdef A2ATS_WITH_CUDA
    else {
      indices_src = cuda_->last_indices();
      counts_src = cuda_->last_counts();
    }
#endif
    py::array_t<int32_t> indices({n, Hkv, kmax}), counts({n, Hkv});
    copy_out(indices.mutable_data(), indices_src, size_t(indices.size()) * sizeof(int32_t));
    copy_out(counts.mutable_data(), counts_src, size_t(counts.size()) * sizeof(int32_t));
    return py::make_tuple(indices, counts);
  }

  py::dict stats() {
    auto lock = py_store_.acquire();
    return stats_dict(base().stats());
  }

  const PagedPipelineBase& base() const {
#ifdef A2ATS_WITH_CUDA
    if (cuda_) return *cuda_;
#endif
    return *cpu_;
  }

 private:
  void expect_on_device(const TensorArg& t) const { BoundPipeline::expect_on_device(t, "PagedPipeline"); }
  void check_rows(const TensorArg& t, const std::vector<int64_t>& shape, const std::string& what) const {
    t.expect_dtype({py_store_.store().dtype()}).expect_shape(shape, what).expect_last_dim_contiguous();
    expect_on_device(t);
  }
  PagedCodes check_codes(const TensorArg& codes) const {
    const KVStore& s = py_store_.store();
    codes.expect_dtype({DType::kInt16}).expect_ndim(4).expect_size(1, s.num_kv_heads(), "num_kv_heads of the store");
    codes.expect_size(3, base().shape().num_subspaces, "M of the codebook").expect_last_dim_contiguous();
    expect_on_device(codes);
    PagedCodes paged;
    paged.data = codes.data<int16_t>();
    paged.num_blocks = codes.size(0);
    paged.block_size = codes.size(2);
    paged.stride[0] = codes.stride(0);
    paged.stride[1] = codes.stride(1);
    paged.stride[2] = codes.stride(2);
    return paged;
  }
  std::unique_ptr<PagedPipeline> cpu_;
#ifdef A2ATS_WITH_CUDA
  std::unique_ptr<CudaPagedPipeline> cuda_;
#endif
};

}  // namespace

void bind_pipeline(py::module_& m) {
  py::class_<PyPipeline>(m, "Pipeline",
                         R"doc(The A²ATS decode step of a model as one native call per layer (CPU or CUDA).

Pipeline(store, *, num_q_heads, inv_freq, chol, chol_inv, centroids, sink, window, wrope_distances,
bin_edges=(), interleaved=False, budget_per="query_head", device=None) owns `store` (a KVStore: from then on only the pipeline
changes it) and keeps a code for every stored key. Codebook arrays are float32 CPU, copied (to the
device on CUDA): inv_freq (R/2,); chol, chol_inv (L, Hkv, D, D) with whitened = k_pre @ chol[l, g] and
chol_inv = chol^-1; centroids (L, Hkv, M, C, D/M). WRoPE: far tokens are scored at distance
wrope_distances[j] of their bin j = #{bin_edges <= d} (d = length - 1 - n; one distance and no edges
is the paper's method). budget_per: "query_head" selects k middle rows per query head and unites
them per KV head (the paper's; a KV head reads up to G k), "kv_head" selects k per KV head from
group_scores of its query heads (reads exactly k).

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
                    std::vector<int64_t>, std::vector<int32_t>, bool, const std::string&, py::handle>(),
           py::arg("store"), py::kw_only(), py::arg("num_q_heads"), py::arg("inv_freq"), py::arg("chol"),
           py::arg("chol_inv"), py::arg("centroids"), py::arg("sink"), py::arg("window"), py::arg("wrope_distances"),
           py::arg("bin_edges") = std::vector<int32_t>{}, py::arg("interleaved") = false,
           py::arg("budget_per") = "query_head", py::arg("device") = py::none())
      .def("prefill", &PyPipeline::prefill, py::arg("layer"), py::arg("k"), py::arg("v"), py::arg("positions"),
           py::kw_only(), py::arg("num_tokens") = py::none(), py::arg("stream") = py::none(),
           R"doc(Store the first num_tokens[b] (all when None) rows of k, v (B, Hkv, t, D) of each batch row, keys
post-RoPE at positions (B, t) int64, and encode them: un-rotated, whitened, nearest centroid.)doc")
      .def(
          "plan", &PyPipeline::plan, py::arg("k"),
          R"doc(Start a decode step selecting k middle rows per query head (per KV head with budget_per="kv_head") in every layer. Raises ValueError when the
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
      .def_property_readonly("num_q_heads", [](const PyPipeline& p) { return p.base().shape().num_q_heads; })
      .def_property_readonly(
          "budget_per",
          [](const PyPipeline& p) {
            return std::string(p.base().shape().budget_per_kv_head ? "kv_head" : "query_head");
          },
          "\"query_head\" or \"kv_head\" (see the class docstring).");

  py::class_<PyPagedPipeline>(
      m, "PagedPipeline",
      R"doc(The A²ATS decode step over a serving engine's paged cache, one native call per layer (CPU or CUDA).

PagedPipeline(store, *, num_q_heads, inv_freq, chol, chol_inv, centroids, sink, window, wrope_distances,
bin_edges=(), interleaved=False, budget_per="query_head", device=None) takes the codebook and device as
Pipeline does. `store` is
a slot-indexed KVStore (batch 1, capacity = the engine's slots) whose rows the engine writes with
write_slots; it stays an ordinary store. The codes are the engine's: every call takes codes
(num_blocks, Hkv, block_size, M) int16, the paged cache of the layer, where token t of a request lies
at slot block_table[t // block_size] * block_size + t % block_size, as its K/V rows do in the store.
On CUDA, k, q, positions, slots, codes, block_table and out live on the pipeline's device, lengths
and k (the budgets) on the host; the selected rows are gathered from the (pinned) store, one host
synchronisation per decode call.)doc")
      .def(py::init<py::object, int64_t, py::handle, py::handle, py::handle, py::handle, int64_t, int64_t,
                    std::vector<int64_t>, std::vector<int32_t>, bool, const std::string&, py::handle>(),
           py::arg("store"), py::kw_only(), py::arg("num_q_heads"), py::arg("inv_freq"), py::arg("chol"),
           py::arg("chol_inv"), py::arg("centroids"), py::arg("sink"), py::arg("window"), py::arg("wrope_distances"),
           py::arg("bin_edges") = std::vector<int32_t>{}, py::arg("interleaved") = false,
           py::arg("budget_per") = "query_head", py::arg("device") = py::none())
      .def("encode", &PyPagedPipeline::encode, py::arg("layer"), py::arg("k"), py::arg("positions"), py::arg("slots"),
           py::arg("codes"), py::kw_only(), py::arg("stream") = py::none(),
           R"doc(Encode keys k (n, Hkv, D), post-RoPE at positions (n,) int64 (un-rotated, whitened, nearest
centroid), into `codes` at slots (n,) int64; a negative slot skips its key.)doc")
      .def("decode", &PyPagedPipeline::decode, py::arg("layer"), py::arg("q"), py::arg("codes"), py::arg("lengths"),
           py::arg("block_table"), py::arg("k"), py::kw_only(), py::arg("scale"), py::arg("out") = py::none(),
           py::arg("stream") = py::none(),
           R"doc(One decode step of `layer` for N requests → out (N, Hq, D) of the store's dtype.

q (N, Hq, D) post-RoPE at position lengths[i] - 1; lengths (N,) int32 tokens in context, the new one
included (its K/V already written to the store, its code encoded); block_table (N, max_blocks) int32;
k (N,) int32 the middle rows each request selects per query head (per KV head with
budget_per="kv_head"). Scores every context token from the paged codes with the WRoPE dual query,
selects the top k plus the sink and window rows, and attends exactly over those slots of the store.)doc")
      .def("last_selection", &PyPagedPipeline::last_selection,
           R"doc((indices (N, Hkv, Kmax) int32, counts (N, Hkv) int32) the last decode call attended over, as token
indices of each request (not slots; copies).)doc")
      .def("stats", &PyPagedPipeline::stats, "Counters: decode_calls, rows_read, rows_fetched, rows_cached.")
      .def_property_readonly("store", &PyPagedPipeline::store)
      .def_property_readonly("device", &PyPagedPipeline::device, "\"cpu\" or \"cuda:N\".")
      .def_property_readonly("num_bins", [](const PyPagedPipeline& p) { return p.base().num_bins(); })
      .def_property_readonly("num_q_heads", [](const PyPagedPipeline& p) { return p.base().shape().num_q_heads; })
      .def_property_readonly(
          "budget_per",
          [](const PyPagedPipeline& p) {
            return std::string(p.base().shape().budget_per_kv_head ? "kv_head" : "query_head");
          },
          "\"query_head\" or \"kv_head\".");
}

}  // namespace a2ats::bind
