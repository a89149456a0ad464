// Decode attention kernels over per-head pages (see decode_attention.h for the algorithm and the
// plan). Include only from the per-head-dim instance files.
//
// Variants (template parameters) and why they exist:
//   kHeadDim 64 / 128     the head dims of the supported checkpoints
//   QT bf16 / float       the query as the model produced it (fp32 is rounded to bf16 on load)
//   kPagesPerIter 1/2/4   pages whose K/V loads are all issued before the first is used: more
//                         bytes in flight per warp against more registers (fewer resident warps);
//                         4 only at head dim 64 (at 128 it would spill)
//
// Work split, v2 warp kernel (decode_attention_kernel): one warp per work item (a run of pages of
// one row); the warp computes all g <= 8 query heads of the row's kv head, so K/V is read once per
// group. No shared memory; the 4 warps of a block are independent.
// v3 block kernel (decode_attention_block_kernel, the default): one block per work item chain;
// warp w of the block takes pages w, w + 4, ... of each item with the same per-page arithmetic,
// and the 4 warps' (m, l, o) are combined in shared memory, so an item writes one output or one
// partial. The item itself carries the page-table position and valid length (see DecodeParams).
//
// Tensor cores on register fragments loaded straight from global memory (16-byte loads), with
// the KV entries (tokens) as the M dimension so that all g heads fit one n8 tile:
//   scores  S^T[16 tok][8 heads] = K[16 tok][d] . Q^T[d][8 heads]  (mma m16n8k16, d/16 steps)
//   output  O^T[d][8 heads]     += V^T[d][16 tok] . P^T[16 tok][8 heads]  (d/16 m-tiles)
// Both dot products run over an index the hardware never sees in order (dims for S, tokens for
// O), so each thread loads contiguous 16-byte pieces and the fragments use a fixed permutation
// of that index; the A fragment of V^T pairs two tokens per register with one byte-permute.
// P goes from the C layout of S^T to the B layout of P^T with movmatrix (an in-register 8x8
// transpose), and each thread keeps the softmax state of the same two heads (2c, 2c+1) in S^T,
// P^T and O^T, so the online-softmax rescale needs no data exchange beyond the max reduction.
//
// Thread (lane) roles: r = lane / 4, c = lane % 4.
//   K loads: tokens r and r + 8, dims [32j + 8c, +8) for j < d/32 (8 tokens x 64 contiguous bytes
//            per warp instruction).
//   V loads: tokens 2c, 2c+1, 2c+8, 2c+9, dims [64q + 8r, +8) for q < d/64 (4 tokens x 128
//            contiguous bytes per warp instruction). No byte is loaded twice.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/decode_attention.h"
#include "backends/cuda/decode_attention_kernels.h"
#include "backends/cuda/last_arrival.cuh"
#include "backends/cuda/stream_load.cuh"

namespace adakv::cuda::decode_detail {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kLn2 = 0.693147180559945309f;
constexpr unsigned kFullMask = 0xffffffffu;

// --- small device helpers ---------------------------------------------------------------------

// Streaming 16-byte loads (stream_load.cuh): every byte of K/V is read once.
using cuda::load_stream;
using cuda::prefetch_l2;

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) {
  return w == 0 ? v.x : (w == 1 ? v.y : (w == 2 ? v.z : v.w));
}

// Element e (0..7) of x and of y as one bf16 pair: x's in the low half.
__device__ __forceinline__ uint32_t pair_at(const uint4& x, const uint4& y, int e) {
  return __byte_perm(word_of(x, e >> 1), word_of(y, e >> 1), (e & 1) ? 0x7632 : 0x5410);
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// D[16x8] += A[16x16] . B[16x8], bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// In-register transpose of an 8x8 b16 matrix held in the mma fragment layout.
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Diagnostics: the global nanosecond timer into t[i] (thread 0 of a block calls it; t may be
// null), or with latest: the later of it and t[i] (several blocks stamping one slot; every run's
// stamps exceed the previous run's).
__device__ __forceinline__ void trace_stamp(unsigned long long* t, int i, bool latest = false) {
  if (t != nullptr) {
    unsigned long long x;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(x));
    if (latest) {
      atomicMax(t + i, x);
    } else {
      t[i] = x;
    }
  }
}

// --- fragments ----------------------------------------------------------------------------------

template <int kHeadDim>
struct PageFrag {
  uint4 k[2][kHeadDim / 32];  // [token r, token r + 8][j] dims [32j + 8c, +8)
  uint4 v[4][kHeadDim / 64];  // [token 2c, 2c+1, 2c+8, 2c+9][q] dims [64q + 8r, +8)
};

template <int kHeadDim>
__device__ __forceinline__ void load_page(PageFrag<kHeadDim>& f, const __nv_bfloat16* kp,
                                          const __nv_bfloat16* vp, int r, int c) {
#pragma unroll
  for (int j = 0; j < kHeadDim / 32; ++j) {
    f.k[0][j] = load_stream(kp + r * kHeadDim + 32 * j + 8 * c);
    f.k[1][j] = load_stream(kp + (r + 8) * kHeadDim + 32 * j + 8 * c);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int tok = 2 * c + (i & 1) + 8 * (i >> 1);
#pragma unroll
    for (int q = 0; q < kHeadDim / 64; ++q) f.v[i][q] = load_stream(vp + tok * kHeadDim + 64 * q + 8 * r);
  }
}

template <int kHeadDim>
__device__ __forceinline__ void zero_page(PageFrag<kHeadDim>& f) {
#pragma unroll
  for (int j = 0; j < kHeadDim / 32; ++j) f.k[0][j] = f.k[1][j] = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int q = 0; q < kHeadDim / 64; ++q) f.v[i][q] = make_uint4(0, 0, 0, 0);
}

