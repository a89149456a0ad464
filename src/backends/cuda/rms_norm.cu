// The residual add fused with RMSNorm (model_ops.h): one block per row, the row held in
// registers between the two passes (sum of squares, then scale), so x is read once and written
// once. fp32 throughout; the product is rounded to bf16 once, as in the CPU oracle's
// w * (x * inv_rms) followed by the GEMM's bf16 input.
#include "backends/cuda/dependent_launch.cuh"
#include "backends/cuda/model_ops.h"
#include "backends/cuda/model_ops_common.cuh"

namespace adakv::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxPerThread = 32;  // dim <= 8192 held in registers; larger dims loop twice over x

__global__ void __launch_bounds__(kThreads) rms_norm_kernel(RmsNormArgs a) {
  __shared__ float scratch[32];
  const int r = blockIdx.x;
  const bool write_x = a.row_index == nullptr && a.delta != nullptr;
  __nv_bfloat16* out = a.out + static_cast<int64_t>(r) * a.dim;
  float ss = 0.f;
  // The row of x (and delta) this block normalises: row_index may come from an earlier kernel,
  // so it is read after the wait.
  const auto row_of = [&](float** x, const __nv_bfloat16** delta) {
    const int64_t src_row = a.row_index != nullptr ? a.row_index[r] : r;
    *x = a.x + src_row * a.dim;
    *delta = a.delta != nullptr ? a.delta + src_row * a.dim : nullptr;
  };
  float* x = nullptr;
  const __nv_bfloat16* delta = nullptr;
  if (a.dim <= kThreads * kMaxPerThread) {
    // Every load of the row (x, delta, bias, weight) is issued before the first store: a store
    // to x (fp32) may alias the bias or the weight (fp32 too) as far as the compiler knows, and
    // interleaving them made each of the 16-32 loads per thread wait for the store before it,
    // a chain of dependent global round trips (about 10 µs for one row of 4096 on an H100).
    // The weight is read before the wait (no kernel writes it), x and delta after.
    float v[kMaxPerThread], w[kMaxPerThread];
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads;
      w[j] = i < a.dim ? a.weight[i] : 0.f;
    }
    await_preceding_grid();
    release_dependent_grid();
    row_of(&x, &delta);
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads;
      v[j] = i < a.dim ? x[i] : 0.f;
    }
    if (delta != nullptr) {
#pragma unroll
      for (int j = 0; j < kMaxPerThread; ++j) {
        const int i = threadIdx.x + j * kThreads;
        if (i < a.dim) v[j] += __bfloat162float(delta[i]) + (a.delta_bias != nullptr ? a.delta_bias[i] : 0.f);
      }
    }
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) ss += v[j] * v[j];
    if (write_x) {
#pragma unroll
      for (int j = 0; j < kMaxPerThread; ++j) {
        const int i = threadIdx.x + j * kThreads;
        if (i < a.dim) x[i] = v[j];
      }
    }
    ss = ops_detail::block_sum(ss, scratch);
    const float inv_rms = 1.0f / sqrtf(ss / static_cast<float>(a.dim) + a.eps);
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i < a.dim) out[i] = __float2bfloat16(w[j] * (v[j] * inv_rms));
    }
    return;
  }
  // Rows longer than the registers hold: x read twice (the second pass recomputes x + delta when
  // x is not rewritten).
  await_preceding_grid();
  release_dependent_grid();
  row_of(&x, &delta);
  for (int i = threadIdx.x; i < a.dim; i += kThreads) {
    float val = x[i];
    if (delta != nullptr) {
      val += __bfloat162float(delta[i]) + (a.delta_bias != nullptr ? a.delta_bias[i] : 0.f);
      if (write_x) x[i] = val;
    }
    ss += val * val;
  }
  ss = ops_detail::block_sum(ss, scratch);
  const float inv_rms = 1.0f / sqrtf(ss / static_cast<float>(a.dim) + a.eps);
  for (int i = threadIdx.x; i < a.dim; i += kThreads) {
    float val = x[i];
    if (delta != nullptr && !write_x)
      val += __bfloat162float(delta[i]) + (a.delta_bias != nullptr ? a.delta_bias[i] : 0.f);
    out[i] = __float2bfloat16(a.weight[i] * (val * inv_rms));
  }
}

}  // namespace

Status rms_norm_residual(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.x == nullptr || a.weight == nullptr || a.out == nullptr || a.dim <= 0)
    return invalid_argument("rms_norm_residual: null pointer or empty row");
  const int rows = a.row_index != nullptr ? a.out_rows : a.rows;
  if (rows <= 0) return Status::ok();
  return ops_detail::launch_status("rms_norm_residual",
                                   launch_dependent(rms_norm_kernel, dim3(rows), dim3(kThreads), 0, stream, a));
}

}  // namespace adakv::cuda
