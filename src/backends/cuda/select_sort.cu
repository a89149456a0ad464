// CUB wrappers of select_sort.h.
#include "backends/cuda/select_sort.h"

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

namespace adakv::cuda::select_detail {

cudaError_t sort_pairs_u32(void* temp, size_t& temp_bytes, const uint32_t* keys_in, uint32_t* keys_out,
                           const int32_t* values_in, int32_t* values_out, int32_t count, int end_bit,
                           cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, values_out, count, 0, end_bit,
                                         stream);
}

cudaError_t sort_pairs_u64(void* temp, size_t& temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                           const int32_t* values_in, int32_t* values_out, int32_t count, int end_bit,
                           cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, values_out, count, 0, end_bit,
                                         stream);
}

cudaError_t exclusive_sum_i32(void* temp, size_t& temp_bytes, const int32_t* in, int32_t* out, int32_t count,
                              cudaStream_t stream) {
  return cub::DeviceScan::ExclusiveSum(temp, temp_bytes, in, out, count, stream);
}

}  // namespace adakv::cuda::select_detail
