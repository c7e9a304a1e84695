// Chooses the variant of the CPU hot loops (strip_kernels.h) once per process: MMLOSS_CPU_ISA
// forces one by name, else the widest this CPU supports (cpuid, __builtin_cpu_supports). The
// build compiles strip_kernels.cpp once per variant and defines MMLOSS_CPU_WITH_<VARIANT>.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "strip_kernels.h"

namespace mmloss {

#ifdef MMLOSS_CPU_WITH_AVX512
namespace avx512 { const StripKernels* kernels(); }
#endif
#ifdef MMLOSS_CPU_WITH_AVX2
namespace avx2 { const StripKernels* kernels(); }
#endif
#ifdef MMLOSS_CPU_WITH_BASELINE
namespace baseline { const StripKernels* kernels(); }
#endif
#ifdef MMLOSS_CPU_WITH_GENERIC
namespace generic { const StripKernels* kernels(); }
#endif
#ifdef MMLOSS_CPU_WITH_NATIVE
namespace native { const StripKernels* kernels(); }
#endif

namespace {

struct Variant {
  const char* name;
  const StripKernels* (*kernels)();
  bool (*supported)();
  const char* needs;  // what the CPU must have, for the error message
};

[[maybe_unused]] bool always() { return true; }
#if defined(__x86_64__)
[[maybe_unused]] bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
[[maybe_unused]] bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
}
#endif

// The compiled variants, widest first.
const std::vector<Variant>& variants() {
  static const std::vector<Variant> all = {
#ifdef MMLOSS_CPU_WITH_NATIVE
      {"native", native::kernels, always, "the build machine's instruction set"},
#endif
#ifdef MMLOSS_CPU_WITH_AVX512
      {"avx512", avx512::kernels, has_avx512, "AVX-512 F/DQ/VL/BW, AVX2 and FMA"},
#endif
#ifdef MMLOSS_CPU_WITH_AVX2
      {"avx2", avx2::kernels, has_avx2, "AVX2 and FMA"},
#endif
#ifdef MMLOSS_CPU_WITH_BASELINE
      {"baseline", baseline::kernels, always, "x86-64"},
#endif
#ifdef MMLOSS_CPU_WITH_GENERIC
      {"generic", generic::kernels, always, "nothing"},
#endif
  };
  return all;
}

std::string names() {
  std::string out;
  for (const Variant& v : variants()) out += (out.empty() ? "" : ", ") + std::string(v.name);
  return out;
}

const StripKernels* choose() {
  const char* forced = std::getenv("MMLOSS_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    for (const Variant& v : variants()) {
      if (std::strcmp(v.name, forced) != 0) continue;
      TORCH_CHECK(v.supported(), "MMLOSS_CPU_ISA=", forced, ": this CPU lacks ", v.needs);
      return v.kernels();
    }
    TORCH_CHECK(false, "MMLOSS_CPU_ISA=", forced, " is not a CPU kernel variant of this build (compiled: ", names(),
                ")");
  }
  for (const Variant& v : variants())
    if (v.supported()) return v.kernels();
  TORCH_CHECK(false, "no CPU kernel variant of this build runs on this CPU (compiled: ", names(), ")");
}

}  // namespace

const StripKernels& strip_kernels() {
  static const StripKernels* chosen = choose();  // a failed choice (an error) is retried
  return *chosen;
}

std::vector<std::pair<std::string, bool>> cpu_isas() {
  std::vector<std::pair<std::string, bool>> out;
  for (const Variant& v : variants()) out.emplace_back(v.name, v.supported());
  return out;
}

}  // namespace mmloss
