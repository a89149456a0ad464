// A 16-byte global load for data read exactly once (K/V pages, projection weights): it bypasses
// L1 (no allocation there), so the stream does not evict what other loads reuse.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace adakv::cuda {

__device__ __forceinline__ uint4 load_stream(const __nv_bfloat16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

}  // namespace adakv::cuda
