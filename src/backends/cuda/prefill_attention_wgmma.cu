// Prefill attention on Hopper's warpgroup MMA (wgmma, sm_90a), head dim 128: the same
// computation, masking, GQA order and outputs as prefill_attention.cuh's mma.sync kernel.
//
// CTA = 2 warpgroups = 128 queries of one query head (the mma.sync kernel's tile, so the grids
// match); warpgroup w owns rows [64w, 64w + 64). Key tiles of kBN = 64 or 128 keys (128 by
// default: 10-13 % faster from 8K on, H200) stream through a two-stage cp.async pipeline shared by
// both warpgroups. Per tile and warpgroup:
//   S[64 x kBN] = Q K^T   8 x wgmma.m64nNk16, both operands in shared memory (K-major);
//   online softmax on the accumulators in registers (the accumulator layout per warp is
//   mma.sync's, so the masking and the row reductions are the same code);
//   O[64x128] += P V   kBN / 16 x wgmma.m64n128k16, P from registers (the accumulators of S packed to
//   bf16 pairs are exactly the A-operand layout), V from shared memory as an MN-major operand.
// Shared memory holds each [rows][128] tile as two column blocks of [rows][64] (128-byte rows,
// 16-byte chunks swizzled by row & 7: the 128B swizzle that the wgmma descriptors name).
// No warp specialisation or ping-pong scheduling yet: each warpgroup waits for its own wgmmas.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "backends/cuda/prefill_attention.cuh"

namespace adakv::cuda::prefill_detail {
namespace {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ADAKV_WGMMA 1
#endif

constexpr int kD = 128;
constexpr int kWgThreads = 256;                // 2 warpgroups
constexpr uint32_t kQBytes = kBlockM * kD * 2;  // 32 KB
// Q + two stages of K and V tiles of kBN keys, + alignment to 1024 bytes.
constexpr size_t wgmma_smem(int kBN) { return kQBytes + 4 * size_t(kBN) * kD * 2 + 1024; }

#ifdef ADAKV_WGMMA  // the device helpers exist in the sm_90a pass only (elsewhere the kernel is a stub);
// smem_u32, cp_async_16, fast_exp2, pack_bf16, kNegInf and kLn2 come from prefill_attention.cuh.

// Byte offset of 16-byte chunk `ch` (0..15) of row `row` in a tile of `rows` rows: column block
// ch / 8 of [rows][128 B], the chunk swizzled by row & 7.
__device__ __forceinline__ uint32_t tile_offset(int row, int ch, int rows) {
  return uint32_t((ch >> 3) * rows * 128 + row * 128 + (((ch & 7) ^ (row & 7)) << 4));
}

// Copies rows [0, rows) x 128 of a [.][stride] bf16 matrix into a tile; rows at or past
// `valid` are zero-filled without being read.
template <int kRows>
__device__ __forceinline__ void load_tile(uint32_t s_tile, const __nv_bfloat16* src, int64_t stride, int valid,
                                          int tid) {
#pragma unroll
  for (int i = 0; i < kRows * 16 / kWgThreads; ++i) {
    const int idx = tid + kWgThreads * i, row = idx >> 4, ch = idx & 15;
    cp_async_16(s_tile + tile_offset(row, ch, kRows), src + int64_t{row} * stride + ch * 8, row < valid ? 16 : 0);
  }
}

// Shared-memory matrix descriptor, 128-byte swizzle (start address 1024-byte aligned but for the
// in-atom k offsets): lbo / sbo in bytes.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// d[32] (+)= A[64x16] (shared, K-major) . B[16x64] (shared, K-major); scale_d 0: d = A B.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d[64] (+)= A[64x16] (shared, K-major) . B[16x128] (shared, K-major); scale_d 0: d = A B.
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d[64] += A[64x16] (registers: bf16 pairs in the mma.m16n8k16 A layout per warp) . B[16x128]
// (shared, MN-major: imm-trans-b 1).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}


#endif  // ADAKV_WGMMA

template <int kBN>
__global__ void __launch_bounds__(kWgThreads, 1) prefill_attention_wgmma_kernel(const __grid_constant__ PrefillParams p) {
#ifdef ADAKV_WGMMA
  constexpr uint32_t kTileBytes = kBN * kD * 2;  // K or V
  constexpr int kS = kBN / 2;                    // accumulators of S per thread
  extern __shared__ unsigned char smem_raw[];
  const uint32_t s_q = (smem_u32(smem_raw) + 1023u) & ~1023u;  // [2 blocks][128 rows][128 B]
  const uint32_t s_k = s_q + kQBytes;                           // [2 stages][2 blocks][kBN][128 B]
  const uint32_t s_v = s_k + 2 * kTileBytes;                    // [2 stages][2 blocks][kBN][128 B]

  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, w4 = (tid >> 5) & 3;
  const int r = lane >> 2, c = lane & 3;  // accumulator rows 16 w4 + r (+ 8), columns 8j + 2c (+ 1)
  const int H = p.num_qo_heads;
  const int head = int(blockIdx.x % unsigned(H));
  const int q_tile = p.num_q_tiles - 1 - int(blockIdx.x / unsigned(H));
  const int kv_head = head / p.group_size;
  const int m0 = q_tile * kBlockM;
  const int row0 = m0 + 64 * wg + 16 * w4 + r;  // this thread's first query row (second: + 8)

  const int last_k = p.num_k - 1;
  auto last_key = [&](int i) { return p.causal ? min(i + p.q_offset, last_k) : last_k; };
  const int n_tiles = last_key(min(m0 + kBlockM, p.num_q) - 1) / kBN + 1;
  const int mask_from = last_key(m0 + 64 * wg);   // tiles reaching past it need the mask
  const int wg_last = last_key(m0 + 64 * wg + 63);  // tiles starting past it: warpgroup idle

  const __nv_bfloat16* k_g = p.k + int64_t{kv_head} * kD;
  const __nv_bfloat16* v_g = p.v + int64_t{kv_head} * kD;
  load_tile<kBlockM>(s_q, p.q + int64_t{m0} * p.q_row_stride + int64_t{head} * kD, p.q_row_stride, p.num_q - m0, tid);
  load_tile<kBN>(s_k, k_g, p.k_row_stride, p.num_k, tid);
  load_tile<kBN>(s_v, v_g, p.v_row_stride, p.num_k, tid);
  asm volatile("cp.async.commit_group;\n" ::: "memory");

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};

