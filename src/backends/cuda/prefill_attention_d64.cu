// Prefill attention kernels for head dim 64 (one file per head dim so that they compile in parallel).
#include "backends/cuda/prefill_attention.cuh"

namespace adakv::cuda::prefill_detail {

template cudaError_t prefill_attention_launch<64>(const PrefillParams&, int, cudaStream_t);

}  // namespace adakv::cuda::prefill_detail
