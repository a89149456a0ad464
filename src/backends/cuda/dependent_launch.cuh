// The device side of dependent_launch.h, and the launch. A kernel launched with
// launch_dependent() must call await_preceding_grid() in every block before it reads anything an
// earlier kernel may write or writes anything at all (before that: only prefetch_l2 or loads of
// data no kernel writes, such as weights), and should call release_dependent_grid() right after
// it: the next kernel's blocks then become resident as this one's leave. Releasing only after the
// wait keeps the chain one kernel deep: a kernel's pre-wait part starts only once the kernel two
// places before it has finished, which is what lets decode attention read its plan and page ids
// before its wait (decode_attention.h, overlap_prologue).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "backends/cuda/dependent_launch.h"

namespace adakv::cuda {

__device__ __forceinline__ void await_preceding_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void release_dependent_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Launches `kernel` (as a programmatic dependent of the preceding kernel when `as_dependent`)
// and returns the launch error: a bad configuration is reported here rather than at the next
// synchronising call. A grid with no blocks launches nothing.
template <typename... Expected, typename... Actual>
cudaError_t launch_kernel(bool as_dependent, void (*kernel)(Expected...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, Actual&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = as_dependent ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, std::forward<Actual>(args)...);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// launch_kernel as a dependent when dependent_launches().
template <typename... Expected, typename... Actual>
cudaError_t launch_dependent(void (*kernel)(Expected...), dim3 grid, dim3 block, size_t smem_bytes,
                             cudaStream_t stream, Actual&&... args) {
  return launch_kernel(dependent_launches(), kernel, grid, block, smem_bytes, stream, std::forward<Actual>(args)...);
}

}  // namespace adakv::cuda