  for (int t = 0; t < n_tiles; ++t) {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    // The tile's bytes, written through the generic proxy, become visible to the wgmma (async proxy).
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    if (t + 1 < n_tiles) {
      const uint32_t next = ((t + 1) & 1) * kTileBytes;
      const int n1 = (t + 1) * kBN;
      load_tile<kBN>(s_k + next, k_g + int64_t{n1} * p.k_row_stride, p.k_row_stride, p.num_k - n1, tid);
      load_tile<kBN>(s_v + next, v_g + int64_t{n1} * p.v_row_stride, p.v_row_stride, p.num_k - n1, tid);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    const int n0 = t * kBN;
    if (n0 > wg_last) continue;
    const uint32_t stage = (t & 1) * kTileBytes;

    // S = Q K^T over 8 k-steps of 16 dims: column block kk / 4, 32 bytes per step inside it.
    float s[kS];
#pragma unroll
    for (int i = 0; i < kS; ++i) s[i] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const uint32_t koff = (kk & 3) * 32;
      const uint64_t da = smem_desc(s_q + (kk >> 2) * (kBlockM * 128) + wg * (64 * 128) + koff, 16, 1024);
      const uint64_t db = smem_desc(s_k + stage + (kk >> 2) * (kBN * 128) + koff, 16, 1024);
      if constexpr (kBN == 64)
        wgmma_m64n64k16_ss(s, da, db, kk > 0 ? 1 : 0);
      else
        wgmma_m64n128k16_ss(s, da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait_all();

    if (n0 + kBN - 1 > mask_from) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lim = last_key(row0 + 8 * h) - n0;
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (8 * j + 2 * c + e > lim) s[4 * j + 2 * h + e] = kNegInf;
      }
    }

    // Online softmax per row h (r, r + 8), in exp2 with the scale folded in.
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = row_max[h];
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == kNegInf ? 0.f : mx * p.scale_log2;
      alpha[h] = mx != row_max[h] ? fast_exp2(row_max[h] * p.scale_log2 - m_scaled) : 1.f;
      row_max[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = fast_exp2(fmaf(s[4 * j + 2 * h + e], p.scale_log2, -m_scaled));
          s[4 * j + 2 * h + e] = pe;
          sum += pe;
        }
      row_sum[h] = row_sum[h] * alpha[h] + sum;
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      o[4 * j] *= alpha[0];
      o[4 * j + 1] *= alpha[0];
      o[4 * j + 2] *= alpha[1];
      o[4 * j + 3] *= alpha[1];
    }

    // O += P V over kBN / 16 k-steps of 16 keys: V rows 16 kk.. (2048 bytes a step), the two
    // column blocks kBN * 128 bytes apart (LBO), 8-key groups 1024 bytes apart (SBO).
    constexpr int kKN = kBN / 16;
    uint32_t pa[kKN][4];  // the A fragments of every k-step, all written before the fence
#pragma unroll
    for (int kk = 0; kk < kKN; ++kk)
#pragma unroll
      for (int q = 0; q < 4; ++q) pa[kk][q] = pack_bf16(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKN; ++kk)
      wgmma_m64n128k16_rs(o, pa[kk], smem_desc(s_v + stage + kk * 2048, kBN * 128, 1024));
    wgmma_commit();
    wgmma_wait_all();
  }

  // Epilogue: o / l as bf16 pairs straight to global memory; lse per row.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int gq = row0 + 8 * h;
    if (gq >= p.num_q) continue;
    const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    __nv_bfloat16* dst = p.out + int64_t{gq} * p.out_row_stride + int64_t{head} * kD + 2 * c;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack_bf16(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    if (p.lse != nullptr && c == 0) {
      const float l = row_sum[h];
      p.lse[int64_t{head} * p.num_q + gq] = l > 0.f ? (row_max[h] * p.scale_log2 + __log2f(l)) * kLn2 : kNegInf;
    }
  }
#else
  __trap();  // built for an architecture without wgmma; the host never launches it there
#endif
}


template <int kBN>
cudaError_t launch_wgmma(const PrefillParams& p, cudaStream_t stream) {
  const auto kernel = prefill_attention_wgmma_kernel<kBN>;
  constexpr size_t kWgSmem = wgmma_smem(kBN);
  static std::atomic<uint64_t> configured{0};  // devices whose shared-memory limit was raised
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit == 0 || (configured.load(std::memory_order_relaxed) & bit) == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kWgSmem));
    if (err != cudaSuccess) return err;
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  const unsigned grid = unsigned(p.num_q_tiles) * unsigned(p.num_qo_heads);
  kernel<<<grid, kWgThreads, kWgSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool prefill_attention_wgmma_built() {
  static const bool built = [] {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, prefill_attention_wgmma_kernel<128>) == cudaSuccess && attr.binaryVersion == 90;
  }();
  return built;
}

cudaError_t prefill_attention_wgmma_launch(const PrefillParams& p, int block_n, cudaStream_t stream) {
  if (block_n == 64) return launch_wgmma<64>(p, stream);
  if (block_n == 128) return launch_wgmma<128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace adakv::cuda::prefill_detail