// Entries at or beyond `valid` may hold anything (NaN too): zero their V so that p = 0 times
// them stays 0. Their scores are masked separately.
template <int kHeadDim>
__device__ __forceinline__ void mask_v(PageFrag<kHeadDim>& f, int valid, int c) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int tok = 2 * c + (i & 1) + 8 * (i >> 1);
    if (tok >= valid) {
#pragma unroll
      for (int q = 0; q < kHeadDim / 64; ++q) f.v[i][q] = make_uint4(0, 0, 0, 0);
    }
  }
}

// Q^T as the B operand: head r (zero for r >= g), dims [32j + 8c, +8) as bf16.
template <int kHeadDim, typename QT>
__device__ __forceinline__ void load_q(uint4 (&qf)[kHeadDim / 32], const QT* qh, int c) {
#pragma unroll
  for (int j = 0; j < kHeadDim / 32; ++j) {
    if constexpr (sizeof(QT) == 2) {
      qf[j] = *reinterpret_cast<const uint4*>(qh + 32 * j + 8 * c);
    } else {
      const float4 a = *reinterpret_cast<const float4*>(qh + 32 * j + 8 * c);
      const float4 b = *reinterpret_cast<const float4*>(qh + 32 * j + 8 * c + 4);
      qf[j] = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
    }
  }
}

// The row's query group as the B operand: lane (r, c) holds head head0 + r, zeros for r >= g
// (their S^T columns are never read).
template <int kHeadDim, typename QT>
__device__ __forceinline__ void load_group_q(uint4 (&qf)[kHeadDim / 32], const DecodeParams& p, int seq, int head0,
                                             int r, int c) {
  if (r < p.group_size) {
    load_q<kHeadDim>(qf, static_cast<const QT*>(p.q) + seq * p.q_seq_stride + int64_t{head0 + r} * kHeadDim, c);
  } else {
#pragma unroll
    for (int j = 0; j < kHeadDim / 32; ++j) qf[j] = make_uint4(0, 0, 0, 0);
  }
}

// An empty online-softmax state: o = 0, running max -inf (log2 units, heads 2c and 2c + 1), sums 0.
template <int T>
__device__ __forceinline__ void init_softmax_state(float (&o)[T][4], float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int t = 0; t < T; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  m[0] = m[1] = kNegInf;
  l[0] = l[1] = 0.f;
}

// S^T for one page: s[0] (token r, head 2c), s[1] (token r, head 2c+1), s[2] (token r+8, head
// 2c), s[3] (token r+8, head 2c+1). Mma step (j, h) takes logical k {2c, 2c+1 | 2c+8, 2c+9} =
// dims 32j + 8c + 4h + {0, 1 | 2, 3}: words (2h, 2h+1) of both the K and the Q piece.
template <int kHeadDim>
__device__ __forceinline__ void page_scores(float (&s)[4], const PageFrag<kHeadDim>& f,
                                            const uint4 (&qf)[kHeadDim / 32]) {
  float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};  // two chains for latency
#pragma unroll
  for (int j = 0; j < kHeadDim / 32; ++j) {
    mma_16816(s0, f.k[0][j].x, f.k[1][j].x, f.k[0][j].y, f.k[1][j].y, qf[j].x, qf[j].y);
    mma_16816(s1, f.k[0][j].z, f.k[1][j].z, f.k[0][j].w, f.k[1][j].w, qf[j].z, qf[j].w);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) s[e] = s0[e] + s1[e];
}

// O^T m-tile t: logical row r is dim S_r[t], row r + 8 is dim S_r[T + t], where S_r[i] =
// 64 (i / 8) + 8r + i % 8 is the i-th dim of the thread's V pieces (T = d / 16).
template <int kHeadDim>
__device__ __forceinline__ void page_pv(float (&o)[kHeadDim / 16][4], const PageFrag<kHeadDim>& f,
                                        uint32_t b0, uint32_t b1) {
  constexpr int T = kHeadDim / 16;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const int lo = t, hi = T + t;
    mma_16816(o[t], pair_at(f.v[0][lo / 8], f.v[1][lo / 8], lo % 8), pair_at(f.v[0][hi / 8], f.v[1][hi / 8], hi % 8),
              pair_at(f.v[2][lo / 8], f.v[3][lo / 8], lo % 8), pair_at(f.v[2][hi / 8], f.v[3][hi / 8], hi % 8), b0, b1);
  }
}

// --- the fused merge (last-arriving warp or block of a row) -------------------------------------

