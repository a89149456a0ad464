// Decode projections with few rows: y[m][n] = sum_k x[m][k] w[n][k] for m <= kGemvMaxRows, bf16
// x and w, fp32 accumulation, y bf16 or fp32. A decode step's projections read each weight once
// and do 2 m FLOPs per weight, so they are bound by the weight bytes; cuBLASLt reaches 46-66 % of
// copy bandwidth on the 8B model's o, qkv and down shapes at m = 1..8 (bench_e2e --gemms, events
// around each call, so a 5-7 µs launch floor is included), too few blocks for K = 4096 .. 14336
// weights of 4096 .. 6144 rows.
//
// How, m <= 2 (CUDA cores): a block of 8 warps takes 16 rows of w and one of K's equal slices of
// at most 4096;
// x's slice is staged in shared memory; each lane streams 16-byte pieces of its warp's 2 rows, 4
// pieces per row in flight, and keeps m x 2 fp32 sums, reduced over the warp at the end.
// m 3..32 (tensor cores, mma.m16n8k16 with the weight rows as M and the tokens as N): a block of
// 4 warps takes 64 rows and a slice of 1024 of K; each weight fragment serves every 8-token tile.
// Both: the slices of a row tile are summed in order by the block that finishes last
// (deterministic, one launch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"
#include "core/status.h"

namespace adakv::cuda {

inline constexpr int32_t kGemvMaxRows = 32;
// Where GemmLt uses it by default, from an H100 (2026-11-28, bench_e2e --gemms, the 8B model's
// projections): at m <= 2 (CUDA cores) it beats cuBLASLt on every projection (1.04-1.30x); at
// m = 3..8 (tensor cores) only on the small weights, qkv and o (1.10-1.18x), while on gate_up,
// down and lm_head it is 0.89-1.01x; from m = 16 on it loses (0.53-0.99x).
inline constexpr int32_t kGemvDefaultRows = 8;
inline constexpr int32_t kGemvSimdRows = 2;                  // the CUDA-core kernel's rows
inline constexpr int64_t kGemvTensorMaxWeight = int64_t{32} << 20;  // n x k for m > kGemvSimdRows

struct GemvArgs {
  const __nv_bfloat16* x = nullptr;  // [m][ldx]
  int64_t ldx = 0;
  const __nv_bfloat16* w = nullptr;  // [n][k]
  void* y = nullptr;                 // [m][ldy] of y_dtype
  int64_t ldy = 0;
  DType y_dtype = DType::kBF16;      // kBF16 or kF32
  int32_t m = 0, n = 0, k = 0;       // m in 1..8, k a multiple of 8
  // x is a fused gate / up projection, [m][ldx] with ldx >= 2k: the kernel takes
  // silu(x[:, 0:k]) * x[:, k:2k] rounded to bf16 (what swiglu() writes) as its input, so that the
  // down projection needs no separate SwiGLU launch. m <= kGemvSimdRows only.
  bool x_swiglu = false;
  // Workspace for K split into slices: partial sums [slices][m][n] fp32 and one arrival counter per
  // 16 rows (zero between calls; the last block resets its own).
  float* partial = nullptr;
  int64_t partial_capacity = 0;      // floats
  int32_t* counters = nullptr;
  int64_t counter_capacity = 0;
};

// The slices of K a call of m rows uses, the partial floats it needs (0 when one slice) and its
// row tiles (one counter each).
int32_t gemv_slices(int32_t m, int32_t k);
int64_t gemv_partial_floats(int32_t m, int32_t n, int32_t k);
int64_t gemv_tiles(int32_t m, int32_t n);

// Asynchronous on `stream`; fails (invalid argument) on shapes it does not take, before launching.
Status gemv_bf16(const GemvArgs& args, cudaStream_t stream);

}  // namespace adakv::cuda
