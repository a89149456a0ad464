// The device-wide primitives the keep selection needs, as thin wrappers over CUB (which ships
// with the CUDA toolkit), so that only select_sort.cu includes CUB. Every function follows CUB's
// two-call convention: with temp == nullptr it only sets temp_bytes.
//
// Radix sorts are stable (CUB's DeviceRadixSort is documented stable): items with equal keys keep
// their input order, which is how ties break by position.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace adakv::cuda::select_detail {

// Sorts (key, value) pairs by the key bits [0, end_bit), ascending, stable.
cudaError_t sort_pairs_u32(void* temp, size_t& temp_bytes, const uint32_t* keys_in, uint32_t* keys_out,
                           const int32_t* values_in, int32_t* values_out, int32_t count, int end_bit,
                           cudaStream_t stream);
cudaError_t sort_pairs_u64(void* temp, size_t& temp_bytes, const uint64_t* keys_in, uint64_t* keys_out,
                           const int32_t* values_in, int32_t* values_out, int32_t count, int end_bit,
                           cudaStream_t stream);
// out[i] = in[0] + ... + in[i - 1].
cudaError_t exclusive_sum_i32(void* temp, size_t& temp_bytes, const int32_t* in, int32_t* out, int32_t count,
                              cudaStream_t stream);

}  // namespace adakv::cuda::select_detail
