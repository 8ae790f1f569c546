// The Python module `hprune._C_cutlass`: importing it registers hprune::w4a16_mm_cutlass (see
// w4a16_cutlass_binding.cpp). Built only for sm_90a, with CUDA and the pinned CUTLASS headers.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "hprune CUTLASS kernels (sm_90a)"; }
