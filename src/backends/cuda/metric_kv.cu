// Per-entry metrics and the KV-Compress block selection (metric_kv.h).
#include "backends/cuda/metric_kv.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/paged_kv_view.h"
#include "backends/cuda/score_common.cuh"
#include "backends/cuda/select_sort.h"

#include <cub/block/block_scan.cuh>

namespace adakv::cuda {

namespace metric_detail {

using score_detail::ceil_div;
using score_detail::launch;

__device__ __forceinline__ int64_t slot_of(const MetricRows& r, int row, int i) {
  return static_cast<int64_t>(r.page_ids[r.row_page_offsets[row] + i / kPageSize]) * kPageSize + i % kPageSize;
}

__global__ void scatter_kernel(const MetricRows r, const float* values, int64_t stride, int length, float* metric,
                               int add) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(r.num_rows) * length) return;
  const int row = static_cast<int>(idx / length), i = static_cast<int>(idx % length);
  const int64_t slot = slot_of(r, row, i);
  metric[slot] = add ? metric[slot] + values[row * stride + i] : values[row * stride + i];
}

__global__ void gather_kernel(const MetricRows r, const float* metric, int length, float* out, int64_t stride) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(r.num_rows) * length) return;
  const int row = static_cast<int>(idx / length), i = static_cast<int>(idx % length);
  out[row * stride + i] = metric[slot_of(r, row, i)];
}

constexpr int kDecThreads = 128;

__device__ __forceinline__ float key_dot(const MetricDecodeParams& p, const float* q, int64_t slot) {
  const int64_t page = slot / kPageSize;
  const __nv_bfloat16* k = p.k_pool + page * p.page_stride + (slot % kPageSize) * p.head_dim;
  float acc = 0.0f;
  for (int c = 0; c < p.head_dim; c += 8) {
    float v[8];
    score_detail::load_bf16x8(k + c, v);
#pragma unroll
    for (int u = 0; u < 8; ++u) acc = fmaf(q[c + u], v[u], acc);
  }
  return acc * p.scale;
}

// One block per row: per group head, (max, 1 / sum) of the softmax over the row (one online pass),
// then each entry's reduced probability added to its slot's metric.
__global__ void __launch_bounds__(kDecThreads) decode_add_kernel(const MetricDecodeParams p) {
  ADAKV_DYNAMIC_SMEM(smem);
  float* q = reinterpret_cast<float*>(smem);  // [g][d]
  float* red_m = q + p.group * p.head_dim;    // [4]
  float* red_l = red_m + 4;                   // [4]
  float* stat_m = red_l + 4;                  // [g]
  float* stat_inv = stat_m + p.group;         // [g]
  const int row = blockIdx.x;
  const int b = row / p.num_kv_heads, kvh = row % p.num_kv_heads;
  const int len = p.row_lengths[row];
  const __nv_bfloat16* qb = p.queries + b * p.q_token_stride + static_cast<int64_t>(kvh) * p.group * p.head_dim;
  for (int i = threadIdx.x; i < p.group * p.head_dim; i += blockDim.x) q[i] = __bfloat162float(qb[i]);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int gi = 0; gi < p.group; ++gi) {
    float m = -INFINITY, l = 0.0f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      const float z = key_dot(p, q + gi * p.head_dim, slot_of(p.rows, row, i));
      if (z > m) {
        l = l * expf(m - z) + 1.0f;
        m = z;
      } else {
        l += expf(z - m);
      }
    }
    for (int o = 16; o >= 1; o >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m, o), ol = __shfl_xor_sync(0xffffffffu, l, o);
      const float nm = fmaxf(m, om);
      l = (m == -INFINITY ? 0.0f : l * expf(m - nm)) + (om == -INFINITY ? 0.0f : ol * expf(om - nm));
      m = nm;
    }
    if (lane == 0) {
      red_m[warp] = m;
      red_l[warp] = l;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float mm = -INFINITY;
      for (int w = 0; w < kDecThreads / 32; ++w) mm = fmaxf(mm, red_m[w]);
      double ll = 0.0;
      for (int w = 0; w < kDecThreads / 32; ++w)
        if (red_m[w] != -INFINITY) ll += static_cast<double>(red_l[w]) * exp(static_cast<double>(red_m[w]) - mm);
      stat_m[gi] = mm;
      stat_inv[gi] = static_cast<float>(1.0 / ll);
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    const int64_t s = slot_of(p.rows, row, i);
    double v = 0.0;
    for (int gi = 0; gi < p.group; ++gi) {
      const double pr = static_cast<double>(expf(key_dot(p, q + gi * p.head_dim, s) - stat_m[gi]) * stat_inv[gi]);
      if (p.mode == 2) v += pr * pr;
      else if (p.mode == 1) v = gi == 0 ? pr : fmax(v, pr);
      else v += pr / p.group;
    }
    p.metric[s] += static_cast<float>(v);
  }
}

