// Host launchers of layer_norm.cu (called by bind_layer_norm.cpp). Tensors are contiguous (rows, n) arrays; x,
// the residuals, s and dx share the dtype `dtype`; y and dy have `out_dtype` (the same, or a 16-bit type when the
// input is fp32: autocast); weight, bias, mean, rstd and the partial sums are fp32. Null pointers: absent.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace megaphi {

// Rows are read as 16-byte vectors when n and every pointer allow it, else element by element; a row must fit in
// one block of at most this many vectors (so n <= 1024 * 16 / sizeof(dtype) when vectorized, else n <= 1024).
constexpr int kLayerNormMaxVectors = 1024;

// s = x + r1 + r2 (stored only when a residual is given), y = (s - mean) * rstd * weight + bias.
void layer_norm_forward(const void* x, const void* r1, const void* r2, const float* weight, const float* bias,
                        void* y, void* s, float* mean, float* rstd, int rows, int n, float eps, DType dtype,
                        DType out_dtype, cudaStream_t stream);

// dx = LayerNorm'(dy) + ds; each of `blocks` blocks writes its rows' sums of dy * xhat and dy into one row of
// dweight_partial / dbias_partial (blocks, n), which layer_norm_reduce_partials then sums: no atomics.
void layer_norm_backward(const void* dy, const void* ds, const void* s, const float* weight, const float* mean,
                         const float* rstd, void* dx, float* dweight_partial, float* dbias_partial, int rows, int n,
                         int blocks, DType dtype, DType out_dtype, cudaStream_t stream);

// out[c] = sum over r < rows of partial[r * n + c]; both arguments may be null (nothing to do).
void layer_norm_reduce_partials(const float* dweight_partial, const float* dbias_partial, float* dweight,
                                float* dbias, int rows, int n, cudaStream_t stream);

}  // namespace megaphi
