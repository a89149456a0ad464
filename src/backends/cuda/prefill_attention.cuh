// Prefill attention kernel (see prefill_attention.h for the computation and the FLOP model).
// Include only from the per-head-dim instance files and prefill_attention_wgmma.cu (which shares
// the device helpers below).
//
// FlashAttention-2's structure on mma.sync (sm_80 tensor-core instructions; on sm_90a at head
// dim 128 prefill_attention() takes the wgmma kernel instead, prefill_attention_wgmma.cu):
//   CTA = 4 warps = 128 queries of ONE query head; warp w owns query rows [32w, 32w + 32) of the
//   tile as two m16 tiles, so each K/V fragment read from shared memory feeds two mma (half the
//   shared-memory traffic per FLOP of a 16-row warp, which on an H100 would be bound by the
//   128 B/clk of shared memory before the tensor cores).
//   Key tiles of kBN keys stream through a two-stage cp.async pipeline (K and V of tile t + 1 land
//   while tile t is computed; one barrier per tile). Q stays in shared memory and is re-read with
//   ldmatrix at each k-step: 32 rows x d of Q fragments in registers would not fit next to the
//   32 x d fp32 output accumulator and the 32 x kBN scores under 255 registers.
//   S = Q K^T: ldmatrix.x4 (Q: A operand; K: B operand, row-major [key][dim] is already K^T's
//   column-major layout). P = exp2(S * scale * log2 e - m) goes from the accumulator layout of S to
//   the A operand of P V in registers (FlashAttention-2's register reuse), V via ldmatrix.trans.
//   Shared-memory rows are swizzled in 16-byte chunks (chunk ^ (row & 7)): the 8 row addresses of
//   every ldmatrix phase hit 8 different bank groups, and so do the cp.async writes.
//
// GQA: one CTA per (query tile, query head); the g CTAs of one KV group get consecutive block
// ids, so they run together and stream the same K/V tiles, which then come from L2 (DRAM reads
// the group's K/V about once). Sharing the tiles through one CTA's shared memory would not raise
// the FLOPs per byte moved into shared memory (that depends on the query rows per CTA, 128
// either way) and would only save L2 -> SM traffic: 128 FLOP per byte loaded, about 2.5 TB/s at
// 300 TFLOP/s, under the H100's L2 bandwidth.
// Causal: key tiles above the diagonal are never loaded (the loop stops at the last key the
// tile's last query sees); a warp whose 32 rows see none of a tile's keys skips its compute; only
// tiles that cross the diagonal or the end of the keys evaluate the mask. Blocks run the
// longest query tiles (the last ones) first, so short tiles fill the tail of the grid.
//
// Online softmax in exp2 with scale * log2(e) folded into one FFMA per score; the rescale of the
// accumulator (128 FMUL per thread and tile at d 128) is skipped when no row of the warp raised
// its running maximum, which after the first tiles is the common case.
//
// Variants: kHeadDim 64 / 128 (the supported checkpoints); kBN keys per tile, 32/64 at d 128
// and 64/128 at d 64: larger tiles amortise the softmax's shuffles and the barrier, smaller ones
// leave registers (d 128, kBN 64: 128 accumulator + 64 score registers per thread, 255 in all;
// d 64, kBN 128 spills a few words). The bench times all four.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "backends/cuda/prefill_attention.h"

namespace adakv::cuda::prefill_detail {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kLn2 = 0.693147180559945309f;

// --- small device helpers ---------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy through L2 only (K/V tiles are re-read by other CTAs, never by
// this one); src_bytes 0 writes zeros and reads nothing (rows past the end of q or k, whose
// address may lie past the allocation).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D[16x8] += A[16x16] . B[16x8], bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Cooperative copy of a [kRows][kD] tile into swizzled shared memory. Each thread copies one
// fixed 16-byte column chunk of every (kThreads / chunks)-th row: `src` is its first row's chunk,
// rows are `row_step` elements apart, and rows at or past `rows_left` (relative to the thread's
// first row) are zero-filled without being read (the end of q or k).
template <int kD>
struct TileLoader {
  static constexpr int kChunks = kD / 8;
  static constexpr int kRowsPerPass = kThreads / kChunks;  // 8 (d 128) or 16 (d 64): row & 7 fixed
  static_assert(kRowsPerPass % 8 == 0, "rows per pass");
  uint32_t dst_offset;  // byte offset of the thread's first chunk in a tile
  int first_row;        // the thread's first row in a tile