// With the attention's lse: grid (rows, ceil(max_length / 256)), 4 warps; each block takes 256
// entries of its row, 8 lanes per key (16-byte pieces of it), all g query heads per key read:
//   p_h = exp(scale q_h . k - lse_h), metric += reduce_g p_h (fp64), as decode_add_kernel.
constexpr int kLseEntries = 256;
__global__ void __launch_bounds__(kDecThreads) decode_add_lse_kernel(const MetricDecodeParams p) {
  ADAKV_DYNAMIC_SMEM(smem);
  float* q = reinterpret_cast<float*>(smem);  // [g][d]
  float* lse = q + p.group * p.head_dim;      // [g]
  const int row = blockIdx.x;
  const int len = p.row_lengths[row];
  const int i0 = blockIdx.y * kLseEntries;
  if (i0 >= len) return;  // the whole block
  const int b = row / p.num_kv_heads, kvh = row % p.num_kv_heads;
  const __nv_bfloat16* qb = p.queries + b * p.q_token_stride + static_cast<int64_t>(kvh) * p.group * p.head_dim;
  for (int i = threadIdx.x; i < p.group * p.head_dim; i += blockDim.x) q[i] = __bfloat162float(qb[i]);
  for (int i = threadIdx.x; i < p.group; i += blockDim.x)
    lse[i] = p.lse[b * p.lse_token_stride + static_cast<int64_t>(kvh) * p.group + i];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / 8, l8 = lane % 8;  // key sub of the warp's 4, piece l8 (+ 8, ...) of it
  const int end = min(len, i0 + kLseEntries);
  const int pieces = p.head_dim / 8;          // 16-byte pieces of a key (<= 32)
  for (int base = i0 + warp * 4; base < end; base += 4 * (kDecThreads / 32)) {  // uniform per warp
    const int i = base + sub;
    const bool valid = i < end;
    float k[4][8];
    int64_t slot = 0;
    if (valid) slot = slot_of(p.rows, row, i);
    const __nv_bfloat16* kp = p.k_pool + (slot / kPageSize) * p.page_stride + (slot % kPageSize) * p.head_dim;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int c = l8 + 8 * u;
      if (valid && c < pieces) {
        score_detail::load_bf16x8(kp + c * 8, k[u]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) k[u][e] = 0.0f;
      }
    }
    double v = 0.0;
    for (int gi = 0; gi < p.group; ++gi) {
      float dot = 0.0f;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int c = l8 + 8 * u;
        if (c >= pieces) break;
        const float* qq = q + gi * p.head_dim + c * 8;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qq[e], k[u][e], dot);
      }
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      dot += __shfl_xor_sync(0xffffffffu, dot, 2);
      dot += __shfl_xor_sync(0xffffffffu, dot, 4);
      const double pr = static_cast<double>(expf(dot * p.scale - lse[gi]));
      if (p.mode == 2) v += pr * pr;
      else if (p.mode == 1) v = gi == 0 ? pr : fmax(v, pr);
      else v += pr / p.group;
    }
    if (valid && l8 == 0) p.metric[slot] += static_cast<float>(v);
  }
}