// Combines the row's partials [rm.x, rm.x + rm.y) into out (and lse) with nthreads threads (one
// warp in the v2 kernel, the block in v3). A partial's g x head_dim floats are contiguous, so
// thread t owns the float4 slots t, t + nthreads, ... of that block (each slot lies in one head)
// and merges them over the partials with a running max: no data exchange between threads, every
// thread keeps the weight sum of its own slot's head. Partials are read through L2 (ld.cg):
// other SMs wrote them in this launch. They are loaded kBatch at a time, all before the first is
// folded, so that a row of up to kBatch partials costs one L2 round trip (a loop that folds each
// partial as it arrives lets every load wait for the previous fold).
template <int kHeadDim>
__device__ __forceinline__ void merge_row_threads(const DecodeParams& p, int seq, int head0, int2 rm, int tid,
                                                  int nthreads) {
  constexpr int kBatch = 8;
  const int g = p.group_size;
  const int slots = g * kHeadDim / 4;
  __nv_bfloat16* out = p.out + seq * p.out_seq_stride + int64_t{head0} * kHeadDim;
  for (int s = tid; s < slots; s += nthreads) {
    const int hh = (4 * s) / kHeadDim;
    float m = kNegInf, sum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i0 = 0; i0 < rm.y; i0 += kBatch) {
      float lse_b[kBatch];
      float4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        // Past the row's end: weight 0 (the batch's first partial is real, so the running max is
        // finite before any of these is folded).
        const int64_t pi = int64_t{rm.x + min(i0 + u, rm.y - 1)} * g;
        lse_b[u] = i0 + u < rm.y ? __ldcg(p.partial_lse + pi + hh) : kNegInf;
        v[u] = __ldcg(reinterpret_cast<const float4*>(p.partial_o + pi * kHeadDim) + s);
      }
      // The batch's max first, then every weight at once (as in decode_merge_kernel).
      float mn = m;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) mn = fmaxf(mn, lse_b[u]);
      const float a = fast_exp2(m - mn);
      float4 bacc = make_float4(0.f, 0.f, 0.f, 0.f);
      float bsum = 0.f;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const float w = fast_exp2(lse_b[u] - mn);
        bsum += w;
        bacc.x += w * v[u].x;
        bacc.y += w * v[u].y;
        bacc.z += w * v[u].z;
        bacc.w += w * v[u].w;
      }
      sum = sum * a + bsum;
      acc.x = acc.x * a + bacc.x;
      acc.y = acc.y * a + bacc.y;
      acc.z = acc.z * a + bacc.z;
      acc.w = acc.w * a + bacc.w;
      m = mn;
    }
    const float inv = 1.f / sum;
    *reinterpret_cast<uint2*>(out + 4 * s) = make_uint2(pack_bf16(acc.x * inv, acc.y * inv), pack_bf16(acc.z * inv, acc.w * inv));
    if ((4 * s) % kHeadDim == 0 && p.lse != nullptr)
      p.lse[int64_t{seq} * p.num_qo_heads + head0 + hh] = (m + __log2f(sum)) * kLn2;
  }
}

// Online softmax of one warp over its pages k = 0 .. mine - 1: row page page0 + kStride * k, page
// id ids[kStride * k], entries valid in it: min(16, valid_total - 16 * (page0 + kStride * k)).
// The v2 warp kernel walks its item's pages in order (kStride 1); in the v3 block kernel the
// block's 4 warps interleave (kStride 4, page0 = the warp). Page ids travel one per lane, 32 at a
// time, the next 32 loaded a batch ahead (`cur` holds the first batch).
template <int kHeadDim, int kPagesPerIter, int kStride, bool kNoMath = false>
__device__ __forceinline__ void attend_pages(const DecodeParams& p, const int32_t* ids, int mine, int page0,
                                             int valid_total, const uint4 (&qf)[kHeadDim / 32],
                                             float (&o)[kHeadDim / 16][4], float (&m)[2], float (&l)[2], int lane,
                                             int cur) {
  constexpr int T = kHeadDim / 16;
  const int r = lane >> 2, c = lane & 3;
  for (int base = 0; base < mine; base += 32) {
    const int nxt = base + 32 + lane < mine ? ids[kStride * (base + 32 + lane)] : 0;
    const int cnt = min(32, mine - base);
    for (int i = 0; i < cnt; i += kPagesPerIter) {
      PageFrag<kHeadDim> f[kPagesPerIter];
      int valid[kPagesPerIter];
#pragma unroll
      for (int u = 0; u < kPagesPerIter; ++u) {
        const int pid = __shfl_sync(kFullMask, cur, i + u);  // i + u < 32: kPagesPerIter divides 32
        valid[u] = i + u < cnt ? min(kPageSize, valid_total - (page0 + kStride * (base + i + u)) * kPageSize) : 0;
        if (valid[u] > 0) {
          const int64_t off = int64_t{pid} * p.kv.page_stride;
          load_page<kHeadDim>(f[u], p.kv.k_pool + off, p.kv.v_pool + off, r, c);
        } else {
          zero_page<kHeadDim>(f[u]);
        }
      }
      if constexpr (kNoMath) {
        // Diagnostic (DecodeParams::no_math): every loaded word is used (one XOR each) and nothing
        // else is computed; the state stays finite so the block combine and merge run as usual.
        uint32_t x = 0;
#pragma unroll
        for (int u = 0; u < kPagesPerIter; ++u) {
#pragma unroll
          for (int j = 0; j < kHeadDim / 32; ++j)
            x ^= f[u].k[0][j].x ^ f[u].k[0][j].y ^ f[u].k[0][j].z ^ f[u].k[0][j].w ^ f[u].k[1][j].x ^
                 f[u].k[1][j].y ^ f[u].k[1][j].z ^ f[u].k[1][j].w;
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int q = 0; q < kHeadDim / 64; ++q) x ^= f[u].v[i][q].x ^ f[u].v[i][q].y ^ f[u].v[i][q].z ^ f[u].v[i][q].w;
        }
        m[0] = m[1] = 0.f;
        l[0] += 1.f;
        l[1] += 1.f;
        o[0][0] += float(x & 1u);
        continue;
      }
      float t[kPagesPerIter][4];
      float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
      for (int u = 0; u < kPagesPerIter; ++u) {
        float s[4];
        page_scores<kHeadDim>(s, f[u], qf);
        const bool lo_ok = r < valid[u], hi_ok = r + 8 < valid[u];
        t[u][0] = lo_ok ? s[0] * p.scale_log2 : kNegInf;
        t[u][1] = lo_ok ? s[1] * p.scale_log2 : kNegInf;
        t[u][2] = hi_ok ? s[2] * p.scale_log2 : kNegInf;
        t[u][3] = hi_ok ? s[3] * p.scale_log2 : kNegInf;
        mx0 = fmaxf(mx0, fmaxf(t[u][0], t[u][2]));
        mx1 = fmaxf(mx1, fmaxf(t[u][1], t[u][3]));
        if (valid[u] < kPageSize) mask_v<kHeadDim>(f[u], valid[u], c);
      }
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(kFullMask, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(kFullMask, mx1, off));
      }
      const float mn0 = fmaxf(m[0], mx0), mn1 = fmaxf(m[1], mx1);
      // A max of -inf means nothing valid yet; subtracting 0 then keeps exp2 away from NaN.
      const float ref0 = mn0 == kNegInf ? 0.f : mn0, ref1 = mn1 == kNegInf ? 0.f : mn1;
      const float alpha0 = fast_exp2(m[0] - ref0), alpha1 = fast_exp2(m[1] - ref1);
      m[0] = mn0;
      m[1] = mn1;
      l[0] *= alpha0;
      l[1] *= alpha1;
#pragma unroll
      for (int tt = 0; tt < T; ++tt) {
        o[tt][0] *= alpha0;
        o[tt][1] *= alpha1;
        o[tt][2] *= alpha0;
        o[tt][3] *= alpha1;
      }
#pragma unroll
      for (int u = 0; u < kPagesPerIter; ++u) {
        const float p0 = fast_exp2(t[u][0] - ref0), p1 = fast_exp2(t[u][1] - ref1);
        const float p2 = fast_exp2(t[u][2] - ref0), p3 = fast_exp2(t[u][3] - ref1);
        l[0] += p0 + p2;
        l[1] += p1 + p3;
        // C layout of S^T (token r, heads 2c/2c+1) -> B layout of P^T (tokens 2c/2c+1, head r).
        const uint32_t b0 = transpose_8x8(pack_bf16(p0, p1));
        const uint32_t b1 = transpose_8x8(pack_bf16(p2, p3));
        page_pv<kHeadDim>(o, f[u], b0, b1);
      }
    }
    cur = nxt;
  }
}

