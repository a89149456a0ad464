// Device sampling (sampling.h).
#include <cub/block/block_scan.cuh>

#include <cfloat>

#include "backends/cuda/model_ops_common.cuh"
#include "backends/cuda/sampling.h"

namespace adakv::cuda {
namespace {

constexpr int kThreads = 1024;

// Larger float -> larger key (the usual sign flip); NaN sorts above +inf and is never produced
// from finite logits.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Block argmax of (value, id) with the lowest id on ties; every thread gets the id.
__device__ int block_argmax(float v, int id, float* sv, int* si) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (ov > v || (ov == v && oi < id)) {
      v = ov;
      id = oi;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = id;
  }
  __syncthreads();
  if (warp == 0) {
    v = sv[lane];
    id = si[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int oi = __shfl_xor_sync(0xffffffffu, id, o);
      if (ov > v || (ov == v && oi < id)) {
        v = ov;
        id = oi;
      }
    }
    if (lane == 0) si[0] = id;
  }
  __syncthreads();
  return si[0];
}

__device__ int row_argmax(const float* lg, int vocab, float* sv, int* si) {
  float best = -INFINITY;
  int best_id = INT32_MAX;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = lg[i];
    if (v > best || best_id == INT32_MAX) {  // strided: i increases, so ties keep the lower id
      best = v;
      best_id = i;
    }
  }
  return block_argmax(best, best_id, sv, si);
}

__global__ void __launch_bounds__(kThreads) argmax_kernel(const float* logits, int64_t stride, int vocab, int32_t* out) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int id = row_argmax(logits + blockIdx.x * stride, vocab, sv, si);
  if (threadIdx.x == 0) out[blockIdx.x] = id;
}