// --- H2O's continual plan -------------------------------------------------------------------------

constexpr int kKeepThreads = 512;

// Sort key: ascending order = metric descending, then index ascending (top_k_indices' order).
__device__ __forceinline__ uint64_t keep_key(float m, int32_t j) {
  if (m == 0.0f) m = 0.0f;  // -0 ties with +0, as the host's float comparison has it
  const uint32_t b = __float_as_uint(m);
  const uint32_t asc = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // ascending in m
  return (static_cast<uint64_t>(~asc) << 32) | static_cast<uint32_t>(j);
}

// One block per row: the candidates' keys sorted in shared memory (bitonic), the first b marked,
// then written in index order (a block scan), then the window.
__global__ void __launch_bounds__(kKeepThreads) keep_top_kernel(const MetricKeepParams p) {
  __shared__ uint64_t keys[kMetricKeepMaxRow];
  __shared__ uint8_t chosen[kMetricKeepMaxRow];
  using Scan = cub::BlockScan<int, kKeepThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const int row = blockIdx.x, tid = threadIdx.x;
  const int len = p.row_lengths[row];
  const int n = max(0, len - p.window);
  const int b = min(max(p.selection_budget, 0), n);
  int32_t* keep = p.keep + row * p.keep_stride;
  if (b >= n) {  // nothing to evict: the row stays whole
    if (tid == 0) p.counts[row] = 0;
    return;
  }
  int size = 1;
  while (size < n) size <<= 1;
  for (int i = tid; i < size; i += kKeepThreads) {
    keys[i] = i < n ? keep_key(p.metric[slot_of(p.rows, row, i)], i) : ~uint64_t{0};
    if (i < n) chosen[i] = 0;
  }
  __syncthreads();
  for (int k = 2; k <= size; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < size; i += kKeepThreads) {
        const int o = i ^ j;
        if (o > i) {
          const uint64_t a = keys[i], c = keys[o];
          if (((i & k) == 0) == (a > c)) {
            keys[i] = c;
            keys[o] = a;
          }
        }
      }
      __syncthreads();
    }
  for (int t = tid; t < b; t += kKeepThreads) chosen[static_cast<uint32_t>(keys[t])] = 1;
  __syncthreads();
  // Thread tid owns candidates [tid * per, (tid + 1) * per): its count, the exclusive scan, then writes.
  constexpr int per = kMetricKeepMaxRow / kKeepThreads;
  int mine = 0;
#pragma unroll
  for (int u = 0; u < per; ++u) {
    const int j = tid * per + u;
    mine += j < n ? chosen[j] : 0;
  }
  int at = 0;
  Scan(scan_tmp).ExclusiveSum(mine, at);
#pragma unroll
  for (int u = 0; u < per; ++u) {
    const int j = tid * per + u;
    if (j < n && chosen[j]) keep[at++] = j;
  }
  for (int j = n + tid; j < len; j += kKeepThreads) keep[b + (j - n)] = j;
  if (tid == 0) p.counts[row] = b + (len - n);
}

// --- KV-Compress selection --------------------------------------------------------------------