// --- the attention kernel -----------------------------------------------------------------------

template <int kHeadDim, typename QT, int kPagesPerIter>
__global__ void __launch_bounds__(kDecodeWarpsPerBlock * 32)
    decode_attention_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int T = kHeadDim / 16;
  const int lane = threadIdx.x & 31;
  const int warp = blockIdx.x * kDecodeWarpsPerBlock + (threadIdx.x >> 5);
  if (warp >= p.num_warps) return;  // whole warps only
  const int r = lane >> 2, c = lane & 3;
  const int g = p.group_size;
  const int item_end = p.warp_item_offsets[warp + 1];

  for (int it = p.warp_item_offsets[warp]; it < item_end; ++it) {
    const int4 item = p.items[it];  // {row, page_begin, page_end, partial}
    const int row = item.x;
    const int seq = row / p.kv.num_kv_heads;
    const int head0 = (row - seq * p.kv.num_kv_heads) * g;
    const int len = p.kv.row_lengths[row];
    const int32_t* ids = p.kv.page_ids + p.kv.row_page_offsets[row] + item.y;
    const int n = item.z - item.y;

    uint4 qf[kHeadDim / 32];
    load_group_q<kHeadDim, QT>(qf, p, seq, head0, r, c);
    float o[T][4];
    float m[2];  // running max of heads 2c, 2c+1 (log2 units), warp-uniform per c
    float l[2];  // this thread's share of the running sums
    init_softmax_state<T>(o, m, l);

    int cur = lane < n ? ids[lane] : 0;
    attend_pages<kHeadDim, kPagesPerIter, 1>(p, ids, n, item.y, len, qf, o, m, l, lane, cur);

    // Epilogue: full sums over the 8 lanes holding the same heads; write o / l and the lse.
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      l[0] += __shfl_xor_sync(kFullMask, l[0], off);
      l[1] += __shfl_xor_sync(kFullMask, l[1], off);
    }
    const int partial = item.w;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int hh = 2 * c + b;
      if (hh >= g) continue;
      const float inv = 1.f / l[b];
      const float lse2 = m[b] + __log2f(l[b]);
#pragma unroll
      for (int q = 0; q < kHeadDim / 64; ++q) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int i = 8 * q + e;  // position in the thread's dims S_r
          v[e] = (i < T ? o[i % T][b] : o[i % T][2 + b]) * inv;
        }
        const int dim = 64 * q + 8 * r;
        if (partial < 0) {
          __nv_bfloat16* dst = p.out + seq * p.out_seq_stride + int64_t{head0 + hh} * kHeadDim + dim;
          *reinterpret_cast<uint4*>(dst) =
              make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
        } else {
          float* dst = p.partial_o + (int64_t{partial} * g + hh) * kHeadDim + dim;
          reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
          reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
      }
      if (r == 0) {
        if (partial >= 0) {
          p.partial_lse[int64_t{partial} * g + hh] = lse2;
        } else if (p.lse != nullptr) {
          p.lse[int64_t{seq} * p.num_qo_heads + head0 + hh] = lse2 * kLn2;
        }
      }
    }
    if (partial >= 0 && p.row_counters != nullptr) {
      // Fused merge: count this partial's arrival (last_arrival.cuh); the warp that brings the
      // row's last piece merges the row and resets the counter for the next launch.
      const int2 rm = p.row_merge[row];
      if (warp_arrives_last(p.row_counters + row, rm.y)) {
        merge_row_threads<kHeadDim>(p, seq, head0, rm, lane, 32);
        if (lane == 0) p.row_counters[row] = 0;
      }
    }
  }

  if (p.row_counters != nullptr) {
    // Fused merge: empty rows get zeros and lse -inf here (rows spread over the warps).
    for (int row = warp; row < p.kv.num_rows; row += p.num_warps) {
      if (p.row_merge[row].y != 0) continue;
      const int seq = row / p.kv.num_kv_heads;
      const int head0 = (row - seq * p.kv.num_kv_heads) * g;
      __nv_bfloat16* dst = p.out + seq * p.out_seq_stride + int64_t{head0} * kHeadDim;
      for (int i = lane; i < g * kHeadDim / 8; i += 32) reinterpret_cast<uint4*>(dst)[i] = make_uint4(0, 0, 0, 0);
      if (lane < g && p.lse != nullptr) p.lse[int64_t{seq} * p.num_qo_heads + head0 + lane] = kNegInf;
    }
  }
}

