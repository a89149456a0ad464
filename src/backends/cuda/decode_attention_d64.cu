// Decode attention kernels for head dim 64 (one file per head dim so that they compile in parallel).
#include "backends/cuda/decode_attention.cuh"

namespace adakv::cuda::decode_detail {

template cudaError_t decode_attention_launch<64>(const DecodeParams&, bool, int, bool, MergeMode, cudaStream_t, bool, int, int);
template cudaError_t decode_attention_occupancy<64>(bool, int, int*, bool);

}  // namespace adakv::cuda::decode_detail
