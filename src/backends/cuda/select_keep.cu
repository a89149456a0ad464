// Keep selection (select_keep.h): key building, the two stable sorts, Ada-KV budgets with the
// exact-sum fix-up, flags, scan and the keep lists.
#include "backends/cuda/select_keep.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/score_common.cuh"
#include "backends/cuda/select_sort.h"

namespace adakv::cuda {

namespace select_detail {

using score_detail::ceil_div;
using score_detail::launch;
using score_detail::warp_min;

constexpr int kMaxHeads = 256;
constexpr int kThreads = 256;

// Ascending order of these keys = descending order of the scores; -0 and +0 tie, as under the
// host's float comparison. (NaN scores have no meaningful order, here or on the host.)
__device__ __forceinline__ uint32_t descending_key(float s) {
  uint32_t b = __float_as_uint(s);
  if ((b & 0x7fffffffu) == 0) b = 0;
  const uint32_t ascending = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ~ascending;
}

// keys[i] = descending_key(S[h][j]), values[i] = i, for i = h * n + j.
__global__ void __launch_bounds__(kThreads) build_keys_kernel(const float* scores, int64_t stride, int n, int items,
                                                              uint32_t* keys, int32_t* values) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= items) return;
  const int h = i / n;
  const int j = i - h * n;
  keys[i] = descending_key(scores[h * stride + j]);
  values[i] = i;
}

// From the global order: keys[r] = head of rank r, values[r] = r; and counts[h] += the head's
// ranks below top_k (Ada's c_h), through a per-block histogram.
__global__ void __launch_bounds__(kThreads) head_keys_kernel(const int32_t* order, int n, int items, uint32_t* keys,
                                                             int32_t* values, int32_t* counts, int heads, int top_k) {
  __shared__ int hist[kMaxHeads];
  for (int h = threadIdx.x; h < heads; h += blockDim.x) hist[h] = 0;
  __syncthreads();
  const int r = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (r < items) {
    const int h = order[r] / n;
    keys[r] = static_cast<uint32_t>(h);
    values[r] = r;
    if (r < top_k) atomicAdd(&hist[h], 1);
  }
  __syncthreads();
  for (int h = threadIdx.x; h < heads; h += blockDim.x)
    if (hist[h] != 0) atomicAdd(&counts[h], hist[h]);
}

struct BudgetParams {
  const int32_t* ranked;  // [heads][n] global ranks, best first
  int32_t n;
  int32_t heads;
  int32_t bs;             // selection budget, >= 0
  int32_t adaptive;
  int32_t floor_f;        // floor(alpha * bs), computed on the host as ada_allocate does
  double one_minus_alpha;
  int32_t two_stage;
  int32_t window_len;     // L - n
  int32_t* counts;        // [heads] in: histogram counts; out: c_h
  int32_t* budgets;       // [heads] out: B_h
  int32_t* take1;         // [heads] out: entries chosen by the first stage (by S)
  int32_t* take2;         // [heads] out: entries chosen by the second stage (by crit)
  int32_t* out_keep_counts;
  int32_t* out_budgets;   // optional
  int32_t* out_counts;    // optional
};

