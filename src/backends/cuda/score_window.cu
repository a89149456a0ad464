// Window scores (score_window.h): pass 1 (tile softmax statistics), merge, pass 2 (probabilities
// reduced over window and group), pooling, and H2O's accumulation over all prompt queries. The
// logit tiles run on tensor cores (score_mma.cuh says how close that stays to fp64).
#include "backends/cuda/score_window.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/score_common.cuh"
#include "backends/cuda/score_mma.cuh"

namespace adakv::cuda {

namespace score_detail {

struct WindowParams {
  const __nv_bfloat16* q;  // [w][H][D], tokens q_stride apart
  int64_t q_stride;
  const __nv_bfloat16* k;  // [L][Hkv][D], tokens k_stride apart, kv heads k_head_stride apart
  int64_t k_stride;
  int64_t k_head_stride;
  int32_t length;      // L
  int32_t window;      // w (H2O: w = L, every prompt query)
  int32_t num_heads;   // H
  int32_t group;       // g
  int32_t rows;        // g * w query rows per kv head
  int32_t query_major; // 0: row = gi * w + i (window scores); 1: row = i * g + gi (H2O)
  int32_t rows_per_chunk;  // 64, or (64 / g) * g when query-major (whole queries per chunk)
  int32_t row_chunks;  // ceil(rows / rows_per_chunk)
  int32_t key_tiles;   // ceil(L / 64)
  int32_t span_tiles;  // key tiles per pass-1 block
  int32_t stat_spans;  // ceil(key_tiles / span_tiles)
  float scale;         // 1 / sqrt(D)
  float2* partial;     // [Hkv][rows][stat_spans]
  float2* stats;       // [Hkv][rows]
  int32_t out_len;     // keys scored: L - w (SnapKV) or L (KV-Compress, H2O)
  int32_t squared;     // 1: KV-Compress (p^2, summed); 0: SnapKV (mean over the window)
  int32_t gqa;         // 0 mean, 1 max, 2 sum
  float* reduced;      // [Hkv][reduced_stride]
  int64_t reduced_stride;
  // H2O pass 2: the query chunks are cut into num_segments runs of chunks_per_segment; a block
  // sums one run for one key tile into seg_sums [segment][Hkv][length] (fp64); a last kernel adds
  // the runs in order. One segment: the block writes `reduced` directly.
  int32_t num_segments;
  int32_t chunks_per_segment;
  double* seg_sums;
  // H2O: the queries' log-sum-exp from the attention that just ran ([H][w], natural log), or null
  // (pass 1 computes the statistics). With it p = exp(z - lse).
  const float* lse;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Window position i and group head gi of row `row`.
__device__ __forceinline__ void row_coords(const WindowParams& p, int row, int& gi, int& i) {
  if (p.query_major) {
    i = row / p.group;
    gi = row - i * p.group;
  } else {
    gi = row / p.window;
    i = row - gi * p.window;
  }
}

// Rows row0 .. row0 + rows_per_chunk - 1 (those < rows) of kv head kvh into the shared tile: at
// once, or (kAsync) as cp.async copies that land after the caller's commit + wait.
template <int D, bool kAsync = false>
__device__ __forceinline__ void load_query_chunk(__nv_bfloat16* dst, const WindowParams& p, int kvh, int row0) {
  const int count = min(p.rows_per_chunk, p.rows - row0);
  const auto row_ptr = [&](int r) {
    int gi, i;
    row_coords(p, row0 + r, gi, i);
    return p.q + static_cast<int64_t>(i) * p.q_stride + static_cast<int64_t>(kvh * p.group + gi) * D;
  };
  if constexpr (kAsync)
    load_rows_bf16_async<D>(dst, count, row_ptr);
  else
    load_rows_bf16<D>(dst, count, row_ptr);
}

template <int D>
__device__ __forceinline__ void load_key_tile(__nv_bfloat16* dst, const WindowParams& p, int kvh, int j0) {
  load_rows_bf16<D>(dst, min(kMmaKeys, p.length - j0), [&](int c) {
    return p.k + static_cast<int64_t>(j0 + c) * p.k_stride + static_cast<int64_t>(kvh) * p.k_head_stride;
  });
}

// Last key visible to row `row` (causal, bottom-right aligned): L - w + i; -1 for rows past the chunk.
__device__ __forceinline__ int last_visible(const WindowParams& p, int row0, int local) {
  if (local >= p.rows_per_chunk || row0 + local >= p.rows) return -1;
  int gi, i;
  row_coords(p, row0 + local, gi, i);
  return p.length - p.window + i;
}

// Largest last-visible key of any row of the chunk (tiles past it are skipped).
__device__ __forceinline__ int chunk_key_limit(const WindowParams& p, int row0) {
  if (!p.query_major) return p.length - 1;
  const int last_row = min(p.rows, row0 + p.rows_per_chunk) - 1;
  return p.length - p.window + last_row / p.group;
}

// Pass 1. Grid (stat_spans, Hkv * row_chunks), 4 warps. partial[kvh][row][span] = (max logit of the
// row over the span's visible keys, sum of exp(logit - that max)); (-inf, 0) when it sees none.
template <int D>
__global__ void __launch_bounds__(kMmaThreads) window_stats_kernel(const WindowParams p) {
  using S = MmaShape<D>;
  ADAKV_DYNAMIC_SMEM(smem);
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);  // [64][kPitch]
  __nv_bfloat16* ks = qs + S::kTileElems;                      // [64][kPitch]
  const int span = blockIdx.x;
  const int kvh = blockIdx.y / p.row_chunks;
  const int row0 = (blockIdx.y % p.row_chunks) * p.rows_per_chunk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r_lo = warp * 16 + lane / 4;  // this thread's rows: r_lo and r_lo + 8
  const int lim0 = last_visible(p, row0, r_lo), lim1 = last_visible(p, row0, r_lo + 8);
  const int key_limit = chunk_key_limit(p, row0);

