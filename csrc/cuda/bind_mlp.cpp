// Python binding of the cuBLASLt GEMM with epilogues (mlp.cu): megaphi._cuda_kernels.gemm and GEMM_EPILOGUES.
#include <pybind11/pybind11.h>

#include <string>

#include "mlp.h"
#include "registry.h"

namespace megaphi {

void register_mlp(pybind11::module_& m) {
  namespace py = pybind11;
  py::dict epilogues;
  epilogues["none"] = static_cast<int>(GemmEpilogue::kNone);
  epilogues["bias"] = static_cast<int>(GemmEpilogue::kBias);
  epilogues["gelu"] = static_cast<int>(GemmEpilogue::kGelu);
  epilogues["gelu_bias"] = static_cast<int>(GemmEpilogue::kGeluBias);
  epilogues["gelu_aux"] = static_cast<int>(GemmEpilogue::kGeluAux);
  epilogues["gelu_aux_bias"] = static_cast<int>(GemmEpilogue::kGeluAuxBias);
  epilogues["dgelu"] = static_cast<int>(GemmEpilogue::kDGelu);
  epilogues["dgelu_bgrad"] = static_cast<int>(GemmEpilogue::kDGeluBGrad);
  epilogues["bgrad_a"] = static_cast<int>(GemmEpilogue::kBGradA);
  m.attr("GEMM_EPILOGUES") = epilogues;

  m.def(
      "gemm",
      [](int dtype, std::uintptr_t a, std::uintptr_t b, std::uintptr_t d, int64_t rows, int64_t cols, int64_t inner,
         bool trans_a, bool trans_b, int64_t lda, int64_t ldb, int64_t ldd, int epilogue, std::uintptr_t bias,
         std::uintptr_t aux, int64_t aux_ld, bool allow_tf32, std::uintptr_t workspace, size_t workspace_bytes,
         std::uintptr_t stream) {
        MEGAPHI_REQUIRE(epilogue >= 0 && epilogue <= static_cast<int>(GemmEpilogue::kBGradA),
                        "gemm: unknown epilogue code " + std::to_string(epilogue));
        GemmArgs g{};
        g.dtype = to_dtype(dtype);
        g.a = as_ptr<const void>(a);
        g.b = as_ptr<const void>(b);
        g.d = as_ptr(d);
        g.m = rows;
        g.n = cols;
        g.k = inner;
        g.trans_a = trans_a;
        g.trans_b = trans_b;
        g.lda = lda;
        g.ldb = ldb;
        g.ldd = ldd;
        g.epilogue = static_cast<GemmEpilogue>(epilogue);
        g.bias = as_ptr(bias);
        g.aux = as_ptr(aux);
        g.aux_ld = aux_ld;
        g.allow_tf32 = allow_tf32;
        g.workspace = as_ptr(workspace);
        g.workspace_bytes = workspace_bytes;
        g.stream = as_stream(stream);
        return gemm_lt(g);
      },
      py::call_guard<py::gil_scoped_release>(),
      "D (M, N) = epilogue(op(A) @ op(B)), row-major, through cuBLASLt; False when bgrad_a had to be dropped "
      "(then D holds the plain product and bias was not written)",
      py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("d"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("trans_a"), py::arg("trans_b"), py::arg("lda"), py::arg("ldb"), py::arg("ldd"), py::arg("epilogue"),
      py::arg("bias"), py::arg("aux"), py::arg("aux_ld"), py::arg("allow_tf32"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"));
  m.attr("KERNELS").cast<py::list>().append("gemm");
}

}  // namespace megaphi