  __device__ __forceinline__ explicit TileLoader(int tid) {
    const int chunk = tid % kChunks;
    first_row = tid / kChunks;
    dst_offset = first_row * (kD * 2) + ((chunk ^ (first_row & 7)) << 4);
  }
  // Element offset of the thread's chunk in row 0 of a tile.
  __device__ __forceinline__ int column(int tid) const { return (tid % kChunks) * 8; }

  template <int kRows>
  __device__ __forceinline__ void load(uint32_t s_tile, const __nv_bfloat16* src, int64_t stride,
                                       int rows_left) const {
    static_assert(kRows % kRowsPerPass == 0, "tile rows");
    const int64_t row_step = stride * kRowsPerPass;
#pragma unroll
    for (int i = 0; i < kRows / kRowsPerPass; ++i) {
      cp_async_16(s_tile + dst_offset + i * kRowsPerPass * (kD * 2), src + i * row_step,
                  i * kRowsPerPass < rows_left ? 16 : 0);
    }
  }
};

// Byte offset, inside a swizzled row, of 16-byte chunk 2 * kk + hi for a thread whose row has
// row & 7 == x7: with kk = 4a + b the xor only touches the low three bits of 8a + 2b + hi.
__device__ __forceinline__ uint32_t chunk_offset(int kk, int hi, int x7) {
  return uint32_t((((2 * (kk & 3) + hi) ^ x7) << 4) + ((kk >> 2) << 7));
}

// --- the kernel -----------------------------------------------------------------------------------

template <int kD, int kBN>
__global__ void __launch_bounds__(kThreads, 2) prefill_attention_kernel(const __grid_constant__ PrefillParams p) {
  constexpr int kMT = 2;         // m16 tiles per warp: 32 query rows
  constexpr int kNT = kBN / 8;   // n8 tiles of S (keys)
  constexpr int kDT = kD / 8;    // n8 tiles of O (dims)
  constexpr int kKD = kD / 16;   // k16 steps of S = Q K^T
  constexpr int kKN = kBN / 16;  // k16 steps of O += P V
  constexpr int kRowBytes = kD * 2;
  constexpr int kChunks = kD / 8;
  constexpr uint32_t kTileBytes = kBN * kRowBytes;
  static_assert(kThreads == 4 * 32 && kBlockM == 4 * 32, "4 warps x 32 rows");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_q = smem_u32(smem);                   // [kBlockM][kD]
  const uint32_t s_k = s_q + kBlockM * kRowBytes;        // [2][kBN][kD]
  const uint32_t s_v = s_k + 2 * kTileBytes;             // [2][kBN][kD]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = lane >> 2, c = lane & 3;  // accumulator layout: rows r, r + 8; columns 2c, 2c + 1
  const int H = p.num_qo_heads;
  const int head = int(blockIdx.x % unsigned(H));
  const int q_tile = p.num_q_tiles - 1 - int(blockIdx.x / unsigned(H));
  const int kv_head = head / p.group_size;
  const int m0 = q_tile * kBlockM;

  // Last key visible to query row i (rows past num_q too: their results are never stored).
  const int last_k = p.num_k - 1;
  auto last_key = [&](int i) { return p.causal ? min(i + p.q_offset, last_k) : last_k; };
  const int n_tiles = last_key(min(m0 + kBlockM, p.num_q) - 1) / kBN + 1;
  const int mask_from = last_key(m0);                       // tiles reaching past it need the mask
  const int warp_last = last_key(m0 + 32 * warp + 31);      // tiles starting past it: warp idle

  const __nv_bfloat16* q_g = p.q + int64_t{head} * kD;
  const __nv_bfloat16* k_g = p.k + int64_t{kv_head} * kD;
  const __nv_bfloat16* v_g = p.v + int64_t{kv_head} * kD;

  // ldmatrix row addresses. Every row a thread addresses has row & 7 == lane & 7.
  const int x7 = lane & 7;
  const int hi_a = lane >> 4;         // Q and V: matrices 2, 3 take the second 8-column chunk
  const int hi_k = (lane >> 3) & 1;   // K: matrices 1, 3 take the second chunk
  const uint32_t q_frag = s_q + (32 * warp + x7 + 8 * ((lane >> 3) & 1)) * kRowBytes;
  const uint32_t k_frag = (x7 + 8 * (lane >> 4)) * kRowBytes;
  const uint32_t v_frag = (x7 + 8 * ((lane >> 3) & 1)) * kRowBytes;

  float o[kMT][kDT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
  float row_max[kMT][2], row_sum[kMT][2];  // raw-score max, per-thread partial sum of p
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) row_max[mt][0] = row_max[mt][1] = kNegInf, row_sum[mt][0] = row_sum[mt][1] = 0.f;

  // Cooperative cp.async loads: the thread's chunk of its first row of Q and of K/V tile 0.
  const TileLoader<kD> loader(tid);
  const int col = loader.column(tid);
  const __nv_bfloat16* k_src = k_g + int64_t{loader.first_row} * p.k_row_stride + col;
  const __nv_bfloat16* v_src = v_g + int64_t{loader.first_row} * p.v_row_stride + col;
  const int64_t k_tile_step = int64_t{kBN} * p.k_row_stride, v_tile_step = int64_t{kBN} * p.v_row_stride;
  loader.template load<kBlockM>(s_q, q_g + int64_t{m0 + loader.first_row} * p.q_row_stride + col, p.q_row_stride,
                                p.num_q - m0 - loader.first_row);
  loader.template load<kBN>(s_k, k_src, p.k_row_stride, p.num_k - loader.first_row);
  loader.template load<kBN>(s_v, v_src, p.v_row_stride, p.num_k - loader.first_row);
  cp_async_commit();

  for (int t = 0; t < n_tiles; ++t) {
    // Tile t has landed (this thread's copies) and is visible (everyone's); every warp is done
    // with tile t - 1, whose stage the loads of tile t + 1 overwrite next.
    cp_async_wait_all();
    __syncthreads();
    if (t + 1 < n_tiles) {
      const uint32_t next = ((t + 1) & 1) * kTileBytes;
      k_src += k_tile_step;
      v_src += v_tile_step;
      const int rows_left = p.num_k - (t + 1) * kBN - loader.first_row;
      loader.template load<kBN>(s_k + next, k_src, p.k_row_stride, rows_left);
      loader.template load<kBN>(s_v + next, v_src, p.v_row_stride, rows_left);
    }
    cp_async_commit();
    const int n0 = t * kBN;
    if (n0 > warp_last) continue;  // every key of the tile is masked for this warp's rows
    const uint32_t stage = (t & 1) * kTileBytes;

    // S = Q K^T: s[mt][nt] holds rows (16 mt + r, + 8) x keys (8 nt + 2c, + 1) of the warp.
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKD; ++kk) {
      uint32_t qa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(qa[mt], q_frag + mt * 16 * kRowBytes + chunk_offset(kk, hi_a, x7));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t kb[4];  // b0, b1 of key tile 2np, then of key tile 2np + 1
        ldmatrix_x4(kb, s_k + stage + k_frag + np * 16 * kRowBytes + chunk_offset(kk, hi_k, x7));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816(s[mt][2 * np], qa[mt], kb[0], kb[1]);
          mma_16816(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }

    if (n0 + kBN - 1 > mask_from) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int lim = last_key(m0 + 32 * warp + 16 * mt + 8 * h + r) - n0;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (8 * nt + 2 * c + e > lim) s[mt][nt][2 * h + e] = kNegInf;
        }
    }

