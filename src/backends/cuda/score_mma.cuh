// Tensor-core logit tiles for the scoring kernels (score_window.cu): bf16 x bf16 products with
// fp32 accumulation through mma.sync.m16n8k16 (HMMA), operands staged in shared memory as bf16
// rows and read with ldmatrix. A block of 4 warps owns 64 rows (16 per warp) of the row operand
// (queries); each warp keeps its rows' A fragments in registers and multiplies them with tiles of
// 64 keys.
//
// Numerics: every product of two bf16 values is exact in fp32; the tensor core adds them in fp32.
// The result differs from the fp64 dot product by about 1e-6 relative of the logit's magnitude
// (tests/gpu/test_score_select.cc measures it), a little more than a sequential fp32 FMA chain,
// at a small fraction of its cost. The same instruction on the same data gives the same bits, so
// a pass that recomputes a logit gets exactly the first pass's value.
//
// C fragment of n-tile t (keys t*8 .. t*8+7): acc[t][0..1] = row lane/4, keys t*8 + 2*(lane%4) + {0,1};
// acc[t][2..3] = row lane/4 + 8, same keys.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace adakv::cuda::score_detail {

inline constexpr int kMmaThreads = 128;  // 4 warps
inline constexpr int kMmaRows = 64;      // rows per block chunk
inline constexpr int kMmaKeys = 64;      // keys per tile

template <int D>
struct MmaShape {
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  static constexpr int kPitch = D + 8;  // bf16 elements per shared row: 16-byte aligned, conflict-free ldmatrix
  static constexpr int kTileElems = 64 * kPitch;
  static constexpr int kSteps = D / 16;
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copies up to 64 rows of D bf16 (row_ptr(r), 16-byte aligned, for r < count) into dst
// [64][kPitch]; rows >= count are zero.
template <int D, typename RowPtr>
__device__ __forceinline__ void load_rows_bf16(__nv_bfloat16* dst, int count, RowPtr row_ptr) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < 64 * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, c = idx - (idx / kChunks) * kChunks;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < count) v = __ldg(reinterpret_cast<const uint4*>(row_ptr(r) + c * 8));
    *reinterpret_cast<uint4*>(dst + r * MmaShape<D>::kPitch + c * 8) = v;
  }
}

// cp.async: 16-byte global -> shared copies that do not wait (sm_80+), committed in groups;
// cp_async_wait<N> waits until at most N of this thread's groups are still in flight.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory"); }

// load_rows_bf16 without waiting: the rows < count are cp.async copies (complete after the
// caller's commit + wait), the rows past count are zeroed directly.
template <int D, typename RowPtr>
__device__ __forceinline__ void load_rows_bf16_async(__nv_bfloat16* dst, int count, RowPtr row_ptr) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < 64 * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, c = idx - (idx / kChunks) * kChunks;
    __nv_bfloat16* d = dst + r * MmaShape<D>::kPitch + c * 8;
    if (r < count)
      cp_async_16(d, row_ptr(r) + c * 8);
    else
      *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// The warp's A fragments (its 16 rows, all of D) from the shared row tile.
template <int D>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[MmaShape<D>::kSteps][4], const __nv_bfloat16* rows,
                                             int warp, int lane) {
  const __nv_bfloat16* base = rows + (warp * 16 + (lane % 16)) * MmaShape<D>::kPitch + (lane / 16) * 8;
#pragma unroll
  for (int kk = 0; kk < MmaShape<D>::kSteps; ++kk) ldmatrix_x4(a[kk], base + kk * 16);
}

// acc = the warp's 16 rows x the 64 keys of the shared key tile.
template <int D>
__device__ __forceinline__ void warp_logits(float (&acc)[8][4], const uint32_t (&a)[MmaShape<D>::kSteps][4],
                                            const __nv_bfloat16* keys, int lane) {
#pragma unroll
  for (int t = 0; t < 8; ++t)
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[t][u] = 0.0f;
  const __nv_bfloat16* base = keys + ((lane % 8) + (lane / 16) * 8) * MmaShape<D>::kPitch + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int kk = 0; kk < MmaShape<D>::kSteps; ++kk) {
#pragma unroll
    for (int tp = 0; tp < 4; ++tp) {
      uint32_t b[4];
      ldmatrix_x4(b, base + tp * 16 * MmaShape<D>::kPitch + kk * 16);
      mma_bf16_16816(acc[2 * tp], a[kk], b[0], b[1]);
      mma_bf16_16816(acc[2 * tp + 1], a[kk], b[2], b[3]);
    }
  }
}

}  // namespace adakv::cuda::score_detail
