// The fp32 tile product behind the window scores and CriticalKV's value norms: a block of 256
// threads computes acc[row][col] = sum_t A[row][t] * B[col][t] for a tile of 16*TM rows and 64
// columns, with both operands bf16 in global memory (rows of head_dim contiguous elements) and
// fp32 (transposed) in shared memory. Thread (ty, tx) = (tid / 16, tid % 16) owns rows
// ty*TM .. ty*TM+TM-1 and columns tx*4 .. tx*4+3.
//
// Why CUDA cores and not tensor cores: the scores must agree with the fp64 host reference to
// 1e-5 relative (issue 4), and a sequential fp32 FMA chain per dot product gives about 1e-6; the
// whole scoring pass is a few percent of prefill on CUDA cores (docs/benchmarks.md).
// Variants: TM = 8 (128 rows: g*w = 128 for Llama's 4 x 32, or a chunk of more) and TM = 2
// (32 rows: small g*w such as 1 x 8 or 4 x 8, where a 128-row tile would be mostly padding).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/score_common.cuh"

namespace adakv::cuda::score_detail {

inline constexpr int kTileThreads = 256;
inline constexpr int kColTile = 64;  // columns (keys, hidden units) per tile
inline constexpr int kColsPerThread = 4;

template <int D, int TM>
struct TileShape {
  static_assert(D % 8 == 0 && (TM == 2 || TM % 4 == 0), "tile shape");
  static constexpr int kRowTile = 16 * TM;
  // +4 floats: keeps 16-byte alignment of every d-row and staggers the banks between d-rows.
  static constexpr int kRowPitch = kRowTile + 4;
  static constexpr int kColPitch = kColTile + 4;
  static constexpr int kRowFloats = D * kRowPitch;  // [D][kRowPitch] transposed row operand
  static constexpr int kColFloats = D * kColPitch;  // [D][kColPitch] transposed column operand
};

// Stores NR operand rows transposed: dst[t * Pitch + r] = row r element t (fp32), r < NR, t < D.
// row_ptr(r) gives the bf16 address of row r (16-byte aligned) for r < count; rows r >= count
// are zero (their products are computed and ignored). Warp lanes take consecutive rows, so the
// shared stores of one instruction hit 32 consecutive words (no bank conflict).
template <int D, int NR, int Pitch, typename RowPtr>
__device__ __forceinline__ void load_transposed(float* dst, int count, RowPtr row_ptr) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < NR * kChunks; idx += blockDim.x) {
    const int r = idx % NR;
    const int c = idx / NR;
    float v[8];
    if (r < count) {
      load_bf16x8(row_ptr(r) + c * 8, v);
    } else {
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = 0.0f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) dst[(c * 8 + u) * Pitch + r] = v[u];
  }
}

// acc[i][j] = sum over t of rows_t[t][ty*TM + i] * cols_t[t][tx*4 + j], one fmaf chain in t order.
template <int D, int TM>
__device__ __forceinline__ void tile_product(const float* rows_t, const float* cols_t, int ty, int tx,
                                             float (&acc)[TM][kColsPerThread]) {
  using S = TileShape<D, TM>;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) acc[i][j] = 0.0f;
  const float* a_base = rows_t + ty * TM;
  const float* b_base = cols_t + tx * kColsPerThread;
#pragma unroll 4
  for (int t = 0; t < D; ++t) {
    float a[TM];
    if constexpr (TM % 4 == 0) {
#pragma unroll
      for (int v = 0; v < TM / 4; ++v) {
        const float4 x = *reinterpret_cast<const float4*>(a_base + t * S::kRowPitch + 4 * v);
        a[4 * v] = x.x;
        a[4 * v + 1] = x.y;
        a[4 * v + 2] = x.z;
        a[4 * v + 3] = x.w;
      }
    } else {
      const float2 x = *reinterpret_cast<const float2*>(a_base + t * S::kRowPitch);
      a[0] = x.x;
      a[1] = x.y;
    }
    const float4 y = *reinterpret_cast<const float4*>(b_base + t * S::kColPitch);
    const float b[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

}  // namespace adakv::cuda::score_detail
