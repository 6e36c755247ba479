// Python binding of the rotary kernel (rotary.cu): megaphi._cuda_kernels.rotary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <vector>

#include "registry.h"
#include "rotary.h"

namespace megaphi {

void register_rotary(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "rotary",
      [](int dtype, const std::vector<std::uintptr_t>& inputs, const std::vector<std::uintptr_t>& outputs,
         const std::vector<std::array<int64_t, 3>>& in_strides, const std::vector<std::array<int64_t, 3>>& out_strides,
         int rotate_count, std::uintptr_t cos, std::uintptr_t sin, int batch, int seq, int heads, int head_dim,
         int rotary_dim, int pos_offset, bool conjugate, std::uintptr_t stream) {
        const size_t count = inputs.size();
        MEGAPHI_REQUIRE(count >= 1 && count <= kRotaryMaxTensors, "rotary: between 1 and 3 input tensors");
        MEGAPHI_REQUIRE(outputs.size() == count && in_strides.size() == count && out_strides.size() == count,
                        "rotary: inputs, outputs, in_strides and out_strides must have the same length");
        RotaryArgs a{};
        a.dtype = to_dtype(dtype);
        for (size_t z = 0; z < count; ++z) {
          a.t[z].in = as_ptr<const void>(inputs[z]);
          a.t[z].out = as_ptr(outputs[z]);
          for (int d = 0; d < 3; ++d) {
            a.t[z].in_stride[d] = in_strides[z][d];
            a.t[z].out_stride[d] = out_strides[z][d];
          }
        }
        a.count = static_cast<int>(count);
        a.rotate_count = rotate_count;
        a.cos = as_ptr<const void>(cos);
        a.sin = as_ptr<const void>(sin);
        a.batch = batch;
        a.seq = seq;
        a.heads = heads;
        a.head_dim = head_dim;
        a.rotary_dim = rotary_dim;
        a.pos_offset = pos_offset;
        a.conjugate = conjugate;
        a.stream = as_stream(stream);
        rotary_launch(a);
      },
      py::call_guard<py::gil_scoped_release>(),
      "rotate-half rotary of the first rotate_count (batch, seq, heads, head_dim) tensors, copying the rest, from "
      "inputs to outputs (strides of batch, seq, heads in elements; head_dim contiguous)",
      py::arg("dtype"), py::arg("inputs"), py::arg("outputs"), py::arg("in_strides"), py::arg("out_strides"),
      py::arg("rotate_count"), py::arg("cos"), py::arg("sin"), py::arg("batch"), py::arg("seq"), py::arg("heads"),
      py::arg("head_dim"), py::arg("rotary_dim"), py::arg("pos_offset"), py::arg("conjugate"), py::arg("stream"));
  m.attr("KERNELS").cast<py::list>().append("rotary");
}

}  // namespace megaphi
