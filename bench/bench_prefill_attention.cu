// Prefill attention (src/backends/cuda/prefill_attention.h): TFLOP/s of the causal kernel on
// prompts of 4K..64K tokens, batch 1, Llama-3.1-8B-like heads (32 query heads over 8 kv heads,
// head dim 128; also head dim 64 at 8K), every key-tile variant of each head dim.
//
// FLOP model (the same in tools/bench/sdpa_prefill.py): 4 * d * H * pairs, pairs = the (query,
// key) pairs the causal mask lets through = L * (L + 1) / 2 for a prompt of L tokens; two
// products (QK^T, PV) of 2 FLOPs per multiply-add; softmax not counted.
// Ceiling: the measured rate of the instruction the kernel runs on, mma.sync m16n8k16 bf16 with
// fp32 accumulation, in a register-only loop over the whole device (printed first); the SDPA
// script measures cuBLAS's bf16 GEMM (wgmma on Hopper) alongside.
//
// Inputs: normal(0, 1) bf16 q, k, v generated on the device (fresh per run: the seed is the clock)
// in the kernel's layout q/out [L][32][d], k/v [L][8][d]. Each timing: CUDA events around one
// launch, median of --reps (default: as many as fit about 1.5 s per variant, 5..30) after 2
// warm-ups. All variants of a shape are compared with the first (max abs difference of the bf16
// outputs; MISMATCH above 0.02), so a broken variant cannot post a fast time unnoticed.
//
// --layouts: also the default key tile at d 128 with q/k/v as the model lays them out (one fused
// QKV buffer; head-major K/V, one launch per kv head), against the dense layout, in a table
// before the main one.
//
// A negative bn in the tables: the wgmma kernel with -bn keys per tile (d 128, compute
// capability 9.0 devices only).
//
// Usage: bench_prefill_attention [--quick] [--reps N] [--layouts]; writes $OUT/bench_prefill_attention.csv
// when OUT is set. Prints one table last, then one "BEST ..." line per shape (for
// scripts/gpu_prefill_check.sh).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/prefill_attention.h"
#include "core/dtype.h"
#include "median.h"

namespace {

using adakv::cuda::PrefillAttentionArgs;
using adakv::cuda::PrefillAttentionOptions;

constexpr int kQoHeads = 32;
constexpr int kKvHeads = 8;

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  x *= 0x94D049BB133111EBull;
  return x ^ (x >> 32);
}

// Normal(0, 1) bf16 by Box-Muller on a counter hash.
__global__ void fill_normal_bf16(__nv_bfloat16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64((i + 1) * 0x9E3779B97F4A7C15ull ^ seed);
    const float u1 = (float(uint32_t(h >> 40)) + 0.5f) * (1.f / 16777216.f);
    const float u2 = float(uint32_t(h) & 0xffffffu) * (1.f / 16777216.f);
    p[i] = __float2bfloat16(sqrtf(-2.f * __logf(u1)) * __cosf(6.2831853f * u2));
  }
}

// The instruction ceiling: independent mma.sync chains from registers, no memory traffic.
constexpr int kMmaChains = 8;
constexpr int kMmaIters = 256;  // about 0.1 s per launch on an H100
__global__ void __launch_bounds__(256) mma_peak(float* sink, uint32_t seed) {
  // Ordinary finite operands (the tensor cores may run faster on zeros).
  uint32_t a[4], b[2];
  const float x = float((seed + threadIdx.x) % 97) * 0.01f - 0.5f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x + 0.1f * i, x - 0.07f * i);
    a[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  b[0] = a[1] ^ 0x00010001u;
  b[1] = a[2] ^ 0x00020002u;
  float d[kMmaChains][4] = {};
  for (int it = 0; it < kMmaIters; ++it) {
#pragma unroll
    for (int c = 0; c < kMmaChains; ++c) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
          "{%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
  }
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < kMmaChains; ++c) acc += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  if (acc == 1.2345f) *sink = acc;
}

using bench::median;

struct Shape {
  int d;
  int len;
};

