// LayerNorm with the parallel block's residual sum fused in (the contract of megaphi/kernels/triton/layer_norm.py).
//
// Forward: one block per row; thread t holds the row's t-th VEC-element vector in registers (16-byte loads), so the
// row is read once: s = x + r1 + r2 (rounded to the input dtype and stored, so the backward reads back exactly the
// numbers it normalized), fp32 mean, then fp32 variance around it (two-pass, no cancellation), then y.
// Backward: `blocks` blocks stride over the rows with the same column mapping; each thread accumulates its columns'
// dweight/dbias terms in registers over all its block's rows and writes them once to a partial row, and a second
// kernel sums the few partial rows column by column: no atomics at all.
#include <algorithm>
#include <initializer_list>

#include "layer_norm.h"

namespace megaphi {
namespace {

constexpr int kMaxThreads = kLayerNormMaxVectors;  // one vector per thread

template <typename T, int VEC> __device__ __forceinline__ void load(const T* p, int i, float (&out)[VEC]) {
  const Vec<T, VEC> v = reinterpret_cast<const Vec<T, VEC>*>(p)[i];
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(v.v[j]);
}

template <typename T, int VEC> __device__ __forceinline__ void store(T* p, int i, const float (&in)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int j = 0; j < VEC; ++j) v.v[j] = from_float<T>(in[j]);
  reinterpret_cast<Vec<T, VEC>*>(p)[i] = v;
}

template <typename T, typename O, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ r1, const T* __restrict__ r2,
                              const float* __restrict__ weight, const float* __restrict__ bias, O* __restrict__ y,
                              T* __restrict__ s, float* __restrict__ mean_out, float* __restrict__ rstd_out, int n,
                              float eps) {
  __shared__ float scratch[32];
  const long long offset = static_cast<long long>(blockIdx.x) * n;
  const int i = threadIdx.x;
  const bool active = i < n / VEC;
  float v[VEC] = {};
  float sum = 0.0f;
  if (active) {
    load<T, VEC>(x + offset, i, v);
    if (r1 != nullptr) {
      float r[VEC];
      load<T, VEC>(r1 + offset, i, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] += r[j];
      if (r2 != nullptr) {
        load<T, VEC>(r2 + offset, i, r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] += r[j];
      }
      Vec<T, VEC> rounded;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        rounded.v[j] = from_float<T>(v[j]);
        v[j] = to_float(rounded.v[j]);
      }
      reinterpret_cast<Vec<T, VEC>*>(s + offset)[i] = rounded;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += v[j];
  }
  const float mean = block_sum(sum, scratch) / n;
  float squares = 0.0f;
  if (active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) squares += (v[j] - mean) * (v[j] - mean);
  }
  const float rstd = rsqrtf(block_sum(squares, scratch) / n + eps);
  if (active) {
    float w[VEC], b[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) w[j] = 1.0f, b[j] = 0.0f;
    if (weight != nullptr) load<float, VEC>(weight, i, w);
    if (bias != nullptr) load<float, VEC>(bias, i, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = (v[j] - mean) * rstd * w[j] + b[j];
    store<O, VEC>(y + offset, i, v);
  }
  if (i == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

// The two row sums of the backward (of xhat * w * dy and of w * dy) in one pass over the block's warps.
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // the previous row's scratch has been read by every thread
  if (lane == 0) scratch[warp] = make_float2(a, b);
  __syncthreads();
  const float2 t = lane < warps ? scratch[lane] : make_float2(0.0f, 0.0f);
  return make_float2(warp_sum(t.x), warp_sum(t.y));
}

template <typename T, typename O, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_backward_kernel(const O* __restrict__ dy, const T* __restrict__ ds, const T* __restrict__ s,
                               const float* __restrict__ weight, const float* __restrict__ mean,
                               const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dweight_partial,
                               float* __restrict__ dbias_partial, int rows, int n) {
  __shared__ float2 scratch[32];
  const int i = threadIdx.x;
  const bool active = i < n / VEC;
  float dw[VEC] = {}, db[VEC] = {};
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long offset = static_cast<long long>(row) * n;
    const float mu = mean[row], r = rstd[row];
    float xhat[VEC] = {}, g[VEC] = {};
    float a = 0.0f, b = 0.0f;
    if (active) {
      load<T, VEC>(s + offset, i, xhat);
      load<O, VEC>(dy + offset, i, g);
      float w[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = 1.0f;
      if (weight != nullptr) load<float, VEC>(weight, i, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[j] = (xhat[j] - mu) * r;
        dw[j] += g[j] * xhat[j];
        db[j] += g[j];
        g[j] *= w[j];  // from here on g is w * dy
        a += xhat[j] * g[j];
        b += g[j];
      }
    }
    const float2 sums = block_sum2(a, b, scratch);
    if (active) {
      const float c1 = sums.x / n, c2 = sums.y / n;
      float d[VEC];
      if (ds != nullptr) {
        load<T, VEC>(ds + offset, i, d);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) d[j] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) d[j] += (g[j] - (xhat[j] * c1 + c2)) * r;
      store<T, VEC>(dx + offset, i, d);
    }
  }
  if (active) {
    const long long offset = static_cast<long long>(blockIdx.x) * n;
    if (dweight_partial != nullptr) store<float, VEC>(dweight_partial + offset, i, dw);
    if (dbias_partial != nullptr) store<float, VEC>(dbias_partial + offset, i, db);
  }
}