  load_query_chunk<D>(qs, p, kvh, row0);
  __syncthreads();
  uint32_t a[S::kSteps][4];
  load_a_frags<D>(a, qs, warp, lane);
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.0f, 0.0f};
  const int t_end = min(p.key_tiles, (span + 1) * p.span_tiles);
  for (int t = span * p.span_tiles; t < t_end; ++t) {
    const int j0 = t * kMmaKeys;
    if (j0 > key_limit) break;
    __syncthreads();  // the previous tile's reads of ks are done
    load_key_tile<D>(ks, p, kvh, j0);
    __syncthreads();
    float acc[8][4];
    warp_logits<D>(acc, a, ks, lane);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lim = h == 0 ? lim0 : lim1;
      float z[16];
      float tm = kNegInf;
#pragma unroll
      for (int t8 = 0; t8 < 8; ++t8)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int key = j0 + t8 * 8 + 2 * (lane % 4) + u;
          const float v = __fmul_rn(acc[t8][2 * h + u], p.scale);  // pass 2 computes the same z
          z[t8 * 2 + u] = key <= lim ? v : kNegInf;
          tm = fmaxf(tm, z[t8 * 2 + u]);
        }
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
      // Every lane reaches the shuffles (a row that sees none of the tile, or a padding row, sums 0).
      float s = 0.0f;
#pragma unroll
      for (int u = 0; u < 16; ++u) s += z[u] == kNegInf ? 0.0f : expf(z[u] - tm);
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      if (tm == kNegInf) continue;  // the row sees none of the tile (uniform over the quad)
      const float nm = fmaxf(m[h], tm);
      l[h] = (m[h] == kNegInf ? 0.0f : l[h] * expf(m[h] - nm)) + s * expf(tm - nm);
      m[h] = nm;
    }
  }
  if (lane % 4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int local = r_lo + 8 * h;
      if (local < p.rows_per_chunk && row0 + local < p.rows)
        p.partial[(static_cast<int64_t>(kvh) * p.rows + row0 + local) * p.stat_spans + span] = make_float2(m[h], l[h]);
    }
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

template <int D>
struct ProbsSmem {
  static constexpr int kPPitch = kMmaKeys + 1;
  static constexpr size_t bytes(int group) {
    return static_cast<size_t>(2 * MmaShape<D>::kTileElems) * sizeof(__nv_bfloat16) +
           static_cast<size_t>(kMmaRows * kPPitch) * sizeof(float) + static_cast<size_t>(group) * kMmaKeys * sizeof(double);
  }
};

