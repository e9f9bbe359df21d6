#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "a2ats/common.h"

namespace a2ats {
namespace {

// -1 until the first active_isa(); then the Isa in use.
std::atomic<int> g_active{-1};

std::string supported_list() {
  std::string names;
  for (int level = 0; level <= int(best_isa()); ++level) names += std::string(level ? ", " : "") + isa_name(Isa(level));
  return names;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kBaseline:
      return "baseline";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

Isa parse_isa(const char* name, const char* what) {
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512})
    if (std::strcmp(name, isa_name(isa)) == 0) return isa;
  throw std::invalid_argument(std::string(what) + " must be baseline, avx2 or avx512, got \"" + name + "\"");
}

Isa best_isa() {
#if A2ATS_HAS_ISA_CLONES
  // The same feature sets GCC's arch=x86-64-v3 / -v4 clones are compiled for.
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
    if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return best;
#else
  return Isa::kBaseline;  // no clones in this build
#endif
}

void set_isa(Isa isa) {
  if (int(isa) > int(best_isa()))
    throw std::invalid_argument(std::string("ISA level ") + isa_name(isa) + " is not supported by this CPU or build (" +
                                "supported: " + supported_list() + ")");
  g_active.store(int(isa), std::memory_order_relaxed);
}

Isa active_isa() {
  const int active = g_active.load(std::memory_order_relaxed);
  if (active >= 0) return Isa(active);
  const char* env = std::getenv("A2ATS_ISA");
  if (!env || !*env) {
    g_active.store(int(best_isa()), std::memory_order_relaxed);
    return best_isa();
  }
  const Isa wanted = parse_isa(env, "A2ATS_ISA");
  if (int(wanted) > int(best_isa()))
    throw std::invalid_argument(std::string("A2ATS_ISA=") + env +
                                " is not supported by this CPU or build (supported: " + supported_list() + ")");
  g_active.store(int(wanted), std::memory_order_relaxed);
  return wanted;
}

}  // namespace a2ats
