// "The last one to finish combines": a block (or warp) has written its part of a result to global
// memory, counts its arrival on a counter shared with the others, and the one that brings the
// last arrival reads every part (through L2: ld.cg, since L1 is not coherent across SMs) and
// writes the combined result. Used by the fused decode-attention merge and the GEMV's K slices.
//
// Ordering (PTX memory model): the barrier before the count orders every thread's earlier writes
// before thread 0's gpu-scope release, and a release is cumulative, so they are visible to
// whoever acquires a later value of the counter. The last arriver's acquire, passed on to its
// other threads by the barrier after the count, orders their reads after all of it. This takes
// the place of a __threadfence() on each side of a relaxed atomicAdd: both compile to
// MEMBAR.SC.GPU, a sequentially consistent fence, where release and acquire are all that the
// pattern needs.
#pragma once

#include <cuda_runtime.h>

namespace adakv::cuda {

// *p += v at gpu scope with acquire and release semantics; returns the old value.
__device__ __forceinline__ int atomic_add_acq_rel_gpu(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// Every thread of the block calls this after writing its part; true in every thread of the block
// that brings the count to `count` (exactly one block per `count` arrivals). s_flag: a
// __shared__ int of the block.
__device__ __forceinline__ bool block_arrives_last(int* counter, int count, int* s_flag) {
  __syncthreads();
  if (threadIdx.x == 0) *s_flag = atomic_add_acq_rel_gpu(counter, 1) == count - 1;
  __syncthreads();
  return *s_flag != 0;
}

// The same for one warp (all 32 lanes call it).
__device__ __forceinline__ bool warp_arrives_last(int* counter, int count) {
  __syncwarp();
  int last = 0;
  if ((threadIdx.x & 31) == 0) last = atomic_add_acq_rel_gpu(counter, 1) == count - 1;
  last = __shfl_sync(0xffffffffu, last, 0);
  __syncwarp();
  return last != 0;
}

}  // namespace adakv::cuda
