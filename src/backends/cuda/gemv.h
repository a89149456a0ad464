// Decode projections with few rows: y[m][n] = sum_k x[m][k] w[n][k] for m <= kGemvMaxRows, bf16
// x and w, fp32 accumulation, y bf16 or fp32. A decode step's projections read each weight once
// and do 2 m FLOPs per weight, so they are bound by the weight bytes; cuBLASLt reaches 46-66 % of
// copy bandwidth on the 8B model's o, qkv and down shapes at m = 1..8 (bench_e2e --gemms, events
// around each call, so a 5-7 µs launch floor is included), too few blocks for K = 4096 .. 14336
// weights of 4096 .. 6144 rows.
//
// How: a block of 8 warps takes 16 rows of w and a slice of up to 2048 of K (the slices of a row
// are summed in order by the block that finishes last: deterministic, no second launch); x's slice
// is staged in shared memory; each lane streams 16-byte pieces of its warp's 2 rows, 4 pieces per
// row in flight, and keeps m x 2 fp32 sums, reduced over the warp at the end.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"
#include "core/status.h"

namespace adakv::cuda {

inline constexpr int32_t kGemvMaxRows = 8;
// Up to how many rows GemmLt uses it by default: on an H100 (2026-11-28, bench_e2e --gemms) it
// beats cuBLASLt on every projection of the 8B model at m = 1 (1.04-1.22x) and m = 2
// (1.01-1.23x), is mixed at m = 4 (0.95-1.07x) and loses at m = 8 (0.72-0.82x: the dot products
// from shared memory become the bound, not the weight bytes).
inline constexpr int32_t kGemvDefaultRows = 2;

struct GemvArgs {
  const __nv_bfloat16* x = nullptr;  // [m][ldx]
  int64_t ldx = 0;
  const __nv_bfloat16* w = nullptr;  // [n][k]
  void* y = nullptr;                 // [m][ldy] of y_dtype
  int64_t ldy = 0;
  DType y_dtype = DType::kBF16;      // kBF16 or kF32
  int32_t m = 0, n = 0, k = 0;       // m in 1..8, k a multiple of 8
  // Workspace for K split into slices: partial sums [slices][m][n] fp32 and one arrival counter per
  // 16 rows (zero between calls; the last block resets its own).
  float* partial = nullptr;
  int64_t partial_capacity = 0;      // floats
  int32_t* counters = nullptr;
  int64_t counter_capacity = 0;
};

// The slices of K a call uses, and the partial floats it needs (0 when one slice).
int32_t gemv_slices(int32_t k);
int64_t gemv_partial_floats(int32_t m, int32_t n, int32_t k);

// Asynchronous on `stream`; fails (invalid argument) on shapes it does not take, before launching.
Status gemv_bf16(const GemvArgs& args, cudaStream_t stream);

}  // namespace adakv::cuda