// Column sums of a (rows, n) fp32 array: blocks of 32 columns x 8 row groups, coalesced along the columns.
__global__ void __launch_bounds__(256)
    column_sum_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ a_out,
                      float* __restrict__ b_out, int rows, int n) {
  __shared__ float partial[2][8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float sa = 0.0f, sb = 0.0f;
  if (col < n) {
    for (int r = threadIdx.y; r < rows; r += 8) {
      if (a != nullptr) sa += a[static_cast<long long>(r) * n + col];
      if (b != nullptr) sb += b[static_cast<long long>(r) * n + col];
    }
  }
  partial[0][threadIdx.y][threadIdx.x] = sa;
  partial[1][threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    for (int k = 1; k < 8; ++k) sa += partial[0][k][threadIdx.x], sb += partial[1][k][threadIdx.x];
    if (a_out != nullptr) a_out[col] = sa;
    if (b_out != nullptr) b_out[col] = sb;
  }
}

bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Threads of a block holding `vectors` vectors: whole warps, at least one.
int block_threads(int vectors) {
  MEGAPHI_REQUIRE(vectors <= kMaxThreads, "layer_norm: the row is wider than the CUDA kernel takes");
  return std::max(32, (vectors + 31) / 32 * 32);
}

template <typename T> bool use_vectors(int n, std::initializer_list<const void*> pointers) {
  constexpr int vec = 16 / sizeof(T);
  return n % vec == 0 && aligned16(pointers);
}

template <typename T, typename O>
void forward(const void* x, const void* r1, const void* r2, const float* weight, const float* bias, void* y,
             void* s, float* mean, float* rstd, int rows, int n, float eps, cudaStream_t stream) {
  constexpr int vec = 16 / sizeof(T);
  // Vec<O, vec> of a 16-bit O under fp32 T is 8 bytes: y needs only that alignment, the 16-byte check covers it.
  if (use_vectors<T>(n, {x, r1, r2, weight, bias, y, s})) {
    layer_norm_forward_kernel<T, O, vec><<<rows, block_threads(n / vec), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(r1), static_cast<const T*>(r2), weight, bias,
        static_cast<O*>(y), static_cast<T*>(s), mean, rstd, n, eps);
  } else {
    layer_norm_forward_kernel<T, O, 1><<<rows, block_threads(n), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(r1), static_cast<const T*>(r2), weight, bias,
        static_cast<O*>(y), static_cast<T*>(s), mean, rstd, n, eps);
  }
  MEGAPHI_CHECK_LAUNCH();
}

