#include "tensor_view.h"

#include <algorithm>
#include <sstream>

namespace a2ats::bind {

[[noreturn]] void throw_value(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void throw_type(const std::string& msg) { throw py::type_error(msg); }

namespace {

constexpr int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3;
constexpr uint8_t kDLInt = 0, kDLFloat = 2, kDLBfloat = 4;

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

bool dtype_from_dl(DLDataType t, DType* out) {
  if (t.lanes != 1) return false;
  if (t.code == kDLFloat && t.bits == 32)
    *out = DType::kFloat32;
  else if (t.code == kDLFloat && t.bits == 16)
    *out = DType::kFloat16;
  else if (t.code == kDLBfloat && t.bits == 16)
    *out = DType::kBFloat16;
  else if (t.code == kDLInt && t.bits == 16)
    *out = DType::kInt16;
  else if (t.code == kDLInt && t.bits == 32)
    *out = DType::kInt32;
  else if (t.code == kDLInt && t.bits == 64)
    *out = DType::kInt64;
  else
    return false;
  return true;
}

// Python's spelling of a tuple: (2, 3), (4,), ().
std::string tuple_str(const std::vector<int64_t>& values) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < values.size(); ++i) os << (i ? ", " : "") << values[i];
  os << (values.size() == 1 ? ",)" : ")");
  return os.str();
}

std::string dl_dtype_str(DLDataType t) {
  const char* kind = t.code == kDLFloat    ? "float"
                     : t.code == kDLBfloat ? "bfloat"
                     : t.code == kDLInt    ? "int"
                     : t.code == 1         ? "uint"
                     : t.code == 6         ? "bool"
                                           : "code";
  return std::string(kind) + std::to_string(t.bits) + (t.lanes != 1 ? "x" + std::to_string(t.lanes) : "");
}

}  // namespace

TensorArg::TensorArg(py::handle obj, std::string name) : name_(std::move(name)) {
  if (!py::hasattr(obj, "__dlpack__") || !py::hasattr(obj, "__dlpack_device__"))
    throw_type(name_ + " must be an array exporting DLPack (torch.Tensor, numpy.ndarray), got " + type_name(obj));
  object_ = py::reinterpret_borrow<py::object>(obj);
  py::object capsule;
  try {
    py::tuple dev = obj.attr("__dlpack_device__")();
    const int dev_type = dev[0].cast<int>();
    // Kernels are ordered on the caller's stream, so the producer need not synchronise (-1).
    capsule = dev_type == kDLCUDA ? obj.attr("__dlpack__")(py::arg("stream") = -1) : obj.attr("__dlpack__")();
  } catch (py::error_already_set& e) {
    throw_type(name_ + " could not be viewed through DLPack: " + std::string(e.what()));
  }
  PyObject* cap = capsule.ptr();
  if (!PyCapsule_IsValid(cap, "dltensor"))
    throw_type(name_ + ": __dlpack__ returned something other than an unused 'dltensor' capsule");
  managed_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  PyCapsule_SetName(cap, "used_dltensor");  // we own it now and call its deleter
  const DLTensor& t = managed_->dl_tensor;
  if (t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost) {
    device_ = {DeviceKind::kCPU, 0};
  } else if (t.device.device_type == kDLCUDA) {
    device_ = {DeviceKind::kCUDA, t.device.device_id};
  } else {
    throw_type(name_ + " lives on an unsupported device (DLPack device type " + std::to_string(t.device.device_type) +
               "); expected cpu or cuda");
  }
  if (!dtype_from_dl(t.dtype, &dtype_))
    throw_type(name_ + " has unsupported dtype " + dl_dtype_str(t.dtype) +
               "; a2ats_core takes float32, float16, bfloat16, int16, int32 or int64");
  shape_.assign(t.shape, t.shape + t.ndim);
  strides_.resize(size_t(t.ndim));
  if (t.strides) {
    strides_.assign(t.strides, t.strides + t.ndim);
  } else {
    int64_t s = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      strides_[size_t(d)] = s;
      s *= shape_[size_t(d)];
    }
  }
  data_ = static_cast<char*>(t.data) + t.byte_offset;
}

TensorArg& TensorArg::operator=(TensorArg&& other) noexcept {
  if (this != &other) {
    if (managed_ && managed_->deleter) managed_->deleter(managed_);
    object_ = std::move(other.object_);
    name_ = std::move(other.name_);
    managed_ = other.managed_;
    other.managed_ = nullptr;
    data_ = other.data_;
    dtype_ = other.dtype_;
    device_ = other.device_;
    shape_ = std::move(other.shape_);
    strides_ = std::move(other.strides_);
  }
  return *this;
}

