// Scoring + selection + compaction after prefill, on a Llama-3.1-8B-shaped model (32 layers,
// 32 query / 8 kv heads, head dim 128), window w = 32, budget B = 1024 (Bs = 992), at L = 8K
// and 32K: time per layer of each phase and of the whole model, and the share of a prefill-time
// estimate.
//
// Phases (one layer of one sequence, CUDA events, median of --reps after warm-ups, each rep on
// another of the 32 layers' buffers so that L2 holds nothing useful):
//   score       WindowScorer::snapkv: mean over the group, max-pool 7 (4 kernels)
//   kvc-metric  WindowScorer::kvcompress_metric (for reference; not part of the Ada pipeline)
//   select-ada  KeepSelector::select, Ada-KV alpha 0.2 (2 CUB sorts, scan, 6 small kernels)
//   select-uni  the same, uniform (SnapKV)
//   compact     compact_kv_rows over the layer's 8 rows, pages scattered over the pool
//   model       the 32 layers back to back (score, select-ada, compact per layer), one timing
// Floors: scoring does 2 passes x 2 * (g*w) * L * d * Hkv flops on tensor cores (score_mma.cuh); the
// table prints its TFLOP/s. Compaction moves B entries x 512 bytes per row, read and written.
// Prefill estimate (issue 4): flops = 2 * 8e9 * L + 4 * L^2 / 2 * d * H * layers at the bf16 GEMM
// rate measured here with cuBLAS (cublasGemmEx 8192^3, loaded with dlopen so that this program
// needs only the CUDA runtime); without cuBLAS the share column reads n/a and the lead divides
// the model time by a measured prefill time instead.
//
// Usage: bench_compress_gpu [--reps N] [--quick] ; prints one table last.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/compact_kv.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/paged_kv_view.h"
#include "backends/cuda/prefill_attention.h"
#include "backends/cuda/score_critical.h"
#include "backends/cuda/score_window.h"
#include "backends/cuda/select_keep.h"
#include "median.h"

