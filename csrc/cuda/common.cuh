// What every CUDA file of megaphi._cuda_kernels shares: error checks, the dtype codes Python passes, and (under
// nvcc) the small device helpers. Plain CUDA: no torch header, so the extension compiles fast. Bind files (host
// C++) include it too; the device part is compiled only under nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace megaphi {

// The element type of a tensor, as the int Python passes (megaphi/kernels/cuda/_ext.py reads these names from the
// extension's DTYPE_CODES, so the two sides cannot drift apart).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what);
}

inline DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

}  // namespace megaphi

// A CUDA runtime call whose status is not cudaSuccess throws std::runtime_error (RuntimeError in Python) naming
// the call, the file:line and CUDA's error string.
#define MEGAPHI_CHECK_CUDA(expr)                                                                          \
  do {                                                                                                    \
    cudaError_t megaphi_status_ = (expr);                                                                 \
    if (megaphi_status_ != cudaSuccess)                                                                   \
      ::megaphi::fail(__FILE__, __LINE__, std::string(#expr) + " failed: " +                              \
                                              cudaGetErrorName(megaphi_status_) + ": " +                  \
                                              cudaGetErrorString(megaphi_status_));                       \
  } while (0)

// The same for cuBLASLt calls (the caller includes <cublasLt.h>; only libcublasLt is linked, so cuBLASLt's own
// status strings).
#define MEGAPHI_CHECK_CUBLAS(expr)                                                                        \
  do {                                                                                                    \
    cublasStatus_t megaphi_status_ = (expr);                                                              \
    if (megaphi_status_ != CUBLAS_STATUS_SUCCESS)                                                         \
      ::megaphi::fail(__FILE__, __LINE__, std::string(#expr) + " failed: " +                              \
                                              cublasLtGetStatusName(megaphi_status_) + ": " +             \
                                              cublasLtGetStatusString(megaphi_status_));                  \
  } while (0)

// After every kernel launch: a bad configuration (too many threads, too much shared memory, no kernel image for
// this GPU) is reported here, at the launch that caused it, not at some later synchronizing call.
#define MEGAPHI_CHECK_LAUNCH() MEGAPHI_CHECK_CUDA(cudaGetLastError())

// Argument checks in host launchers: a std::invalid_argument, ValueError in Python.
#define MEGAPHI_REQUIRE(cond, message)                                                                    \
  do {                                                                                                    \
    if (!(cond)) throw std::invalid_argument(std::string(message));                                       \
  } while (0)

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace megaphi {

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends, so no implicit ones exist.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements of T loaded/stored together: one instruction up to 16 bytes (wider ones take several, 16-byte aligned).
template <typename T, int N> struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

// The largest vector width (elements) that divides n and keeps every row of a (rows, n) tensor 16-byte aligned,
// given that the base pointers are; 1 when they are not.
template <typename T> inline int vector_width(int n, std::initializer_list<const void*> pointers) {
  int width = 16 / static_cast<int>(sizeof(T));
  for (const void* p : pointers)
    while (width > 1 && (reinterpret_cast<std::uintptr_t>(p) % (width * sizeof(T)) != 0)) width /= 2;
  while (width > 1 && n % width != 0) width /= 2;
  return width;
}

// Sum over a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result. scratch: 32 floats
// of shared memory, reusable right after the call returns.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(x);
}

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// Calls body with a type alias `scalar_t` for the dtype code (float, __half, __nv_bfloat16).
#define MEGAPHI_DISPATCH_DTYPE(dtype, ...)                                                                \
  [&] {                                                                                                   \
    switch (dtype) {                                                                                      \
      case ::megaphi::DType::kFloat32: {                                                                  \
        using scalar_t = float;                                                                           \
        return __VA_ARGS__();                                                                             \
      }                                                                                                   \
      case ::megaphi::DType::kFloat16: {                                                                  \
        using scalar_t = __half;                                                                          \
        return __VA_ARGS__();                                                                             \
      }                                                                                                   \
      case ::megaphi::DType::kBFloat16: {                                                                 \
        using scalar_t = __nv_bfloat16;                                                                   \
        return __VA_ARGS__();                                                                             \
      }                                                                                                   \
    }                                                                                                     \
    ::megaphi::fail(__FILE__, __LINE__, "unknown dtype");                                                 \
  }()

}  // namespace megaphi
#endif  // __CUDACC__