TensorArg::~TensorArg() {
  if (managed_ && managed_->deleter) managed_->deleter(managed_);
}

int64_t TensorArg::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

std::string TensorArg::shape_str() const { return tuple_str(shape_); }

const TensorArg& TensorArg::expect_dtype(std::initializer_list<DType> allowed) const {
  if (std::find(allowed.begin(), allowed.end(), dtype_) != allowed.end()) return *this;
  std::string names;
  for (DType d : allowed) names += (names.empty() ? "" : " or ") + std::string(dtype_name(d));
  throw_type(name_ + " must have dtype " + names + ", got " + dtype_name(dtype_));
}

const TensorArg& TensorArg::expect_ndim(int n) const {
  if (ndim() != n)
    throw_value(name_ + " must have " + std::to_string(n) + " dimensions, got " + std::to_string(ndim()) +
                " with shape " + shape_str());
  return *this;
}

const TensorArg& TensorArg::expect_size(int dim, int64_t size, const std::string& what) const {
  if (this->size(dim) != size)
    throw_value(name_ + ".shape[" + std::to_string(dim < 0 ? dim + ndim() : dim) + "] must be " + std::to_string(size) +
                " (" + what + "), got " + std::to_string(this->size(dim)) + " in shape " + shape_str());
  return *this;
}

const TensorArg& TensorArg::expect_shape(const std::vector<int64_t>& shape, const std::string& what) const {
  expect_ndim(int(shape.size()));
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape_[d] != shape[d])
      throw_value(name_ + " must have shape " + tuple_str(shape) + " (" + what + "), got " + shape_str());
  }
  return *this;
}

const TensorArg& TensorArg::expect_last_dim_contiguous() const {
  // An empty array touches no memory, whatever strides its producer gave it (numpy gives 0).
  if (numel() == 0) return *this;
  if (ndim() > 0 && size(-1) > 1 && stride(-1) != 1)
    throw_value(name_ + " must be contiguous in its last dimension (stride 1), got strides that step by " +
                std::to_string(stride(-1)) + "; pass a .contiguous() copy");
  for (int d = 0; d < ndim(); ++d)
    if (strides_[size_t(d)] < 0) throw_value(name_ + " has a negative stride, which a2ats_core does not accept");
  return *this;
}

const TensorArg& TensorArg::expect_contiguous() const {
  if (numel() == 0) return *this;
  int64_t expected = 1;
  for (int d = ndim() - 1; d >= 0; --d) {
    if (shape_[size_t(d)] != 1 && strides_[size_t(d)] != expected)
      throw_value(name_ + " must be contiguous (row-major); pass a .contiguous() copy");
    expected *= shape_[size_t(d)];
  }
  return *this;
}

const TensorArg& TensorArg::expect_device(const Device& device, const TensorArg& reference) const {
  if (!(device_ == device))
    throw_value(name_ + " is on " + device_.str() + " but " + reference.name() + " is on " + device.str() +
                "; all arrays of one call must be on the same device");
  return *this;
}

const TensorArg& TensorArg::expect_cpu(const std::string& why) const {
  if (device_.kind != DeviceKind::kCPU) throw_value(name_ + " must be a CPU array (" + why + "), got " + device_.str());
  return *this;
}

const TensorArg& TensorArg::expect_no_internal_overlap() const {
  if (numel() == 0) return *this;
  for (int d = 0; d < ndim(); ++d)
    if (shape_[size_t(d)] > 1 && strides_[size_t(d)] == 0)
      throw_value(name_ + " has stride 0 in dimension " + std::to_string(d) +
                  " (an expanded view), so several of "
                  "its elements share memory; pass a separate array");
  // Dimensions by stride: each must step past everything the smaller ones span, or two index
  // tuples can name one element (a sufficient test; every dense or sliced layout passes it).
  std::vector<int> dims;
  for (int d = 0; d < ndim(); ++d)
    if (shape_[size_t(d)] > 1) dims.push_back(d);
  std::sort(dims.begin(), dims.end(), [&](int a, int b) { return strides_[size_t(a)] < strides_[size_t(b)]; });
  int64_t span = 0;  // largest offset the smaller dimensions reach
  for (int d : dims) {
    if (strides_[size_t(d)] <= span)
      throw_value(name_ + " has strides " + tuple_str(strides_) + " for shape " + shape_str() +
                  ", under which several of its elements share memory; pass a separate array");
    span += (shape_[size_t(d)] - 1) * strides_[size_t(d)];
  }
  return *this;
}

