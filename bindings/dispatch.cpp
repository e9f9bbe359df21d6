#include "dispatch.h"

namespace a2ats::bind {

Output::Output(py::handle out, const char* name, const TensorArg& like, const std::vector<int64_t>& shape,
               DType dtype) {
  object = out.is_none() ? empty_like_framework(like, shape, dtype) : py::reinterpret_borrow<py::object>(out);
  view = TensorArg(object, name);
  view.expect_dtype({dtype}).expect_shape(shape, "the output shape").expect_last_dim_contiguous();
  view.expect_no_internal_overlap().expect_device(like.device(), like);
}

const Output& Output::disjoint_from(std::initializer_list<const TensorArg*> inputs) const {
  for (const TensorArg* input : inputs)
    if (input) expect_disjoint(view, *input);
  return *this;
}

[[noreturn]] void no_cuda(const TensorArg& t) {
  throw_value(t.name() + " is on " + t.device().str() +
              " but this a2ats_core was built without CUDA (built_with_cuda() is False); pass CPU arrays");
}

void expect_nonnegative(int64_t value, const char* name) {
  if (value < 0) throw_value(std::string(name) + " must be >= 0, got " + std::to_string(value));
}

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

#ifdef A2ATS_WITH_CUDA
void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
  }
}

CudaDeviceGuard::CudaDeviceGuard(int device) {
  check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    switched_ = true;
  }
}

CudaDeviceGuard::~CudaDeviceGuard() {
  if (switched_) cudaSetDevice(previous_);
}
#endif

}  // namespace a2ats::bind