template <typename T, typename O>
void backward(const void* dy, const void* ds, const void* s, const float* weight, const float* mean,
              const float* rstd, void* dx, float* dweight_partial, float* dbias_partial, int rows, int n, int blocks,
              cudaStream_t stream) {
  constexpr int vec = 16 / sizeof(T);
  if (use_vectors<T>(n, {dy, ds, s, weight, dx, dweight_partial, dbias_partial})) {
    layer_norm_backward_kernel<T, O, vec><<<blocks, block_threads(n / vec), 0, stream>>>(
        static_cast<const O*>(dy), static_cast<const T*>(ds), static_cast<const T*>(s), weight, mean, rstd,
        static_cast<T*>(dx), dweight_partial, dbias_partial, rows, n);
  } else {
    layer_norm_backward_kernel<T, O, 1><<<blocks, block_threads(n), 0, stream>>>(
        static_cast<const O*>(dy), static_cast<const T*>(ds), static_cast<const T*>(s), weight, mean, rstd,
        static_cast<T*>(dx), dweight_partial, dbias_partial, rows, n);
  }
  MEGAPHI_CHECK_LAUNCH();
}

// Runs CALL with T, O bound to the supported (input, output) dtype pairs: the same dtype, or fp32 in and a 16-bit
// type out (autocast).
#define MEGAPHI_LAYER_NORM_DISPATCH(dtype, out_dtype, CALL)                                                  \
  do {                                                                                                      \
    if (dtype == out_dtype && dtype == DType::kFloat32) {                                                   \
      using T = float; using O = float; CALL;                                                               \
    } else if (dtype == out_dtype && dtype == DType::kFloat16) {                                            \
      using T = __half; using O = __half; CALL;                                                             \
    } else if (dtype == out_dtype && dtype == DType::kBFloat16) {                                           \
      using T = __nv_bfloat16; using O = __nv_bfloat16; CALL;                                               \
    } else if (dtype == DType::kFloat32 && out_dtype == DType::kFloat16) {                                  \
      using T = float; using O = __half; CALL;                                                              \
    } else if (dtype == DType::kFloat32 && out_dtype == DType::kBFloat16) {                                 \
      using T = float; using O = __nv_bfloat16; CALL;                                                       \
    } else {                                                                                                \
      throw std::invalid_argument("layer_norm: the CUDA kernel takes an output dtype equal to the input's, " \
                                  "or a 16-bit output for fp32 input");                                     \
    }                                                                                                       \
  } while (0)

void check_sizes(int rows, int n) {
  MEGAPHI_REQUIRE(rows > 0 && n > 0, "layer_norm: empty input");
}

}  // namespace

void layer_norm_forward(const void* x, const void* r1, const void* r2, const float* weight, const float* bias,
                        void* y, void* s, float* mean, float* rstd, int rows, int n, float eps, DType dtype,
                        DType out_dtype, cudaStream_t stream) {
  check_sizes(rows, n);
  MEGAPHI_REQUIRE(r2 == nullptr || r1 != nullptr, "layer_norm: a second residual without a first");
  MEGAPHI_REQUIRE(r1 == nullptr || s != nullptr, "layer_norm: residuals need an output for their sum");
  MEGAPHI_LAYER_NORM_DISPATCH(dtype, out_dtype,
                              (forward<T, O>(x, r1, r2, weight, bias, y, s, mean, rstd, rows, n, eps, stream)));
}

void layer_norm_backward(const void* dy, const void* ds, const void* s, const float* weight, const float* mean,
                         const float* rstd, void* dx, float* dweight_partial, float* dbias_partial, int rows, int n,
                         int blocks, DType dtype, DType out_dtype, cudaStream_t stream) {
  check_sizes(rows, n);
  // Each block writes one partial row: more blocks than rows would leave rows of the partials unwritten.
  MEGAPHI_REQUIRE(blocks > 0 && blocks <= rows, "layer_norm: the backward takes between 1 and rows blocks");
  MEGAPHI_LAYER_NORM_DISPATCH(dtype, out_dtype,
                              (backward<T, O>(dy, ds, s, weight, mean, rstd, dx, dweight_partial, dbias_partial,
                                              rows, n, blocks, stream)));
}

void layer_norm_reduce_partials(const float* dweight_partial, const float* dbias_partial, float* dweight,
                                float* dbias, int rows, int n, cudaStream_t stream) {
  if (dweight_partial == nullptr && dbias_partial == nullptr) return;
  check_sizes(rows, n);
  column_sum_kernel<<<ceil_div(n, 32), dim3(32, 8), 0, stream>>>(dweight_partial, dbias_partial, dweight, dbias,
                                                                 rows, n);
  MEGAPHI_CHECK_LAUNCH();
}

}  // namespace megaphi
