// CriticalKV value norms and scores (score_critical.h). One block per (128 entries, kv head): the
// entries' values stay in registers (tensor-core A fragments) while the o_proj slices of the
// group's heads stream through shared memory in tiles of 64 hidden units; v W_o^h is a tensor-core
// product (bf16 x bf16, fp32 accumulation) whose |y| is summed in the epilogue, so the n x H x hidden
// products never reach memory. Variants: head_dim 64 / 128.
#include "backends/cuda/score_critical.h"

#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/score_common.cuh"
#include "backends/cuda/score_mma.cuh"

namespace adakv::cuda {

namespace score_detail {

struct CriticalParams {
  const __nv_bfloat16* values;  // entry j of kv head k at j * v_stride + k * v_head_stride
  int64_t v_head_stride;
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

// 128 value rows per block: 4 warps x 2 groups of 16 rows, so that each o_proj tile read from L2
// serves 128 entries.
constexpr int kCritRows = 128;

template <int D>
constexpr size_t critical_smem_bytes() {
  return static_cast<size_t>(4 * MmaShape<D>::kTileElems) * sizeof(__nv_bfloat16);
}

// Tile t of the block's W stream (head gi = t / tiles_per_head, hidden units o0 = 64 * (t %
// tiles_per_head) ..): 64 rows of W_o^h into dst [64][kPitch] without waiting; rows past hidden
// are zero.
template <int D>
__device__ __forceinline__ void load_w_tile_async(__nv_bfloat16* dst, const CriticalParams& p, int kvh, int t,
                                                  int tiles_per_head) {
  const int h = kvh * p.group + t / tiles_per_head;
  const int o0 = (t % tiles_per_head) * kMmaKeys;
  const int64_t w_stride = static_cast<int64_t>(p.num_heads) * D;
  load_rows_bf16_async<D>(dst, min(kMmaKeys, p.hidden - o0), [&](int r) {
    return p.o_proj + static_cast<int64_t>(o0 + r) * w_stride + static_cast<int64_t>(h) * D;
  });
}

// Grid (ceil(n / 128), Hkv), 4 warps. Values of the block's entries stay as A fragments in
// registers; W_o^h of the group's heads streams through two shared-memory tiles of 64 hidden units
// (the next tile's copy is in flight while the tensor cores work on this one); |y| is summed per
// entry in fp32 per tile, then fp64 across tiles and heads.
template <int D>
__global__ void __launch_bounds__(kMmaThreads) critical_kernel(const CriticalParams p) {
  using S = MmaShape<D>;
  ADAKV_DYNAMIC_SMEM(smem);
  __nv_bfloat16* vs = reinterpret_cast<__nv_bfloat16*>(smem);  // [2][64][kPitch]: the block's values
  __nv_bfloat16* ws = vs + 2 * S::kTileElems;                  // [2][64][kPitch]: W tiles (double buffer)
  const int j0 = blockIdx.x * kCritRows;
  const int kvh = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles_per_head = (p.hidden + kMmaKeys - 1) / kMmaKeys;
  const int tiles = p.group * tiles_per_head;
  load_w_tile_async<D>(ws, p, kvh, 0, tiles_per_head);
  cp_async_commit();
  for (int half = 0; half < 2; ++half)
    load_rows_bf16<D>(vs + half * S::kTileElems, min(64, p.count - j0 - half * 64), [&](int r) {
      return p.values + static_cast<int64_t>(j0 + half * 64 + r) * p.v_stride + kvh * p.v_head_stride;
    });
  __syncthreads();
  uint32_t a0[S::kSteps][4], a1[S::kSteps][4];
  load_a_frags<D>(a0, vs, warp, lane);
  load_a_frags<D>(a1, vs + S::kTileElems, warp, lane);
  double total[4] = {0.0, 0.0, 0.0, 0.0};  // rows lane/4, +8 of each group
  double l1[4] = {0.0, 0.0, 0.0, 0.0};     // the current head's
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load_w_tile_async<D>(ws + ((t + 1) & 1) * S::kTileElems, p, kvh, t + 1, tiles_per_head);
    cp_async_commit();  // (an empty group on the last tile keeps the count uniform)
    cp_async_wait<1>();  // tile t has landed (this thread's copies) ...
    __syncthreads();     // ... and every thread's
    const __nv_bfloat16* w = ws + (t & 1) * S::kTileElems;
    float acc[8][4];
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    warp_logits<D>(acc, a0, w, lane);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      part[0] += fabsf(acc[q][0]) + fabsf(acc[q][1]);
      part[1] += fabsf(acc[q][2]) + fabsf(acc[q][3]);
    }
    warp_logits<D>(acc, a1, w, lane);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      part[2] += fabsf(acc[q][0]) + fabsf(acc[q][1]);
      part[3] += fabsf(acc[q][2]) + fabsf(acc[q][3]);
    }
    // Zero rows of W (past hidden) add |0|: nothing.
#pragma unroll
    for (int u = 0; u < 4; ++u) l1[u] += static_cast<double>(part[u]);
    if ((t + 1) % tiles_per_head == 0) {  // the head is done: its L1 over the quad's columns
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        double v = l1[u];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        total[u] += v;
        l1[u] = 0.0;
      }
    }
    __syncthreads();  // every warp is done with tile t before tile t + 2 overwrites it
  }
  if (lane % 4 != 0) return;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int j = j0 + (u / 2) * 64 + warp * 16 + lane / 4 + (u % 2) * 8;
    if (j >= p.count) continue;
    const double norm = total[u] / p.group;
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
  const int64_t v_head_stride = in.v_head_stride != 0 ? in.v_head_stride : in.head_dim;
  if (v_stride % 8 != 0 || v_head_stride % 8 != 0 || reinterpret_cast<uintptr_t>(in.values) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(in.o_proj) % 16 != 0)
    return invalid_argument(where + "values / o_proj need 16-byte alignment and a token stride that is a multiple of 8");
  if (in.count == 0) return Status::ok();
  CriticalParams p{};
  p.values = in.values;
  p.v_stride = v_stride;
  p.v_head_stride = v_head_stride;
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
  const dim3 grid(static_cast<unsigned>(ceil_div(in.count, kCritRows)), in.num_kv_heads);
  if (in.head_dim == 64) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(critical_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(critical_smem_bytes<64>())));
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(critical_kernel<64>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    ADAKV_CUDA_RETURN_IF_ERROR(launch(critical_kernel<64>, grid, dim3(kMmaThreads), critical_smem_bytes<64>(), stream, p));
  } else {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(critical_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(critical_smem_bytes<128>())));
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(critical_kernel<128>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
    ADAKV_CUDA_RETURN_IF_ERROR(
        launch(critical_kernel<128>, grid, dim3(kMmaThreads), critical_smem_bytes<128>(), stream, p));
  }
  return Status::ok();
}

}  // namespace adakv::cuda