// --- the block-item attention kernel (v3, default) -----------------------------------------------


// One block per slot of the plan; the block walks its item list (first item at blockIdx.x). Per
// item, warp w takes pages w, w + 4, ...; the 4 warps' (m, l, o) meet in shared memory and the
// block writes one output or one partial.
template <int kHeadDim, typename QT, int kPagesPerIter, bool kNoMath = false>
__global__ void __launch_bounds__(kDecodeWarpsPerBlock * 32)
    decode_attention_block_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int T = kHeadDim / 16;
  constexpr int W = kDecodeWarpsPerBlock;
  __shared__ __align__(16) float s_o[W][8][kHeadDim];  // unnormalised o of each warp, [head][dim]
  __shared__ float s_m[W][8], s_l[W][8];
  __shared__ int s_last;
  const int tid = threadIdx.x;
  const int lane = tid & 31, w = tid >> 5;
  const int r = lane >> 2, c = lane & 3;
  const int g = p.group_size;
  if (tid == 0) trace_stamp(p.trace_attn, 3 * blockIdx.x);
#if __CUDA_ARCH__ >= 900
  // Let the merge kernel (a programmatic dependent) be scheduled now: it waits for this grid's
  // completion itself, and this grid is a single wave.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  int idx = blockIdx.x;
  int4 a = p.block_items[2 * idx];      // {page_off, num_pages, page_begin, row}
  int4 b = p.block_items[2 * idx + 1];  // {partial, next, 0, 0}
  bool waited = false;
  while (a.y > 0) {
    const int row = a.w;
    const int n = a.y;
    const int mine = n > w ? (n - w + W - 1) / W : 0;
    const int32_t* ids = p.kv.page_ids + a.x + w;
    if (!p.items_absolute) ids += p.kv.row_page_offsets[row];
    int cur = lane < mine ? ids[W * lane] : 0;
    // Entries of the row from the item's first page on (the plan holds pages only, so that it
    // stays valid while the rows grow within their pages).
    const int valid = p.kv.row_lengths[row] - kPageSize * a.z;
    // The block's next item travels with this one.
    int4 na = make_int4(0, 0, 0, 0), nb = make_int4(0, -1, 0, 0);
    if (b.y >= 0) {
      na = p.block_items[2 * b.y];
      nb = p.block_items[2 * b.y + 1];
    }
    if (!waited) {
      // Before the wait only the plan, the page ids and the row length are read; K/V pages are
      // merely requested in L2 (a hint: if the preceding kernel still writes one, L2 keeps it
      // coherent).
      if (lane < min(mine, p.prefetch_pages)) {
        constexpr uint32_t kPageBytes = kPageSize * kHeadDim * sizeof(__nv_bfloat16);
        const int64_t off = int64_t{cur} * p.kv.page_stride;
        prefetch_l2(p.kv.k_pool + off, kPageBytes);
        prefetch_l2(p.kv.v_pool + off, kPageBytes);
      }
#if __CUDA_ARCH__ >= 900
      // Launched as a programmatic dependent (overlap_prologue): q, K/V and every output may
      // belong to the preceding kernel until it has finished. A no-op otherwise.
      asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
      waited = true;
      if (tid == 0) trace_stamp(p.trace_attn, 3 * blockIdx.x + 1);
    }
    const int seq = row / p.kv.num_kv_heads;
    const int head0 = (row - seq * p.kv.num_kv_heads) * g;

    uint4 qf[kHeadDim / 32];
    load_group_q<kHeadDim, QT>(qf, p, seq, head0, r, c);
    float o[T][4], m[2], l[2];
    init_softmax_state<T>(o, m, l);
    attend_pages<kHeadDim, kPagesPerIter, W, kNoMath>(p, ids, mine, w, valid, qf, o, m, l, lane, cur);

    // This warp's state to shared memory (unnormalised o; m = -inf, l = 0 for a warp without pages).
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      l[0] += __shfl_xor_sync(kFullMask, l[0], off);
      l[1] += __shfl_xor_sync(kFullMask, l[1], off);
    }
