// The pybind11 side of megaphi._cuda_kernels: each kernel family's bind_<name>.cpp defines one register_<name>
// that adds its functions to the module (bindings.cpp calls them all). Plain pybind11, no torch: tensors arrive as
// device pointers (tensor.data_ptr()), the stream as an int (torch.cuda.current_stream().cuda_stream), dtypes as
// megaphi::DType codes; megaphi/kernels/cuda/*.py validate shapes, dtypes and devices before calling.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.cuh"

namespace megaphi {

void register_layer_norm(pybind11::module_& m);
void register_mlp(pybind11::module_& m);
void register_rotary(pybind11::module_& m);

// A device pointer passed from Python as an int (0 for an absent optional tensor).
template <typename T = void> inline T* as_ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// m.def(name, f, doc) that also lists name in m.KERNELS, so Python can say which kernels the build holds.
template <typename F> void def_kernel(pybind11::module_& m, const char* name, F&& f, const char* doc) {
  m.def(name, std::forward<F>(f), doc);
  m.attr("KERNELS").cast<pybind11::list>().append(name);
}

}  // namespace megaphi