namespace {

// Byte intervals [begin, end) of the contiguous runs of `t`'s elements (its innermost
// dimension when that has stride 1, single elements otherwise), sorted by begin.
std::vector<std::pair<uintptr_t, uintptr_t>> byte_runs(const TensorArg& t) {
  std::vector<std::pair<uintptr_t, uintptr_t>> runs;
  const int nd = t.ndim();
  if (t.numel() == 0) return runs;
  const int64_t elem = dtype_size(t.dtype());
  const bool inner_run = nd > 0 && t.stride(nd - 1) == 1;
  const int outer = inner_run ? nd - 1 : nd;
  const int64_t run_bytes = inner_run ? t.size(nd - 1) * elem : elem;
  std::vector<int64_t> index(size_t(outer), 0);
  const auto base = reinterpret_cast<uintptr_t>(t.data());
  while (true) {
    int64_t offset = 0;
    for (int d = 0; d < outer; ++d) offset += index[size_t(d)] * t.stride(d);
    const uintptr_t begin = base + uintptr_t(offset * elem);
    runs.emplace_back(begin, begin + uintptr_t(run_bytes));
    int d = outer - 1;
    for (; d >= 0; --d) {
      if (++index[size_t(d)] < t.size(d)) break;
      index[size_t(d)] = 0;
    }
    if (d < 0) break;
  }
  std::sort(runs.begin(), runs.end());
  return runs;
}

}  // namespace

void expect_disjoint(const TensorArg& out, const TensorArg& other) {
  if (!(out.device() == other.device()) || out.numel() == 0 || other.numel() == 0) return;
  const auto a = out.byte_range(), b = other.byte_range();
  if (a.second <= b.first || b.second <= a.first) return;
  // The spans meet; interleaved views (the K and V halves of one buffer) may still be
  // disjoint, so compare their actual runs. Only this rare case pays for it.
  const auto ra = byte_runs(out), rb = byte_runs(other);
  for (size_t i = 0, j = 0; i < ra.size() && j < rb.size();) {
    if (ra[i].first < rb[j].second && rb[j].first < ra[i].second)
      throw_value(out.name() + " overlaps " + other.name() +
                  " in memory; outputs must not share memory with "
                  "the inputs or with each other; pass a separate array");
    if (ra[i].second <= rb[j].second)
      ++i;
    else
      ++j;
  }
}

std::pair<uintptr_t, uintptr_t> TensorArg::byte_range() const {
  const auto base = reinterpret_cast<uintptr_t>(data_);
  if (numel() == 0) return {base, base};
  int64_t last = 0;
  for (int d = 0; d < ndim(); ++d) last += (shape_[size_t(d)] - 1) * strides_[size_t(d)];
  return {base, base + uintptr_t((last + 1) * dtype_size(dtype_))};
}

py::object empty_like_framework(const TensorArg& like, const std::vector<int64_t>& shape, DType dtype) {
  py::tuple py_shape(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) py_shape[i] = py::int_(shape[i]);
  const std::string module = py::str(py::type::handle_of(like.object()).attr("__module__"));
  if (module.rfind("torch", 0) == 0) {
    py::module_ torch = py::module_::import("torch");
    return torch.attr("empty")(py_shape, py::arg("dtype") = torch.attr(dtype_name(dtype)),
                               py::arg("device") = like.object().attr("device"));
  }
  if (module.rfind("numpy", 0) == 0 && !like.is_cuda() && dtype != DType::kBFloat16) {
    return py::module_::import("numpy").attr("empty")(py_shape, py::arg("dtype") = dtype_name(dtype));
  }
  throw_type("cannot allocate an output like " + like.name() + " (a " + module +
             " array); pass the output explicitly with out=");
}

uintptr_t resolve_stream(py::handle stream, const TensorArg& like) {
  if (!like.is_cuda()) return 0;
  if (!stream.is_none()) {
    if (!py::isinstance<py::int_>(stream))
      throw_type("stream must be an int (a cudaStream_t handle such as torch.cuda.Stream.cuda_stream), got " +
                 std::string(py::str(py::type::handle_of(stream).attr("__name__"))));
    return stream.cast<uintptr_t>();
  }
  const std::string module = py::str(py::type::handle_of(like.object()).attr("__module__"));
  if (module.rfind("torch", 0) == 0) {
    py::object current = py::module_::import("torch").attr("cuda").attr("current_stream")(like.object().attr("device"));
    return current.attr("cuda_stream").cast<uintptr_t>();
  }
  return 0;
}

}  // namespace a2ats::bind
