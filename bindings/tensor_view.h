// Zero-copy views of DLPack-exporting Python objects (torch.Tensor, numpy.ndarray, ...)
// and the argument checks every binding performs before calling a kernel.
//
// Each check raises a Python TypeError (wrong kind of thing: type, dtype, device) or
// ValueError (wrong shape, stride or value) whose message names the argument, says what
// was expected and what came.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "a2ats/common.h"

namespace a2ats::bind {

namespace py = pybind11;

// The stable DLPack ABI (v0.x "dltensor" capsules), declared here to stay dependency-free.
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

enum class DeviceKind { kCPU, kCUDA };

struct Device {
  DeviceKind kind = DeviceKind::kCPU;
  int index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  std::string str() const { return kind == DeviceKind::kCPU ? "cpu" : "cuda:" + std::to_string(index); }
};

// A borrowed view of one array argument; keeps the producer's buffer alive while it exists.
class TensorArg {
 public:
  TensorArg() = default;
  TensorArg(py::handle obj, std::string name);
  TensorArg(TensorArg&& other) noexcept { *this = std::move(other); }
  TensorArg& operator=(TensorArg&& other) noexcept;
  TensorArg(const TensorArg&) = delete;
  TensorArg& operator=(const TensorArg&) = delete;
  ~TensorArg();

  const std::string& name() const { return name_; }
  py::handle object() const { return object_; }
  template <typename T = void>
  T* data() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  const Device& device() const { return device_; }
  bool is_cuda() const { return device_.kind == DeviceKind::kCUDA; }
  int ndim() const { return int(shape_.size()); }
  int64_t size(int dim) const { return shape_[size_t(dim < 0 ? dim + ndim() : dim)]; }
  int64_t stride(int dim) const { return strides_[size_t(dim < 0 ? dim + ndim() : dim)]; }
  int64_t numel() const;
  std::string shape_str() const;

  // Checks; each throws py::type_error / py::value_error naming this argument.
  const TensorArg& expect_dtype(std::initializer_list<DType> allowed) const;
  const TensorArg& expect_ndim(int n) const;
  const TensorArg& expect_size(int dim, int64_t size, const std::string& what) const;
  const TensorArg& expect_shape(const std::vector<int64_t>& shape, const std::string& what) const;
  const TensorArg& expect_last_dim_contiguous() const;
  const TensorArg& expect_contiguous() const;
  const TensorArg& expect_device(const Device& device, const TensorArg& reference) const;
  const TensorArg& expect_cpu(const std::string& why) const;
  // Refuses stride 0 over a dimension of size > 1: writes through such a view would collide.
  const TensorArg& expect_no_internal_overlap() const;
  // Byte range [lo, hi) this view can touch; used to reject partially overlapping outputs.
  std::pair<uintptr_t, uintptr_t> byte_range() const;

 private:
  py::object object_;
  std::string name_;
  DLManagedTensor* managed_ = nullptr;
  void* data_ = nullptr;
  DType dtype_ = DType::kFloat32;
  Device device_;
  std::vector<int64_t> shape_, strides_;
};

// Raises ValueError naming both when `out` shares memory with `other` (same device only).
void expect_disjoint(const TensorArg& out, const TensorArg& other);

// A fresh array of the same framework as `like` (torch.Tensor -> torch.empty on its device,
// numpy -> numpy.empty); other producers must pass `out=` explicitly.
py::object empty_like_framework(const TensorArg& like, const std::vector<int64_t>& shape, DType dtype);

// The CUDA stream to run on: the given int, else the current stream of the framework that
// produced `like` (torch.cuda.current_stream), else 0. Always 0 for CPU tensors.
uintptr_t resolve_stream(py::handle stream, const TensorArg& like);

[[noreturn]] void throw_value(const std::string& msg);
[[noreturn]] void throw_type(const std::string& msg);

}  // namespace a2ats::bind