__device__ __forceinline__ uint32_t ascending_key(float m) {
  uint32_t b = __float_as_uint(m);
  if ((b & 0x7fffffffu) == 0) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ int find_row(const int32_t* base, int rows, int64_t idx) {
  int lo = 0, hi = rows - 1;  // last r with base[r] <= idx
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (base[mid] <= idx) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

struct EntryKeyParams {
  MetricRows rows;
  const int32_t* row_base;  // [rows + 1]
  int32_t total;
  const float* metric;
  const int32_t* positions;
  int32_t row_shift;   // 64 - rb
  int32_t pos_bits;    // pb
  int64_t first_protected;
  uint64_t* keys;
  int32_t* vals;
  int32_t* unprot;     // [rows] counted here
};

__global__ void entry_keys_kernel(const EntryKeyParams p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.total) return;
  const int r = find_row(p.row_base, p.rows.num_rows, idx);
  const int i = static_cast<int>(idx - p.row_base[r]);
  const int64_t s = slot_of(p.rows, r, i);
  const int32_t pos = p.positions[s];
  const bool prot = pos >= p.first_protected;
  if (!prot) atomicAdd(&p.unprot[r], 1);
  const uint64_t pos_part = ((uint64_t{1} << p.pos_bits) - 1) - static_cast<uint64_t>(pos);
  p.keys[idx] = (static_cast<uint64_t>(r) << p.row_shift) | (static_cast<uint64_t>(prot) << (p.row_shift - 1)) |
                (static_cast<uint64_t>(ascending_key(p.metric[s])) << p.pos_bits) | pos_part;
  p.vals[idx] = i;
}

struct BlockKeyParams {
  const int32_t* row_base;    // [rows + 1] entries
  const int32_t* block_base;  // [rows + 1] blocks
  int32_t rows;
  int32_t total_blocks;
  int32_t block_size;
  const uint64_t* sorted_keys;  // entries sorted
  int32_t pos_bits;
  int32_t row_bits;
  int32_t k_bits;
  uint64_t* keys;
  int32_t* sizes;
};

__global__ void block_keys_kernel(const BlockKeyParams p) {
  const int64_t bi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bi >= p.total_blocks) return;
  const int r = find_row(p.block_base, p.rows, bi);
  const int k = static_cast<int>(bi - p.block_base[r]) + 1;
  const int n = p.row_base[r + 1] - p.row_base[r];
  const int hang = n % p.block_size == 0 ? p.block_size : n % p.block_size;
  const int idx = (k - 1) * p.block_size + hang - 1;
  const uint64_t asc = (p.sorted_keys[p.row_base[r] + idx] >> p.pos_bits) & 0xffffffffull;
  p.keys[bi] = (asc << (p.row_bits + p.k_bits)) | (static_cast<uint64_t>(p.rows - 1 - r) << p.k_bits) |
               static_cast<uint64_t>(k);
  p.sizes[bi] = k == 1 ? hang : p.block_size;
}

__global__ void mark_kernel(const uint64_t* sorted_keys, const int32_t* scan, int32_t total_blocks, int64_t excess,
                            int32_t rows, int32_t row_bits, int32_t k_bits, int32_t* freed) {
  const int64_t bi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bi >= total_blocks || scan[bi] >= excess) return;
  const uint64_t key = sorted_keys[bi];
  const int k = static_cast<int>(key & ((uint64_t{1} << k_bits) - 1));
  const int r = rows - 1 - static_cast<int>((key >> k_bits) & ((uint64_t{1} << row_bits) - 1));
  atomicMax(&freed[r], k);
}

int bits_for(int64_t values) {  // bits to hold 0 .. values - 1
  int b = 1;
  while ((int64_t{1} << b) < values) ++b;
  return b;
}

}  // namespace metric_detail

using namespace metric_detail;

namespace {
Status scatter(const MetricRows& rows, const float* values, int64_t stride, int32_t length, float* metric, int add,
               cudaStream_t stream) {
  const int64_t total = int64_t{rows.num_rows} * length;
  if (total <= 0) return Status::ok();
  ADAKV_CUDA_RETURN_IF_ERROR(launch(scatter_kernel, dim3(static_cast<unsigned>(ceil_div(total, 256))), dim3(256), 0,
                                    stream, rows, values, stride, static_cast<int>(length), metric, add));
  return Status::ok();
}
}  // namespace

