// Few-row projections (gemv.h).
#include "backends/cuda/gemv.h"

#include <cstdlib>
#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/dependent_launch.cuh"
#include "backends/cuda/last_arrival.cuh"
#include "backends/cuda/model_ops_common.cuh"
#include "backends/cuda/score_common.cuh"
#include "backends/cuda/score_mma.cuh"
#include "backends/cuda/stream_load.cuh"

namespace adakv::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // 16
// Most of K per block of the CUDA-core kernel (x's slice in shared memory: m x kSlice bf16); a
// call cuts K into the fewest slices of at most this, of equal length. 4096 keeps the 8B model's
// qkv and o projections (K = 4096) in one slice: no partial sums and no last block adding them up,
// and 1792 blocks instead of 3584 for gate_up (H200, 2026-11-28: whole batch 1 decode steps 5.6-6.6 %
// faster than with 2048). Diagnostics: ADAKV_GEMV_SLICE=1024|2048, read once per process.
constexpr int kSlice = 4096;
int simd_slice() {
  static const int s = [] {
    const char* e = std::getenv("ADAKV_GEMV_SLICE");
    const int v = e != nullptr ? std::atoi(e) : kSlice;
    return v == 1024 || v == 2048 ? v : kSlice;
  }();
  return s;
}
constexpr int kUnroll = 4;                            // 16-byte pieces per row in flight per lane
// Launched as a programmatic dependent (dependent_launch.h), a block asks for the start of each of
// its weight rows in L2 before it waits for the kernel before it (which wrote x): 32 KB a block,
// enough to keep an SM's share of DRAM busy for the ~1 µs the wait and x's load take.
constexpr uint32_t kPrefetchBytesPerRow = 2048;

__device__ __forceinline__ float dot8(const uint4& w, const uint4& x) {
  float a[8], b[8];
  score_detail::load_bf16x8(reinterpret_cast<const __nv_bfloat16*>(&w), a);
  score_detail::load_bf16x8(reinterpret_cast<const __nv_bfloat16*>(&x), b);
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s = fmaf(a[e], b[e], s);
  return s;
}

// y[m][row] = v in y's type.
__device__ __forceinline__ void store_y(const GemvArgs& a, int m, int row, float v) {
  if (a.y_dtype == DType::kF32)
    static_cast<float*>(a.y)[m * a.ldy + row] = v;
  else
    static_cast<__nv_bfloat16*>(a.y)[m * a.ldy + row] = __float2bfloat16(v);
}

// After every block has written its slice's sums to the partials ([slice][m_count][n]): the block
// that brings a row tile's last slice (rows [row_base, row_base + rows)) adds the slices in order
// and writes y, then resets the tile's counter for the next launch. s_last: a __shared__ int.
__device__ __forceinline__ void sum_slices_if_last(const GemvArgs& a, int m_count, int row_base, int rows, int slices,
                                                   int* s_last) {
  if (!block_arrives_last(a.counters + blockIdx.x, slices, s_last)) return;
  for (int i = threadIdx.x; i < rows * m_count; i += blockDim.x) {
    const int m = i / rows, row = row_base + i % rows;
    if (row >= a.n) continue;
    float v = 0.f;
    for (int s = 0; s < slices; ++s) v += __ldcg(a.partial + (static_cast<int64_t>(s) * m_count + m) * a.n + row);
    store_y(a, m, row, v);
  }
  if (threadIdx.x == 0) a.counters[blockIdx.x] = 0;
}

// kCap: the most of K a block takes (x's slice in shared memory), simd_slice() of the launch.
template <int M, int kCap>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const GemvArgs a) {
  __shared__ __align__(16) __nv_bfloat16 xs[M * kCap];
  __shared__ int s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slice = blockIdx.y, slices = gridDim.y;
  // Equal slices (a multiple of 8, at most kCap): 14336 = 4 x 3584, not 3 x 4096 + 2048.
  const int len = (((a.k + slices - 1) / slices) + 7) & ~7;
  const int k0 = slice * len, k1 = min(a.k, k0 + len), ks = k1 - k0;  // ks: a multiple of 8 (<= 0: none)
  if (tid < kRowsPerBlock && ks > 0) {
    const int row = min(static_cast<int>(blockIdx.x) * kRowsPerBlock + tid, a.n - 1);
    prefetch_l2(a.w + static_cast<int64_t>(row) * a.k + k0, min(2u * ks, kPrefetchBytesPerRow));
  }
  await_preceding_grid();
  release_dependent_grid();
  for (int i = tid; i < M * (ks / 8); i += blockDim.x) {
    const int m = i / (ks / 8), c = i - m * (ks / 8);
    const __nv_bfloat16* src = a.x + m * a.ldx + k0 + 8 * c;
    uint4 v = *reinterpret_cast<const uint4*>(src);
    // x_swiglu: v holds 8 gates; their ups are k further on.
    if (a.x_swiglu) v = ops_detail::swiglu8(v, *reinterpret_cast<const uint4*>(src + a.k));
    reinterpret_cast<uint4*>(xs + m * kCap)[c] = v;
  }
  __syncthreads();
  const int row0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  float acc[M][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] = 0.f;
  const __nv_bfloat16* wr[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) wr[r] = a.w + static_cast<int64_t>(min(row0 + r, a.n - 1)) * a.k + k0;
  // Pieces of 8 elements: lane l takes pieces l, l + 32, ... of the slice, kUnroll at a time.
  const int pieces = ks / 8;
  for (int base = 0; base < pieces; base += 32 * kUnroll) {
    uint4 wv[kUnroll][kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) wv[u][r] = c < pieces ? load_stream(wr[r] + 8 * c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32 + lane;
      if (c >= pieces) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = reinterpret_cast<const uint4*>(xs + m * kCap)[c];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] += dot8(wv[u][r], xv);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      acc[m][r] = v;
    }
  if (slices == 1) {
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        if (row0 + r < a.n)
#pragma unroll
          for (int m = 0; m < M; ++m) store_y(a, m, row0 + r, acc[m][r]);
    return;
  }
  // Several slices: this block's sums to the partials, added up by the tile's last block.
  if (lane == 0)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
      if (row0 + r < a.n)
#pragma unroll
        for (int m = 0; m < M; ++m) a.partial[(static_cast<int64_t>(slice) * M + m) * a.n + row0 + r] = acc[m][r];
  sum_slices_if_last(a, M, blockIdx.x * kRowsPerBlock, kRowsPerBlock, slices, &s_last);
}

