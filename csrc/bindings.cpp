// pybind11 module mmloss._C: the similarity kernels and what was compiled. The core op's
// kernels are torch.library ops (ops.cpp), registered when this module loads.
#include <torch/extension.h>

#include "cpu/contrastive_cpu.h"
#include "cpu/gemm16.h"
#include "cpu/strip_kernels.h"
#include "cpu/similarity_cpu.h"

#ifndef MMLOSS_CUDA_ARCHS
#define MMLOSS_CUDA_ARCHS ""
#endif

namespace {

bool has_cuda() {
#ifdef MMLOSS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Compiled CUDA architectures, e.g. [80, 90]; empty without CUDA.
std::vector<int> cuda_archs() {
  std::vector<int> archs;
  std::string list = MMLOSS_CUDA_ARCHS;
  size_t start = 0;
  while (has_cuda() && start < list.size()) {
    size_t end = list.find(';', start);
    if (end == std::string::npos) end = list.size();
    if (end > start) archs.push_back(std::stoi(list.substr(start, end - start)));
    start = end + 1;
  }
  return archs;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmloss compiled kernels";
  m.def("similarity_cpu", &mmloss::similarity_cpu, "Cosine (or dot) similarity matrix into out",
        py::arg("a"), py::arg("b"), py::arg("normalize"), py::arg("out"), py::arg("strip_rows"));
  m.def("topk_similarity_cpu", &mmloss::topk_similarity_cpu, "Streaming top-k similarity",
        py::arg("q"), py::arg("k"), py::arg("k_top"), py::arg("normalize"), py::arg("strip_rows"),
        py::arg("block_cols"));
  m.def("openmp_threads", &mmloss::openmp_threads, "Threads OpenMP would use");
  m.def("cpu_isa", [] { return std::string(mmloss::strip_kernels().isa); }, "The CPU kernels' instruction set that runs");
  m.def("cpu_gemm16", [] { return std::string(mmloss::gemm16_path()); },
        "The GEMMs bf16 inputs take here: brgemm-bf16 (16-bit, fp32 accumulation) or fp32 (upcast)");
  m.def("cpu_isas", &mmloss::cpu_isas, "Compiled CPU kernel variants, widest first: (name, runs on this CPU)");
  m.def("has_cuda", &has_cuda, "Whether CUDA kernels were compiled in");
  m.def("cuda_archs", &cuda_archs, "Compiled CUDA architectures");
}