Status metric_scatter_rows(const MetricRows& rows, const float* values, int64_t stride, int32_t length, float* metric,
                           cudaStream_t stream) {
  return scatter(rows, values, stride, length, metric, 0, stream);
}

Status metric_add_rows(const MetricRows& rows, const float* values, int64_t stride, int32_t length, float* metric,
                       cudaStream_t stream) {
  return scatter(rows, values, stride, length, metric, 1, stream);
}

Status metric_gather_rows(const MetricRows& rows, const float* metric, int32_t length, float* out, int64_t stride,
                          cudaStream_t stream) {
  const int64_t total = int64_t{rows.num_rows} * length;
  if (total <= 0) return Status::ok();
  ADAKV_CUDA_RETURN_IF_ERROR(launch(gather_kernel, dim3(static_cast<unsigned>(ceil_div(total, 256))), dim3(256), 0,
                                    stream, rows, metric, static_cast<int>(length), out, stride));
  return Status::ok();
}

Status metric_decode_add(const MetricDecodeParams& p, cudaStream_t stream) {
  if (p.rows.num_rows <= 0) return Status::ok();
  if (p.head_dim % 8 != 0 || p.head_dim > 256 || p.group < 1 || p.group > 64)
    return invalid_argument("metric_decode_add: head_dim must be a multiple of 8 up to 256, group 1..64");
  if (p.lse != nullptr) {
    if (p.max_length <= 0) return Status::ok();
    const size_t smem = (static_cast<size_t>(p.group) * p.head_dim + p.group) * sizeof(float);
    if (smem > 48 * 1024)
      ADAKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(decode_add_lse_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>(p.rows.num_rows), static_cast<unsigned>(ceil_div(p.max_length, kLseEntries)));
    ADAKV_CUDA_RETURN_IF_ERROR(launch(decode_add_lse_kernel, grid, dim3(kDecThreads), smem, stream, p));
    return Status::ok();
  }
  const size_t smem = (static_cast<size_t>(p.group) * p.head_dim + 8 + 2 * p.group) * sizeof(float);
  if (smem > 48 * 1024)
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(decode_add_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  ADAKV_CUDA_RETURN_IF_ERROR(launch(decode_add_kernel, dim3(p.rows.num_rows), dim3(kDecThreads), smem, stream, p));
  return Status::ok();
}

Status metric_keep_top(const MetricKeepParams& p, cudaStream_t stream) {
  if (p.rows.num_rows <= 0) return Status::ok();
  if (p.keep == nullptr || p.counts == nullptr || p.metric == nullptr || p.row_lengths == nullptr)
    return invalid_argument("metric_keep_top: null pointer");
  ADAKV_CUDA_RETURN_IF_ERROR(launch(keep_top_kernel, dim3(static_cast<unsigned>(p.rows.num_rows)), dim3(kKeepThreads), 0,
                                    stream, p));
  return Status::ok();
}

Expected<std::unique_ptr<KvcSelector>> KvcSelector::create(int64_t max_entries, int32_t max_rows) {
  if (max_entries < 1 || max_entries >= (int64_t{1} << 31) || max_rows < 1)
    return invalid_argument("KvcSelector: max_entries must be in [1, 2^31), max_rows >= 1");
  std::unique_ptr<KvcSelector> s(new KvcSelector());
  s->cap_ = max_entries;
  s->max_rows_ = max_rows;
  const int count = static_cast<int>(max_entries);
  size_t t64 = 0, tscan = 0;
  ADAKV_CUDA_RETURN_IF_ERROR(
      select_detail::sort_pairs_u64(nullptr, t64, nullptr, nullptr, nullptr, nullptr, count, 64, nullptr));
  ADAKV_CUDA_RETURN_IF_ERROR(select_detail::exclusive_sum_i32(nullptr, tscan, nullptr, nullptr, count, nullptr));
  s->temp_bytes_ = (std::max(t64, tscan) + 255) / 256 * 256;
  const size_t n = static_cast<size_t>(max_entries);
  const size_t rows = static_cast<size_t>(max_rows) + 1;
  const size_t bytes = s->temp_bytes_ + n * (2 * sizeof(uint64_t) + 4 * sizeof(int32_t)) + 4 * rows * sizeof(int32_t) + 16 * 16;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&s->workspace_, bytes));
  char* p = static_cast<char*>(s->workspace_);
  auto take = [&](size_t b) {
    char* r = p;
    p += (b + 15) / 16 * 16;
    return r;
  };
  s->temp_ = take(s->temp_bytes_);
  s->keys_ = reinterpret_cast<uint64_t*>(take(n * 8));
  s->keys_out_ = reinterpret_cast<uint64_t*>(take(n * 8));
  s->vals_ = reinterpret_cast<int32_t*>(take(n * 4));
  s->vals_out_ = reinterpret_cast<int32_t*>(take(n * 4));
  s->sizes_ = reinterpret_cast<int32_t*>(take(n * 4));
  s->scan_ = reinterpret_cast<int32_t*>(take(n * 4));
  s->row_base_ = reinterpret_cast<int32_t*>(take(rows * 4));
  s->unprot_ = reinterpret_cast<int32_t*>(take(rows * 4));
  s->block_base_ = reinterpret_cast<int32_t*>(take(rows * 4));
  s->freed_ = reinterpret_cast<int32_t*>(take(rows * 4));
  void* h = nullptr;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMallocHost(&h, rows * sizeof(int32_t)));
  s->host_ = static_cast<int32_t*>(h);
  return Expected<std::unique_ptr<KvcSelector>>(std::move(s));
}