// Pass 2 of the window scores. Grid (ceil(out_len / 64), Hkv), 4 warps. Logits recomputed with the
// pass-1 instruction sequence, probabilities p = exp(z - max) / sum (or p^2) staged in shared
// memory, then reduced in a fixed order (deterministic), fp64: sacc[gi][j] = sum over the window
// rows of gi, in row order; then the group reduction (mean over the window first, then mean | max
// | sum over the group). Written to reduced[kvh][j] for j < out_len.
template <int D>
__global__ void __launch_bounds__(kMmaThreads) window_probs_kernel(const WindowParams p) {
  using S = MmaShape<D>;
  using PS = ProbsSmem<D>;
  ADAKV_DYNAMIC_SMEM(smem);
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* ks = qs + S::kTileElems;
  float* probs = reinterpret_cast<float*>(ks + S::kTileElems);  // [64][kPPitch]
  double* sacc = reinterpret_cast<double*>(probs + kMmaRows * PS::kPPitch);  // [g][64]
  const int tile = blockIdx.x;
  const int kvh = blockIdx.y;
  const int j0 = tile * kMmaKeys;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r_lo = warp * 16 + lane / 4;

  for (int idx = threadIdx.x; idx < p.group * kMmaKeys; idx += blockDim.x) sacc[idx] = 0.0;
  load_key_tile<D>(ks, p, kvh, j0);
  for (int chunk = 0; chunk < p.row_chunks; ++chunk) {
    const int row0 = chunk * p.rows_per_chunk;
    __syncthreads();  // the previous chunk's reads of qs / probs are done
    load_query_chunk<D>(qs, p, kvh, row0);
    __syncthreads();
    uint32_t a[S::kSteps][4];
    load_a_frags<D>(a, qs, warp, lane);
    float acc[8][4];
    warp_logits<D>(acc, a, ks, lane);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int local = r_lo + 8 * h;
      const int lim = last_visible(p, row0, local);
      float2 st = make_float2(0.0f, 0.0f);
      if (lim >= 0) st = p.stats[static_cast<int64_t>(kvh) * p.rows + row0 + local];
#pragma unroll
      for (int t8 = 0; t8 < 8; ++t8)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int c = t8 * 8 + 2 * (lane % 4) + u;
          float pv = 0.0f;
          if (j0 + c <= lim) {
            pv = expf(__fmul_rn(acc[t8][2 * h + u], p.scale) - st.x) * st.y;
            if (p.squared) pv *= pv;
          }
          probs[local * PS::kPPitch + c] = pv;
        }
    }
    __syncthreads();
    const int row_end = min(p.rows, row0 + p.rows_per_chunk);
    // (group head, key) items of this chunk; each sums its rows in order.
    const int gi_first = row0 / p.window;
    const int gi_count = (row_end - 1) / p.window - gi_first + 1;
    for (int item = threadIdx.x; item < gi_count * kMmaKeys; item += blockDim.x) {
      const int c = item % kMmaKeys;
      const int gi = gi_first + item / kMmaKeys;
      const int r_begin = max(gi * p.window, row0) - row0;
      const int r_end = min((gi + 1) * p.window, row_end) - row0;
      double s = 0.0;
      for (int r = r_begin; r < r_end; ++r) s += static_cast<double>(probs[r * PS::kPPitch + c]);
      sacc[gi * kMmaKeys + c] += s;
    }
  }
  __syncthreads();
  const int c = threadIdx.x;
  if (c < kMmaKeys && j0 + c < p.out_len) {
    double v = 0.0;
    if (p.squared || p.gqa == 2) {
      for (int gi = 0; gi < p.group; ++gi) v += sacc[gi * kMmaKeys + c];
    } else {
      // Mirrors reduce_group(window_mean_probs): mean over the window first, then the group.
      v = sacc[c] / p.window;
      for (int gi = 1; gi < p.group; ++gi) {
        const double x = sacc[gi * kMmaKeys + c] / p.window;
        v = p.gqa == 1 ? fmax(v, x) : v + x;
      }
      if (p.gqa == 0) v /= p.group;
    }
    p.reduced[static_cast<int64_t>(kvh) * p.reduced_stride + j0 + c] = static_cast<float>(v);
  }
}

