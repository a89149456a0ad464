// Error handling for CUDA runtime calls. Two flavours, as for the rest of adakv:
//   ADAKV_CUDA_RETURN_IF_ERROR(expr)  inside functions returning Status or Expected<T>: a failing
//                                     call (out of memory, no device, bad launch) becomes a Status
//                                     naming the call, the file and the line.
//   ADAKV_CUDA_CHECK(expr)            for invariants and in tests/benchmarks: aborts with the same.
// After every kernel launch, cuda_last_error() (cudaGetLastError: no synchronisation) reports a
// bad launch configuration at once instead of at the next synchronising call.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/status.h"

namespace adakv::cuda {

inline Status cuda_status(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return Status::ok();
  return internal_error(std::string(file) + ":" + std::to_string(line) + ": " + expr + ": " +
                        cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

[[noreturn]] inline void cuda_check_failed(cudaError_t err, const char* expr, const char* file, int line) {
  std::fprintf(stderr, "adakv: CUDA call failed at %s:%d: %s: %s (%s)\n", file, line, expr,
               cudaGetErrorName(err), cudaGetErrorString(err));
  std::abort();
}

}  // namespace adakv::cuda

#define ADAKV_CUDA_RETURN_IF_ERROR(expr)                                                \
  do {                                                                                  \
    const cudaError_t adakv_cuda_err_ = (expr);                                         \
    if (adakv_cuda_err_ != cudaSuccess)                                                 \
      return ::adakv::cuda::cuda_status(adakv_cuda_err_, #expr, __FILE__, __LINE__);    \
  } while (0)

#define ADAKV_CUDA_CHECK(expr)                                                          \
  do {                                                                                  \
    const cudaError_t adakv_cuda_err_ = (expr);                                         \
    if (adakv_cuda_err_ != cudaSuccess)                                                 \
      ::adakv::cuda::cuda_check_failed(adakv_cuda_err_, #expr, __FILE__, __LINE__);     \
  } while (0)