#pragma unroll
    for (int bb = 0; bb < 2; ++bb) {
      const int hh = 2 * c + bb;
      if (hh >= g) continue;
#pragma unroll
      for (int q = 0; q < kHeadDim / 64; ++q) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int i = 8 * q + e;
          v[e] = i < T ? o[i % T][bb] : o[i % T][2 + bb];
        }
        float4* dst = reinterpret_cast<float4*>(&s_o[w][hh][64 * q + 8 * r]);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
      if (r == 0) {
        s_m[w][hh] = m[bb];
        s_l[w][hh] = l[bb];
      }
    }
    __syncthreads();

    // Combine the 4 warps and write the output or the item's partial.
    const int partial = b.x;
    const int slots = g * kHeadDim / 4;
    for (int s = tid; s < slots; s += W * 32) {
      const int hh = (4 * s) / kHeadDim, dim = 4 * s - hh * kHeadDim;
      float mw[W], big = kNegInf;
#pragma unroll
      for (int k = 0; k < W; ++k) big = fmaxf(big, mw[k] = s_m[k][hh]);  // finite: warp 0 has a page
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float wt = fast_exp2(mw[k] - big);  // 0 for a warp without pages
        const float4 v = *reinterpret_cast<const float4*>(&s_o[k][hh][dim]);
        sum += wt * s_l[k][hh];
        acc.x += wt * v.x;
        acc.y += wt * v.y;
        acc.z += wt * v.z;
        acc.w += wt * v.w;
      }
      const float inv = 1.f / sum;
      if (partial < 0) {
        __nv_bfloat16* dst = p.out + seq * p.out_seq_stride + int64_t{head0 + hh} * kHeadDim + dim;
        *reinterpret_cast<uint2*>(dst) =
            make_uint2(pack_bf16(acc.x * inv, acc.y * inv), pack_bf16(acc.z * inv, acc.w * inv));
        if (dim == 0 && p.lse != nullptr)
          p.lse[int64_t{seq} * p.num_qo_heads + head0 + hh] = (big + __log2f(sum)) * kLn2;
      } else {
        float* dst = p.partial_o + (int64_t{partial} * g + hh) * kHeadDim + dim;
        *reinterpret_cast<float4*>(dst) = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
        if (dim == 0) p.partial_lse[int64_t{partial} * g + hh] = big + __log2f(sum);
      }
    }
    if (partial >= 0 && p.row_counters != nullptr) {
      // Fused merge: the block that brings the row's last partial merges the row
      // (last_arrival.cuh) and resets the counter for the next launch.
      const int2 rm = p.row_merge[row];
      if (block_arrives_last(p.row_counters + row, rm.y, &s_last)) {
        // merge_floor (diagnostic): fold the first partial only, one L2 round trip.
        merge_row_threads<kHeadDim>(p, seq, head0, p.merge_floor ? make_int2(rm.x, 1) : rm, tid, W * 32);
        if (tid == 0) p.row_counters[row] = 0;
      }
    }
    __syncthreads();  // shared memory is reused by the next item
    if (b.y < 0) break;
    a = na;
    b = nb;
  }
  if (tid == 0) trace_stamp(p.trace_attn, 3 * blockIdx.x + 2);

  if (p.row_counters != nullptr) {
    if (!waited) {
#if __CUDA_ARCH__ >= 900
      asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    }
    // Fused merge: empty rows get zeros and lse -inf here (rows spread over the blocks).
    for (int row = blockIdx.x; row < p.kv.num_rows; row += gridDim.x) {
      if (p.row_merge[row].y != 0) continue;
      const int seq = row / p.kv.num_kv_heads;
      const int head0 = (row - seq * p.kv.num_kv_heads) * g;
      __nv_bfloat16* dst = p.out + seq * p.out_seq_stride + int64_t{head0} * kHeadDim;
      for (int i = tid; i < g * kHeadDim / 8; i += W * 32) reinterpret_cast<uint4*>(dst)[i] = make_uint4(0, 0, 0, 0);
      if (tid < g && p.lse != nullptr) p.lse[int64_t{seq} * p.num_qo_heads + head0 + tid] = kNegInf;
    }
  }
}

// --- the merge kernel ---------------------------------------------------------------------------

// One block per (row, query head of the group, slice of head_dim / kSlices dims): combines the
// row's partials through their log-sum-exp, or writes zeros for an empty row. Rows written
// directly return at once. A thread owns kPerLane consecutive dims of the slice (one 16-byte
// load at d 128) and folds every G-th partial, G = kWarps * kSlices partial groups per block:
// each warp holds kSlices partials per load instruction (32 / kSlices lanes each). It loads 9 of
// them at once, so a block folds 9 G partials per batch of loads (about two L2 round trips, see
// kMergeBatch). The launch takes kWarps and kSlices from the plan (merge_shape_for): 4 warps and
// 1 slice up to 64 partials, 16 warps above; at batch 1, Ada-KV's longest row (about 130-260
// partials) gets 4 slices of 4-warp blocks (144 partials per batch) where they fit one per SM.
template <int kHeadDim, int kWarps, int kSlices, bool kFloor = false>
// At most 64 registers: a 4-warp merge block then fits beside two 224-register attention blocks,
// so under PDL it is resident and waiting before they finish (8 warps of 32 registers each, an
// earlier shape, left no room for a batch of loads in flight). Wider blocks become resident only
// as attention blocks leave their SM.
__global__ void __launch_bounds__(kWarps * 32, 32 / kWarps) decode_merge_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int kPerLane = kHeadDim / 32;           // floats of o per lane
  constexpr int kSliceDims = kHeadDim / kSlices;    // dims of this block's slice
  constexpr int kLanesPerPartial = 32 / kSlices;    // lanes that load one partial's slice
  constexpr int kGroups = kWarps * kSlices;         // partials in flight per load instruction
  const int row = blockIdx.x, hh = blockIdx.y, slice = blockIdx.z;
  // The plan was uploaded before any kernel of the step, so its row table may be read before the
  // wait, and a row that its single piece wrote directly needs no wait at all: the dependent
  // load is off the chain, and such blocks are gone before the attention grid ends (H200,
  // 2026-11-28: +0.5-1.4 points of copy bandwidth at batch 1 up to 134 MB, level elsewhere).
  const int2 rm = p.row_merge[row];  // {partial_begin, partial_count}