// H2O pass 2. Grid (ceil(L / 64), Hkv, num_segments), 4 warps. Block (tile, kvh, seg) recomputes
// the logits of the tile's 64 keys against the query chunks of its segment that can see them
// (causal: chunks before the tile's first query are skipped), makes them probabilities with the
// pass-1 statistics and sums them per key over the queries, fp64:
//   mean: sum_i mean_g p = (1 / g) sum over every row of p: each thread sums its 16 keys over its
//         2 rows in registers; at the end the lanes and the 4 warps are added in a fixed order;
//   max:  p staged in shared memory, thread c adds max_g p of the chunk's queries in order.
// Segments split the causal triangle's long columns (the first key tiles see every query), so
// the longest block does chunks_per_segment chunks rather than all of them. Query chunks are
// double-buffered: chunk k + 1's copy (cp.async) is in flight while the tensor cores work on k.
// Statistics: pass 1's (max, 1 / sum) per row, or the attention's lse (p = exp(z - lse)).
template <int D>
struct H2oSmem {
  static constexpr int kPPitch = kMmaKeys + 1;
  static constexpr size_t bytes() {
    return static_cast<size_t>(3 * MmaShape<D>::kTileElems) * sizeof(__nv_bfloat16) +
           static_cast<size_t>(kMmaRows * kPPitch) * sizeof(float) + static_cast<size_t>(4 * kMmaKeys) * sizeof(double);
  }
};

template <int D>
__global__ void __launch_bounds__(kMmaThreads) h2o_probs_kernel(const WindowParams p) {
  using S = MmaShape<D>;
  using HS = H2oSmem<D>;
  ADAKV_DYNAMIC_SMEM(smem);
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);  // [2][64][kPitch] query chunks
  __nv_bfloat16* ks = qs + 2 * S::kTileElems;
  float* probs = reinterpret_cast<float*>(ks + S::kTileElems);                // [64][kPPitch] (max)
  double* warp_sums = reinterpret_cast<double*>(probs + kMmaRows * HS::kPPitch);  // [4][64] (mean)
  const int tile = blockIdx.x, kvh = blockIdx.y, seg = blockIdx.z;
  const int j0 = tile * kMmaKeys;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r_lo = warp * 16 + lane / 4;
  const bool mean = p.gqa == 0;
  const int first_query = max(0, j0 - (p.length - p.window));  // earlier queries see none of the tile
  const int chunk_begin = max((first_query * p.group) / p.rows_per_chunk, seg * p.chunks_per_segment);
  const int chunk_end = min(p.row_chunks, (seg + 1) * p.chunks_per_segment);
  double col[16];  // mean: keys t8 * 8 + 2 * (lane % 4) + u, summed over this thread's rows
