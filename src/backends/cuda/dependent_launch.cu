// The process-wide switch of dependent_launch.h.
#include "backends/cuda/dependent_launch.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace adakv::cuda {
namespace {

// -1: not decided yet; 0 off; 1 on.
std::atomic<int> g_state{-1};

bool device_supports() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 9;
}

}  // namespace

bool dependent_launches() {
  int s = g_state.load(std::memory_order_relaxed);
  if (s < 0) {
    const char* e = std::getenv("ADAKV_DEPENDENT_LAUNCH");
    const bool on = device_supports() && !(e != nullptr && std::string(e) == "0");
    int expected = -1;
    g_state.compare_exchange_strong(expected, on ? 1 : 0);
    s = g_state.load(std::memory_order_relaxed);
  }
  return s == 1;
}

void set_dependent_launches(bool on) { g_state.store(on && device_supports() ? 1 : 0); }

}  // namespace adakv::cuda
