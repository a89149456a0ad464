// Window scores (score_window.h): pass 1 (tile softmax statistics), merge, pass 2 (probabilities
// reduced over window and group), pooling. Kernel variants: head_dim 64 / 128 x row tile 32 / 128
// (score_tile.cuh says why two row tiles).
#include "backends/cuda/score_window.h"

#include <cmath>
#include <limits>
#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/score_common.cuh"
#include "backends/cuda/score_tile.cuh"

namespace adakv::cuda {

namespace score_detail {

struct WindowParams {
  const __nv_bfloat16* q;  // [w][H][D], tokens q_stride apart
  int64_t q_stride;
  const __nv_bfloat16* k;  // [L][Hkv][D], tokens k_stride apart
  int64_t k_stride;
  int32_t length;      // L
  int32_t window;      // w
  int32_t num_heads;   // H
  int32_t group;       // g
  int32_t rows;        // g * w query rows per kv head: row = gi * w + i
  int32_t row_chunks;  // ceil(rows / row tile)
  int32_t stat_tiles;  // ceil(L / 64)
  float scale;         // 1 / sqrt(D)
  float2* partial;     // [Hkv][rows][stat_tiles]
  float2* stats;       // [Hkv][rows]
  int32_t out_len;     // keys scored: L - w (SnapKV) or L (KV-Compress)
  int32_t squared;     // 1: KV-Compress (p^2, summed); 0: SnapKV (mean over the window)
  int32_t gqa;         // 0 mean, 1 max, 2 sum
  float* reduced;      // [Hkv][reduced_stride]
  int64_t reduced_stride;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query rows row0 .. row0 + NR - 1 of kv head `kvh` into rows_t (transposed). Row r = gi * w + i
// is query head kvh * g + gi at window position i (token L - w + i of the prompt).
template <int D, int NR, int Pitch>
__device__ __forceinline__ void load_query_rows(float* rows_t, const WindowParams& p, int kvh, int row0) {
  const int count = min(NR, p.rows - row0);
  load_transposed<D, NR, Pitch>(rows_t, count, [&](int r) {
    const int row = row0 + r;
    const int gi = row / p.window;
    const int i = row - gi * p.window;
    return p.q + static_cast<int64_t>(i) * p.q_stride + static_cast<int64_t>(kvh * p.group + gi) * D;
  });
}

template <int D>
__device__ __forceinline__ void load_key_tile(float* cols_t, const WindowParams& p, int kvh, int j0) {
  using S = TileShape<D, 2>;  // the column pitch does not depend on TM
  const int count = min(kColTile, p.length - j0);
  load_transposed<D, kColTile, S::kColPitch>(cols_t, count, [&](int c) {
    return p.k + static_cast<int64_t>(j0 + c) * p.k_stride + static_cast<int64_t>(kvh) * D;
  });
}

// Whether window row `row` sees key `key` (causal, bottom-right aligned).
__device__ __forceinline__ bool visible(const WindowParams& p, int row, int key) {
  if (row >= p.rows || key >= p.length) return false;
  const int i = row % p.window;
  return key <= p.length - p.window + i;
}

// Pass 1. Grid (stat tiles, Hkv * row_chunks). partial[kvh][row][tile] = (max logit of the row over
// the tile's visible keys, sum of exp(logit - that max)); (-inf, 0) when it sees none of them.
template <int D, int TM>
__global__ void __launch_bounds__(kTileThreads) window_stats_kernel(const WindowParams p) {
  using S = TileShape<D, TM>;
  ADAKV_DYNAMIC_SMEM(smem);
  float* rows_t = reinterpret_cast<float*>(smem);  // [D][kRowPitch]
  float* cols_t = rows_t + S::kRowFloats;          // [D][kColPitch]
  const int tile = blockIdx.x;
  const int kvh = blockIdx.y / p.row_chunks;
  const int row0 = (blockIdx.y % p.row_chunks) * S::kRowTile;
  const int j0 = tile * kColTile;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  load_query_rows<D, S::kRowTile, S::kRowPitch>(rows_t, p, kvh, row0);
  load_key_tile<D>(cols_t, p, kvh, j0);
  __syncthreads();
  float acc[TM][kColsPerThread];
  tile_product<D, TM>(rows_t, cols_t, ty, tx, acc);

#pragma unroll
  for (int r = 0; r < TM; ++r) {
    const int row = row0 + ty * TM + r;
    float z[kColsPerThread];
    bool ok[kColsPerThread];
    float m = kNegInf;
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      ok[j] = visible(p, row, j0 + tx * kColsPerThread + j);
      z[j] = __fmul_rn(acc[r][j], p.scale);  // rounded product, no FMA contraction: pass 2 computes the same z
      if (ok[j]) m = fmaxf(m, z[j]);
    }
    m = half_warp_max(m);
    float l = 0.0f;
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j)
      if (ok[j]) l += expf(z[j] - m);
    l = half_warp_sum(l);
    if (tx == 0 && row < p.rows)
      p.partial[(static_cast<int64_t>(kvh) * p.rows + row) * p.stat_tiles + tile] = make_float2(m, l);
  }
}

// One warp per (kv head, row): stats = (row max, 1 / sum over tiles of l_t exp(m_t - max)), in fp64.
__global__ void __launch_bounds__(256) window_merge_kernel(const float2* partial, float2* stats, int total_rows,
                                                           int tiles) {
  const int warp = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) / 32);
  const int lane = threadIdx.x % 32;
  if (warp >= total_rows) return;  // whole warps only
  const float2* pr = partial + static_cast<int64_t>(warp) * tiles;
  float m = kNegInf;
  for (int t = lane; t < tiles; t += 32) m = fmaxf(m, pr[t].x);
  m = warp_max(m);
  double l = 0.0;
  for (int t = lane; t < tiles; t += 32) {
    const float2 v = pr[t];
    if (v.x != kNegInf) l += static_cast<double>(v.y) * exp(static_cast<double>(v.x) - static_cast<double>(m));
  }
  l = warp_sum(l);
  if (lane == 0) stats[warp] = make_float2(m, static_cast<float>(1.0 / l));
}

