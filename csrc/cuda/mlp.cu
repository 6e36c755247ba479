// The fused MLP's GEMMs: cuBLASLt matmuls whose epilogues add the bias and apply the tanh GELU (keeping the
// pre-activation), or apply GELU's derivative and reduce the bias gradient, so no separate elementwise pass touches
// the (tokens, ffn) activation. megaphi/kernels/cuda/mlp.py chains them into forward and backward.
//
// The API is row-major, as torch lays tensors out: D (M, N) = op(A) @ op(B), op(A) (M, K), op(B) (K, N), each
// matrix with a leading dimension (its row stride, in elements). cuBLASLt is column-major, and a row-major (M, N)
// matrix is a column-major (N, M) one, so D^T = op(B)^T op(A)^T is computed: cuBLASLt's m, n, k are our N, M, K,
// its A is our B and its B is our A, each transposed iff ours is. Its "bias per row of D" is then our bias per
// column (length N), and BGRADB (the bias gradient reduced over k from its B) is the row sums of our op(A).
#include <cublasLt.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"
#include "mlp.h"

namespace megaphi {
namespace {

cublasLtEpilogue_t lt_epilogue(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::kNone: return CUBLASLT_EPILOGUE_DEFAULT;
    case GemmEpilogue::kBias: return CUBLASLT_EPILOGUE_BIAS;
    case GemmEpilogue::kGelu: return CUBLASLT_EPILOGUE_GELU;
    case GemmEpilogue::kGeluBias: return CUBLASLT_EPILOGUE_GELU_BIAS;
    case GemmEpilogue::kGeluAux: return CUBLASLT_EPILOGUE_GELU_AUX;
    case GemmEpilogue::kGeluAuxBias: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case GemmEpilogue::kDGelu: return CUBLASLT_EPILOGUE_DGELU;
    case GemmEpilogue::kDGeluBGrad: return CUBLASLT_EPILOGUE_DGELU_BGRAD;
    case GemmEpilogue::kBGradA: return CUBLASLT_EPILOGUE_BGRADB;
  }
  fail(__FILE__, __LINE__, "unknown GEMM epilogue " + std::to_string(static_cast<int>(e)));
}

bool uses_bias(GemmEpilogue e) {
  return e == GemmEpilogue::kBias || e == GemmEpilogue::kGeluBias || e == GemmEpilogue::kGeluAuxBias ||
         e == GemmEpilogue::kDGeluBGrad || e == GemmEpilogue::kBGradA;
}

bool uses_aux(GemmEpilogue e) {
  return e == GemmEpilogue::kGeluAux || e == GemmEpilogue::kGeluAuxBias || e == GemmEpilogue::kDGelu ||
         e == GemmEpilogue::kDGeluBGrad;
}

cudaDataType_t lt_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
    case DType::kFloat32: return CUDA_R_32F;
  }
  fail(__FILE__, __LINE__, "unknown dtype");
}

// The largest power of two (at most 256) that divides the address: what cuBLASLt may assume about a buffer.
uint32_t alignment(const void* p) {
  auto address = reinterpret_cast<std::uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && address % a != 0) a /= 2;
  return a;
}

// One cuBLASLt handle per device, created on first use and kept for the life of the process.
cublasLtHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasLtHandle_t handle = nullptr;
  MEGAPHI_CHECK_CUBLAS(cublasLtCreate(&handle));
  handles[device] = handle;
  return handle;
}

// Owns the descriptors of one matmul; destroyed on every path out, errors included.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// The heuristic's choice depends on everything below (pointer alignments included), and asking it costs tens of
// microseconds of CPU per call, so its answer is kept per problem.
using AlgoKey = std::tuple<int, int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int64_t,
                           uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint64_t>;

struct CachedAlgo {
  bool found;
  cublasLtMatmulAlgo_t algo;
};

template <typename T> void set_attr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value) {
  MEGAPHI_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

template <typename T>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
  MEGAPHI_CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

}  // namespace