struct Row {
  Shape s;
  int block_n;
  double ms, tflops, max_diff;
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int fixed_reps = 0;
  bool layouts = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
    } else if (!std::strcmp(argv[i], "--layouts")) {
      layouts = true;
    } else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      fixed_reps = std::max(3, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--reps N] [--layouts]\n", argv[0]);
      return 2;
    }
  }
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("skip: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop{};
  ADAKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  int sm_clock_khz = 0;
  cudaDeviceGetAttribute(&sm_clock_khz, cudaDevAttrClockRate, 0);
  std::printf("device: %s, %d SMs, cc %d.%d, max SM clock %.0f MHz\n", prop.name, prop.multiProcessorCount, prop.major,
              prop.minor, sm_clock_khz / 1e3);
  cudaStream_t stream;
  ADAKV_CUDA_CHECK(cudaStreamCreate(&stream));
  cudaEvent_t ev0, ev1;
  ADAKV_CUDA_CHECK(cudaEventCreate(&ev0));
  ADAKV_CUDA_CHECK(cudaEventCreate(&ev1));
  auto elapsed_ms = [&]() {
    ADAKV_CUDA_CHECK(cudaEventSynchronize(ev1));
    float ms = 0;
    ADAKV_CUDA_CHECK(cudaEventElapsedTime(&ms, ev0, ev1));
    return double(ms);
  };

  // Instruction ceiling.
  {
    float* sink = nullptr;
    ADAKV_CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
    const int blocks = prop.multiProcessorCount * 8;
    std::vector<double> t;
    for (int rep = 0; rep < 7; ++rep) {
      ADAKV_CUDA_CHECK(cudaEventRecord(ev0, stream));
      mma_peak<<<blocks, 256, 0, stream>>>(sink, 12345u + rep);
      ADAKV_CUDA_CHECK(cudaGetLastError());
      ADAKV_CUDA_CHECK(cudaEventRecord(ev1, stream));
      if (rep >= 2) t.push_back(elapsed_ms());
      else elapsed_ms();
    }
    const double flops = double(blocks) * 8 * kMmaIters * kMmaChains * 4096.0;
    std::printf("mma.sync m16n8k16 bf16/f32 ceiling: %.1f TFLOP/s (register-only loop, median of 5)\n",
                flops / (median(t) * 1e-3) / 1e12);
    ADAKV_CUDA_CHECK(cudaFree(sink));
  }

  std::vector<Shape> shapes = {{128, 4096}, {128, 8192}, {128, 16384}, {128, 32768}, {128, 65536}, {64, 8192}};
  if (quick) shapes = {{128, 4096}, {64, 4096}};
  int64_t max_q = 0, max_kv = 0;
  for (const Shape& s : shapes) {
    max_q = std::max<int64_t>(max_q, int64_t{s.len} * kQoHeads * s.d);
    max_kv = std::max<int64_t>(max_kv, int64_t{s.len} * kKvHeads * s.d);
  }
  __nv_bfloat16 *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
  float* lse = nullptr;
  ADAKV_CUDA_CHECK(cudaMalloc(&q, max_q * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&out, max_q * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&k, max_kv * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&v, max_kv * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&lse, max_q / 64 * sizeof(float)));
  const uint64_t seed = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));

  std::vector<Row> rows;
  std::vector<uint16_t> first_out, this_out;
  for (const Shape& s : shapes) {
    const int64_t nq = int64_t{s.len} * kQoHeads * s.d, nkv = int64_t{s.len} * kKvHeads * s.d;
    fill_normal_bf16<<<prop.multiProcessorCount * 8, 256, 0, stream>>>(q, nq, seed ^ 1);
    fill_normal_bf16<<<prop.multiProcessorCount * 8, 256, 0, stream>>>(k, nkv, seed ^ 2);
    fill_normal_bf16<<<prop.multiProcessorCount * 8, 256, 0, stream>>>(v, nkv, seed ^ 3);
    ADAKV_CUDA_CHECK(cudaGetLastError());
    PrefillAttentionArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.out = out;
    a.lse = lse;
    a.num_q = s.len;
    a.num_k = s.len;
    a.num_qo_heads = kQoHeads;
    a.num_kv_heads = kKvHeads;
    a.head_dim = s.d;
    a.softmax_scale = 1.f / std::sqrt(float(s.d));
    a.causal = true;
    const double flops = adakv::cuda::prefill_attention_flops(s.len, s.len, kQoHeads, s.d, true);
    // Key-tile sizes of the mma.sync kernel; negative: the wgmma kernel with that many keys per
    // tile (d 128 on a compute capability 9.0 device).
    std::vector<int> variants = s.d == 128 ? std::vector<int>{64, 32} : std::vector<int>{64, 128};
    if (s.d == 128 && prop.major == 9 && prop.minor == 0) variants.insert(variants.end(), {-64, -128});
    for (size_t vi = 0; vi < variants.size(); ++vi) {
      PrefillAttentionOptions opt;
      opt.block_n = std::abs(variants[vi]);
      if (variants[vi] < 0) opt.kernel = adakv::cuda::PrefillKernel::kWgmma;
      ADAKV_CUDA_CHECK(cudaMemsetAsync(out, 0xff, nq * 2, stream));  // poison: NaN
      auto run = [&]() {
        const adakv::Status st = adakv::cuda::prefill_attention(a, stream, opt);
        if (!st.is_ok()) {
          std::fprintf(stderr, "run: %s\n", st.message().c_str());
          std::exit(1);
        }
      };
      std::vector<double> t;
      for (int w = 0; w < 2; ++w) {
        ADAKV_CUDA_CHECK(cudaEventRecord(ev0, stream));
        run();
        ADAKV_CUDA_CHECK(cudaEventRecord(ev1, stream));
        t.push_back(elapsed_ms());
      }
      const int reps = fixed_reps ? fixed_reps : std::clamp(int(1500.0 / std::max(t.back(), 1e-3)), 5, 30);
      t.clear();
      for (int rep = 0; rep < reps; ++rep) {
        ADAKV_CUDA_CHECK(cudaEventRecord(ev0, stream));
        run();
        ADAKV_CUDA_CHECK(cudaEventRecord(ev1, stream));
        t.push_back(elapsed_ms());
      }
      ADAKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      ADAKV_CUDA_CHECK(cudaGetLastError());
      // Compare with the first variant; every element must be finite (written).
      this_out.resize(nq);
      ADAKV_CUDA_CHECK(cudaMemcpy(this_out.data(), out, nq * 2, cudaMemcpyDeviceToHost));
      double max_diff = 0;
      bool finite = true;
      for (int64_t i = 0; i < nq; ++i) {
        const float x = adakv::bf16_to_f32(this_out[i]);
        if (!std::isfinite(x)) {
          finite = false;
          break;
        }
        if (vi > 0) max_diff = std::max(max_diff, double(std::fabs(x - adakv::bf16_to_f32(first_out[i]))));
      }
      if (!finite) max_diff = INFINITY;
      if (vi == 0) first_out.swap(this_out);
      const double ms = median(t);
      rows.push_back({s, variants[vi], ms, flops / (ms * 1e-3) / 1e12, max_diff});
      std::printf("d %d L %d bn %d: %.3f ms (%d reps), %.1f TFLOP/s, max diff vs bn %d: %.4f%s\n", s.d, s.len,
                  variants[vi], ms, reps, rows.back().tflops, variants[0], max_diff,
                  max_diff > 0.02 ? "  MISMATCH" : "");
      std::fflush(stdout);
    }
  }

  // --layouts: the default key tile at head dim 128 with q/k/v laid out as the model has them.
  // fused: one [L][(H + 2 Hkv) d] buffer (the QKV projection's output, a fresh prompt's path);
  // heads: k and v head-major [Hkv][L][d], one launch per kv head over its g query heads (the
  // path of a prompt appended to a cache, after kv_gather_rows); dense: the table above's layout.
  struct LayoutRow {
    int len;
    const char* layout;
    double ms, tflops;
  };
  std::vector<LayoutRow> layout_rows;
  if (layouts) {
    constexpr int d = 128, H = kQoHeads, Hkv = kKvHeads, g = H / Hkv;
    for (const Shape& s : shapes) {
      if (s.d != d) continue;
      const int64_t L = s.len, row = int64_t{H + 2 * Hkv} * d;
      __nv_bfloat16* fused = nullptr;
      ADAKV_CUDA_CHECK(cudaMalloc(&fused, L * row * 2));
      fill_normal_bf16<<<prop.multiProcessorCount * 8, 256, 0, stream>>>(fused, L * row, seed ^ 4);
      fill_normal_bf16<<<prop.multiProcessorCount * 8, 256, 0, stream>>>(q, L * H * d, seed ^ 1);
      fill_normal_bf16<<<prop.multiProcessorCount * 8, 256, 0, stream>>>(k, L * Hkv * d, seed ^ 2);
      fill_normal_bf16<<<prop.multiProcessorCount * 8, 256, 0, stream>>>(v, L * Hkv * d, seed ^ 3);
      ADAKV_CUDA_CHECK(cudaGetLastError());
      const double flops = adakv::cuda::prefill_attention_flops(s.len, s.len, H, d, true);
      for (const char* layout : {"dense", "fused", "heads"}) {
        std::vector<PrefillAttentionArgs> calls;
        PrefillAttentionArgs a;
        a.num_q = a.num_k = s.len;
        a.head_dim = d;
        a.softmax_scale = 1.f / std::sqrt(float(d));
        a.causal = true;
        a.out = out;
        a.out_row_stride = int64_t{H} * d;
        if (!std::strcmp(layout, "dense")) {
          a.q = q, a.k = k, a.v = v;
          a.num_qo_heads = H, a.num_kv_heads = Hkv;
          calls.push_back(a);
        } else if (!std::strcmp(layout, "fused")) {
          a.q = fused, a.k = fused + int64_t{H} * d, a.v = fused + int64_t{H + Hkv} * d;
          a.q_row_stride = a.k_row_stride = a.v_row_stride = row;
          a.num_qo_heads = H, a.num_kv_heads = Hkv;
          calls.push_back(a);
        } else {
          for (int kh = 0; kh < Hkv; ++kh) {
            a.q = q + int64_t{kh} * g * d, a.q_row_stride = int64_t{H} * d;
            a.k = k + int64_t{kh} * L * d, a.v = v + int64_t{kh} * L * d;
            a.k_row_stride = a.v_row_stride = d;
            a.out = out + int64_t{kh} * g * d;
            a.num_qo_heads = g, a.num_kv_heads = 1;
            calls.push_back(a);
          }
        }
        auto run = [&]() {
          for (const PrefillAttentionArgs& c : calls) {
            const adakv::Status st = adakv::cuda::prefill_attention(c, stream);
            if (!st.is_ok()) {
              std::fprintf(stderr, "run (%s): %s\n", layout, st.message().c_str());
              std::exit(1);
            }
          }
        };
        std::vector<double> t;
        for (int rep = 0; rep < 2 + (fixed_reps ? fixed_reps : 7); ++rep) {
          ADAKV_CUDA_CHECK(cudaEventRecord(ev0, stream));
          run();
          ADAKV_CUDA_CHECK(cudaEventRecord(ev1, stream));
          const double ms = elapsed_ms();
          if (rep >= 2) t.push_back(ms);
        }
        const double ms = median(t);
        layout_rows.push_back({s.len, layout, ms, flops / (ms * 1e-3) / 1e12});
        std::printf("layout %s L %d: %.3f ms, %.1f TFLOP/s\n", layout, s.len, ms, layout_rows.back().tflops);
        std::fflush(stdout);
      }
      ADAKV_CUDA_CHECK(cudaFree(fused));
    }
  }

  bool mismatch = false;
  if (!layout_rows.empty()) {
    std::printf("\n== prefill attention by layout (d 128, default key tile; TFLOP/s)\n| L | layout | ms | TFLOP/s |\n|---|---|---|---|\n");
    for (const LayoutRow& r : layout_rows) std::printf("| %d | %s | %.3f | %.1f |\n", r.len, r.layout, r.ms, r.tflops);
  }
  std::printf("\n== prefill attention (causal, bf16, batch 1, %d/%d heads; FLOPs = 4 d H L(L+1)/2)\n", kQoHeads,
              kKvHeads);
  std::printf("| d | L | bn | ms | TFLOP/s | max diff |\n|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    mismatch |= !(r.max_diff <= 0.02);
    std::printf("| %d | %d | %d | %.3f | %.1f | %.4f%s |\n", r.s.d, r.s.len, r.block_n, r.ms, r.tflops, r.max_diff,
                r.max_diff > 0.02 ? " MISMATCH" : "");
  }
  for (const Shape& s : shapes) {
    const Row* best = nullptr;
    for (const Row& r : rows)
      if (r.s.d == s.d && r.s.len == s.len && (!best || r.ms < best->ms)) best = &r;
    std::printf("BEST d=%d hq=%d hkv=%d L=%d bn=%d ms=%.4f tflops=%.2f\n", s.d, kQoHeads, kKvHeads, s.len,
                best->block_n, best->ms, best->tflops);
  }
  if (const char* out_dir = std::getenv("OUT")) {
    const std::string path = std::string(out_dir) + "/bench_prefill_attention.csv";
    if (FILE* f = std::fopen(path.c_str(), "w")) {
      std::fprintf(f, "d,hq,hkv,L,block_n,ms,tflops,max_diff\n");
      for (const Row& r : rows)
        std::fprintf(f, "%d,%d,%d,%d,%d,%.5f,%.3f,%.5f\n", r.s.d, kQoHeads, kKvHeads, r.s.len, r.block_n, r.ms,
                     r.tflops, r.max_diff);
      std::fclose(f);
    }
  }
  std::printf("done\n");
  return mismatch ? 1 : 0;
}
