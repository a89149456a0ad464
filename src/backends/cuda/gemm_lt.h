// bf16 projections through cuBLASLt: y[m][n] = x[m][k] . w[n][k]^T (nn.Linear's layout), fp32
// accumulation, y in bf16 (activations) or fp32 (logits). Row-major operands map to cuBLASLt's
// column-major "TN" form (y^T = w . x^T), which is the layout Hopper's kernels are tuned for.
//
// Biases are not fused here: the model adds them in the fp32 element-wise op that follows each
// projection (qkv_rope, rms_norm_residual), which keeps the bias in fp32 and costs no extra pass.
//
// Descriptors and the heuristic's algorithm are cached per (m, n, k, out dtype), so a step does no
// host-side search after the first; the workspace is allocated once.
//
// Decode shapes go to gemv_bf16 instead (gemv.h) where it measured faster: m <= 2 always, m up to
// gemv_rows() (default kGemvDefaultRows, 8) when the weight has at most kGemvTensorMaxWeight
// elements (the 8B model's qkv and o); 1.04-1.30x cuBLASLt's rate there;
// ADAKV_GEMV=0 in the environment, or set_gemv(false), keeps everything on cuBLASLt.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "backends/cuda/gemv.h"
#include "core/dtype.h"
#include "core/status.h"

namespace adakv::cuda {

class GemmLt {
 public:
  static Expected<std::unique_ptr<GemmLt>> create(size_t workspace_bytes = size_t{32} << 20);
  ~GemmLt();
  GemmLt(const GemmLt&) = delete;
  GemmLt& operator=(const GemmLt&) = delete;

  // x [m][k] bf16 (rows ldx apart, 0 = k), w [n][k] bf16, y [m][n] of y_dtype (kBF16 or kF32,
  // rows ldy apart, 0 = n). Pointers 16-byte aligned.
  Status linear(const __nv_bfloat16* x, const __nv_bfloat16* w, void* y, DType y_dtype, int64_t m, int64_t n,
                int64_t k, cudaStream_t stream, int64_t ldx = 0, int64_t ldy = 0);
  // The down projection of SwiGLU(gate_up): y = swiglu(gate_up) . w^T, gate_up [m][2k] bf16 (gates
  // then ups), w [n][k]. Where the CUDA-core GEMV takes it (m <= kGemvSimdRows, GEMV on) the SwiGLU
  // is computed as the GEMV loads its input, bit for bit as swiglu() would write it: one launch
  // instead of two. Otherwise swiglu() into `act` ([m][k] bf16 scratch), then linear().
  Status linear_swiglu(const __nv_bfloat16* gate_up, __nv_bfloat16* act, const __nv_bfloat16* w, void* y,
                       DType y_dtype, int64_t m, int64_t n, int64_t k, cudaStream_t stream);
  // Whether linear() sends m <= gemv_rows() to the GEMV kernel (default: yes, unless ADAKV_GEMV=0),
  // and up to how many rows (1 .. kGemvMaxRows; default kGemvDefaultRows: the measured crossover).
  void set_gemv(bool on) { gemv_ = on; }
  bool gemv() const { return gemv_; }
  void set_gemv_rows(int32_t rows) { gemv_rows_ = rows < 1 ? 1 : rows > kGemvMaxRows ? kGemvMaxRows : rows; }
  int32_t gemv_rows() const { return gemv_rows_; }

 private:
  GemmLt() = default;
  struct Plan;
  Expected<Plan*> plan(int64_t m, int64_t n, int64_t k, int64_t ldx, int64_t ldy, DType y_dtype);
  // Where linear() would use the GEMV for this call: fills *a and returns true (else false).
  bool gemv_args(const __nv_bfloat16* x, const __nv_bfloat16* w, void* y, DType y_dtype, int64_t m, int64_t n,
                 int64_t k, int64_t ldx, int64_t ldy, GemvArgs* a) const;

  void* handle_ = nullptr;  // cublasLtHandle_t
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  bool gemv_ = true;
  int32_t gemv_rows_ = kGemvDefaultRows;
  float* gemv_partial_ = nullptr;     // [kGemvPartialFloats] split-K partial sums
  int32_t* gemv_counters_ = nullptr;  // [kGemvCounters] arrival counters, zero between calls
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int>, std::unique_ptr<Plan>> plans_;
};

}  // namespace adakv::cuda