bool gemm_lt(const GemmArgs& g) {
  MEGAPHI_REQUIRE(g.m > 0 && g.n > 0 && g.k > 0, "gemm: M, N and K must be positive");
  MEGAPHI_REQUIRE(g.a && g.b && g.d, "gemm: a, b and d must be device pointers, got 0");
  MEGAPHI_REQUIRE(g.lda >= (g.trans_a ? g.m : g.k), "gemm: lda is smaller than a row of a");
  MEGAPHI_REQUIRE(g.ldb >= (g.trans_b ? g.k : g.n), "gemm: ldb is smaller than a row of b");
  MEGAPHI_REQUIRE(g.ldd >= g.n, "gemm: ldd is smaller than a row of d");
  MEGAPHI_REQUIRE(!uses_bias(g.epilogue) || g.bias, "gemm: this epilogue needs a bias (or bias-gradient) pointer");
  MEGAPHI_REQUIRE(!uses_aux(g.epilogue) || g.aux, "gemm: this epilogue needs an aux (pre-activation) pointer");
  // cuBLASLt: the GELU aux matrix's leading dimension must be a multiple of 8 and cover a row of D.
  MEGAPHI_REQUIRE(!uses_aux(g.epilogue) || (g.aux_ld >= g.n && g.aux_ld % 8 == 0),
                  "gemm: aux_ld must be >= N and a multiple of 8");
  MEGAPHI_REQUIRE(g.workspace_bytes == 0 || g.workspace, "gemm: workspace_bytes > 0 needs a workspace pointer");

  int device = 0;
  MEGAPHI_CHECK_CUDA(cudaGetDevice(&device));
  cublasLtHandle_t handle = handle_for(device);
  const cudaDataType_t type = lt_type(g.dtype);
  // fp16/bf16 accumulate in fp32; fp32 inputs use TF32 tensor cores only when the caller asks (torch's setting).
  const cublasComputeType_t compute =
      g.dtype == DType::kFloat32 && g.allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const cublasLtEpilogue_t epilogue = lt_epilogue(g.epilogue);
  // Swapped to column-major (see the top of the file): cuBLASLt's A is our b, its B is our a.
  const cublasOperation_t op_a = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const uint64_t m = g.n, n = g.m, k = g.k;

  Descriptors desc;
  MEGAPHI_CHECK_CUBLAS(cublasLtMatmulDescCreate(&desc.op, compute, CUDA_R_32F));
  set_attr(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(op_a));
  set_attr(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(op_b));
  set_attr(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(epilogue));
  if (uses_bias(g.epilogue)) set_attr(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  if (uses_aux(g.epilogue)) {
    set_attr(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
    set_attr(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, static_cast<int64_t>(g.aux_ld));
  }
  // Stored shapes, column-major: cuBLASLt's A is (m, k) untransposed, (k, m) transposed; likewise B (k, n).
  MEGAPHI_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&desc.a, type, op_a == CUBLAS_OP_N ? m : k,
                                              op_a == CUBLAS_OP_N ? k : m, g.ldb));
  MEGAPHI_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&desc.b, type, op_b == CUBLAS_OP_N ? k : n,
                                              op_b == CUBLAS_OP_N ? n : k, g.lda));
  MEGAPHI_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&desc.d, type, m, n, g.ldd));

  const uint32_t align_a = alignment(g.b), align_b = alignment(g.a), align_d = alignment(g.d);
  const AlgoKey key{device,
                    static_cast<int>(g.dtype),
                    static_cast<int>(op_a),
                    static_cast<int>(op_b),
                    g.m,
                    g.n,
                    g.k,
                    g.lda,
                    g.ldb,
                    g.ldd,
                    static_cast<int>(g.epilogue) * 2 + (compute == CUBLAS_COMPUTE_32F_FAST_TF32),
                    uses_aux(g.epilogue) ? g.aux_ld : 0,
                    align_a,
                    align_b,
                    align_d,
                    uses_bias(g.epilogue) ? alignment(g.bias) : 0u,
                    uses_aux(g.epilogue) ? alignment(g.aux) : 0u,
                    static_cast<uint64_t>(g.workspace_bytes)};
  static std::mutex cache_mutex;
  static std::map<AlgoKey, CachedAlgo> cache;
  CachedAlgo chosen{};
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) chosen = it->second, cached = true;
  }
  if (!cached) {
    MEGAPHI_CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&desc.pref));
    set_pref(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(g.workspace_bytes));
    // By default the heuristic assumes 256-byte aligned buffers; views of torch tensors may be less aligned.
    set_pref(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
    set_pref(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
    set_pref(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d);
    set_pref(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
    cublasLtMatmulHeuristicResult_t result;
    std::memset(&result, 0, sizeof(result));
    int found = 0;
    cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                                           desc.pref, 1, &result, &found);
    // NOT_SUPPORTED (or no result) means no kernel implements this epilogue for these types and shapes. The
    // optional bias-gradient epilogue falls back on any refusal, whatever status it comes with (apex's fused_dense
    // does the same): its support varies with the cuBLASLt version and the layout.
    if (status != CUBLAS_STATUS_NOT_SUPPORTED && g.epilogue != GemmEpilogue::kBGradA) MEGAPHI_CHECK_CUBLAS(status);
    chosen.found = status == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (chosen.found) chosen.algo = result.algo;
    std::lock_guard<std::mutex> lock(cache_mutex);
    cache[key] = chosen;
  }
  if (!chosen.found) {
    // Only the bias-gradient-of-A epilogue has a fallback: the plain GEMM, the caller sums the rows itself.
    if (g.epilogue == GemmEpilogue::kBGradA) {
      GemmArgs plain = g;
      plain.epilogue = GemmEpilogue::kNone;
      gemm_lt(plain);
      return false;
    }
    fail(__FILE__, __LINE__, std::string("cuBLASLt has no algorithm for this GEMM (epilogue ") +
                                 std::to_string(static_cast<int>(g.epilogue)) + ", M=" + std::to_string(g.m) +
                                 " N=" + std::to_string(g.n) + " K=" + std::to_string(g.k) + ")");
  }
  const float alpha = 1.0f, beta = 0.0f;
  MEGAPHI_CHECK_CUBLAS(cublasLtMatmul(handle, desc.op, &alpha, g.b, desc.a, g.a, desc.b, &beta, g.d, desc.d, g.d,
                                  desc.d, &chosen.algo, g.workspace, g.workspace_bytes, g.stream));
  return true;
}

}  // namespace megaphi
