// A device buffer of `count` T for the kernel tests: freed on scope exit, ptr null when cudaMalloc
// failed (the caller reports it), whole-buffer copies to and from the host.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(size_t count) : n(count) {
    if (cudaMalloc(&ptr, std::max<size_t>(1, count) * sizeof(T)) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  bool upload(const std::vector<T>& h) {
    return cudaMemcpy(ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess;
  }
  bool download(std::vector<T>* h) const {
    h->resize(n);
    return cudaMemcpy(h->data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess;
  }
};