#pragma unroll
  for (int u = 0; u < 16; ++u) col[u] = 0.0;
  double qacc = 0.0;  // max: key threadIdx.x's running sum
  if (chunk_begin < chunk_end) {
    load_query_chunk<D, true>(qs, p, kvh, chunk_begin * p.rows_per_chunk);
    cp_async_commit();
    load_key_tile<D>(ks, p, kvh, j0);
  }
  for (int chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int row0 = chunk * p.rows_per_chunk;
    const int buf = (chunk - chunk_begin) & 1;
    if (chunk + 1 < chunk_end) load_query_chunk<D, true>(qs + (buf ^ 1) * S::kTileElems, p, kvh, row0 + p.rows_per_chunk);
    cp_async_commit();  // (empty on the last chunk: the group count stays uniform)
    cp_async_wait<1>();  // this chunk's copies (this thread's) ...
    __syncthreads();     // ... and everyone's, and the key tile
    uint32_t a[S::kSteps][4];
    load_a_frags<D>(a, qs + buf * S::kTileElems, warp, lane);
    float acc[8][4];
    warp_logits<D>(acc, a, ks, lane);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int local = r_lo + 8 * h;
      const int lim = last_visible(p, row0, local);
      float2 st = make_float2(0.0f, 0.0f);
      if (lim >= 0) {
        if (p.lse != nullptr) {
          int gi, i;
          row_coords(p, row0 + local, gi, i);
          st = make_float2(p.lse[static_cast<int64_t>(kvh * p.group + gi) * p.window + i], 1.0f);
        } else {
          st = p.stats[static_cast<int64_t>(kvh) * p.rows + row0 + local];
        }
      }
#pragma unroll
      for (int t8 = 0; t8 < 8; ++t8)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int c = t8 * 8 + 2 * (lane % 4) + u;
          float pv = 0.0f;
          if (j0 + c <= lim) pv = expf(__fmul_rn(acc[t8][2 * h + u], p.scale) - st.x) * st.y;
          if (mean)
            col[t8 * 2 + u] += static_cast<double>(pv);
          else
            probs[local * HS::kPPitch + c] = pv;
        }
    }
    if (!mean) {
      __syncthreads();
      const int row_end = min(p.rows, row0 + p.rows_per_chunk);
      const int c = threadIdx.x;
      if (c < kMmaKeys) {
        for (int r = 0; r + row0 < row_end; r += p.group) {
          float v = probs[r * HS::kPPitch + c];
          for (int gi = 1; gi < p.group; ++gi) v = fmaxf(v, probs[(r + gi) * HS::kPPitch + c]);
          qacc += static_cast<double>(v);
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer (and probs) before chunk + 2 lands in it
  }
  if (mean) {
    // Over the 8 row lanes of each key (lane / 4), then the warps in order.
#pragma unroll
    for (int u = 0; u < 16; ++u) {
      col[u] += __shfl_xor_sync(0xffffffffu, col[u], 4);
      col[u] += __shfl_xor_sync(0xffffffffu, col[u], 8);
      col[u] += __shfl_xor_sync(0xffffffffu, col[u], 16);
    }
    if (lane < 4) {
#pragma unroll
      for (int t8 = 0; t8 < 8; ++t8)
#pragma unroll
        for (int u = 0; u < 2; ++u) warp_sums[warp * kMmaKeys + t8 * 8 + 2 * lane + u] = col[t8 * 2 + u];
    }
    __syncthreads();
  }
  const int c = threadIdx.x;
  if (c < kMmaKeys && j0 + c < p.out_len) {
    double v = qacc;
    if (mean) v = ((warp_sums[c] + warp_sums[kMmaKeys + c]) + warp_sums[2 * kMmaKeys + c]) + warp_sums[3 * kMmaKeys + c];
    if (p.num_segments == 1)
      p.reduced[static_cast<int64_t>(kvh) * p.reduced_stride + j0 + c] = static_cast<float>(mean ? v / p.group : v);
    else
      p.seg_sums[(static_cast<int64_t>(seg) * gridDim.y + kvh) * p.length + j0 + c] = v;
  }
}

// H2O with several segments: out[kvh][j] = the segments' sums added in order (mean: / g).
__global__ void __launch_bounds__(256) h2o_segments_kernel(const double* seg_sums, int segments, int num_kv_heads,
                                                           int length, int divisor, float* out, int64_t out_stride) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(num_kv_heads) * length) return;
  const int kvh = static_cast<int>(idx / length), j = static_cast<int>(idx % length);
  double v = 0.0;
  for (int s = 0; s < segments; ++s) v += seg_sums[(static_cast<int64_t>(s) * num_kv_heads + kvh) * length + j];
  out[kvh * out_stride + j] = static_cast<float>(v / divisor);
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

template <int D>
constexpr size_t stats_smem_bytes() {
  return static_cast<size_t>(2 * MmaShape<D>::kTileElems) * sizeof(__nv_bfloat16);
}

constexpr int kMaxGroup = 64;
constexpr int64_t kMaxH2oSegments = 16;