template <int D, int TM>
struct ProbsSmem {
  using S = TileShape<D, TM>;
  static constexpr int kPPitch = kColTile + 1;
  // cols_t and the probability tile share one region: P is written after the last read of cols_t.
  static constexpr int kUnionFloats = S::kColFloats > S::kRowTile * kPPitch ? S::kColFloats : S::kRowTile * kPPitch;
  static constexpr size_t bytes(int group) {
    return static_cast<size_t>(S::kRowFloats + kUnionFloats) * sizeof(float) +
           static_cast<size_t>(group) * kColTile * sizeof(double);
  }
};

// Pass 2. Grid (ceil(out_len / 64), Hkv). For each key j of the tile and each group head gi:
// sacc[gi][j] = sum over the window rows of p (or p^2), in row order, fp64; then the group
// reduction, written to reduced[kvh][j] for j < out_len.
template <int D, int TM>
__global__ void __launch_bounds__(kTileThreads) window_probs_kernel(const WindowParams p) {
  using S = TileShape<D, TM>;
  using PS = ProbsSmem<D, TM>;
  ADAKV_DYNAMIC_SMEM(smem);
  float* rows_t = reinterpret_cast<float*>(smem);  // [D][kRowPitch]
  float* cols_t = rows_t + S::kRowFloats;          // [D][kColPitch]
  float* probs = cols_t;                           // [kRowTile][kPPitch] (same region)
  double* sacc = reinterpret_cast<double*>(rows_t + S::kRowFloats + PS::kUnionFloats);  // [g][kColTile]
  const int tile = blockIdx.x;
  const int kvh = blockIdx.y;
  const int j0 = tile * kColTile;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  for (int idx = threadIdx.x; idx < p.group * kColTile; idx += blockDim.x) sacc[idx] = 0.0;
  for (int chunk = 0; chunk < p.row_chunks; ++chunk) {
    const int row0 = chunk * S::kRowTile;
    __syncthreads();  // the previous chunk's reads of probs / sacc are done
    load_query_rows<D, S::kRowTile, S::kRowPitch>(rows_t, p, kvh, row0);
    load_key_tile<D>(cols_t, p, kvh, j0);
    __syncthreads();
    float acc[TM][kColsPerThread];
    tile_product<D, TM>(rows_t, cols_t, ty, tx, acc);
    __syncthreads();  // every read of cols_t is done before probs overwrites it
#pragma unroll
    for (int r = 0; r < TM; ++r) {
      const int local = ty * TM + r;
      const int row = row0 + local;
      float2 st = make_float2(0.0f, 0.0f);
      if (row < p.rows) st = p.stats[static_cast<int64_t>(kvh) * p.rows + row];
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int c = tx * kColsPerThread + j;
        float pv = 0.0f;
        if (visible(p, row, j0 + c)) {
          pv = expf(__fmul_rn(acc[r][j], p.scale) - st.x) * st.y;
          if (p.squared) pv *= pv;
        }
        probs[local * PS::kPPitch + c] = pv;
      }
    }
    __syncthreads();
    // (group head, key) items of this chunk; each sums its rows in order.
    const int row_end = min(p.rows, row0 + S::kRowTile);
    const int gi_first = row0 / p.window;
    const int gi_count = (row_end - 1) / p.window - gi_first + 1;
    for (int item = threadIdx.x; item < gi_count * kColTile; item += blockDim.x) {
      const int c = item % kColTile;
      const int gi = gi_first + item / kColTile;
      const int r_begin = max(gi * p.window, row0) - row0;
      const int r_end = min((gi + 1) * p.window, row_end) - row0;
      double s = 0.0;
      for (int r = r_begin; r < r_end; ++r) s += static_cast<double>(probs[r * PS::kPPitch + c]);
      sacc[gi * kColTile + c] += s;
    }
  }
  __syncthreads();
  const int c = threadIdx.x;
  if (c < kColTile && j0 + c < p.out_len) {
    double v = 0.0;
    if (p.squared || p.gqa == 2) {
      for (int gi = 0; gi < p.group; ++gi) v += sacc[gi * kColTile + c];
    } else {
      // Mirrors reduce_group(window_mean_probs): mean over the window first, then the group.
      v = sacc[c] / p.window;
      for (int gi = 1; gi < p.group; ++gi) {
        const double x = sacc[gi * kColTile + c] / p.window;
        v = p.gqa == 1 ? fmax(v, x) : v + x;
      }
      if (p.gqa == 0) v /= p.group;
    }
    p.reduced[static_cast<int64_t>(kvh) * p.reduced_stride + j0 + c] = static_cast<float>(v);
  }
}

