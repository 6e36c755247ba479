// The row-major cuBLASLt GEMM with epilogues that mlp.cu implements and bind_mlp.cpp exposes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace megaphi {

// What happens to acc = op(A) @ op(B) before it is stored in D (M, N); the bias has length N unless stated.
enum class GemmEpilogue : int {
  kNone = 0,         // D = acc
  kBias = 1,         // D = acc + bias
  kGelu = 2,         // D = gelu(acc)
  kGeluBias = 3,     // D = gelu(acc + bias)
  kGeluAux = 4,      // aux = acc, D = gelu(aux)
  kGeluAuxBias = 5,  // aux = acc + bias, D = gelu(aux)
  kDGelu = 6,        // D = acc * gelu'(aux)
  kDGeluBGrad = 7,   // D = acc * gelu'(aux), bias = column sums of D
  kBGradA = 8,       // D = acc, bias (length M) = row sums of op(A), i.e. summed over K
};

struct GemmArgs {
  DType dtype;  // of A, B, D, bias and aux alike
  const void* a;
  const void* b;
  void* d;
  int64_t m, n, k;
  bool trans_a, trans_b;  // A stored (K, M) / B stored (N, K), row-major
  int64_t lda, ldb, ldd;  // row strides in elements
  GemmEpilogue epilogue;
  void* bias;        // read (kBias, kGelu*Bias) or written (kDGeluBGrad, kBGradA)
  void* aux;         // the pre-activation (M, N): written by kGeluAux*, read by kDGelu*
  int64_t aux_ld;    // its row stride: >= N and a multiple of 8
  bool allow_tf32;   // fp32 inputs only
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
};

// Enqueues the GEMM on g.stream. Returns false only for kBGradA when cuBLASLt has no kernel with that epilogue:
// then D was computed without it and the bias gradient was not written. Throws on every other failure.
bool gemm_lt(const GemmArgs& g);

}  // namespace megaphi