#if __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the attention kernel (sm_90): the launch overlaps the
  // attention kernel's tail; this waits until that grid has finished and its writes are visible.
  // It lets its own dependents launch at once: the only kernel launched as one is the next
  // layer's attention kernel with overlap_prologue, which reads nothing this kernel writes before
  // its own griddepcontrol.wait (any other kernel is an ordinary launch and waits for the end).
  // (Releasing them only once this block's partial loads are issued, or folded, lost 2.5-4.6 points:
  // their prologue no longer overlaps the merge.)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  if (rm.y < 0) return;
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  // The (row, head)'s stamps (addresses recomputed from the parameters: no register held for
  // them): slice 0 marks its wait, folded and done are the latest slice's.
  const auto stamp = [&](int k) {
    if (p.trace_merge != nullptr && (k > 0 || slice == 0))
      trace_stamp(p.trace_merge + 3 * (int64_t{blockIdx.x} * gridDim.y + blockIdx.y), k, kSlices > 1);
  };
  if (threadIdx.x == 0) stamp(0);
  const int g = p.group_size;
  const int seq = row / p.kv.num_kv_heads;
  const int head = (row - seq * p.kv.num_kv_heads) * g + hh;
  __nv_bfloat16* dst = p.out + seq * p.out_seq_stride + int64_t{head} * kHeadDim + slice * kSliceDims;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  if (rm.y == 0) {
    for (int i = tid; i < kSliceDims; i += blockDim.x) dst[i] = __float2bfloat16(0.f);
    if (slice == 0 && tid == 0 && p.lse != nullptr) p.lse[int64_t{seq} * p.num_qo_heads + head] = kNegInf;
    return;
  }
  __shared__ float s_max[kGroups];
  __shared__ float s_sum[kGroups];
  __shared__ float s_acc[kGroups][kSliceDims];
  // This thread's partial group (j) and its dims within the slice ([q * kPerLane, +kPerLane)).
  const int j = w * kSlices + lane / kLanesPerPartial, q = lane % kLanesPerPartial;

  // One pass: each group merges its partials (j, j + kGroups, ...) with a running max, loading a
  // partial's lse and o together (one L2 round trip per batch, not two: max first, then the
  // weighted sum); the groups' states are combined at the end. A group's partials are loaded
  // kMergeBatch at a time, all into registers before the first is folded (a loop that folds each
  // as it arrives lets every load wait for the previous fold). A group without partials keeps
  // m = -inf, sum = 0: weight 0 below. 9, not 8: a 4-warp block then folds the 33 pieces per row
  // of batch 1 on 132 SMs (264 slots over 8 kv heads) in one batch instead of two (H200,
  // 2026-11-28: +1.2-1.5 points of copy bandwidth at 134 MB, level elsewhere; 64 registers, no
  // spills). In the SASS a batch is still two L2 round trips: within 64 registers the compiler
  // issues the 9 lse loads and 2 of the o loads, waits for the lse (the batch max), then issues
  // the other 7. Loading each lse in one lane and shuffling after every load is issued makes it
  // one (0.15-0.2 us less fold), but whole layers were level within the noise (session 14,
  // docs/benchmarks.md v12), so the simpler form stays.
  constexpr int kMergeBatch = 9;
  float acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.f;
  float mx = kNegInf, sum = 0.f;
  if constexpr (kFloor) {
    // Diagnostic (DecodeParams::merge_floor): each group loads one partial (the merge's shortest
    // chain: one dependent L2 round trip), so the output is wrong. Timing only.
    const int64_t pi = int64_t{rm.x + min(j, rm.y - 1)} * g + hh;
    mx = p.partial_lse[pi];
    sum = 1.f;
    const float* src = p.partial_o + pi * kHeadDim + slice * kSliceDims + q * kPerLane;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] = src[e];
  }
  for (int i0 = j; !kFloor && i0 < rm.y; i0 += kMergeBatch * kGroups) {
    float lse_b[kMergeBatch];
    float v[kMergeBatch][kPerLane];
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) {
      const int i = i0 + u * kGroups;
      const int64_t pi = int64_t{rm.x + min(i, rm.y - 1)} * g + hh;
      // Past the row's end: weight 0 (lse -inf; the batch's first partial is always real, so
      // the running max is finite before any of these is folded).
      lse_b[u] = i < rm.y ? p.partial_lse[pi] : kNegInf;
      const float* src = p.partial_o + pi * kHeadDim + slice * kSliceDims + q * kPerLane;
      if constexpr (kPerLane == 4) {
        const float4 x = *reinterpret_cast<const float4*>(src);
        v[u][0] = x.x;
        v[u][1] = x.y;
        v[u][2] = x.z;
        v[u][3] = x.w;
      } else {
        const float2 x = *reinterpret_cast<const float2*>(src);
        v[u][0] = x.x;
        v[u][1] = x.y;
      }
    }
    // The batch's max first, then all its weights at once: a running max per partial would
    // chain two exp2 and the FMAs of every partial behind the previous one's.
    float mn = mx;
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) mn = fmaxf(mn, lse_b[u]);
    const float a = fast_exp2(mx - mn);
    float bacc[kPerLane], bsum = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) bacc[e] = 0.f;
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) {
      const float wgt = fast_exp2(lse_b[u] - mn);
      bsum += wgt;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) bacc[e] += wgt * v[u][e];
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] = acc[e] * a + bacc[e];
    sum = sum * a + bsum;
    mx = mn;
  }
  if (tid == 0) stamp(1);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) s_acc[j][q * kPerLane + e] = acc[e];
  if (q == 0) {
    s_max[j] = mx;
    s_sum[j] = sum;
  }
  __syncthreads();
  // Every thread turns the groups' maxima into weights itself (group 0 has partial 0, so the
  // largest is finite; a group without partials gets weight 0): one barrier, not two.
  float big = kNegInf;
#pragma unroll
  for (int k = 0; k < kGroups; ++k) big = fmaxf(big, s_max[k]);
  float wt[kGroups], total = 0.f;
#pragma unroll
  for (int k = 0; k < kGroups; ++k) {
    wt[k] = fast_exp2(s_max[k] - big);
    total += wt[k] * s_sum[k];
  }
  if (slice == 0 && tid == 0 && p.lse != nullptr)
    p.lse[int64_t{seq} * p.num_qo_heads + head] = (big + __log2f(total)) * kLn2;
  const float inv = 1.f / total;
  for (int i = tid; i < kSliceDims; i += blockDim.x) {
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < kGroups; ++k) v += wt[k] * s_acc[k][i];
    dst[i] = __float2bfloat16(v * inv);
  }
  if (tid == 0) stamp(2);
}

