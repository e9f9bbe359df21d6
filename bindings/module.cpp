// a2ats_core: the module definition. Each op family binds itself in bindings/<family>.cpp, which
// validates every argument before a kernel runs; dispatch.h routes a call to the CPU or CUDA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

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
  m.doc() =
      "Native kernels of a2ats (A²ATS): RoPE, VQ codes, LUT scores, top-K selection and the host KV store.\n\n"
      "Every check runs before anything is written: a refused call leaves its outputs and the store as they "
      "were. Outputs must not share memory with the inputs or with each other (rotary's out=x excepted); "
      "empty arrays are accepted whatever their strides.";
#ifdef A2ATS_VERSION
  m.attr("__version__") = A2ATS_VERSION;
#else
  m.attr("__version__") = "0.0.0";
#endif
  m.def(
      "built_with_cuda",
      [] {
#ifdef A2ATS_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled in.");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible to this process (0 without CUDA or a driver).");
  m.def(
      "num_threads", [] { return ThreadPool::global().num_threads(); },
      "Threads the CPU kernels use (A2ATS_NUM_THREADS or the core count).");

  // An unknown or unsupported A2ATS_ISA refuses the import rather than the first kernel call.
  try {
    active_isa();
  } catch (const std::invalid_argument& e) {
    throw py::import_error(e.what());
  }
  m.def(
      "isa", [] { return std::string(isa_name(active_isa())); },
      R"doc(The ISA level the CPU kernels' hot loops run at: "baseline" (x86-64), "avx2" (x86-64-v3) or
"avx512" (x86-64-v4). A2ATS_ISA picks it at import; by default the best the CPU supports.)doc");
  m.def(
      "supported_isas",
      [] {
        std::vector<std::string> names;
        for (int level = 0; level <= int(best_isa()); ++level) names.push_back(isa_name(Isa(level)));
        return names;
      },
      "ISA levels this CPU and build support, lowest first (only \"baseline\" off x86-64 Linux with GCC).");
  m.def(
      "set_isa",
      [](const std::string& name) {
        try {
          set_isa(parse_isa(name.c_str(), "isa"));
        } catch (const std::invalid_argument& e) {
          throw_value(e.what());
        }
      },
      py::arg("isa"),
      R"doc(Run later CPU kernel calls at ISA level `isa` (see isa()); ValueError for a level the CPU lacks.
For tests and diagnostics: results may differ in the last bits between levels (FMA contraction).)doc");

  bind_rotary(m);
  bind_vq(m);
  bind_topk(m);
  bind_kv_store(m);
  bind_pipeline(m);
}