// One warp. Mirrors ada_allocate (compress/allocators.cc) step by step; "better" there is a
// lower global rank here, which is the same (score, head, position) order.
__global__ void __launch_bounds__(32) budget_kernel(const BudgetParams p) {
  __shared__ int b[kMaxHeads];
  const int lane = threadIdx.x;
  const int64_t target = static_cast<int64_t>(p.heads) * p.bs;
  const int64_t total = static_cast<int64_t>(p.heads) * p.n;
  const bool fixup = p.adaptive && p.n > 0 && total > target;
  for (int h = lane; h < p.heads; h += 32) {
    int c = p.n, bh;
    if (p.n == 0) {
      bh = 0;
      c = 0;
    } else if (!p.adaptive) {
      bh = min(p.bs, p.n);
    } else if (!fixup) {
      bh = p.n;  // B >= L: nothing to compress
    } else {
      c = p.counts[h];
      // (1 - alpha) * c_h + f with two roundings (no FMA), half to even: as the host computes it.
      const double x = rint(__dadd_rn(__dmul_rn(p.one_minus_alpha, static_cast<double>(c)), static_cast<double>(p.floor_f)));
      bh = static_cast<int>(fmin(fmax(x, 0.0), static_cast<double>(p.n)));
    }
    b[h] = bh;
    p.counts[h] = c;
  }
  __syncwarp();
  if (fixup) {
    long long sum = 0;
    for (int h = lane; h < p.heads; h += 32) sum += b[h];
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    while (sum < target) {  // shortfall: the head whose next candidate is best
      unsigned long long best = ~0ull;
      for (int h = lane; h < p.heads; h += 32) {
        if (b[h] >= p.n) continue;
        const unsigned long long rank = static_cast<unsigned long long>(p.ranked[static_cast<int64_t>(h) * p.n + b[h]]);
        best = min(best, (rank << 32) | static_cast<unsigned long long>(h));
      }
      best = warp_min(best);
      if (best == ~0ull) break;  // cannot happen when total > target
      __syncwarp();
      if (lane == 0) ++b[static_cast<int>(best & 0xffffffffull)];
      __syncwarp();
      ++sum;
    }
    const int lower_cap = p.floor_f;
    while (sum > target) {  // excess: the head whose worst selected candidate is worst
      unsigned long long best = ~0ull;
      for (int h = lane; h < p.heads; h += 32) {
        if (b[h] <= min(lower_cap, p.n)) continue;
        const long long rank = p.ranked[static_cast<int64_t>(h) * p.n + b[h] - 1];
        // The largest rank wins: minimise its complement.
        best = min(best, (static_cast<unsigned long long>(0x7fffffffLL - rank) << 32) | static_cast<unsigned long long>(h));
      }
      best = warp_min(best);
      if (best == ~0ull) break;
      __syncwarp();
      if (lane == 0) --b[static_cast<int>(best & 0xffffffffull)];
      __syncwarp();
      --sum;
    }
  }
  __syncwarp();
  for (int h = lane; h < p.heads; h += 32) {
    const int bh = b[h];
    int t1 = bh, t2 = 0;
    if (bh >= p.n) {
      t1 = p.n;
    } else if (p.two_stage) {
      t1 = bh / 2;
      t2 = bh - bh / 2;
    }
    p.budgets[h] = bh;
    p.take1[h] = t1;
    p.take2[h] = t2;
    p.out_keep_counts[h] = bh + p.window_len;
    if (p.out_budgets != nullptr) p.out_budgets[h] = bh;
    if (p.out_counts != nullptr) p.out_counts[h] = p.counts[h];
  }
}

// flags[entry] = 1 for the first take[h] entries of every head's ranking. ranked == nullptr:
// the ranking is `order` itself, segmented by head ([h][n], values = flat entry index).
__global__ void __launch_bounds__(kThreads) flag_kernel(const int32_t* ranked, const int32_t* order, const int32_t* take,
                                                        int n, int items, int32_t* flags) {
  const int idx = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (idx >= items) return;
  const int h = idx / n;
  const int r = idx - h * n;
  if (r >= take[h]) return;
  flags[ranked != nullptr ? order[ranked[idx]] : order[idx]] = 1;
}

// Stage two of CriticalKV: per head, the entries stage one left, by crit descending (ties: lower
// position first, by the stable sort), then the stage-one entries.
__global__ void __launch_bounds__(kThreads) crit_keys_kernel(const float* crit, int64_t stride, const int32_t* flags, int n,
                                                             int items, uint64_t* keys, int32_t* values) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= items) return;
  const int h = i / n;
  const int j = i - h * n;
  keys[i] = (static_cast<uint64_t>(h) << 33) | (static_cast<uint64_t>(flags[i] != 0) << 32) |
            static_cast<uint64_t>(descending_key(crit[h * stride + j]));
  values[i] = i;
}

// keep[h][scan[i] - scan[h * n]] = j for flagged i = h * n + j; then the window n .. L-1 after
// the head's B_h selected entries.
__global__ void __launch_bounds__(kThreads) scatter_keep_kernel(const int32_t* flags, const int32_t* scan,
                                                                const int32_t* budgets, int n, int items, int heads,
                                                                int window_len, int32_t* keep, int64_t keep_stride) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < items) {
    const int i = static_cast<int>(idx);
    if (flags[i] == 0) return;
    const int h = i / n;
    keep[h * keep_stride + (scan[i] - scan[h * n])] = i - h * n;
    return;
  }
  const int64_t t = idx - items;
  if (window_len == 0 || t >= static_cast<int64_t>(heads) * window_len) return;
  const int h = static_cast<int>(t / window_len);
  const int u = static_cast<int>(t - static_cast<int64_t>(h) * window_len);
  keep[h * keep_stride + budgets[h] + u] = n + u;
}

int head_bits(int heads) {
  int bits = 1;
  while ((1 << bits) < heads) ++bits;
  return bits;
}

}  // namespace select_detail

using namespace select_detail;

