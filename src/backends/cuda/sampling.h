// Next-token choice on the device from rows of fp32 logits, with engine/sampler.h's semantics:
// greedy = argmax with the lowest id on ties (torch.argmax); sampling = temperature (logits / T in
// fp32), then top-k (ties at the k-th value kept), then top-p (the smallest most-probable prefix
// reaching top_p, ties in probability ordered by id, at least one token), then the first id whose
// cumulative renormalised probability, summed in id order, exceeds u. The uniform u comes from the
// host Sampler's own generator (Sampler::next_uniform is not public, so callers draw it as
// Sampler::sample would: the top 53 bits of one mt19937_64 output), so a seed reproduces the
// CPU's choice up to fp64 rounding of the sums.
//
// How (one 1024-thread block per row, no sort): top-k is a 4-pass radix select of the k-th largest
// value over order-preserving 32-bit keys; top-p is the same descent weighted by probability
// mass (fp64 shared-memory histograms), finding the key at which the prefix mass reaches top_p,
// then the ties at that key by id through a block scan; the draw is a block scan of the kept
// probabilities in id order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/status.h"

namespace adakv::cuda {

struct DeviceSamplingRow {
  float temperature = 0.f;  // 0: greedy
  int32_t top_k = 0;        // 0: off
  float top_p = 1.f;        // 1: off
  int32_t row = -1;         // logits row to sample from; -1: row r of the launch
  double u = 0.0;           // uniform in [0, 1) for the draw
};

// out[r] = argmax of logits[r * stride ... + vocab), lowest id on ties.
Status argmax_rows(const float* logits, int64_t stride, int32_t rows, int32_t vocab, int32_t* out,
                   cudaStream_t stream);
// out[r] = the id sampled under params[r] (device array [rows]) from logits row params[r].row.
Status sample_rows(const float* logits, int64_t stride, int32_t rows, int32_t vocab, const DeviceSamplingRow* params,
                   int32_t* out, cudaStream_t stream);

}  // namespace adakv::cuda