using ScanD = cub::BlockScan<double, kThreads>;
using ScanI = cub::BlockScan<int, kThreads>;

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* logits, int64_t stride, int vocab, const DeviceSamplingRow* params, int32_t* out) {
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ unsigned int hist[256];
  __shared__ double hmass[256];
  __shared__ union {
    typename ScanD::TempStorage d;
    typename ScanI::TempStorage i;
  } scan;
  __shared__ uint32_t s_prefix;
  __shared__ double s_mass;
  __shared__ int s_k;
  __shared__ int s_pick_lo, s_pick_last;
  __shared__ float s_red[32];

  const DeviceSamplingRow P = params[blockIdx.x];
  const float* lg = logits + (P.row >= 0 ? static_cast<int64_t>(P.row) : static_cast<int64_t>(blockIdx.x)) * stride;
  if (P.temperature == 0.f) {
    const int id = row_argmax(lg, vocab, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = id;
    return;
  }
  const float T = P.temperature;

  // --- top-k: the key of the k-th largest scaled logit (radix select, 8 bits a pass) ----------
  uint32_t kth_key = 0;  // keep iff key >= kth_key
  if (P.top_k > 0 && P.top_k < vocab) {
    if (threadIdx.x == 0) {
      s_prefix = 0;
      s_k = P.top_k;
    }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
      __syncthreads();
      const uint32_t prefix = s_prefix;
      for (int i = threadIdx.x; i < vocab; i += kThreads) {
        const uint32_t k = order_key(lg[i] / T);
        if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int remaining = s_k;
        for (int dgt = 255; dgt >= 0; --dgt) {
          if (static_cast<int>(hist[dgt]) >= remaining) {
            s_prefix = prefix | (static_cast<uint32_t>(dgt) << shift);
            break;
          }
          remaining -= static_cast<int>(hist[dgt]);
        }
        s_k = remaining;
      }
      mask |= 255u << shift;
      __syncthreads();
    }
    kth_key = s_prefix;
  }

  // --- softmax over the kept set (fp64 sums, as the CPU) -----------------------------------------
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float s = lg[i] / T;
    if (order_key(s) >= kth_key) mx = fmaxf(mx, s);
  }
  mx = ops_detail::warp_max(mx);
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = mx;
  __syncthreads();
  mx = s_red[0];
  for (int w = 1; w < kThreads / 32; ++w) mx = fmaxf(mx, s_red[w]);
  const double dmx = mx;
  // Contiguous chunks per thread, so that block scans follow id order.
  const int chunk = (vocab + kThreads - 1) / kThreads;
  const int lo = min(vocab, static_cast<int>(threadIdx.x) * chunk), hi = min(vocab, lo + chunk);
  double local = 0.0;
  for (int i = lo; i < hi; ++i) {
    const float s = lg[i] / T;
    if (order_key(s) >= kth_key) local += exp(static_cast<double>(s) - dmx);
  }
  double total;
  {
    double excl;
    ScanD(scan.d).ExclusiveSum(local, excl, total);  // the block's sum reaches every thread
  }
  __syncthreads();

  // --- top-p: the key where the descending prefix mass reaches top_p, then ties by id ------------
  uint32_t p_key = 0;   // keep iff key > p_key, or key == p_key and tie rank < keep_ties
  int keep_ties = INT32_MAX;
  if (P.top_p < 1.f) {
    if (threadIdx.x == 0) {
      s_prefix = 0;
      s_mass = 0.0;
    }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += kThreads) hmass[i] = 0.0;
      __syncthreads();
      const uint32_t prefix = s_prefix;
      for (int i = threadIdx.x; i < vocab; i += kThreads) {
        const float s = lg[i] / T;
        const uint32_t k = order_key(s);
        if (k >= kth_key && (k & mask) == prefix)
          atomicAdd(&hmass[(k >> shift) & 255u], exp(static_cast<double>(s) - dmx) / total);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        double above = s_mass;
        int chosen = -1, lowest_nonempty = -1;
        for (int dgt = 255; dgt >= 0; --dgt) {
          if (hmass[dgt] <= 0.0) continue;
          lowest_nonempty = dgt;
          if (above + hmass[dgt] >= static_cast<double>(P.top_p)) {
            chosen = dgt;
            break;
          }
          above += hmass[dgt];
        }
        if (chosen < 0) {  // rounding left the whole mass below top_p: keep down to the last bucket
          chosen = lowest_nonempty;
          above -= hmass[chosen];
        }
        s_prefix = prefix | (static_cast<uint32_t>(chosen) << shift);
        s_mass = above;
      }
      mask |= 255u << shift;
      __syncthreads();
    }
    p_key = s_prefix;
    const double mass_gt = s_mass;
    const double p_star = exp(static_cast<double>(key_value(p_key)) - dmx) / total;
    // Ties at p_key in id order: the j-th is kept while the mass before it is below top_p.
    if (threadIdx.x == 0) {
      int j = 1;
      while (mass_gt + j * p_star < static_cast<double>(P.top_p) && j < vocab) ++j;
      s_k = j;
    }
    __syncthreads();
    keep_ties = s_k;
  }

  // --- the draw: first id whose cumulative renormalised probability exceeds u ---------------------
  int tie_count = 0;
  if (P.top_p < 1.f)
    for (int i = lo; i < hi; ++i) tie_count += order_key(lg[i] / T) == p_key;
  int tie_base = 0;
  ScanI(scan.i).ExclusiveSum(tie_count, tie_base);
  __syncthreads();
  auto kept = [&](int i, int& tie_rank) {
    const uint32_t k = order_key(lg[i] / T);
    if (k < kth_key) return false;
    if (P.top_p >= 1.f) return true;
    if (k > p_key) return true;
    if (k < p_key) return false;
    return tie_rank++ < keep_ties;
  };
  double kept_local = 0.0;
  {
    int rank = tie_base;
    for (int i = lo; i < hi; ++i)
      if (kept(i, rank)) kept_local += exp(static_cast<double>(lg[i] / T) - dmx);
  }
  double prefix_mass, kept_total;
  ScanD(scan.d).ExclusiveSum(kept_local, prefix_mass, kept_total);
  if (threadIdx.x == 0) {
    s_pick_lo = INT32_MAX;
    s_pick_last = -1;
  }
  __syncthreads();
  {
    int rank = tie_base;
    double cum = prefix_mass / kept_total;
    int last = -1;
    for (int i = lo; i < hi; ++i) {
      if (!kept(i, rank)) continue;
      cum += exp(static_cast<double>(lg[i] / T) - dmx) / kept_total;
      last = i;
      if (P.u < cum) {
        atomicMin(&s_pick_lo, i);
        break;
      }
    }
    if (last >= 0) atomicMax(&s_pick_last, last);
  }
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = s_pick_lo != INT32_MAX ? s_pick_lo : s_pick_last;
}

}  // namespace

Status argmax_rows(const float* logits, int64_t stride, int32_t rows, int32_t vocab, int32_t* out,
                   cudaStream_t stream) {
  if (vocab <= 0) return invalid_argument("argmax_rows: empty vocabulary");
  if (rows <= 0) return Status::ok();
  argmax_kernel<<<rows, kThreads, 0, stream>>>(logits, stride, vocab, out);
  return ops_detail::launch_status("argmax_rows");
}

Status sample_rows(const float* logits, int64_t stride, int32_t rows, int32_t vocab, const DeviceSamplingRow* params,
                   int32_t* out, cudaStream_t stream) {
  if (vocab <= 0) return invalid_argument("sample_rows: empty vocabulary");
  if (rows <= 0) return Status::ok();
  sample_kernel<<<rows, kThreads, 0, stream>>>(logits, stride, vocab, params, out);
  return ops_detail::launch_status("sample_rows");
}

}  // namespace adakv::cuda