namespace {

using namespace adakv;
using adakv::cuda::kPageSize;

constexpr int kLayers = 32, kHeads = 32, kKvHeads = 8, kDim = 128, kWindow = 32, kBudget = 1024;
constexpr int kHidden = 4096;

#define BENCH_CHECK_STATUS(expr)                                                              \
  do {                                                                                        \
    const ::adakv::Status s_ = (expr);                                                        \
    if (!s_.is_ok()) {                                                                        \
      std::fprintf(stderr, "bench_compress_gpu: %s failed: %s\n", #expr, s_.message().c_str()); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

__global__ void fill_random_bf16(__nv_bfloat16* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    const float u = float(x >> 40) * (1.f / 16777216.f);  // [0, 1)
    p[i] = __float2bfloat16(scale * (2.f * u - 1.f));
  }
}

using bench::median;

// --- cuBLAS through dlopen ----------------------------------------------------------------------
struct Cublas {
  void* lib = nullptr;
  cublasStatus_t (*create)(cublasHandle_t*) = nullptr;
  cublasStatus_t (*destroy)(cublasHandle_t) = nullptr;
  cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t) = nullptr;
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                            const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                            cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  bool load() {
    for (const char* name : {"libcublas.so.13", "libcublas.so", "/usr/local/cuda/lib64/libcublas.so.13",
                             "/usr/local/cuda/lib64/libcublas.so", "libcublas.so.12"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib != nullptr) break;
    }
    if (lib == nullptr) return false;
    create = reinterpret_cast<decltype(create)>(dlsym(lib, "cublasCreate_v2"));
    destroy = reinterpret_cast<decltype(destroy)>(dlsym(lib, "cublasDestroy_v2"));
    set_stream = reinterpret_cast<decltype(set_stream)>(dlsym(lib, "cublasSetStream_v2"));
    gemm_ex = reinterpret_cast<decltype(gemm_ex)>(dlsym(lib, "cublasGemmEx"));
    return create && destroy && set_stream && gemm_ex;
  }
};

// bf16 GEMM rate (TFLOP/s) of cuBLAS on 8192^3, median of 20; 0 when cuBLAS is unavailable.
double measure_gemm_tflops(cudaStream_t stream, cudaEvent_t e0, cudaEvent_t e1) {
  Cublas cb;
  if (!cb.load()) {
    std::printf("gemm: cuBLAS not found (dlopen): %s\n", dlerror());
    return 0;
  }
  cublasHandle_t h = nullptr;
  if (cb.create(&h) != CUBLAS_STATUS_SUCCESS) return 0;
  cb.set_stream(h, stream);
  const int n = 8192;
  __nv_bfloat16 *a, *b, *c;
  ADAKV_CUDA_CHECK(cudaMalloc(&a, size_t(n) * n * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&b, size_t(n) * n * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&c, size_t(n) * n * 2));
  fill_random_bf16<<<1024, 256, 0, stream>>>(a, size_t(n) * n, 1, 1.0f);
  fill_random_bf16<<<1024, 256, 0, stream>>>(b, size_t(n) * n, 2, 1.0f);
  ADAKV_CUDA_CHECK(cudaGetLastError());
  const float alpha = 1.0f, beta = 0.0f;
  std::vector<double> ms;
  bool ok = true;
  for (int i = 0; i < 25 && ok; ++i) {
    ADAKV_CUDA_CHECK(cudaEventRecord(e0, stream));
    ok = cb.gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &beta, c,
                    CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
    ADAKV_CUDA_CHECK(cudaEventRecord(e1, stream));
    ADAKV_CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0;
    ADAKV_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (i >= 5) ms.push_back(t);
  }
  cb.destroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  if (!ok) {
    std::printf("gemm: cublasGemmEx failed\n");
    return 0;
  }
  const double t = median(ms);
  const double tflops = 2.0 * n * double(n) * n / (t * 1e-3) / 1e12;
  std::printf("gemm: cuBLAS bf16 %d^3 median %.3f ms = %.0f TFLOP/s\n", n, t, tflops);
  return tflops;
}

// One layer's prefill, measured: causal flash attention (prefill_attention, the kernel the CUDA
// forward runs) plus the four projection GEMMs through cuBLAS on L tokens (qkv 6144, o 4096,
// gate/up 28672, down 4096 x 14336). Norms, RoPE and SwiGLU are left out (a few % of a layer), so
// the prefill is slightly underestimated and the share slightly overstated. Returns ms per layer
// (median of 10) and the attention part in *attn_ms; 0 when cuBLAS is unavailable.
// Causal prefill attention of L queries over L keys with the model's heads (rows q_stride /
// kv_stride elements apart; lse optional).
cuda::PrefillAttentionArgs causal_prefill(const __nv_bfloat16* q, int64_t q_stride, const __nv_bfloat16* k,
                                          const __nv_bfloat16* v, int64_t kv_stride, __nv_bfloat16* out, float* lse,
                                          int L) {
  cuda::PrefillAttentionArgs pa;
  pa.q = q;
  pa.k = k;
  pa.v = v;
  pa.out = out;
  pa.lse = lse;
  pa.num_q = L;
  pa.num_k = L;
  pa.num_qo_heads = kHeads;
  pa.num_kv_heads = kKvHeads;
  pa.head_dim = kDim;
  pa.q_row_stride = q_stride;
  pa.k_row_stride = kv_stride;
  pa.v_row_stride = kv_stride;
  pa.out_row_stride = kHeads * kDim;
  pa.softmax_scale = 1.0f / std::sqrt(float(kDim));
  pa.causal = true;
  return pa;
}

double measure_prefill_layer_ms(int L, cudaStream_t stream, cudaEvent_t e0, cudaEvent_t e1, double* attn_ms) {
  Cublas cb;
  *attn_ms = 0;
  if (!cb.load()) return 0;
  cublasHandle_t h = nullptr;
  if (cb.create(&h) != CUBLAS_STATUS_SUCCESS) return 0;
  cb.set_stream(h, stream);
  const int hidden = kHidden, inter = 14336, qkvd = (kHeads + 2 * kKvHeads) * kDim;
  __nv_bfloat16 *x, *w, *y, *qkv, *out;
  const size_t wmax = size_t(2) * inter * hidden;
  ADAKV_CUDA_CHECK(cudaMalloc(&x, size_t(L) * inter * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&w, wmax * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&y, size_t(L) * 2 * inter * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&qkv, size_t(L) * qkvd * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&out, size_t(L) * kHeads * kDim * 2));
  fill_random_bf16<<<2048, 256, 0, stream>>>(x, size_t(L) * inter, 5, 1.0f);
  fill_random_bf16<<<2048, 256, 0, stream>>>(w, wmax, 6, 0.02f);
  fill_random_bf16<<<2048, 256, 0, stream>>>(qkv, size_t(L) * qkvd, 7, 1.0f);
  const float one = 1.0f, zero = 0.0f;
  auto gemm = [&](int n, int k) {  // y[L][n] = x[L][k] w[n][k]^T
    cb.gemm_ex(h, CUBLAS_OP_T, CUBLAS_OP_N, n, L, k, &one, w, CUDA_R_16BF, k, x, CUDA_R_16BF, k, &zero, y, CUDA_R_16BF,
               n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  const cuda::PrefillAttentionArgs pa = causal_prefill(qkv, qkvd, qkv + kHeads * kDim, qkv + (kHeads + kKvHeads) * kDim,
                                                       qkvd, out, nullptr, L);
  std::vector<double> total, attn;
  for (int i = 0; i < 13; ++i) {
    ADAKV_CUDA_CHECK(cudaEventRecord(e0, stream));
    BENCH_CHECK_STATUS(cuda::prefill_attention(pa, stream));
    ADAKV_CUDA_CHECK(cudaEventRecord(e1, stream));
    ADAKV_CUDA_CHECK(cudaEventSynchronize(e1));
    float ta = 0;
    ADAKV_CUDA_CHECK(cudaEventElapsedTime(&ta, e0, e1));
    ADAKV_CUDA_CHECK(cudaEventRecord(e0, stream));
    gemm(qkvd, hidden);
    gemm(hidden, kHeads * kDim);
    gemm(2 * inter, hidden);
    gemm(hidden, inter);
    ADAKV_CUDA_CHECK(cudaEventRecord(e1, stream));
    ADAKV_CUDA_CHECK(cudaEventSynchronize(e1));
    float tg = 0;
    ADAKV_CUDA_CHECK(cudaEventElapsedTime(&tg, e0, e1));
    if (i >= 3) {
      attn.push_back(ta);
      total.push_back(ta + tg);
    }
  }
  cb.destroy(h);
  for (void* p : {(void*)x, (void*)w, (void*)y, (void*)qkv, (void*)out}) cudaFree(p);
  *attn_ms = median(attn);
  return median(total);
}

// --- one context length ---------------------------------------------------------------------------

struct Result {
  int L = 0;
  double score_us = 0, kvc_us = 0, select_ada_us = 0, select_uni_us = 0, compact_us = 0, model_ms = 0;
  double crit_ms = -1, h2o_ms = -1, h2o_lse_ms = -1;
  double prefill_meas_ms = 0, attn_layer_ms = 0;
  double score_tflops = 0, prefill_ms = 0;
  long long kept_per_layer = 0;
};

Result run_length(int L, int reps, double gemm_tflops, bool with_critical, cudaStream_t stream, cudaEvent_t e0,
                  cudaEvent_t e1) {
  Result res;
  res.L = L;
  const int n = L - kWindow;
  const int64_t rows = kKvHeads;
  const int64_t pages_per_row = (L + kPageSize - 1) / kPageSize;
  const int64_t pages_per_layer = rows * pages_per_row;
  const int64_t num_pages = pages_per_layer * kLayers;
  const size_t k_elems = size_t(L) * kKvHeads * kDim;  // per layer, contiguous [L][Hkv][d]
  const size_t q_elems = size_t(kWindow) * kHeads * kDim;
  const size_t page_elems = size_t(kPageSize) * kDim;

  __nv_bfloat16 *keys, *values, *queries, *k_pool, *v_pool, *o_proj = nullptr;
  int32_t *positions, *offsets, *page_ids, *keep, *keep_counts;
  float* scores;
  ADAKV_CUDA_CHECK(cudaMalloc(&keys, k_elems * kLayers * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&values, k_elems * 2));  // one layer's values (CriticalKV only)
  ADAKV_CUDA_CHECK(cudaMalloc(&queries, q_elems * kLayers * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&k_pool, size_t(num_pages) * page_elems * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&v_pool, size_t(num_pages) * page_elems * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&positions, size_t(num_pages) * kPageSize * 4));
  ADAKV_CUDA_CHECK(cudaMalloc(&offsets, size_t(kLayers) * (rows + 1) * 4));
  ADAKV_CUDA_CHECK(cudaMalloc(&page_ids, size_t(num_pages) * 4));
  ADAKV_CUDA_CHECK(cudaMalloc(&keep, size_t(rows) * L * 4));
  ADAKV_CUDA_CHECK(cudaMalloc(&keep_counts, size_t(rows) * 4));
  ADAKV_CUDA_CHECK(cudaMalloc(&scores, size_t(rows) * L * 4));
  // Queries scaled so that logits have a spread like a trained model's (std about 2-3).
  fill_random_bf16<<<2048, 256, 0, stream>>>(keys, k_elems * kLayers, 11 + L, 1.7f);
  fill_random_bf16<<<2048, 256, 0, stream>>>(values, k_elems, 12 + L, 1.7f);
  fill_random_bf16<<<256, 256, 0, stream>>>(queries, q_elems * kLayers, 13 + L, 3.4f);
  fill_random_bf16<<<2048, 256, 0, stream>>>(k_pool, size_t(num_pages) * page_elems, 14 + L, 1.0f);
  fill_random_bf16<<<2048, 256, 0, stream>>>(v_pool, size_t(num_pages) * page_elems, 15 + L, 1.0f);
  ADAKV_CUDA_CHECK(cudaGetLastError());
  {  // Page tables: every layer's rows own a random permutation of the layer's pages.
    std::mt19937_64 rng(L);
    std::vector<int32_t> ids(static_cast<size_t>(num_pages)), offs;
    for (int l = 0; l < kLayers; ++l) {
      std::vector<int32_t> perm(static_cast<size_t>(pages_per_layer));
      std::iota(perm.begin(), perm.end(), int32_t(l * pages_per_layer));
      std::shuffle(perm.begin(), perm.end(), rng);
      std::copy(perm.begin(), perm.end(), ids.begin() + l * pages_per_layer);
      for (int64_t r = 0; r <= rows; ++r) offs.push_back(int32_t(r * pages_per_row));
    }
    std::vector<int32_t> pos(static_cast<size_t>(num_pages) * kPageSize);
    std::iota(pos.begin(), pos.end(), 0);
    ADAKV_CUDA_CHECK(cudaMemcpy(page_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
    ADAKV_CUDA_CHECK(cudaMemcpy(offsets, offs.data(), offs.size() * 4, cudaMemcpyHostToDevice));
    ADAKV_CUDA_CHECK(cudaMemcpy(positions, pos.data(), pos.size() * 4, cudaMemcpyHostToDevice));
  }
  auto scorer = cuda::WindowScorer::create({kHeads, kKvHeads, kDim, L, kWindow});
  auto selector = cuda::KeepSelector::create({kKvHeads, L});
  BENCH_CHECK_STATUS(scorer.status());
  BENCH_CHECK_STATUS(selector.status());

  auto score = [&](int l) {
    const cuda::WindowScoreInputs in{queries + q_elems * l, 0, keys + k_elems * l, 0, L, kWindow};
    BENCH_CHECK_STATUS((*scorer)->snapkv(in, GqaReduce::kMean, PoolKind::kMax, 7, scores, L, stream));
  };
  auto kvc = [&](int l) {
    const cuda::WindowScoreInputs in{queries + q_elems * l, 0, keys + k_elems * l, 0, L, kWindow};
    BENCH_CHECK_STATUS((*scorer)->kvcompress_metric(in, PoolKind::kMax, 7, scores, L, stream));
  };
  auto select = [&](bool adaptive) {
    cuda::SelectInputs in;
    in.scores = scores;
    in.scores_stride = L;
    in.length = L;
    in.window = kWindow;
    in.selection_budget = kBudget - kWindow;
    in.adaptive = adaptive;
    in.alpha = 0.2;
    const cuda::SelectOutputs out{keep, L, keep_counts, nullptr, nullptr};
    BENCH_CHECK_STATUS((*selector)->select(in, out, stream));
  };
  auto compact = [&](int l) {
    cuda::KvCompactParams p;
    p.k_pool = k_pool;
    p.v_pool = v_pool;
    p.page_stride = int64_t(page_elems);
    p.head_dim = kDim;
    p.positions = positions;
    p.row_page_offsets = offsets + l * (rows + 1);
    p.page_ids = page_ids;
    p.num_rows = int32_t(rows);
    p.keep = keep;
    p.keep_stride = L;
    p.keep_counts = keep_counts;
    BENCH_CHECK_STATUS(cuda::compact_kv_rows(p, stream));
  };
  auto time_us = [&](const std::function<void(int)>& fn) {
    std::vector<double> t;
    for (int i = 0; i < reps + 3; ++i) {
      const int l = (i * 7) % kLayers;
      ADAKV_CUDA_CHECK(cudaEventRecord(e0, stream));
      fn(l);
      ADAKV_CUDA_CHECK(cudaEventRecord(e1, stream));
      ADAKV_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      ADAKV_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 3) t.push_back(ms * 1e3);
    }
    return median(t);
  };

  res.score_us = time_us(score);
  res.kvc_us = time_us(kvc);
  score(0);
  res.select_ada_us = time_us([&](int) { select(true); });
  res.select_uni_us = time_us([&](int) { select(false); });
  select(true);
  res.compact_us = time_us(compact);
  {
    std::vector<int32_t> kc(rows);
    ADAKV_CUDA_CHECK(cudaMemcpy(kc.data(), keep_counts, rows * 4, cudaMemcpyDeviceToHost));
    res.kept_per_layer = std::accumulate(kc.begin(), kc.end(), 0LL);
  }
  std::vector<double> model;
  for (int rep = 0; rep < std::max(3, reps / 4) + 1; ++rep) {
    ADAKV_CUDA_CHECK(cudaEventRecord(e0, stream));
    for (int l = 0; l < kLayers; ++l) {
      score(l);
      select(true);
      compact(l);
    }
    ADAKV_CUDA_CHECK(cudaEventRecord(e1, stream));
    ADAKV_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    ADAKV_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (rep > 0) model.push_back(ms);
  }
  res.model_ms = median(model);
  if (with_critical) {  // CriticalKV value norms and H2O's prompt accumulation, one layer
    ADAKV_CUDA_CHECK(cudaMalloc(&o_proj, size_t(kHidden) * kHeads * kDim * 2));
    fill_random_bf16<<<2048, 256, 0, stream>>>(o_proj, size_t(kHidden) * kHeads * kDim, 16, 0.02f);
    float* crit;
    ADAKV_CUDA_CHECK(cudaMalloc(&crit, size_t(rows) * L * 4));
    score(0);
    const cuda::CriticalInputs ci{values, 0, o_proj, kHidden, kHeads, kKvHeads, kDim, n, scores, L};
    res.crit_ms = time_us([&](int) { BENCH_CHECK_STATUS(cuda::critical_scores(ci, crit, L, nullptr, 0, stream)); }) / 1e3;
    cudaFree(crit);
    cudaFree(o_proj);
    // H2O prompt accumulation, one layer: every prompt query (queries = the layer's keys' buffer
    // reinterpreted: [L][H][d] needs L * H * d elements; the pool holds enough).
    auto h2o_scorer = cuda::WindowScorer::create({kHeads, kKvHeads, kDim, L, kWindow});
    BENCH_CHECK_STATUS(h2o_scorer.status());
    const cuda::WindowScoreInputs hin{k_pool, 0, keys, 0, L, L};
    res.h2o_ms = time_us([&](int) { BENCH_CHECK_STATUS((*h2o_scorer)->h2o(hin, GqaReduce::kMean, scores, L, stream)); }) / 1e3;
    // As the model runs it: the prefill attention of the same queries and keys writes each
    // query's lse, which replaces the scorer's statistics pass.
    float* lse;
    __nv_bfloat16* attn_out;
    ADAKV_CUDA_CHECK(cudaMalloc(&lse, size_t(kHeads) * L * 4));
    ADAKV_CUDA_CHECK(cudaMalloc(&attn_out, size_t(L) * kHeads * kDim * 2));
    BENCH_CHECK_STATUS(
        cuda::prefill_attention(causal_prefill(k_pool, kHeads * kDim, keys, keys, kKvHeads * kDim, attn_out, lse, L), stream));
    res.h2o_lse_ms =
        time_us([&](int) { BENCH_CHECK_STATUS((*h2o_scorer)->h2o(hin, GqaReduce::kMean, scores, L, stream, lse)); }) / 1e3;
    cudaFree(lse);
    cudaFree(attn_out);
  }
  const double score_flops = 2.0 * 2.0 * (kHeads / kKvHeads * kWindow) * double(L) * kDim * kKvHeads;
  res.score_tflops = score_flops / (res.score_us * 1e-6) / 1e12;
  res.prefill_meas_ms = kLayers * measure_prefill_layer_ms(L, stream, e0, e1, &res.attn_layer_ms);
  if (gemm_tflops > 0) {
    const double flops = 2.0 * 8e9 * L + 4.0 * double(L) * L / 2.0 * kDim * kHeads * kLayers;
    res.prefill_ms = flops / (gemm_tflops * 1e12) * 1e3;
  }
  ADAKV_CUDA_CHECK(cudaDeviceSynchronize());
  for (void* p : {(void*)keys, (void*)values, (void*)queries, (void*)k_pool, (void*)v_pool, (void*)positions,
                  (void*)offsets, (void*)page_ids, (void*)keep, (void*)keep_counts, (void*)scores})
    cudaFree(p);
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 20;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skip: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop{};
  ADAKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaStream_t stream;
  cudaEvent_t e0, e1;
  ADAKV_CUDA_CHECK(cudaStreamCreate(&stream));
  ADAKV_CUDA_CHECK(cudaEventCreate(&e0));
  ADAKV_CUDA_CHECK(cudaEventCreate(&e1));
  const double gemm = measure_gemm_tflops(stream, e0, e1);
  std::vector<Result> results;
  for (int L : {8192, 32768}) {
    if (quick && L > 8192) continue;
    results.push_back(run_length(L, reps, gemm, L == 8192, stream, e0, e1));
    const Result& r = results.back();
    std::printf("L %d: kept %lld entries per layer (expected %d); criticalkv norms %.2f ms per layer; h2o prompt "
                "accumulation %.2f ms per layer (%.2f ms with the attention's lse); prefill attention %.2f ms per "
                "layer\n", r.L, r.kept_per_layer, kKvHeads * kBudget, r.crit_ms, r.h2o_ms, r.h2o_lse_ms,
                r.attn_layer_ms);
  }
  std::printf("\n== scoring + selection + compaction (Llama-3.1-8B shapes: %d layers, %d/%d heads, d %d, w %d, B %d)\n",
              kLayers, kHeads, kKvHeads, kDim, kWindow, kBudget);
  std::printf("device: %s; bf16 GEMM (cuBLAS): %.0f TFLOP/s\n\n", prop.name, gemm);
  std::printf("| L | score µs | score TFLOP/s | kvc-metric µs | select-ada µs | select-uni µs | compact µs | "
              "per layer µs | model ms (32 layers) | prefill est. ms | share %% | prefill meas. ms | share meas. %% |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Result& r : results) {
    const double layer = r.score_us + r.select_ada_us + r.compact_us;
    char share[32] = "n/a", prefill[32] = "n/a";
    if (r.prefill_ms > 0) {
      std::snprintf(share, sizeof share, "%.2f", 100.0 * r.model_ms / r.prefill_ms);
      std::snprintf(prefill, sizeof prefill, "%.1f", r.prefill_ms);
    }
    char share_m[32] = "n/a", prefill_m[32] = "n/a";
    if (r.prefill_meas_ms > 0) {
      std::snprintf(share_m, sizeof share_m, "%.2f", 100.0 * r.model_ms / r.prefill_meas_ms);
      std::snprintf(prefill_m, sizeof prefill_m, "%.1f", r.prefill_meas_ms);
    }
    std::printf("| %dK | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %s | %s | %s | %s |\n", r.L / 1024,
                r.score_us, r.score_tflops, r.kvc_us, r.select_ada_us, r.select_uni_us, r.compact_us, layer, r.model_ms,
                prefill, share, prefill_m, share_m);
  }
  const bool ok = std::all_of(results.begin(), results.end(),
                              [](const Result& r) { return r.kept_per_layer == kKvHeads * kBudget; });
  std::printf("%s\n", ok ? "done" : "MISMATCH: kept entries per layer != Hkv * B");
  return ok ? 0 : 1;
}
