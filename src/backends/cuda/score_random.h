// The random policy's scores on the device (method.md 1.2, "Random"): the same counter-based
// hash as random_scores of compress/scorers.h, so a seed gives the host's scores bit for bit:
//   base = splitmix64(splitmix64(splitmix64(seed) ^ layer) ^ kv_head)
//   out[kv_head][j] = (splitmix64(base ^ j) >> 40) / 2^24,   j < count
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/status.h"

namespace adakv::cuda {

// out: [num_kv_heads][out_stride] fp32, the first `count` of each row written. Asynchronous.
Status random_scores_rows(uint64_t seed, int32_t layer, int32_t num_kv_heads, int32_t count, float* out,
                          int64_t out_stride, cudaStream_t stream);

}  // namespace adakv::cuda