Expected<std::unique_ptr<KeepSelector>> KeepSelector::create(const KeepSelectorOptions& o) {
  if (o.num_kv_heads < 1 || o.num_kv_heads > kMaxHeads) return invalid_argument("KeepSelector: kv heads must be 1..256");
  if (o.max_length < 1) return invalid_argument("KeepSelector: max_length must be >= 1");
  const int64_t items = static_cast<int64_t>(o.num_kv_heads) * o.max_length;
  if (items > (int64_t{1} << 31) - 1) return invalid_argument("KeepSelector: kv heads x max_length must be below 2^31");
  std::unique_ptr<KeepSelector> s(new KeepSelector());
  s->options_ = o;
  s->max_items_ = items;
  const int count = static_cast<int>(items);
  size_t t32 = 0, t64 = 0, tscan = 0;
  ADAKV_CUDA_RETURN_IF_ERROR(sort_pairs_u32(nullptr, t32, nullptr, nullptr, nullptr, nullptr, count, 32, nullptr));
  ADAKV_CUDA_RETURN_IF_ERROR(sort_pairs_u64(nullptr, t64, nullptr, nullptr, nullptr, nullptr, count, 64, nullptr));
  ADAKV_CUDA_RETURN_IF_ERROR(exclusive_sum_i32(nullptr, tscan, nullptr, nullptr, count, nullptr));
  s->temp_bytes_ = (std::max({t32, t64, tscan}) + 255) / 256 * 256;
  const size_t n = static_cast<size_t>(items);
  const size_t bytes = s->temp_bytes_ + n * (2 * sizeof(uint64_t) + 2 * sizeof(uint32_t) + 5 * sizeof(int32_t)) +
                       4 * kMaxHeads * sizeof(int32_t) + 16 * 16;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&s->workspace_, bytes));
  char* p = static_cast<char*>(s->workspace_);
  auto take = [&](size_t b) {
    char* r = p;
    p += (b + 15) / 16 * 16;
    return r;
  };
  s->temp_ = take(s->temp_bytes_);
  s->keys64_ = reinterpret_cast<uint64_t*>(take(n * sizeof(uint64_t)));
  s->keys64_out_ = reinterpret_cast<uint64_t*>(take(n * sizeof(uint64_t)));
  s->keys_ = reinterpret_cast<uint32_t*>(take(n * sizeof(uint32_t)));
  s->keys_out_ = reinterpret_cast<uint32_t*>(take(n * sizeof(uint32_t)));
  s->values_ = reinterpret_cast<int32_t*>(take(n * sizeof(int32_t)));
  s->order_ = reinterpret_cast<int32_t*>(take(n * sizeof(int32_t)));
  s->ranked_ = reinterpret_cast<int32_t*>(take(n * sizeof(int32_t)));
  s->flags_ = reinterpret_cast<int32_t*>(take(n * sizeof(int32_t)));
  s->scan_ = reinterpret_cast<int32_t*>(take(n * sizeof(int32_t)));
  s->head_info_ = reinterpret_cast<int32_t*>(take(4 * kMaxHeads * sizeof(int32_t)));
  return Expected<std::unique_ptr<KeepSelector>>(std::move(s));
}

KeepSelector::~KeepSelector() {
  if (workspace_ != nullptr) cudaFree(workspace_);
}