template <int D>
cudaError_t set_smem_limits() {
  cudaError_t err = cudaFuncSetAttribute(window_stats_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(stats_smem_bytes<D>()));
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(window_probs_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(ProbsSmem<D>::bytes(kMaxGroup)));
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(window_probs_kernel<D>, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(h2o_probs_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(H2oSmem<D>::bytes()));
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(h2o_probs_kernel<D>, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  return err;
}

template <int D>
cudaError_t launch_passes(const WindowParams& p, int num_kv_heads, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (p.lse == nullptr) {
    err = launch(window_stats_kernel<D>, dim3(p.stat_spans, num_kv_heads * p.row_chunks), dim3(kMmaThreads),
                 stats_smem_bytes<D>(), stream, p);
    if (err != cudaSuccess) return err;
    const int total_rows = num_kv_heads * p.rows;
    err = launch(window_merge_kernel, dim3(static_cast<unsigned>(ceil_div(total_rows, 8))), dim3(256), 0, stream,
                 static_cast<const float2*>(p.partial), p.stats, total_rows, p.stat_spans);
    if (err != cudaSuccess) return err;
  }
  const int prob_tiles = static_cast<int>(ceil_div(p.out_len, kMmaKeys));
  if (!p.query_major)
    return launch(window_probs_kernel<D>, dim3(prob_tiles, num_kv_heads), dim3(kMmaThreads),
                  ProbsSmem<D>::bytes(p.group), stream, p);
  err = launch(h2o_probs_kernel<D>, dim3(prob_tiles, num_kv_heads, p.num_segments), dim3(kMmaThreads),
               H2oSmem<D>::bytes(), stream, p);
  if (err != cudaSuccess || p.num_segments == 1) return err;
  const int64_t total = static_cast<int64_t>(num_kv_heads) * p.length;
  return launch(h2o_segments_kernel, dim3(static_cast<unsigned>(ceil_div(total, 256))), dim3(256), 0, stream,
                static_cast<const double*>(p.seg_sums), p.num_segments, num_kv_heads, p.length,
                p.gqa == 0 ? p.group : 1, p.reduced, p.reduced_stride);
}

// Key tiles per pass-1 block: spans of 8 tiles (512 keys) for window scores, so that a layer
// gives enough blocks; one span (the whole row) for H2O, whose rows are many.
inline int span_tiles_for(bool query_major, int key_tiles) { return query_major ? std::max(key_tiles, 1) : 8; }

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
  // Partials: window scores [Hkv][g * w][spans of 8 tiles]; H2O [Hkv][g * L][1].
  const int64_t tiles = ceil_div(o.max_length, kMmaKeys);
  const int64_t window_rows = static_cast<int64_t>(s->group_) * std::min(o.max_window, o.max_length);
  const int64_t partial_count = std::max(window_rows * ceil_div(tiles, span_tiles_for(false, 1)),
                                         static_cast<int64_t>(s->group_) * o.max_length);
  const int64_t rows = std::max(window_rows, static_cast<int64_t>(s->group_) * o.max_length);
  const size_t partial_bytes = static_cast<size_t>(o.num_kv_heads) * partial_count * sizeof(float2);
  const size_t stats_bytes = static_cast<size_t>(o.num_kv_heads) * rows * sizeof(float2);
  const size_t reduced_bytes = static_cast<size_t>(o.num_kv_heads) * o.max_length * sizeof(float);
  // H2O's per-segment sums: up to 16 segments, at most 64 MiB.
  const int64_t per_segment = static_cast<int64_t>(o.num_kv_heads) * o.max_length * static_cast<int64_t>(sizeof(double));
  s->max_segments_ = static_cast<int32_t>(std::clamp<int64_t>((int64_t{64} << 20) / per_segment, 1, kMaxH2oSegments));
  const size_t seg_bytes = s->max_segments_ > 1 ? static_cast<size_t>(s->max_segments_ * per_segment) : 0;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&s->workspace_, partial_bytes + stats_bytes + reduced_bytes + seg_bytes));
  char* base = static_cast<char*>(s->workspace_);
  s->partial_ = reinterpret_cast<float2*>(base);
  s->stats_ = reinterpret_cast<float2*>(base + partial_bytes);
  s->reduced_ = reinterpret_cast<float*>(base + partial_bytes + stats_bytes);
  s->seg_sums_ = seg_bytes > 0 ? reinterpret_cast<double*>(base + partial_bytes + stats_bytes + reduced_bytes) : nullptr;
  if (o.head_dim == 64) {
    ADAKV_CUDA_RETURN_IF_ERROR(set_smem_limits<64>());
  } else {
    ADAKV_CUDA_RETURN_IF_ERROR(set_smem_limits<128>());
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
  return run(in, false, gqa, pool, kernel, in.length - in.window, out, out_stride, stream, false);
}

Status WindowScorer::kvcompress_metric(const WindowScoreInputs& in, PoolKind pool, int32_t kernel, float* out,
                                       int64_t out_stride, cudaStream_t stream) {
  return run(in, true, GqaReduce::kSum, pool, kernel, in.length, out, out_stride, stream, false);
}