// --- launch -------------------------------------------------------------------------------------

// Calls f.template operator()<V>() for the V in the list equal to v; false if none is.
template <int... kValues, typename F>
bool dispatch_int(int v, F&& f) {
  return ((v == kValues ? (f.template operator()<kValues>(), true) : false) || ...);
}

// kPagesPerIter 4 at head dim 128 would need more than 255 registers (it spills): not built.
template <int kHeadDim, typename F>
bool dispatch_pages_per_iter(int v, F&& f) {
  if constexpr (kHeadDim == 128) {
    return dispatch_int<1, 2>(v, f);
  } else {
    return dispatch_int<1, 2, 4>(v, f);
  }
}

template <typename F>
void dispatch_q(bool q_f32, F&& f) {
  if (q_f32) {
    f.template operator()<float>();
  } else {
    f.template operator()<__nv_bfloat16>();
  }
}

template <int kHeadDim>
cudaError_t decode_attention_launch(const DecodeParams& p, bool q_f32, int pages_per_iter, bool dependent_launch,
                                    MergeMode merge, cudaStream_t stream, bool overlap_prologue, int merge_warps,
                                    int merge_slices) {
  if ((merge == MergeMode::kFused) != (p.row_counters != nullptr)) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_q(q_f32, [&]<typename QT>() {
    dispatch_pages_per_iter<kHeadDim>(pages_per_iter, [&]<int kPpi>() {
      if (p.block_items != nullptr) {
        if (p.num_warps > 0) {
          // The default shared-memory carveout stays: the largest one (28 KB of L1) cost this
          // kernel 8-10 points of copy bandwidth on an H200, though its K/V loads do not allocate
          // in L1 (about 128 KB of them are in flight per SM); 100-132 KB were level
          // (docs/benchmarks.md v13).
          cudaLaunchConfig_t cfg = {};
          cfg.gridDim = dim3(p.num_warps);
          cfg.blockDim = dim3(kDecodeWarpsPerBlock * 32);
          cfg.stream = stream;
          cudaLaunchAttribute attr[1];
          attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
          attr[0].val.programmaticStreamSerializationAllowed = 1;
          cfg.attrs = attr;
          cfg.numAttrs = overlap_prologue ? 1 : 0;
          // The diagnostic without arithmetic (DecodeParams::no_math; d 128, bf16 queries: create()
          // allows nothing else) needs fewer registers than the real kernel (168 against 222), so
          // a third block (the next layer's) would fit beside two; 72 KB of unused shared memory
          // keeps it at 2 blocks per SM with room for a merge block, as the registers do for the
          // real kernel.
          bool launched = false;
          if constexpr (kHeadDim == 128 && sizeof(QT) == 2) {
            if (p.no_math) {
              constexpr int kPad = 72 << 10;
              const auto kern = decode_attention_block_kernel<kHeadDim, QT, kPpi, true>;
              err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, kPad);
              if (err != cudaSuccess) return;
              cfg.dynamicSmemBytes = kPad;
              err = cudaLaunchKernelEx(&cfg, kern, p);
              launched = true;
            }
          }
          if (!launched) err = cudaLaunchKernelEx(&cfg, decode_attention_block_kernel<kHeadDim, QT, kPpi>, p);
          if (err != cudaSuccess) return;
        }
      } else {
        const int blocks = (p.num_warps + kDecodeWarpsPerBlock - 1) / kDecodeWarpsPerBlock;
        if (blocks > 0) {
          decode_attention_kernel<kHeadDim, QT, kPpi><<<blocks, kDecodeWarpsPerBlock * 32, 0, stream>>>(p);
          err = cudaGetLastError();
          if (err != cudaSuccess) return;
        }
      }
      if (p.kv.num_rows > 0 && merge == MergeMode::kKernel) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(p.kv.num_rows, p.group_size, merge_slices);
        cfg.blockDim = dim3(merge_warps * 32);
        cfg.stream = stream;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = dependent_launch ? 1 : 0;
        // Slices split the 4-warp block only (merge_shape_for); wider blocks take whole heads.
        const bool floor = p.merge_floor && merge_slices == 1 && merge_warps == 4;
        if (floor) err = cudaLaunchKernelEx(&cfg, decode_merge_kernel<kHeadDim, 4, 1, true>, p);
        const bool known =
            floor ? true
            : merge_slices == 1 ? dispatch_int<4, 8, 16, 32>(merge_warps, [&]<int kWarps>() {
              err = cudaLaunchKernelEx(&cfg, decode_merge_kernel<kHeadDim, kWarps, 1>, p);
            })
            : merge_warps == 4 && merge_slices == 4 ? (err = cudaLaunchKernelEx(&cfg, decode_merge_kernel<kHeadDim, 4, 4>, p), true)
                                                    : false;
        if (!known) err = cudaErrorInvalidValue;
        if (err != cudaSuccess) return;
      }
      err = cudaGetLastError();
    });
  });
  return err;
}

template <int kHeadDim>
cudaError_t decode_attention_occupancy(bool q_f32, int pages_per_iter, int* blocks_per_sm, bool block_items) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_q(q_f32, [&]<typename QT>() {
    dispatch_pages_per_iter<kHeadDim>(pages_per_iter, [&]<int kPpi>() {
      err = block_items ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                              blocks_per_sm, decode_attention_block_kernel<kHeadDim, QT, kPpi>,
                              kDecodeWarpsPerBlock * 32, 0)
                        : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                              blocks_per_sm, decode_attention_kernel<kHeadDim, QT, kPpi>, kDecodeWarpsPerBlock * 32, 0);
    });
  });
  return err;
}

}  // namespace adakv::cuda::decode_detail