KvcSelector::~KvcSelector() {
  if (workspace_ != nullptr) cudaFree(workspace_);
  if (host_ != nullptr) cudaFreeHost(host_);
}

Status KvcSelector::select(const MetricRows& rows, const std::vector<int32_t>& lengths, const float* metric,
                           const int32_t* positions, int64_t max_entries, int32_t block_size, int64_t logical_length,
                           int32_t protected_window, cudaStream_t stream, std::vector<std::vector<int32_t>>* evict) {
  const std::string where = "KvcSelector: ";
  const int32_t R = rows.num_rows;
  if (R < 1 || R > max_rows_ || lengths.size() != static_cast<size_t>(R))
    return invalid_argument(where + "rows must be 1..max_rows with one length each");
  if (block_size < 1) return invalid_argument(where + "block size must be >= 1");
  evict->assign(static_cast<size_t>(R), {});
  std::vector<int32_t> row_base(static_cast<size_t>(R) + 1, 0);
  for (int32_t r = 0; r < R; ++r) row_base[static_cast<size_t>(r) + 1] = row_base[static_cast<size_t>(r)] + lengths[static_cast<size_t>(r)];
  const int64_t total = row_base.back();
  if (total <= max_entries || total == 0) return Status::ok();
  if (total > cap_)
    return resource_exhausted(where + std::to_string(total) + " entries exceed the workspace of " + std::to_string(cap_));
  const int row_bits = bits_for(R);
  const int pos_bits = 63 - row_bits - 32;
  if (pos_bits < 1 || logical_length >= (int64_t{1} << pos_bits))
    return invalid_argument(where + "positions up to " + std::to_string(logical_length) + " do not fit the sort key");
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(row_base_, row_base.data(), row_base.size() * 4, cudaMemcpyHostToDevice, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(unprot_, 0, static_cast<size_t>(R) * 4, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(freed_, 0, static_cast<size_t>(R) * 4, stream));
  EntryKeyParams ep{rows, row_base_, static_cast<int32_t>(total), metric, positions, 64 - row_bits, pos_bits,
                    logical_length - protected_window, keys_, vals_, unprot_};
  ADAKV_CUDA_RETURN_IF_ERROR(
      launch(entry_keys_kernel, dim3(static_cast<unsigned>(ceil_div(total, 256))), dim3(256), 0, stream, ep));
  size_t need = temp_bytes_;
  ADAKV_CUDA_RETURN_IF_ERROR(select_detail::sort_pairs_u64(temp_, need, keys_, keys_out_, vals_, vals_out_,
                                                           static_cast<int32_t>(total), 64, stream));
  // Blocks per row: those whose cost index stays below the unprotected entries.
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_, unprot_, static_cast<size_t>(R) * 4, cudaMemcpyDeviceToHost, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  std::vector<int32_t> block_base(static_cast<size_t>(R) + 1, 0);
  int32_t max_blocks = 1;
  for (int32_t r = 0; r < R; ++r) {
    const int32_t n = lengths[static_cast<size_t>(r)], u = host_[r];
    const int32_t hang = n == 0 ? 0 : (n % block_size == 0 ? block_size : n % block_size);
    const int32_t nb = n == 0 || u < hang ? 0 : (u - hang) / block_size + 1;
    block_base[static_cast<size_t>(r) + 1] = block_base[static_cast<size_t>(r)] + nb;
    max_blocks = std::max(max_blocks, nb + 1);
  }
  const int32_t total_blocks = block_base.back();
  if (total_blocks == 0) return Status::ok();
  const int k_bits = bits_for(max_blocks);
  if (32 + row_bits + k_bits > 64) return invalid_argument(where + "too many blocks per row for the sort key");
  ADAKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(block_base_, block_base.data(), block_base.size() * 4, cudaMemcpyHostToDevice, stream));
  BlockKeyParams bp{row_base_, block_base_, R, total_blocks, block_size, keys_out_, pos_bits, row_bits, k_bits, keys_, sizes_};
  ADAKV_CUDA_RETURN_IF_ERROR(
      launch(block_keys_kernel, dim3(static_cast<unsigned>(ceil_div(total_blocks, 256))), dim3(256), 0, stream, bp));
  // Global block order; vals_ carries each block's size through the sort.
  uint64_t* bkeys_out = keys_out_ + 0;  // the entry keys are no longer needed... but the sorted values are
  need = temp_bytes_;
  ADAKV_CUDA_RETURN_IF_ERROR(select_detail::sort_pairs_u64(temp_, need, keys_, bkeys_out, sizes_, vals_, total_blocks,
                                                           32 + row_bits + k_bits, stream));
  need = temp_bytes_;
  ADAKV_CUDA_RETURN_IF_ERROR(select_detail::exclusive_sum_i32(temp_, need, vals_, scan_, total_blocks, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(launch(mark_kernel, dim3(static_cast<unsigned>(ceil_div(total_blocks, 256))), dim3(256), 0,
                                    stream, static_cast<const uint64_t*>(bkeys_out), static_cast<const int32_t*>(scan_),
                                    total_blocks, total - max_entries, R, row_bits, k_bits, freed_));
  std::vector<int32_t> freed(static_cast<size_t>(R)), order(static_cast<size_t>(total));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(freed.data(), freed_, static_cast<size_t>(R) * 4, cudaMemcpyDeviceToHost, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(order.data(), vals_out_, static_cast<size_t>(total) * 4, cudaMemcpyDeviceToHost, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  for (int32_t r = 0; r < R; ++r) {
    const int32_t k = freed[static_cast<size_t>(r)];
    if (k == 0) continue;
    const int32_t n = lengths[static_cast<size_t>(r)];
    const int32_t hang = n % block_size == 0 ? block_size : n % block_size;
    const int32_t count = (k - 1) * block_size + hang;
    const int32_t* first = order.data() + row_base[static_cast<size_t>(r)];
    (*evict)[static_cast<size_t>(r)].assign(first, first + count);
  }
  return Status::ok();
}

}  // namespace adakv::cuda