// 1-D pooling along each row: out[h][j] over the in-range neighbours j - k/2 .. j + k/2 (max), or
// their sum / k (avg: zero padding).
__global__ void __launch_bounds__(256) pool_kernel(const float* in, int64_t in_stride, float* out, int64_t out_stride,
                                                   int num_rows, int n, int kernel, int is_max) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(num_rows) * n) return;
  const int h = static_cast<int>(idx / n);
  const int j = static_cast<int>(idx % n);
  const int half = kernel / 2;
  const int lo = max(0, j - half);
  const int hi = min(n - 1, j + half);
  const float* x = in + h * in_stride;
  float result;
  if (is_max) {
    float m = x[lo];
    for (int t = lo + 1; t <= hi; ++t) m = fmaxf(m, x[t]);
    result = m;
  } else {
    double s = 0.0;
    for (int t = lo; t <= hi; ++t) s += static_cast<double>(x[t]);
    result = static_cast<float>(s / kernel);
  }
  out[h * out_stride + j] = result;
}

template <int D, int TM>
constexpr size_t stats_smem_bytes() {
  return static_cast<size_t>(TileShape<D, TM>::kRowFloats + TileShape<D, TM>::kColFloats) * sizeof(float);
}

constexpr int kMaxGroup = 64;

// Raises the dynamic shared-memory limit of both passes and asks for the largest shared-memory
// carveout, so that two 100 KB blocks fit on an SM.
template <int D, int TM>
cudaError_t set_smem_limits() {
  cudaError_t err = cudaFuncSetAttribute(window_stats_kernel<D, TM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(stats_smem_bytes<D, TM>()));
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(window_stats_kernel<D, TM>, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(window_probs_kernel<D, TM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(ProbsSmem<D, TM>::bytes(kMaxGroup)));
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(window_probs_kernel<D, TM>, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  return err;
}

template <int D, int TM>
cudaError_t launch_passes(const WindowParams& p, int num_kv_heads, cudaStream_t stream) {
  cudaError_t err = launch(window_stats_kernel<D, TM>, dim3(p.stat_tiles, num_kv_heads * p.row_chunks),
                           dim3(kTileThreads), stats_smem_bytes<D, TM>(), stream, p);
  if (err != cudaSuccess) return err;
  const int total_rows = num_kv_heads * p.rows;
  err = launch(window_merge_kernel, dim3(static_cast<unsigned>(ceil_div(total_rows, 8))), dim3(256), 0, stream,
               static_cast<const float2*>(p.partial), p.stats, total_rows, p.stat_tiles);
  if (err != cudaSuccess) return err;
  const int prob_tiles = static_cast<int>(ceil_div(p.out_len, kColTile));
  return launch(window_probs_kernel<D, TM>, dim3(prob_tiles, num_kv_heads), dim3(kTileThreads),
                ProbsSmem<D, TM>::bytes(p.group), stream, p);
}

}  // namespace score_detail

using namespace score_detail;

Expected<std::unique_ptr<WindowScorer>> WindowScorer::create(const WindowScorerOptions& o) {
  const std::string where = "WindowScorer: ";
  if (o.num_kv_heads < 1 || o.num_heads < o.num_kv_heads || o.num_heads % o.num_kv_heads != 0)
    return invalid_argument(where + "query heads must be a positive multiple of kv heads");
  if (o.num_heads / o.num_kv_heads > kMaxGroup) return invalid_argument(where + "group size above 64");
  if (o.head_dim != 64 && o.head_dim != 128) return invalid_argument(where + "head_dim must be 64 or 128");
  if (o.max_length < 1 || o.max_window < 1) return invalid_argument(where + "max_length and max_window must be >= 1");
  std::unique_ptr<WindowScorer> s(new WindowScorer());
  s->options_ = o;
  s->group_ = o.num_heads / o.num_kv_heads;
  const int64_t rows = static_cast<int64_t>(s->group_) * o.max_window;
  const int64_t tiles = ceil_div(o.max_length, kColTile);
  const size_t partial_bytes = static_cast<size_t>(o.num_kv_heads) * rows * tiles * sizeof(float2);
  const size_t stats_bytes = static_cast<size_t>(o.num_kv_heads) * rows * sizeof(float2);
  const size_t reduced_bytes = static_cast<size_t>(o.num_kv_heads) * o.max_length * sizeof(float);
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&s->workspace_, partial_bytes + stats_bytes + reduced_bytes));
  char* base = static_cast<char*>(s->workspace_);
  s->partial_ = reinterpret_cast<float2*>(base);
  s->stats_ = reinterpret_cast<float2*>(base + partial_bytes);
  s->reduced_ = reinterpret_cast<float*>(base + partial_bytes + stats_bytes);
  if (o.head_dim == 64) {
    ADAKV_CUDA_RETURN_IF_ERROR((set_smem_limits<64, 2>()));
    ADAKV_CUDA_RETURN_IF_ERROR((set_smem_limits<64, 8>()));
  } else {
    ADAKV_CUDA_RETURN_IF_ERROR((set_smem_limits<128, 2>()));
    ADAKV_CUDA_RETURN_IF_ERROR((set_smem_limits<128, 8>()));
  }
  return Expected<std::unique_ptr<WindowScorer>>(std::move(s));
}