    // Online softmax, per row (mt, h): new max over the quad of lanes sharing the row, rescale
    // of the running sum and of o by exp2(old - new), p = exp2(s * scale * log2 e - max). Once the
    // running maxima settle (a few tiles in; at once with an attention sink) no row of the warp
    // changes its max and the rescale of o, 128 multiplies per thread at d 128, is skipped.
    float alpha[kMT][2];
    bool max_changed = false;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = row_max[mt][h];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row with every key so far masked keeps max -inf: use 0 so that exp2 sees -inf, not NaN.
        const float m_scaled = mx == kNegInf ? 0.f : mx * p.scale_log2;
        const bool changed = mx != row_max[mt][h];
        max_changed |= changed;
        alpha[mt][h] = changed ? fast_exp2(row_max[mt][h] * p.scale_log2 - m_scaled) : 1.f;
        row_max[mt][h] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(fmaf(s[mt][nt][2 * h + e], p.scale_log2, -m_scaled));
            s[mt][nt][2 * h + e] = pe;
            sum += pe;
          }
        row_sum[mt][h] = row_sum[mt][h] * alpha[mt][h] + sum;
      }
    if (__any_sync(0xffffffffu, max_changed)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          o[mt][dt][0] *= alpha[mt][0];
          o[mt][dt][1] *= alpha[mt][0];
          o[mt][dt][2] *= alpha[mt][1];
          o[mt][dt][3] *= alpha[mt][1];
        }
    }

    // O += P V: the accumulators of key tiles 2kk, 2kk + 1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kKN; ++kk) {
      uint32_t pa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int jp = 0; jp < kDT / 2; ++jp) {
        uint32_t vb[4];  // b0, b1 of dim tile 2jp, then of dim tile 2jp + 1
        ldmatrix_x4_trans(vb, s_v + stage + v_frag + kk * 16 * kRowBytes + chunk_offset(jp, hi_a, x7));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816(o[mt][2 * jp], pa[mt], vb[0], vb[1]);
          mma_16816(o[mt][2 * jp + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }

  // Epilogue: o / l as bf16, staged in this warp's own 32 rows of the Q tile (no other warp reads
  // them) so that the stores to global memory are whole 16-byte chunks of whole rows.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[mt][h] += __shfl_xor_sync(0xffffffffu, row_sum[mt][h], 1);
      row_sum[mt][h] += __shfl_xor_sync(0xffffffffu, row_sum[mt][h], 2);
    }
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float inv = row_sum[mt][h] > 0.f ? 1.f / row_sum[mt][h] : 0.f;
      const uint32_t row_addr = s_q + (32 * warp + 16 * mt + 8 * h + r) * kRowBytes + 4 * c;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const uint32_t v = pack_bf16(o[mt][dt][2 * h] * inv, o[mt][dt][2 * h + 1] * inv);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(row_addr + ((dt ^ r) << 4)), "r"(v) : "memory");
      }
    }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int idx = lane + 32 * i;
    const int row = idx / kChunks, ch = idx % kChunks;
    const int gq = m0 + 32 * warp + row;
    if (gq < p.num_q) {
      uint4 v;
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(s_q + (32 * warp + row) * kRowBytes + ((ch ^ (row & 7)) << 4))
                   : "memory");
      __nv_bfloat16* dst = p.out + int64_t{gq} * p.out_row_stride + int64_t{head} * kD + ch * 8;
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                   : "memory");
    }
  }
  if (p.lse != nullptr && c == 0) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int gq = m0 + 32 * warp + 16 * mt + 8 * h + r;
        if (gq < p.num_q) {
          const float l = row_sum[mt][h];
          p.lse[int64_t{head} * p.num_q + gq] = l > 0.f ? (row_max[mt][h] * p.scale_log2 + __log2f(l)) * kLn2 : kNegInf;
        }
      }
  }
}

// --- launch ---------------------------------------------------------------------------------------

template <int kD, int kBN>
cudaError_t launch_variant(const PrefillParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = smem_bytes(kD, kBN);
  const auto kernel = prefill_attention_kernel<kD, kBN>;
  // The dynamic shared-memory limit above 48 KB is a per-device function attribute: raise it
  // once per device (devices 0..63 remembered; others set it at every launch).
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit == 0 || (configured.load(std::memory_order_relaxed) & bit) == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem));
    if (err != cudaSuccess) return err;
    // Two CTAs per SM need the largest shared-memory carve-out.
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  const unsigned grid = unsigned(p.num_q_tiles) * unsigned(p.num_qo_heads);
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <int kHeadDim>
cudaError_t prefill_attention_launch(const PrefillParams& p, int block_n, cudaStream_t stream) {
  if constexpr (kHeadDim == 128) {
    if (block_n == 64) return launch_variant<128, 64>(p, stream);
    if (block_n == 32) return launch_variant<128, 32>(p, stream);
  } else {
    if (block_n == 64) return launch_variant<64, 64>(p, stream);
    if (block_n == 128) return launch_variant<64, 128>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace adakv::cuda::prefill_detail
