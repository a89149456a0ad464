// CriticalKV value norms and scores (score_critical.h). One block per (128 entries, kv head): the
// entries' values stay in shared memory while the o_proj slices of the group's heads stream
// through in tiles of 64 hidden units; |y| is summed per entry in fp64. Variants: head_dim 64 / 128.
#include "backends/cuda/score_critical.h"

#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/score_common.cuh"
#include "backends/cuda/score_tile.cuh"

namespace adakv::cuda {

namespace score_detail {

struct CriticalParams {
  const __nv_bfloat16* values;  // [n][Hkv][D], tokens v_stride apart
  int64_t v_stride;
  const __nv_bfloat16* o_proj;  // [hidden][H * D]
  int32_t hidden;
  int32_t num_heads;
  int32_t group;
  int32_t count;  // n
  const float* scores;  // [Hkv][scores_stride]
  int64_t scores_stride;
  float* crit;  // [Hkv][crit_stride]
  int64_t crit_stride;
  float* norms;  // [Hkv][norms_stride] or nullptr
  int64_t norms_stride;
};

constexpr int kCriticalTm = 8;  // 128 entries per block

template <int D>
constexpr size_t critical_smem_bytes() {
  return static_cast<size_t>(TileShape<D, kCriticalTm>::kRowFloats + TileShape<D, kCriticalTm>::kColFloats) *
         sizeof(float);
}

template <int D>
__global__ void __launch_bounds__(kTileThreads) critical_kernel(const CriticalParams p) {
  using S = TileShape<D, kCriticalTm>;
  ADAKV_DYNAMIC_SMEM(smem);
  float* rows_t = reinterpret_cast<float*>(smem);  // [D][kRowPitch]: values of the block's entries
  float* cols_t = rows_t + S::kRowFloats;          // [D][kColPitch]: 64 rows of W_o^h
  const int j0 = blockIdx.x * S::kRowTile;
  const int kvh = blockIdx.y;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t w_stride = static_cast<int64_t>(p.num_heads) * D;

  load_transposed<D, S::kRowTile, S::kRowPitch>(rows_t, min(S::kRowTile, p.count - j0), [&](int r) {
    return p.values + static_cast<int64_t>(j0 + r) * p.v_stride + static_cast<int64_t>(kvh) * D;
  });
  double total[kCriticalTm];
#pragma unroll
  for (int r = 0; r < kCriticalTm; ++r) total[r] = 0.0;
  for (int gi = 0; gi < p.group; ++gi) {
    const int h = kvh * p.group + gi;
    double l1[kCriticalTm];
#pragma unroll
    for (int r = 0; r < kCriticalTm; ++r) l1[r] = 0.0;
    for (int o0 = 0; o0 < p.hidden; o0 += kColTile) {
      __syncthreads();  // rows_t is loaded; the previous tile's reads of cols_t are done
      load_transposed<D, kColTile, S::kColPitch>(cols_t, min(kColTile, p.hidden - o0), [&](int c) {
        return p.o_proj + static_cast<int64_t>(o0 + c) * w_stride + static_cast<int64_t>(h) * D;
      });
      __syncthreads();
      float acc[kCriticalTm][kColsPerThread];
      tile_product<D, kCriticalTm>(rows_t, cols_t, ty, tx, acc);
#pragma unroll
      for (int r = 0; r < kCriticalTm; ++r)
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) l1[r] += static_cast<double>(fabsf(acc[r][j]));
    }
#pragma unroll
    for (int r = 0; r < kCriticalTm; ++r) total[r] += half_warp_sum(l1[r]);
  }
#pragma unroll
  for (int r = 0; r < kCriticalTm; ++r) {
    const int j = j0 + ty * kCriticalTm + r;
    if (tx != 0 || j >= p.count) continue;
    const double norm = total[r] / p.group;
    const double s = static_cast<double>(p.scores[static_cast<int64_t>(kvh) * p.scores_stride + j]);
    p.crit[static_cast<int64_t>(kvh) * p.crit_stride + j] = static_cast<float>((s + 1e-4) * norm);
    if (p.norms != nullptr) p.norms[static_cast<int64_t>(kvh) * p.norms_stride + j] = static_cast<float>(norm);
  }
}

}  // namespace score_detail

using namespace score_detail;

Status critical_scores(const CriticalInputs& in, float* crit, int64_t crit_stride, float* norms, int64_t norms_stride,
                       cudaStream_t stream) {
  const std::string where = "critical_scores: ";
  if (in.num_kv_heads < 1 || in.num_heads % in.num_kv_heads != 0)
    return invalid_argument(where + "query heads must be a multiple of kv heads");
  if (in.head_dim != 64 && in.head_dim != 128) return invalid_argument(where + "head_dim must be 64 or 128");
  if (in.values == nullptr || in.o_proj == nullptr || in.scores == nullptr || crit == nullptr)
    return invalid_argument(where + "null pointer");
  if (in.hidden_size < 1 || in.count < 0) return invalid_argument(where + "hidden_size must be >= 1, count >= 0");
  const int64_t v_stride = in.v_token_stride != 0 ? in.v_token_stride : static_cast<int64_t>(in.num_kv_heads) * in.head_dim;
  if (v_stride % 8 != 0 || reinterpret_cast<uintptr_t>(in.values) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(in.o_proj) % 16 != 0)
    return invalid_argument(where + "values / o_proj need 16-byte alignment and a token stride that is a multiple of 8");
  if (in.count == 0) return Status::ok();
  CriticalParams p{};
  p.values = in.values;
  p.v_stride = v_stride;
  p.o_proj = in.o_proj;
  p.hidden = in.hidden_size;
  p.num_heads = in.num_heads;
  p.group = in.num_heads / in.num_kv_heads;
  p.count = in.count;
  p.scores = in.scores;
  p.scores_stride = in.scores_stride;
  p.crit = crit;
  p.crit_stride = crit_stride;
  p.norms = norms;
  p.norms_stride = norms_stride;
  const dim3 grid(static_cast<unsigned>(ceil_div(in.count, TileShape<64, kCriticalTm>::kRowTile)), in.num_kv_heads);
  if (in.head_dim == 64) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(critical_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(critical_smem_bytes<64>())));
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(critical_kernel<64>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    ADAKV_CUDA_RETURN_IF_ERROR(launch(critical_kernel<64>, grid, dim3(kTileThreads), critical_smem_bytes<64>(), stream, p));
  } else {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(critical_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(critical_smem_bytes<128>())));
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(critical_kernel<128>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    ADAKV_CUDA_RETURN_IF_ERROR(
        launch(critical_kernel<128>, grid, dim3(kTileThreads), critical_smem_bytes<128>(), stream, p));
  }
  return Status::ok();
}

}  // namespace adakv::cuda
