// What every binding shares: the route of one call to the CPU or the CUDA kernel, output
// allocation, and the argument checks that several op families repeat.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "a2ats/common.h"
#include "tensor_view.h"

#ifdef A2ATS_WITH_CUDA
#include "a2ats_cuda.h"
#endif

namespace a2ats::bind {

constexpr int64_t kInt32Max = 2147483647;

inline const std::initializer_list<DType> kFloatTypes = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// Wraps an optional `out=` argument, allocating like `like` when it is None.
struct Output {
  py::object object;
  TensorArg view;
  Output(py::handle out, const char* name, const TensorArg& like, const std::vector<int64_t>& shape, DType dtype);
  // Refuses an output that shares memory with any of `inputs` (or earlier outputs).
  const Output& disjoint_from(std::initializer_list<const TensorArg*> inputs) const;
};

// Raises ValueError for a CUDA array given to a build without CUDA.
[[noreturn]] void no_cuda(const TensorArg& t);

// lengths (B,) int32 with 0 <= lengths[b] <= capacity; the values are checked for CPU arrays.
void check_lengths(const TensorArg& lengths, int64_t batch, int64_t capacity, const TensorArg& like);

void expect_nonnegative(int64_t value, const char* name);

// The stream argument of a launcher: a cudaStream_t with CUDA, nothing without it.
#ifdef A2ATS_WITH_CUDA
using Stream = cudaStream_t;

void check_cuda(cudaError_t err, const char* what);

// Makes the device of `t` current for one call (kernels, scratch memory and the stream belong
// to it) and restores the caller's device afterwards.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const TensorArg& t) : CudaDeviceGuard(t.device().index) {}
  explicit CudaDeviceGuard(int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// The CUDA half of run_on_device: a lambda of the stream returning the launcher's cudaError_t.
// Without CUDA the expression is not compiled at all (its launchers do not exist there).
#define A2ATS_ON_CUDA(...) [&](::a2ats::bind::Stream stream) -> cudaError_t { return __VA_ARGS__; }
#else
using Stream = void*;
#define A2ATS_ON_CUDA(...) nullptr
#endif

// Runs f() with the GIL released; a kernel's std::invalid_argument (what it does not support)
// becomes a ValueError.
template <typename F>
void run_on_cpu(F&& f) {
  try {
    py::gil_scoped_release release;
    f();
  } catch (const std::invalid_argument& e) {
    throw_value(e.what());
  }
}

// Runs one call of an op on the device of `like`, with the GIL released either way:
//  - CPU: on_cpu();
//  - CUDA: on_cuda(stream) with like's device current and `stream` resolved from stream_obj (or
//    the producing framework's current stream); its cudaError_t becomes a RuntimeError naming `what`.
template <typename OnCpu, typename OnCuda>
void run_on_device(const TensorArg& like, py::handle stream_obj, const char* what, OnCpu&& on_cpu, OnCuda&& on_cuda) {
  if (!like.is_cuda()) return run_on_cpu(on_cpu);
#ifdef A2ATS_WITH_CUDA
  CudaDeviceGuard guard(like);
  const auto stream = reinterpret_cast<cudaStream_t>(resolve_stream(stream_obj, like));
  cudaError_t err = cudaSuccess;
  run_on_cpu([&] { err = on_cuda(stream); });  // the host side of the launch, GIL released too
  check_cuda(err, what);
#else
  (void)stream_obj, (void)what, (void)on_cuda;
  no_cuda(like);
#endif
}

// Registration of each op family, one per bindings/*.cpp.
void bind_rotary(py::module_& m);
void bind_vq(py::module_& m);
void bind_topk(py::module_& m);
void bind_kv_store(py::module_& m);
void bind_pipeline(py::module_& m);

}  // namespace a2ats::bind
