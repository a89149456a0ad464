// Few-row projections (gemv.h).
#include "backends/cuda/gemv.h"

#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/score_common.cuh"

namespace adakv::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // 16
constexpr int kSlice = 2048;                          // K per block (x's slice: m x 2048 bf16 = 32 KB at m 8)
constexpr int kUnroll = 4;                            // 16-byte pieces per row in flight per lane

__device__ __forceinline__ float dot8(const uint4& w, const uint4& x) {
  float a[8], b[8];
  score_detail::load_bf16x8(reinterpret_cast<const __nv_bfloat16*>(&w), a);
  score_detail::load_bf16x8(reinterpret_cast<const __nv_bfloat16*>(&x), b);
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s = fmaf(a[e], b[e], s);
  return s;
}

// Streaming 16-byte load: each weight byte is read once.
__device__ __forceinline__ uint4 load_w(const __nv_bfloat16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <int M>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const GemvArgs a) {
  __shared__ __align__(16) __nv_bfloat16 xs[M * kSlice];
  __shared__ int s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slice = blockIdx.y, slices = gridDim.y;
  const int k0 = slice * kSlice, k1 = min(a.k, k0 + kSlice), ks = k1 - k0;  // ks: a multiple of 8
  for (int i = tid; i < M * (ks / 8); i += blockDim.x) {
    const int m = i / (ks / 8), c = i - m * (ks / 8);
    reinterpret_cast<uint4*>(xs + m * kSlice)[c] = *reinterpret_cast<const uint4*>(a.x + m * a.ldx + k0 + 8 * c);
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
      for (int r = 0; r < kRowsPerWarp; ++r) wv[u][r] = c < pieces ? load_w(wr[r] + 8 * c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32 + lane;
      if (c >= pieces) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = reinterpret_cast<const uint4*>(xs + m * kSlice)[c];
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
  auto store = [&](int m, int row, float v) {
    if (a.y_dtype == DType::kF32)
      static_cast<float*>(a.y)[m * a.ldy + row] = v;
    else
      static_cast<__nv_bfloat16*>(a.y)[m * a.ldy + row] = __float2bfloat16(v);
  };
  if (slices == 1) {
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        if (row0 + r < a.n)
#pragma unroll
          for (int m = 0; m < M; ++m) store(m, row0 + r, acc[m][r]);
    return;
  }
  // Several slices: this block's sums to the partials; the block that brings a row tile's last
  // slice adds the slices in order and writes y.
  if (lane == 0)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
      if (row0 + r < a.n)
#pragma unroll
        for (int m = 0; m < M; ++m) a.partial[(static_cast<int64_t>(slice) * M + m) * a.n + row0 + r] = acc[m][r];
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(a.counters + blockIdx.x, 1) == slices - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int i = tid; i < M * kRowsPerBlock; i += blockDim.x) {
    const int m = i / kRowsPerBlock, row = blockIdx.x * kRowsPerBlock + i % kRowsPerBlock;
    if (row >= a.n) continue;
    float v = 0.f;
    for (int s = 0; s < slices; ++s) v += __ldcg(a.partial + (static_cast<int64_t>(s) * M + m) * a.n + row);
    store(m, row, v);
  }
  if (tid == 0) a.counters[blockIdx.x] = 0;
}

template <int... kMs>
cudaError_t launch_for_m(int m, dim3 grid, const GemvArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((m == kMs ? (err = score_detail::launch(gemv_kernel<kMs>, grid, dim3(kWarps * 32), 0, stream, a), true) : false) || ...);
  return err;
}

}  // namespace

int32_t gemv_slices(int32_t k) { return (k + kSlice - 1) / kSlice; }

int64_t gemv_partial_floats(int32_t m, int32_t n, int32_t k) {
  const int32_t s = gemv_slices(k);
  return s > 1 ? int64_t{s} * m * n : 0;
}

Status gemv_bf16(const GemvArgs& a, cudaStream_t stream) {
  if (a.m < 1 || a.m > kGemvMaxRows || a.n < 1 || a.k < 8 || a.k % 8 != 0)
    return invalid_argument("gemv: m " + std::to_string(a.m) + ", n " + std::to_string(a.n) + ", k " +
                            std::to_string(a.k) + " (m 1..8, k a multiple of 8)");
  if (a.y_dtype != DType::kBF16 && a.y_dtype != DType::kF32) return invalid_argument("gemv: output must be bf16 or fp32");
  if (a.ldx % 8 != 0 || reinterpret_cast<uintptr_t>(a.x) % 16 != 0 || reinterpret_cast<uintptr_t>(a.w) % 16 != 0)
    return invalid_argument("gemv: x and w need 16-byte alignment and ldx a multiple of 8");
  const int32_t slices = gemv_slices(a.k);
  const int64_t tiles = (a.n + kRowsPerBlock - 1) / kRowsPerBlock;
  if (slices > 1 && (gemv_partial_floats(a.m, a.n, a.k) > a.partial_capacity || tiles > a.counter_capacity))
    return invalid_argument("gemv: the workspace is too small for n " + std::to_string(a.n));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slices));
  ADAKV_CUDA_RETURN_IF_ERROR((launch_for_m<1, 2, 3, 4, 5, 6, 7, 8>(a.m, grid, a, stream)));
  return Status::ok();
}

}  // namespace adakv::cuda