// --- tensor cores, 3..32 rows ----------------------------------------------------------------------
//
// mma.m16n8k16 with 16 weight rows as M and 8 tokens (rows of x) as N: W is streamed once and each
// fragment serves every token tile. Both operands come straight from global memory as 16-byte
// pieces: lane (r, c) = (lane / 4, lane % 4) loads w[row r (and r + 8)][k0 + 8c, +8) and
// x[token r][k0 + 8c, +8) for a 32-wide k block; words 0-1 of each piece feed the first k16 step,
// words 2-3 the second. That permutes k within the block identically for both operands, which a
// dot product does not see. A block of 4 warps takes 64 rows (4 row tiles) and a slice of 1024 of
// K, its warps interleaving the 32-wide k blocks; their sums meet in shared memory, and the slices
// of a row tile are summed in order by the block that finishes last (as above).
constexpr int kTcWarps = 4;
constexpr int kTcTiles = 4;                     // 16-row tiles per block
constexpr int kTcRows = 16 * kTcTiles;          // 64
constexpr int kTcSlice = 1024;

template <int NT>
__global__ void __launch_bounds__(kTcWarps * 32) gemv_tc_kernel(const GemvArgs a) {
  __shared__ float red[kTcWarps][kTcRows][8 * NT];  // each warp's sums, [row][token]
  __shared__ int s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int slice = blockIdx.y, slices = gridDim.y;
  const int k0 = slice * kTcSlice, k1 = min(a.k, k0 + kTcSlice);
  const int row_base = blockIdx.x * kTcRows;
  if (tid < kTcRows) {  // as in gemv_kernel: the rows' first 512 bytes (32 KB a block) before the wait
    const int row = min(row_base + tid, a.n - 1);
    prefetch_l2(a.w + static_cast<int64_t>(row) * a.k + k0, min(2u * (k1 - k0), 512u));
  }
  await_preceding_grid();
  release_dependent_grid();
  float acc[kTcTiles][NT][4];
#pragma unroll
  for (int t = 0; t < kTcTiles; ++t)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[t][n][0] = acc[t][n][1] = acc[t][n][2] = acc[t][n][3] = 0.f;
  const __nv_bfloat16* wrow[kTcTiles][2];
#pragma unroll
  for (int t = 0; t < kTcTiles; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wrow[t][h] = a.w + static_cast<int64_t>(min(row_base + 16 * t + r + 8 * h, a.n - 1)) * a.k;
  const __nv_bfloat16* xrow[NT];
  bool xok[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    xok[n] = 8 * n + r < a.m;
    xrow[n] = a.x + static_cast<int64_t>(min(8 * n + r, a.m - 1)) * a.ldx;
  }
  for (int kb = k0 + 32 * warp; kb < k1; kb += 32 * kTcWarps) {
    const int kk = kb + 8 * c;
    const bool in = kk < k1;  // k is a multiple of 8: a piece is all in or all out
    uint4 wv[kTcTiles][2];
#pragma unroll
    for (int t = 0; t < kTcTiles; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) wv[t][h] = in ? load_stream(wrow[t][h] + kk) : make_uint4(0, 0, 0, 0);
    uint4 xv[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n)
      xv[n] = in && xok[n] ? __ldg(reinterpret_cast<const uint4*>(xrow[n] + kk)) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int t = 0; t < kTcTiles; ++t)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const uint32_t a0[4] = {wv[t][0].x, wv[t][1].x, wv[t][0].y, wv[t][1].y};
        const uint32_t a1[4] = {wv[t][0].z, wv[t][1].z, wv[t][0].w, wv[t][1].w};
        score_detail::mma_bf16_16816(acc[t][n], a0, xv[n].x, xv[n].y);
        score_detail::mma_bf16_16816(acc[t][n], a1, xv[n].z, xv[n].w);
      }
  }
  // C fragment: acc[t][n][0..1] = (row 16t + r, tokens 8n + 2c, +1), [2..3] = (row 16t + r + 8, same).