WindowScorer::~WindowScorer() {
  if (workspace_ != nullptr) cudaFree(workspace_);
}

Status WindowScorer::snapkv(const WindowScoreInputs& in, GqaReduce gqa, PoolKind pool, int32_t kernel, float* out,
                            int64_t out_stride, cudaStream_t stream) {
  if (gqa == GqaReduce::kSum) return invalid_argument("WindowScorer::snapkv: GQA reduction must be mean or max");
  if (in.length <= in.window)
    return invalid_argument("WindowScorer::snapkv: L = " + std::to_string(in.length) + " <= w = " +
                            std::to_string(in.window) + ": nothing to score");
  return run(in, false, gqa, pool, kernel, in.length - in.window, out, out_stride, stream);
}

Status WindowScorer::kvcompress_metric(const WindowScoreInputs& in, PoolKind pool, int32_t kernel, float* out,
                                       int64_t out_stride, cudaStream_t stream) {
  return run(in, true, GqaReduce::kSum, pool, kernel, in.length, out, out_stride, stream);
}

Status WindowScorer::run(const WindowScoreInputs& in, bool squared, GqaReduce gqa, PoolKind pool, int32_t kernel,
                         int32_t out_len, float* out, int64_t out_stride, cudaStream_t stream) {
  const std::string where = "WindowScorer: ";
  const WindowScorerOptions& o = options_;
  const int64_t q_stride = in.q_token_stride != 0 ? in.q_token_stride : static_cast<int64_t>(o.num_heads) * o.head_dim;
  const int64_t k_stride = in.k_token_stride != 0 ? in.k_token_stride : static_cast<int64_t>(o.num_kv_heads) * o.head_dim;
  if (in.queries == nullptr || in.keys == nullptr || out == nullptr) return invalid_argument(where + "null pointer");
  if (in.window < 1 || in.window > o.max_window || in.window > in.length)
    return invalid_argument(where + "window " + std::to_string(in.window) + " outside [1, min(L, max_window)]");
  if (in.length > o.max_length)
    return invalid_argument(where + "L = " + std::to_string(in.length) + " above max_length " + std::to_string(o.max_length));
  if (kernel < 1 || kernel % 2 == 0) return invalid_argument(where + "pool kernel must be odd and >= 1");
  if (out_stride < out_len) return invalid_argument(where + "out_stride shorter than a row of scores");
  if (q_stride % 8 != 0 || k_stride % 8 != 0 || reinterpret_cast<uintptr_t>(in.queries) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(in.keys) % 16 != 0)
    return invalid_argument(where + "queries / keys need 16-byte alignment and strides that are multiples of 8");
  if (q_stride < static_cast<int64_t>(o.num_heads) * o.head_dim || k_stride < static_cast<int64_t>(o.num_kv_heads) * o.head_dim)
    return invalid_argument(where + "token stride shorter than a token");

  WindowParams p{};
  p.q = in.queries;
  p.q_stride = q_stride;
  p.k = in.keys;
  p.k_stride = k_stride;
  p.length = in.length;
  p.window = in.window;
  p.num_heads = o.num_heads;
  p.group = group_;
  p.rows = group_ * in.window;
  const bool small = p.rows <= TileShape<64, 2>::kRowTile;
  const int row_tile = small ? TileShape<64, 2>::kRowTile : TileShape<64, 8>::kRowTile;
  p.row_chunks = static_cast<int32_t>(ceil_div(p.rows, row_tile));
  p.stat_tiles = static_cast<int32_t>(ceil_div(in.length, kColTile));
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(o.head_dim)));
  p.partial = partial_;
  p.stats = stats_;
  p.out_len = out_len;
  p.squared = squared ? 1 : 0;
  p.gqa = gqa == GqaReduce::kMean ? 0 : gqa == GqaReduce::kMax ? 1 : 2;
  // Kernel 1 needs no pooling pass: pass 2 writes the output directly.
  const bool pooled = kernel > 1;
  p.reduced = pooled ? reduced_ : out;
  p.reduced_stride = pooled ? o.max_length : out_stride;

  cudaError_t err;
  if (o.head_dim == 64)
    err = small ? launch_passes<64, 2>(p, o.num_kv_heads, stream) : launch_passes<64, 8>(p, o.num_kv_heads, stream);
  else
    err = small ? launch_passes<128, 2>(p, o.num_kv_heads, stream) : launch_passes<128, 8>(p, o.num_kv_heads, stream);
  ADAKV_CUDA_RETURN_IF_ERROR(err);
  if (pooled) {
    const int64_t total = static_cast<int64_t>(o.num_kv_heads) * out_len;
    ADAKV_CUDA_RETURN_IF_ERROR(launch(pool_kernel, dim3(static_cast<unsigned>(ceil_div(total, 256))), dim3(256), 0,
                                      stream, static_cast<const float*>(reduced_), static_cast<int64_t>(o.max_length),
                                      out, out_stride, o.num_kv_heads, out_len, kernel,
                                      pool == PoolKind::kMax ? 1 : 0));
  }
  return Status::ok();
}

}  // namespace adakv::cuda
