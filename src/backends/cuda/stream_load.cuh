// A 16-byte global load for data read exactly once (K/V pages, projection weights): it bypasses
// L1 (no allocation there), so the stream does not evict what other loads reuse.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace adakv::cuda {

// .L2::128B: a miss brings the whole 128-byte line into L2, not just the 32-byte sectors asked
// for. The decode attention's K loads cover 64 bytes of 8 token rows per warp instruction, so
// without it the two halves of each line reach DRAM as separate requests. H200 (2026-11-28,
// session 11, alternating builds): decode attention +2.5-3.5 points of copy bandwidth from 134 MB
// on (batch 1 / 32K 86.8 -> 89.6-90.1 %, 537 MB 98 -> 101 %), +1 at 67 MB; decode steps at batch 8
// full cache +1.3 %. .L2::256B lost 5-7 points from 134 MB, .L2::64B was level or lower, and an
// evict-first L2 policy on top of 128B changed nothing.
__device__ __forceinline__ uint4 load_stream(const __nv_bfloat16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Asks the memory system to bring [p, p + bytes) into L2 without waiting for it (sm_90 bulk
// prefetch; p 16-byte aligned, bytes a multiple of 16). Only a hint: no register is written and
// L2 stays coherent, so it is safe on data another kernel may still be writing. A no-op before
// sm_90.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}

}  // namespace adakv::cuda