Status KeepSelector::select(const SelectInputs& in, const SelectOutputs& out, cudaStream_t stream) {
  const std::string where = "KeepSelector: ";
  const int heads = options_.num_kv_heads;
  if (in.length < 0 || in.length > options_.max_length)
    return invalid_argument(where + "L = " + std::to_string(in.length) + " outside [0, max_length]");
  if (in.window < 0) return invalid_argument(where + "window must be >= 0");
  if (out.keep == nullptr || out.keep_counts == nullptr || out.keep_stride < in.length)
    return invalid_argument(where + "keep and keep_counts are required, keep_stride >= L");
  if (in.alpha < 0.0 || in.alpha > 1.0) return invalid_argument(where + "alpha must be in [0, 1]");
  const int n = std::max(0, in.length - in.window);
  const int items = heads * n;
  if (n > 0 && (in.scores == nullptr || in.scores_stride < n))
    return invalid_argument(where + "scores [Hkv][>= L - w] are required");
  if (n > 0 && in.two_stage && (in.crit == nullptr || in.crit_stride < n))
    return invalid_argument(where + "two-stage selection needs crit [Hkv][>= L - w]");
  const int bs = std::max(0, in.selection_budget);

  int32_t* counts = head_info_;
  int32_t* budgets = head_info_ + kMaxHeads;
  int32_t* take1 = head_info_ + 2 * kMaxHeads;
  int32_t* take2 = head_info_ + 3 * kMaxHeads;
  const int bits = head_bits(heads);
  const dim3 block(kThreads);
  const dim3 grid_items(static_cast<unsigned>(ceil_div(items, kThreads)));

  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(counts, 0, heads * sizeof(int32_t), stream));
  if (items > 0) {
    size_t need = 0;
    ADAKV_CUDA_RETURN_IF_ERROR(sort_pairs_u32(nullptr, need, keys_, keys_out_, values_, order_, items, 32, stream));
    if (need > temp_bytes_) return internal_error(where + "CUB needs more temporary storage than sized at create()");
    // Global order: rank r -> flat index h * n + j, by (score desc, head, position).
    ADAKV_CUDA_RETURN_IF_ERROR(launch(build_keys_kernel, grid_items, block, 0, stream, in.scores, in.scores_stride, n,
                                      items, keys_, values_));
    ADAKV_CUDA_RETURN_IF_ERROR(sort_pairs_u32(temp_, need, keys_, keys_out_, values_, order_, items, 32, stream));
    // Every head's own ranking (global ranks, ascending) and Ada's c_h.
    const int64_t top_k = in.adaptive ? std::min<int64_t>(static_cast<int64_t>(heads) * bs, items) : 0;
    ADAKV_CUDA_RETURN_IF_ERROR(launch(head_keys_kernel, grid_items, block, 0, stream, static_cast<const int32_t*>(order_),
                                      n, items, keys_, values_, counts, heads, static_cast<int>(top_k)));
    need = 0;
    ADAKV_CUDA_RETURN_IF_ERROR(sort_pairs_u32(nullptr, need, keys_, keys_out_, values_, ranked_, items, bits, stream));
    if (need > temp_bytes_) return internal_error(where + "CUB needs more temporary storage than sized at create()");
    ADAKV_CUDA_RETURN_IF_ERROR(sort_pairs_u32(temp_, need, keys_, keys_out_, values_, ranked_, items, bits, stream));
  }

  BudgetParams bp{};
  bp.ranked = ranked_;
  bp.n = n;
  bp.heads = heads;
  bp.bs = bs;
  bp.adaptive = in.adaptive ? 1 : 0;
  bp.floor_f = static_cast<int32_t>(std::floor(in.alpha * bs));
  bp.one_minus_alpha = 1.0 - in.alpha;
  bp.two_stage = in.two_stage ? 1 : 0;
  bp.window_len = in.length - n;
  bp.counts = counts;
  bp.budgets = budgets;
  bp.take1 = take1;
  bp.take2 = take2;
  bp.out_keep_counts = out.keep_counts;
  bp.out_budgets = out.budgets;
  bp.out_counts = out.counts;
  ADAKV_CUDA_RETURN_IF_ERROR(launch(budget_kernel, dim3(1), dim3(32), 0, stream, bp));

  if (items > 0) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(flags_, 0, static_cast<size_t>(items) * sizeof(int32_t), stream));
    ADAKV_CUDA_RETURN_IF_ERROR(launch(flag_kernel, grid_items, block, 0, stream, static_cast<const int32_t*>(ranked_),
                                      static_cast<const int32_t*>(order_), static_cast<const int32_t*>(take1), n, items,
                                      flags_));
    if (in.two_stage) {
      ADAKV_CUDA_RETURN_IF_ERROR(launch(crit_keys_kernel, grid_items, block, 0, stream, in.crit, in.crit_stride,
                                        static_cast<const int32_t*>(flags_), n, items, keys64_, values_));
      size_t need = 0;
      ADAKV_CUDA_RETURN_IF_ERROR(
          sort_pairs_u64(nullptr, need, keys64_, keys64_out_, values_, order_, items, 33 + bits, stream));
      if (need > temp_bytes_) return internal_error(where + "CUB needs more temporary storage than sized at create()");
      ADAKV_CUDA_RETURN_IF_ERROR(
          sort_pairs_u64(temp_, need, keys64_, keys64_out_, values_, order_, items, 33 + bits, stream));
      ADAKV_CUDA_RETURN_IF_ERROR(launch(flag_kernel, grid_items, block, 0, stream, static_cast<const int32_t*>(nullptr),
                                        static_cast<const int32_t*>(order_), static_cast<const int32_t*>(take2), n,
                                        items, flags_));
    }
    size_t need = 0;
    ADAKV_CUDA_RETURN_IF_ERROR(exclusive_sum_i32(nullptr, need, flags_, scan_, items, stream));
    if (need > temp_bytes_) return internal_error(where + "CUB needs more temporary storage than sized at create()");
    ADAKV_CUDA_RETURN_IF_ERROR(exclusive_sum_i32(temp_, need, flags_, scan_, items, stream));
  }
  const int window_len = in.length - n;
  const int64_t total = static_cast<int64_t>(items) + static_cast<int64_t>(heads) * window_len;
  ADAKV_CUDA_RETURN_IF_ERROR(launch(scatter_keep_kernel, dim3(static_cast<unsigned>(ceil_div(total, kThreads))), block,
                                    0, stream, static_cast<const int32_t*>(flags_), static_cast<const int32_t*>(scan_),
                                    static_cast<const int32_t*>(budgets), n, items, heads, window_len, out.keep,
                                    out.keep_stride));
  return Status::ok();
}

}  // namespace adakv::cuda
