// phi's partial rotate-half rotary over up to three (batch, seq, heads, head_dim) tensors in one launch (rotary.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace megaphi {

constexpr int kRotaryMaxTensors = 3;
constexpr int kRotaryMaxHeadDim = 1024;

// One tensor's source and destination: element strides of batch, seq and heads (head_dim is contiguous).
struct RotaryTensor {
  const void* in;
  void* out;
  int64_t in_stride[3];
  int64_t out_stride[3];
};

struct RotaryArgs {
  DType dtype;
  RotaryTensor t[kRotaryMaxTensors];
  int count;         // tensors in t
  int rotate_count;  // t[0..rotate_count) are rotated, the rest copied (v of a packed QKV)
  const void* cos;   // (positions, rotary_dim / 2), contiguous, of dtype; positions >= pos_offset + seq
  const void* sin;
  int batch, seq, heads, head_dim, rotary_dim;
  int pos_offset;  // position of sequence index 0 (the KV cache's length when decoding)
  bool conjugate;  // rotate by -angle: the backward
  cudaStream_t stream;
};

// Enqueues the kernel on a.stream; std::invalid_argument for bad arguments, std::runtime_error for CUDA errors.
void rotary_launch(const RotaryArgs& a);

}  // namespace megaphi