Status WindowScorer::h2o(const WindowScoreInputs& in, GqaReduce gqa, float* out, int64_t out_stride,
                         cudaStream_t stream, const float* lse) {
  if (gqa == GqaReduce::kSum) return invalid_argument("WindowScorer::h2o: GQA reduction must be mean or max");
  return run(in, false, gqa, PoolKind::kMax, 1, in.length, out, out_stride, stream, true, lse);
}

Status WindowScorer::run(const WindowScoreInputs& in, bool squared, GqaReduce gqa, PoolKind pool, int32_t kernel,
                         int32_t out_len, float* out, int64_t out_stride, cudaStream_t stream, bool query_major,
                         const float* lse) {
  const std::string where = "WindowScorer: ";
  const WindowScorerOptions& o = options_;
  const int64_t q_stride = in.q_token_stride != 0 ? in.q_token_stride : static_cast<int64_t>(o.num_heads) * o.head_dim;
  const int64_t k_stride = in.k_token_stride != 0 ? in.k_token_stride : static_cast<int64_t>(o.num_kv_heads) * o.head_dim;
  if (in.queries == nullptr || in.keys == nullptr || out == nullptr) return invalid_argument(where + "null pointer");
  if (in.window < 1 || (!query_major && in.window > o.max_window) || in.window > in.length)
    return invalid_argument(where + "window " + std::to_string(in.window) + " outside [1, min(L, max_window)]");
  if (in.length > o.max_length)
    return invalid_argument(where + "L = " + std::to_string(in.length) + " above max_length " + std::to_string(o.max_length));
  if (kernel < 1 || kernel % 2 == 0) return invalid_argument(where + "pool kernel must be odd and >= 1");
  if (out_stride < out_len) return invalid_argument(where + "out_stride shorter than a row of scores");
  const int64_t k_head_stride = in.k_head_stride != 0 ? in.k_head_stride : o.head_dim;
  if (q_stride % 8 != 0 || k_stride % 8 != 0 || k_head_stride % 8 != 0 ||
      reinterpret_cast<uintptr_t>(in.queries) % 16 != 0 || reinterpret_cast<uintptr_t>(in.keys) % 16 != 0)
    return invalid_argument(where + "queries / keys need 16-byte alignment and strides that are multiples of 8");
  // Token-major keys hold every kv head within a token; head-major ones need a token per stride.
  const int64_t k_token = in.k_head_stride != 0 ? o.head_dim : static_cast<int64_t>(o.num_kv_heads) * o.head_dim;
  if (q_stride < static_cast<int64_t>(o.num_heads) * o.head_dim || k_stride < k_token || k_head_stride < o.head_dim)
    return invalid_argument(where + "token or head stride shorter than a token or a head");

  WindowParams p{};
  p.q = in.queries;
  p.q_stride = q_stride;
  p.k = in.keys;
  p.k_stride = k_stride;
  p.k_head_stride = k_head_stride;
  p.length = in.length;
  p.window = in.window;
  p.num_heads = o.num_heads;
  p.group = group_;
  p.rows = group_ * in.window;
  p.query_major = query_major ? 1 : 0;
  p.rows_per_chunk = query_major ? (kMmaRows / group_) * group_ : kMmaRows;
  p.row_chunks = static_cast<int32_t>(ceil_div(p.rows, p.rows_per_chunk));
  p.key_tiles = static_cast<int32_t>(ceil_div(in.length, kMmaKeys));
  p.span_tiles = span_tiles_for(query_major, p.key_tiles);
  // H2O: at least 8 chunks a segment (fewer add more partial sums than they save).
  p.chunks_per_segment = static_cast<int32_t>(std::max<int64_t>(8, ceil_div(p.row_chunks, max_segments_)));
  p.num_segments = query_major ? static_cast<int32_t>(ceil_div(p.row_chunks, p.chunks_per_segment)) : 1;
  p.seg_sums = seg_sums_;
  p.lse = lse;
  p.stat_spans = static_cast<int32_t>(ceil_div(p.key_tiles, p.span_tiles));
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
    err = launch_passes<64>(p, o.num_kv_heads, stream);
  else
    err = launch_passes<128>(p, o.num_kv_heads, stream);
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
