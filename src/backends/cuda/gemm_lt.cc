// GemmLt (gemm_lt.h): descriptor cache and dispatch over cuBLASLt.
#include "backends/cuda/gemm_lt.h"

#include <cublasLt.h>

#include <cstdlib>
#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/gemv.h"
#include "backends/cuda/model_ops.h"

namespace adakv::cuda {

namespace {
Status lt_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::ok();
  return internal_error(std::string("cuBLASLt: ") + what + " failed with status " + std::to_string(static_cast<int>(s)));
}
#define ADAKV_LT(expr) ADAKV_RETURN_IF_ERROR(lt_status((expr), #expr))

// GEMV workspace (64 MiB): partial sums, slices x m x n floats (the 8B model's lm_head at m 32:
// 4 x 32 x 128256), counters for n up to 262144 rows.
constexpr int64_t kGemvPartialFloats = int64_t{16} << 20;
constexpr int64_t kGemvCounters = 16384;
}  // namespace

struct GemmLt::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

Expected<std::unique_ptr<GemmLt>> GemmLt::create(size_t workspace_bytes) {
  std::unique_ptr<GemmLt> g(new GemmLt());
  cublasLtHandle_t h = nullptr;
  ADAKV_LT(cublasLtCreate(&h));
  g->handle_ = h;
  g->workspace_bytes_ = workspace_bytes;
  if (workspace_bytes > 0) {
    const cudaError_t err = cudaMalloc(&g->workspace_, workspace_bytes);
    if (err != cudaSuccess)
      return resource_exhausted("cuBLASLt workspace of " + std::to_string(workspace_bytes >> 20) +
                                " MiB: " + cudaGetErrorString(err));
  }
  if (const char* e = std::getenv("ADAKV_GEMV"); e != nullptr && std::string(e) == "0") g->gemv_ = false;
  if (cudaMalloc(&g->gemv_partial_, sizeof(float) * kGemvPartialFloats) != cudaSuccess ||
      cudaMalloc(&g->gemv_counters_, sizeof(int32_t) * kGemvCounters) != cudaSuccess ||
      cudaMemset(g->gemv_counters_, 0, sizeof(int32_t) * kGemvCounters) != cudaSuccess)
    return resource_exhausted("GEMV workspace of 64 MiB: " + std::string(cudaGetErrorString(cudaGetLastError())));
  return g;
}

GemmLt::~GemmLt() {
  plans_.clear();
  if (workspace_ != nullptr) cudaFree(workspace_);
  if (gemv_partial_ != nullptr) cudaFree(gemv_partial_);
  if (gemv_counters_ != nullptr) cudaFree(gemv_counters_);
  if (handle_ != nullptr) cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
}

Expected<GemmLt::Plan*> GemmLt::plan(int64_t m, int64_t n, int64_t k, int64_t ldx, int64_t ldy, DType y_dtype) {
  const auto key = std::make_tuple(m, n, k, ldx, ldy, static_cast<int>(y_dtype));
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second.get();
  auto p = std::make_unique<Plan>();
  const cudaDataType_t dt = y_dtype == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  ADAKV_LT(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  ADAKV_LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  ADAKV_LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  // Column-major: A = w as [k][n] (ld k), op(A) = A^T [n][k]; B = x as [k][m] (ld ldx); D = y^T [n][m].
  ADAKV_LT(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k));
  ADAKV_LT(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(m), ldx));
  ADAKV_LT(cublasLtMatrixLayoutCreate(&p->d, dt, static_cast<uint64_t>(n), static_cast<uint64_t>(m), ldy));
  cublasLtMatmulPreference_t pref = nullptr;
  ADAKV_LT(cublasLtMatmulPreferenceCreate(&pref));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                                       sizeof(workspace_bytes_));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a,
                                                           p->b, p->d, p->d, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (hs != CUBLAS_STATUS_SUCCESS || found == 0)
    return unimplemented("cuBLASLt has no algorithm for a bf16 GEMM of m " + std::to_string(m) + ", n " +
                         std::to_string(n) + ", k " + std::to_string(k));
  p->algo = result.algo;
  Plan* raw = p.get();
  plans_.emplace(key, std::move(p));
  return raw;
}

Status GemmLt::linear(const __nv_bfloat16* x, const __nv_bfloat16* w, void* y, DType y_dtype, int64_t m, int64_t n,
                      int64_t k, cudaStream_t stream, int64_t ldx, int64_t ldy) {
  if (m == 0) return Status::ok();
  if (m < 0 || n <= 0 || k <= 0) return invalid_argument("gemm: bad sizes");
  if (y_dtype != DType::kBF16 && y_dtype != DType::kF32) return unimplemented("gemm: output must be BF16 or F32");
  if (ldx == 0) ldx = k;
  if (ldy == 0) ldy = n;
  if (GemvArgs a; gemv_args(x, w, y, y_dtype, m, n, k, ldx, ldy, &a)) return gemv_bf16(a, stream);
  ADAKV_ASSIGN_OR_RETURN(Plan * p, plan(m, n, k, ldx, ldy, y_dtype));
  const float alpha = 1.f, beta = 0.f;
  ADAKV_LT(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p->desc, &alpha, w, p->a, x, p->b, &beta, y, p->d,
                          y, p->d, &p->algo, workspace_, workspace_bytes_, stream));
  return Status::ok();
}

bool GemmLt::gemv_args(const __nv_bfloat16* x, const __nv_bfloat16* w, void* y, DType y_dtype, int64_t m, int64_t n,
                       int64_t k, int64_t ldx, int64_t ldy, GemvArgs* a) const {
  const bool gemv_shape = m <= kGemvSimdRows || n * k <= kGemvTensorMaxWeight;
  if (!gemv_ || m > gemv_rows_ || !gemv_shape || k % 8 != 0 || ldx % 8 != 0 ||
      gemv_tiles(static_cast<int32_t>(m), static_cast<int32_t>(n)) > kGemvCounters ||
      gemv_partial_floats(static_cast<int32_t>(m), static_cast<int32_t>(n), static_cast<int32_t>(k)) > kGemvPartialFloats)
    return false;
  a->x = x;
  a->ldx = ldx;
  a->w = w;
  a->y = y;
  a->ldy = ldy;
  a->y_dtype = y_dtype;
  a->m = static_cast<int32_t>(m);
  a->n = static_cast<int32_t>(n);
  a->k = static_cast<int32_t>(k);
  a->partial = gemv_partial_;
  a->partial_capacity = kGemvPartialFloats;
  a->counters = gemv_counters_;
  a->counter_capacity = kGemvCounters;
  return true;
}

Status GemmLt::linear_swiglu(const __nv_bfloat16* gate_up, __nv_bfloat16* act, const __nv_bfloat16* w, void* y,
                             DType y_dtype, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  if (m == 0) return Status::ok();
  if (m < 0 || n <= 0 || k <= 0) return invalid_argument("gemm: bad sizes");
  if (GemvArgs a; m <= kGemvSimdRows && gemv_args(gate_up, w, y, y_dtype, m, n, k, 2 * k, n, &a)) {
    a.x_swiglu = true;
    return gemv_bf16(a, stream);
  }
  ADAKV_RETURN_IF_ERROR(swiglu(gate_up, act, static_cast<int32_t>(m), static_cast<int32_t>(k), stream));
  return linear(act, w, y, y_dtype, m, n, k, stream);
}

}  // namespace adakv::cuda
