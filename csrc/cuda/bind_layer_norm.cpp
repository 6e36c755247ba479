// Python bindings of the LayerNorm kernels (layer_norm.h); megaphi/kernels/cuda/layer_norm.py calls them.
#include "layer_norm.h"
#include "registry.h"

namespace megaphi {

void register_layer_norm(pybind11::module_& m) {
  using std::uintptr_t;
  m.attr("LAYER_NORM_MAX_VECTORS") = kLayerNormMaxVectors;
  def_kernel(m, "layer_norm_forward",
             [](uintptr_t x, uintptr_t r1, uintptr_t r2, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t s,
                uintptr_t mean, uintptr_t rstd, int rows, int n, float eps, int dtype, int out_dtype,
                uintptr_t stream) {
               layer_norm_forward(as_ptr(x), as_ptr(r1), as_ptr(r2), as_ptr<float>(weight), as_ptr<float>(bias),
                                  as_ptr(y), as_ptr(s), as_ptr<float>(mean), as_ptr<float>(rstd), rows, n, eps,
                                  to_dtype(dtype), to_dtype(out_dtype), as_stream(stream));
             },
             "y, s, mean, rstd <- x + r1 + r2 (rows, n); see csrc/cuda/layer_norm.h");
  def_kernel(m, "layer_norm_backward",
             [](uintptr_t dy, uintptr_t ds, uintptr_t s, uintptr_t weight, uintptr_t mean, uintptr_t rstd,
                uintptr_t dx, uintptr_t dweight_partial, uintptr_t dbias_partial, int rows, int n, int blocks,
                int dtype, int out_dtype, uintptr_t stream) {
               layer_norm_backward(as_ptr(dy), as_ptr(ds), as_ptr(s), as_ptr<float>(weight), as_ptr<float>(mean),
                                   as_ptr<float>(rstd), as_ptr(dx), as_ptr<float>(dweight_partial),
                                   as_ptr<float>(dbias_partial), rows, n, blocks, to_dtype(dtype),
                                   to_dtype(out_dtype), as_stream(stream));
             },
             "dx and the (blocks, n) partial sums of dweight and dbias; see csrc/cuda/layer_norm.h");
  def_kernel(m, "layer_norm_reduce_partials",
             [](uintptr_t dweight_partial, uintptr_t dbias_partial, uintptr_t dweight, uintptr_t dbias, int rows,
                int n, uintptr_t stream) {
               layer_norm_reduce_partials(as_ptr<float>(dweight_partial), as_ptr<float>(dbias_partial),
                                          as_ptr<float>(dweight), as_ptr<float>(dbias), rows, n, as_stream(stream));
             },
             "column sums of the backward's partial rows into dweight and dbias (fp32)");
}

}  // namespace megaphi
