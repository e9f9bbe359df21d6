// a2ats_core: the module definition. Each op family binds itself in bindings/<family>.cpp, which
// validates every argument before a kernel runs; dispatch.h routes a call to the CPU or CUDA.
#include <pybind11/pybind11.h>

#include "a2ats/thread_pool.h"
#include "dispatch.h"

namespace py = pybind11;
using namespace a2ats;
using namespace a2ats::bind;

namespace {

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

  bind_rotary(m);
  bind_vq(m);
  bind_topk(m);
  bind_kv_store(m);
  bind_pipeline(m);
}
