// phi's partial rotate-half rotary on q and k (and the copy of v) in one pass over memory.
//
// Each tensor is (batch, seq, heads, head_dim) with any batch/seq/head strides and a contiguous head_dim, so the
// inputs can be views of the fused QKV projection (batch, seq, 3 * heads * head_dim) and the outputs the separate
// q, k, v the attention wants, or, in the backward, the other way round. Dim i < rotary_dim / 2 pairs with
// i + rotary_dim / 2: y[i] = x[i] cos - x[i + half] sin, y[i + half] = x[i + half] cos + x[i] sin; dims from
// rotary_dim on are copied. The rotation is orthogonal, so the backward is the same kernel rotating by -angle.
// cos and sin are the reference's tables (fp32 math cast to the tensor's dtype); the arithmetic is fp32.
//
// Thread (item, row) of a block: rows are (batch, seq, head) triples, blockIdx.y picks the tensor. An item is one
// VEC-element vector: items [0, half / VEC) load a vector and its partner half a rotary_dim away and store both
// rotated; the rest copy one vector of the pass-through dims each.
#include <algorithm>
#include <climits>
#include <string>

#include "common.cuh"
#include "rotary.h"

namespace megaphi {
namespace {

struct RotaryParams {
  RotaryTensor t[kRotaryMaxTensors];
  const void* cos;
  const void* sin;
  int rotate_count;
  int rows;  // batch * seq * heads
  int seq, heads, half, pos_offset;
  float sign;  // +1 forward, -1 backward
};

template <typename T, int VEC>
__global__ void rotary_kernel(const __grid_constant__ RotaryParams p) {
  using V = Vec<T, VEC>;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= p.rows) return;
  const int z = blockIdx.y;
  const int item = threadIdx.x;
  const int h = row % p.heads;
  const int bs = row / p.heads;
  const int s = bs % p.seq;
  const int b = bs / p.seq;
  const RotaryTensor& t = p.t[z];
  const T* in = static_cast<const T*>(t.in) + b * t.in_stride[0] + s * t.in_stride[1] + h * t.in_stride[2];
  T* out = static_cast<T*>(t.out) + b * t.out_stride[0] + s * t.out_stride[1] + h * t.out_stride[2];
  const int pairs = p.half / VEC;
  if (item >= pairs) {  // pass-through dims, after the rotary_dim / VEC vectors of the rotated ones
    const int i = (item + pairs) * VEC;
    *reinterpret_cast<V*>(out + i) = *reinterpret_cast<const V*>(in + i);
    return;
  }
  const int i = item * VEC;
  const V x1 = *reinterpret_cast<const V*>(in + i);
  const V x2 = *reinterpret_cast<const V*>(in + p.half + i);
  if (z >= p.rotate_count) {  // v: copied along so that q, k, v land in one layout
    *reinterpret_cast<V*>(out + i) = x1;
    *reinterpret_cast<V*>(out + p.half + i) = x2;
    return;
  }
  const int64_t tab = static_cast<int64_t>(s + p.pos_offset) * p.half + i;
  const V c = *reinterpret_cast<const V*>(static_cast<const T*>(p.cos) + tab);
  const V sn = *reinterpret_cast<const V*>(static_cast<const T*>(p.sin) + tab);
  V y1, y2;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float a = to_float(x1.v[e]), a2 = to_float(x2.v[e]);
    const float cs = to_float(c.v[e]), sg = p.sign * to_float(sn.v[e]);
    y1.v[e] = from_float<T>(a * cs - a2 * sg);
    y2.v[e] = from_float<T>(a2 * cs + a * sg);
  }
  *reinterpret_cast<V*>(out + i) = y1;
  *reinterpret_cast<V*>(out + p.half + i) = y2;
}