#pragma unroll
  for (int t = 0; t < kTcTiles; ++t)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int q = 0; q < 4; ++q) red[warp][16 * t + r + 8 * (q >> 1)][8 * n + 2 * c + (q & 1)] = acc[t][n][q];
  __syncthreads();
  for (int i = tid; i < kTcRows * 8 * NT; i += blockDim.x) {
    const int rr = i / (8 * NT), m = i - rr * (8 * NT), row = row_base + rr;
    if (row >= a.n || m >= a.m) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kTcWarps; ++w) v += red[w][rr][m];
    if (slices == 1)
      store_y(a, m, row, v);
    else
      a.partial[(static_cast<int64_t>(slice) * a.m + m) * a.n + row] = v;
  }
  if (slices == 1) return;
  sum_slices_if_last(a, a.m, row_base, kTcRows, slices, &s_last);
}

template <int kCap, int... kMs>
cudaError_t launch_for_m(int m, dim3 grid, const GemvArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((m == kMs ? (err = launch_dependent(gemv_kernel<kMs, kCap>, grid, dim3(kWarps * 32), 0, stream, a), true)
             : false) ||
   ...);
  return err;
}

}  // namespace

int32_t gemv_slices(int32_t m, int32_t k) {
  const int32_t slice = m <= kGemvSimdRows ? simd_slice() : kTcSlice;
  return (k + slice - 1) / slice;
}

int64_t gemv_partial_floats(int32_t m, int32_t n, int32_t k) {
  const int32_t s = gemv_slices(m, k);
  return s > 1 ? int64_t{s} * m * n : 0;
}

int64_t gemv_tiles(int32_t m, int32_t n) {
  const int32_t rows = m <= kGemvSimdRows ? kRowsPerBlock : kTcRows;
  return (n + rows - 1) / rows;
}

Status gemv_bf16(const GemvArgs& a, cudaStream_t stream) {
  if (a.m < 1 || a.m > kGemvMaxRows || a.n < 1 || a.k < 8 || a.k % 8 != 0)
    return invalid_argument("gemv: m " + std::to_string(a.m) + ", n " + std::to_string(a.n) + ", k " +
                            std::to_string(a.k) + " (m 1.." + std::to_string(kGemvMaxRows) + ", k a multiple of 8)");
  if (a.y_dtype != DType::kBF16 && a.y_dtype != DType::kF32) return invalid_argument("gemv: output must be bf16 or fp32");
  if (a.ldx % 8 != 0 || reinterpret_cast<uintptr_t>(a.x) % 16 != 0 || reinterpret_cast<uintptr_t>(a.w) % 16 != 0)
    return invalid_argument("gemv: x and w need 16-byte alignment and ldx a multiple of 8");
  if (a.x_swiglu && (a.m > kGemvSimdRows || a.ldx < 2 * int64_t{a.k}))
    return invalid_argument("gemv: a fused SwiGLU input needs m <= " + std::to_string(kGemvSimdRows) +
                            " and ldx >= 2k (got m " + std::to_string(a.m) + ", ldx " + std::to_string(a.ldx) + ")");
  const int32_t slices = gemv_slices(a.m, a.k);
  const int64_t tiles = gemv_tiles(a.m, a.n);
  if (slices > 1 && (gemv_partial_floats(a.m, a.n, a.k) > a.partial_capacity || tiles > a.counter_capacity))
    return invalid_argument("gemv: the workspace is too small for n " + std::to_string(a.n));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slices));
  if (a.m <= kGemvSimdRows) {
    const int sl = simd_slice();
    ADAKV_CUDA_RETURN_IF_ERROR((sl == 1024   ? launch_for_m<1024, 1, 2>(a.m, grid, a, stream)
                                : sl == 2048 ? launch_for_m<2048, 1, 2>(a.m, grid, a, stream)
                                             : launch_for_m<4096, 1, 2>(a.m, grid, a, stream)));
  } else {
    const int nt = (a.m + 7) / 8;
    cudaError_t err = cudaErrorInvalidValue;
    const dim3 block(kTcWarps * 32);
    if (nt == 1) err = launch_dependent(gemv_tc_kernel<1>, grid, block, 0, stream, a);
    else if (nt == 2) err = launch_dependent(gemv_tc_kernel<2>, grid, block, 0, stream, a);
    else if (nt == 3) err = launch_dependent(gemv_tc_kernel<3>, grid, block, 0, stream, a);
    else err = launch_dependent(gemv_tc_kernel<4>, grid, block, 0, stream, a);
    ADAKV_CUDA_RETURN_IF_ERROR(err);
  }
  return Status::ok();
}

}  // namespace adakv::cuda
