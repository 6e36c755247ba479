// The module megaphi._cuda_kernels: build facts (arch list, CUDA version, dtype codes) and every kernel family's
// functions, each added by its register_<name> (registry.h).
#include <pybind11/pybind11.h>

#include "registry.h"

#define MEGAPHI_STRINGIFY_(...) #__VA_ARGS__
#define MEGAPHI_STRINGIFY(...) MEGAPHI_STRINGIFY_(__VA_ARGS__)

#ifndef MEGAPHI_CUDA_ARCHS  // setup.py passes the -gencode targets, e.g. sm_80,sm_90 (compute_90: PTX)
#error "build megaphi._cuda_kernels through setup.py, which defines MEGAPHI_CUDA_ARCHS"
#endif

PYBIND11_MODULE(_cuda_kernels, m) {
  namespace py = pybind11;
  m.doc() = "megaphi's CUDA kernels; called through megaphi.kernels.cuda, which checks the arguments";
  m.attr("CUDA_ARCHS") = MEGAPHI_STRINGIFY(MEGAPHI_CUDA_ARCHS);
  m.attr("CUDA_VERSION") = CUDART_VERSION;  // of the toolkit it was compiled with, e.g. 13000
  py::dict codes;
  codes["float32"] = static_cast<int>(megaphi::DType::kFloat32);
  codes["float16"] = static_cast<int>(megaphi::DType::kFloat16);
  codes["bfloat16"] = static_cast<int>(megaphi::DType::kBFloat16);
  m.attr("DTYPE_CODES") = codes;
  m.attr("KERNELS") = py::list();
  m.def("runtime_version", [] {
    int version = 0;
    MEGAPHI_CHECK_CUDA(cudaRuntimeGetVersion(&version));
    return version;
  }, "the CUDA runtime version the module runs against");
  megaphi::register_layer_norm(m);
  megaphi::register_mlp(m);
  megaphi::register_rotary(m);
}