template <typename T, int VEC> void launch(const RotaryParams& p, int count, int head_dim, cudaStream_t stream) {
  const int items = head_dim / VEC - p.half / VEC;
  const int rows_per_block = std::max(1, 256 / items);
  const dim3 block(items, rows_per_block);
  const dim3 grid(ceil_div(p.rows, rows_per_block), count);
  rotary_kernel<T, VEC><<<grid, block, 0, stream>>>(p);
  MEGAPHI_CHECK_LAUNCH();
}

template <typename T> void dispatch(const RotaryArgs& a, const RotaryParams& p) {
  // The widest vector that every row start, the half and every table row keep aligned.
  int width = vector_width<T>(p.half, {a.cos, a.sin});
  while (width > 1 && a.head_dim % width != 0) width /= 2;
  for (int z = 0; z < a.count; ++z) {
    const RotaryTensor& t = a.t[z];
    width = vector_width<T>(width, {t.in, t.out});
    for (int d = 0; d < 3; ++d) {
      while (width > 1 && (t.in_stride[d] % width != 0 || t.out_stride[d] % width != 0)) width /= 2;
    }
  }
  switch (width) {
    case 8:
      if constexpr (sizeof(T) <= 2) return launch<T, 8>(p, a.count, a.head_dim, a.stream);
      break;
    case 4: return launch<T, 4>(p, a.count, a.head_dim, a.stream);
    case 2: return launch<T, 2>(p, a.count, a.head_dim, a.stream);
    case 1: return launch<T, 1>(p, a.count, a.head_dim, a.stream);
  }
  fail(__FILE__, __LINE__, "rotary: no kernel for vector width " + std::to_string(width));
}

}  // namespace

void rotary_launch(const RotaryArgs& a) {
  MEGAPHI_REQUIRE(a.count >= 1 && a.count <= kRotaryMaxTensors, "rotary: between 1 and 3 tensors");
  MEGAPHI_REQUIRE(a.rotate_count >= 0 && a.rotate_count <= a.count, "rotary: rotate_count must be in [0, count]");
  MEGAPHI_REQUIRE(a.batch >= 0 && a.seq >= 0 && a.heads >= 0, "rotary: negative batch, seq or heads");
  MEGAPHI_REQUIRE(a.head_dim > 0 && a.head_dim <= kRotaryMaxHeadDim, "rotary: head_dim must be in [1, 1024]");
  MEGAPHI_REQUIRE(a.rotary_dim >= 2 && a.rotary_dim <= a.head_dim && a.rotary_dim % 2 == 0,
                  "rotary: rotary_dim must be even and in [2, head_dim]");
  MEGAPHI_REQUIRE(a.pos_offset >= 0, "rotary: negative position offset");
  MEGAPHI_REQUIRE(a.rotate_count == 0 || (a.cos && a.sin), "rotary: cos and sin tables are needed");
  const long long rows = static_cast<long long>(a.batch) * a.seq * a.heads;
  MEGAPHI_REQUIRE(rows <= INT_MAX && static_cast<long long>(a.pos_offset) + a.seq <= INT_MAX,
                  "rotary: batch * seq * heads must fit in 32 bits");
  // Before the pointer check: torch gives empty tensors a null data_ptr(), and they are nothing to do.
  if (rows == 0) return;
  for (int z = 0; z < a.count; ++z) MEGAPHI_REQUIRE(a.t[z].in && a.t[z].out, "rotary: null tensor pointer");
  RotaryParams p{};
  for (int z = 0; z < a.count; ++z) p.t[z] = a.t[z];
  p.cos = a.cos;
  p.sin = a.sin;
  p.rotate_count = a.rotate_count;
  p.rows = static_cast<int>(rows);
  p.seq = a.seq;
  p.heads = a.heads;
  p.half = a.rotary_dim / 2;
  p.pos_offset = a.pos_offset;
  p.sign = a.conjugate ? -1.0f : 1.0f;
  MEGAPHI_DISPATCH_DTYPE(a.dtype, [&] { dispatch<scalar_t>(a, p); });
}

}  // namespace megaphi
