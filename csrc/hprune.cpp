// The Python module `hprune._C`. Kernels register themselves as torch ops from their own
// translation units (TORCH_LIBRARY_FRAGMENT(hprune, ...)); this file only exposes what the
// build contains so the Python dispatch point can decide which backends exist.
#include <torch/extension.h>

#include <string>

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef HPRUNE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hprune compiled kernels (CPU C++ and, when built with CUDA, CUDA C++)";
  m.def("build_info", &build_info, "What this build of hprune._C contains");
}
