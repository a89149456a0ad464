// Decode attention over per-head pages: achieved bytes/s against the device's measured copy
// bandwidth, for uniform and Ada-skewed head lengths, batch 1..64, contexts 4K..128K, head dims
// 128 and 64 (Llama-3.1-8B-like: 32 query heads over 8 kv heads, one layer).
//
// Bytes model: a decode step must read every valid K and V entry once:
//   bytes = sum over rows of length * head_dim * 2 (bf16) * 2 (K and V)
// Not counted: q and the output (< 0.1 % from 4K entries per row), the unused tail of each
// row's last page, and the partial results (fp32 o per piece of a row: about 12 % of the KV bytes
// at batch 1 and 4K, 1-2 % for large steps; written and read back through L2).
// Ceiling: cudaMemcpy device-to-device of 1 GiB, counting bytes read plus bytes written.
//
// Variants timed in the same run on the same data (balanced split over all resident warps;
// pX = X pages' loads in flight per warp; d 128: p1 p2, d 64: p2 p4):
//   k2-pX     merge kernel as a second (PDL) launch: the default
//   fu-pX     merge fused into the attention kernel (last-arriving warp of a row)
//   auto-pX   DecodeMerge::kAuto (fused while no row has more than 16 partials, 40 where the merge
//             kernel would have more blocks than the device has SMs)
//   attn-pX   attention kernel alone, split rows left unmerged: timing only (a step's lower bound)
//   naive     one 4-warp block per (sequence, kv head): the head-per-chain baseline the issue
//             measured at 11-48 % with skew
//   b2-pX     v3 block items (the default: 4 warps per piece, combined in shared memory; the plan
//             gets the host page-table offsets), merge kernel; bo-pX the same with the attention
//             kernel's prologue overlapped (overlap_prologue); bf-pX fused merge; bw4-pX one
//             block per SM; battn-pX the v3 attention kernel alone; bpN-pX = bo-pX with each
//             warp's first N pages prefetched into L2 before it waits (prefetch_pages); bpNw-pX
//             the same with one block per SM
// --small: steps up to 1.1 GB, no naive and no sweep; prints the v3 table only. --lean: the same
// with only b2, bp8, b2r / bp8r / bp0r / bp2r / bp4r (the row-aligned split; bpNr: N pages per
// warp requested before the wait), bfr / bfp2r (fused merge), bp8w (one block per SM), and bpa8 /
// bpa8r / bpa8w (without the merge: timing only), a2r / ap2r (DecodeMerge::kAuto, the engine's
// merge; ap2r, overlapped, is the engine's configuration since its decode attention launches as a
// dependent of the K/V append, a2r the plain launch it had before) and bpa2r, and at d 128 ap2rn /
// bpa2rn (the same two without the attention arithmetic: DecodeAttentionOptions::
// diagnostic_no_math), ap2rf / ap2rnf (ap2r / ap2rn with the merge kernel cut to one partial per
// group: diagnostic_merge_floor) and afnf (the fused merge, forced, cut the same way, without the
// arithmetic), all timing only, outputs not compared; ap2r and bpa2r
// at the engine's pages/iter (the options' default, 2, at both head dims: d 64's fastest variant,
// 4, is not what the engine runs), the others at the main pages/iter; and one more table last:
// every variant per layer in a graph, % of copy; with --all-sizes every batch and context and the
// naive baseline too (steps over 1.1 GB per call, marked c). --timeline (with
// --lean): per layer in the graph, where the time goes (DecodeAttention::set_trace's
// global-timer stamps) for each variant at d 128 batch 1 4K / 16K and batch 8 4K, and d 64
// batch 1 4K; steps under 40 MB also "hot" (every layer on the first layer's pages, so K/V come
// from L2).
// Also the ceiling at each step's own size (read_roofline.cuh): the best pure read of the step's
// bytes per layer in the same graph setting, and a copy of them; the v3 table's rd_g% / bp/rd, and
// prd_g%: the best pure read of the step's own scattered pages through its page table.
// Also: the launch floor (an empty kernel timed with events; an empty kernel per layer in a graph
// of 32), and per layer in a graph of N = min(32, pool / step) back-to-back layers (time_graph)
// for k2 and auto at the larger pX, on steps up to 1.1 GB.
// Every variant's output but attn's is compared with the first one's (max abs difference, bf16).
// Each timing: L2 flushed (a read of 1 GiB) before, CUDA events around run() (attention and
// merge kernels; the plan upload is outside), median of --reps (default 20) after 3 warm-ups.
// A tuning sweep (warps per SM, pages per iteration, dependent launch) over a few shapes is
// printed first.
//
// Usage: bench_decode_attention [--quick] [--small] [--lean [--timeline] [--all-sizes]] [--only NAME,...] [--reps N] [--plan-costs I,M,P,A] [--prefetch-pages N] [--ppi64 N] [--merge-slices N]
// [--no-sweep] [--no-ceiling] (--only: the variants of these names, without the -pX suffix; the
// first one kept is the reference the others' outputs are compared with; --no-ceiling: the
// ceilings at each step's size are not measured, for quick A/B runs of builds); writes
// $OUT/bench_decode_attention.csv when OUT is set. Prints one table last
// (tools/bench/compare_decode_runs.py lines up that table of several runs, one column per run).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/decode_attention.h"
#include "core/dtype.h"
#include "decode_timeline.h"
#include "median.h"
#include "read_roofline.cuh"

namespace {

using adakv::cuda::DecodeAttention;
using adakv::cuda::DecodeAttentionOptions;
using adakv::cuda::DecodeMerge;
using adakv::cuda::DecodeSplit;
using adakv::cuda::kPageSize;
using adakv::cuda::PagedKvView;

constexpr int kKvHeads = 8;
constexpr int kQoHeads = 32;
constexpr int kMaxBatch = 64;
constexpr double kMaxKvBytes = 40e9;

__global__ void fill_random_bf16(__nv_bfloat16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    const float u = float(x >> 40) * (1.f / 16777216.f);  // [0, 1)
    p[i] = __float2bfloat16(2.f * u - 1.f);
  }
}

// Reads n 16-byte words (plain loads, so that they replace whatever L2 held); the xor goes to
// *sink so the reads stay. Flushes L2 before each timed run, and measures read bandwidth.
__global__ void read_all(const uint4* p, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

using bench::median;

// Lengths with mean `ctx` over `rows` and max/mean about min(8, rows / 2): one heavy row, the
// others lognormal; the total is exactly rows * ctx.
std::vector<int32_t> skewed_lengths(int rows, int ctx, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::lognormal_distribution<double> ln(0.0, 0.6);
  const double ratio = std::min(8.0, rows / 2.0);
  std::vector<double> w(rows);
  double rest = 0;
  for (int i = 1; i < rows; ++i) rest += (w[i] = ln(rng));
  const double heavy = ratio * rest / (rows - ratio);  // heavy / mean(w) == ratio
  w[0] = heavy;
  std::shuffle(w.begin(), w.end(), rng);
  const double sum = rest + heavy;
  std::vector<int32_t> len(rows);
  int64_t total = 0;
  for (int i = 0; i < rows; ++i) total += len[i] = std::max<int32_t>(1, int32_t(std::llround(w[i] / sum * rows * ctx)));
  len[std::max_element(len.begin(), len.end()) - len.begin()] += int32_t(int64_t(rows) * ctx - total);
  return len;
}

// Everything allocated once: the pool, the page table, q/out, the L2 flusher, events.
struct Bench {
  cudaStream_t stream = nullptr;
  cudaEvent_t ev0 = nullptr, ev1 = nullptr;
  cudaDeviceProp prop{};
  double copy_bw = 0, read_bw = 0;
  int reps = 20;
  int64_t max_pages = 0;  // pages of 16 x 128 bf16 in each of the K and V pools
  __nv_bfloat16 *k_pool = nullptr, *v_pool = nullptr, *q = nullptr, *out = nullptr;
  float* lse = nullptr;
  int32_t *offsets = nullptr, *ids = nullptr, *lengths = nullptr;
  uint4* flush_buf = nullptr;
  size_t flush_words = 0;
  unsigned* sink = nullptr;
  std::vector<int32_t> perm;  // random permutation of the pool's pages

  void flush() const {
    read_all<<<prop.multiProcessorCount * 8, 512, 0, stream>>>(flush_buf, flush_words, sink);
    ADAKV_CUDA_CHECK(cudaGetLastError());
  }
  // Graph timing as time_graph and the ceilings do it: L2 flushed before each replay, median of
  // max(3, reps / 2) after 2 warm-ups.
  read_roofline::Timer timer() {
    return read_roofline::Timer{stream, ev0, ev1, [this] { flush(); }, std::max(3, reps / 2)};
  }
  float elapsed_ms() const {
    ADAKV_CUDA_CHECK(cudaEventSynchronize(ev1));
    float ms = 0;
    ADAKV_CUDA_CHECK(cudaEventElapsedTime(&ms, ev0, ev1));
    return ms;
  }
};

// One shape: lengths, page table and q uploaded; the view to run on.
struct Shape {
  int d = 128, batch = 1, ctx = 4096;
  bool ada = false;
  std::vector<int32_t> len;  // [rows]
  std::vector<int32_t> offsets;  // [rows + 1] host copy of the page table's row offsets
  double bytes = 0, max_over_mean = 0;
  int64_t pages = 0;  // pages of one layer
  PagedKvView view;
  const char* dist() const { return ada ? "ada" : "uniform"; }
};

// Builds and uploads a shape; false when it does not fit the pool.
bool setup_shape(Bench& b, Shape* s) {
  const int rows = s->batch * kKvHeads;
  s->len = s->ada ? skewed_lengths(rows, s->ctx, 1000003ull * s->batch + s->ctx)
                  : std::vector<int32_t>(rows, s->ctx);
  std::vector<int32_t> offsets(rows + 1, 0);
  int32_t mx = 0;
  s->bytes = 0;
  for (int r = 0; r < rows; ++r) {
    offsets[r + 1] = offsets[r] + (s->len[r] + kPageSize - 1) / kPageSize;
    s->bytes += double(s->len[r]) * s->d * 2 * 2;
    mx = std::max(mx, s->len[r]);
  }
  s->max_over_mean = double(mx) / s->ctx;
  s->offsets = offsets;
  s->pages = offsets[rows];
  if (s->bytes > kMaxKvBytes || offsets[rows] > b.max_pages) return false;
  // Pages: a slice of one random permutation of the pool (non-contiguous, no reuse); at d 64
  // the same ids index half-size pages, within the first half of the pool.
  ADAKV_CUDA_CHECK(cudaMemcpy(b.offsets, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
  ADAKV_CUDA_CHECK(cudaMemcpy(b.lengths, s->len.data(), s->len.size() * 4, cudaMemcpyHostToDevice));
  fill_random_bf16<<<64, 256, 0, b.stream>>>(b.q, size_t(s->batch) * kQoHeads * s->d, 17 + s->batch + s->ctx);
  ADAKV_CUDA_CHECK(cudaGetLastError());
  // The copies above ran on the legacy stream, which b.stream does not wait for.
  ADAKV_CUDA_CHECK(cudaDeviceSynchronize());
  PagedKvView& v = s->view;
  v.k_pool = b.k_pool;
  v.v_pool = b.v_pool;
  v.row_page_offsets = b.offsets;
  v.page_ids = b.ids;
  v.row_lengths = b.lengths;
  v.num_rows = rows;
  v.num_kv_heads = kKvHeads;
  v.head_dim = s->d;
  v.page_stride = int64_t(kPageSize) * s->d;
  return true;
}

// --plan-costs ITEM,MERGE,MINPAGES,ALIGN: the plan's costs for every variant (sweeps of
// DecodePlanOptions without a rebuild); a negative field keeps the variant's own value.
struct PlanCosts {
  int item = -1, merge = -1, min_pages = -1, align = -1;
};
PlanCosts g_plan_costs;
// --prefetch-pages N: pages per warp requested in L2 before the wait, for every overlapped variant.
int g_prefetch_pages = -1;
// --ppi64 N: pages per iteration of the lean variants at head dim 64 (default: the engine's).
int g_ppi64 = 0;
// --merge-slices N: the merge kernel's slices per (row, head) for variants whose merge width comes
// from the plan (default 0: from the plan too; 1: one block per (row, head), the shape before).
int g_merge_slices = 0;

// The runner for options, or the process exits with the reason.
std::unique_ptr<DecodeAttention> create_attention(const DecodeAttentionOptions& o) {
  auto a = DecodeAttention::create(o);
  if (!a) {
    std::fprintf(stderr, "create: %s\n", a.status().message().c_str());
    std::exit(1);
  }
  return std::move(*a);
}

DecodeAttentionOptions attention_options(int d, DecodeSplit split, int ppi, int warps_per_sm, bool pdl,
                                         DecodeMerge merge = DecodeMerge::kKernel, bool block_items = false,
                                         bool overlap = false, int prefetch = 0, int merge_warps = 0,
                                         int align_min_slots = 4) {
  DecodeAttentionOptions o;
  o.num_qo_heads = kQoHeads;
  o.num_kv_heads = kKvHeads;
  o.head_dim = d;
  o.max_rows = kMaxBatch * kKvHeads;
  o.pages_per_iter = ppi;
  o.max_warps_per_sm = warps_per_sm;
  o.dependent_launch = pdl;
  o.plan.split = split;
  o.merge = merge;
  o.block_items = block_items;
  o.overlap_prologue = overlap;
  o.prefetch_pages = overlap && g_prefetch_pages >= 0 ? g_prefetch_pages : prefetch;
  o.merge_warps = merge_warps;
  if (merge_warps == 0) o.merge_slices = g_merge_slices;
  o.plan.align_min_slots_per_row = align_min_slots;
  if (g_plan_costs.item >= 0) o.plan.item_cost_pages = g_plan_costs.item;
  if (g_plan_costs.merge >= 0) o.plan.merge_cost_pages = g_plan_costs.merge;
  if (g_plan_costs.min_pages >= 0) o.plan.min_pages_per_warp = g_plan_costs.min_pages;
  if (g_plan_costs.align >= 0) o.plan.align_min_slots_per_row = g_plan_costs.align;
  return o;
}

std::unique_ptr<DecodeAttention> make_attention(int d, DecodeSplit split, int ppi, int warps_per_sm, bool pdl,
                                                DecodeMerge merge = DecodeMerge::kKernel, bool block_items = false,
                                                bool overlap = false, int prefetch = 0, int merge_warps = 0,
                                                int align_min_slots = 4) {
  return create_attention(attention_options(d, split, ppi, warps_per_sm, pdl, merge, block_items, overlap, prefetch,
                                            merge_warps, align_min_slots));
}

// Median microseconds of run() on the uploaded shape; its output in *out.
// v3 block items get the host page-table offsets (absolute item offsets), as the engine can.
adakv::Status plan_for(DecodeAttention& attn, const Shape& s, cudaStream_t stream) {
  return attn.options().block_items ? attn.plan(s.len, s.offsets, stream) : attn.plan(s.len, stream);
}

double time_run(Bench& b, DecodeAttention& attn, const Shape& s, std::vector<uint16_t>* out) {
  const adakv::Status st = plan_for(attn, s, b.stream);
  if (!st) {
    std::fprintf(stderr, "plan: %s\n", st.message().c_str());
    std::exit(1);
  }
  const float scale = 1.f / std::sqrt(float(s.d));
  std::vector<double> t;
  for (int i = 0; i < b.reps + 3; ++i) {
    b.flush();
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev0, b.stream));
    const adakv::Status rs =
        attn.run(s.view, b.q, int64_t(kQoHeads) * s.d, b.out, int64_t(kQoHeads) * s.d, b.lse, scale, b.stream);
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev1, b.stream));
    if (!rs) {
      std::fprintf(stderr, "run: %s\n", rs.message().c_str());
      std::exit(1);
    }
    const float ms = b.elapsed_ms();
    if (i >= 3) t.push_back(ms * 1e-3);
  }
  out->resize(size_t(s.batch) * kQoHeads * s.d);
  ADAKV_CUDA_CHECK(cudaMemcpy(out->data(), b.out, out->size() * 2, cudaMemcpyDeviceToHost));
  return median(t) * 1e6;
}

// Max |a - b| over bf16 outputs; +inf if either holds a NaN or an infinity.
double max_diff(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const float x = adakv::bf16_to_f32(a[i]), y = adakv::bf16_to_f32(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return INFINITY;
    diff = std::max(diff, double(std::abs(x - y)));
  }
  return diff;
}

double pct(const Bench& b, double bytes, double us) { return 100 * bytes / (us * 1e-6) / b.copy_bw; }

void measure_ceilings(Bench& b) {
  const size_t bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  ADAKV_CUDA_CHECK(cudaMalloc(&src, bytes));
  ADAKV_CUDA_CHECK(cudaMalloc(&dst, bytes));
  fill_random_bf16<<<b.prop.multiProcessorCount * 8, 256, 0, b.stream>>>(static_cast<__nv_bfloat16*>(src), bytes / 2, 7);
  ADAKV_CUDA_CHECK(cudaGetLastError());
  std::vector<double> t;
  for (int i = 0; i < 23; ++i) {
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev0, b.stream));
    ADAKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, b.stream));
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev1, b.stream));
    const float ms = b.elapsed_ms();
    if (i >= 3) t.push_back(ms * 1e-3);
  }
  b.copy_bw = 2.0 * bytes / median(t);
  ADAKV_CUDA_CHECK(cudaFree(dst));
  ADAKV_CUDA_CHECK(cudaFree(src));
  t.clear();
  for (int i = 0; i < 13; ++i) {
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev0, b.stream));
    b.flush();
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev1, b.stream));
    const float ms = b.elapsed_ms();
    if (i >= 3) t.push_back(ms * 1e-3);
  }
  b.read_bw = b.flush_words * 16.0 / median(t);
}

// Warps per SM, pages per iteration and dependent launch on a few shapes, so that one run on the
// GPU machine shows which knob matters.
void sweep(Bench& b) {
  struct Knob {
    int ppi, warps_per_sm;
    bool pdl;
  };
  const Knob knobs[] = {{1, 0, true}, {2, 0, true}, {1, 8, true}, {2, 4, true}, {1, 4, true}, {1, 0, false}, {2, 0, false}};
  const auto shape = [](int batch, int ctx, bool ada) {
    Shape s;
    s.batch = batch;
    s.ctx = ctx;
    s.ada = ada;
    return s;
  };
  const Shape shapes[] = {shape(1, 4096, false), shape(1, 131072, true), shape(8, 32768, false),
                          shape(8, 32768, true), shape(64, 4096, true),  shape(64, 32768, true)};
  std::printf("\n== sweep (d 128; %% of copy; warps/SM 0 = occupancy limit) ==\n%-22s", "knob \\ shape");
  for (const Shape& s : shapes) std::printf(" b%-2d %3dK %-4s", s.batch, s.ctx / 1024, s.ada ? "ada" : "uni");
  std::printf("\n");
  std::vector<uint16_t> out;
  std::vector<std::vector<double>> table(std::size(knobs));
  for (const Shape& proto : shapes) {
    Shape s = proto;
    if (!setup_shape(b, &s)) {
      for (auto& row : table) row.push_back(0);
      continue;
    }
    for (size_t k = 0; k < std::size(knobs); ++k) {
      auto attn = make_attention(128, DecodeSplit::kBalanced, knobs[k].ppi, knobs[k].warps_per_sm, knobs[k].pdl);
      table[k].push_back(pct(b, s.bytes, time_run(b, *attn, s, &out)));
    }
  }
  for (size_t k = 0; k < std::size(knobs); ++k) {
    char name[64];
    std::snprintf(name, sizeof(name), "p%d w/SM %-2d %s", knobs[k].ppi, knobs[k].warps_per_sm,
                  knobs[k].pdl ? "pdl" : "no-pdl");
    std::printf("%-22s", name);
    for (double x : table[k]) std::printf(" %13.1f", x);
    std::printf("\n");
  }
}

// N back-to-back layers as a real decode step runs them: layer l reads its own K/V (a disjoint
// slice of the pool's page permutation, same row lengths and plan), the N run() calls captured
// in one CUDA graph (stream order between layers, as the layers of a forward depend on each
// other), L2 flushed before each replay. Returns median microseconds per layer; 0 if N < 2.
double time_graph(Bench& b, DecodeAttention& attn, const Shape& s, int* layers) {
  const int n = int(std::min<int64_t>(32, s.pages > 0 ? b.max_pages / s.pages : 0));
  *layers = n;
  if (n < 2) return 0;
  const adakv::Status st = plan_for(attn, s, b.stream);
  if (!st) {
    std::fprintf(stderr, "plan: %s\n", st.message().c_str());
    std::exit(1);
  }
  ADAKV_CUDA_CHECK(cudaStreamSynchronize(b.stream));
  const float scale = 1.f / std::sqrt(float(s.d));
  return read_roofline::time_layers(b.timer(), n, [&](int l) {
    PagedKvView v = s.view;
    v.page_ids = s.view.page_ids + int64_t(l) * s.pages;
    const adakv::Status rs =
        attn.run(v, b.q, int64_t(kQoHeads) * s.d, b.out, int64_t(kQoHeads) * s.d, b.lse, scale, b.stream);
    if (!rs) {
      std::fprintf(stderr, "run (capture): %s\n", rs.message().c_str());
      std::exit(1);
    }
  });
}

__global__ void empty_kernel(int* p) {
  if (p != nullptr && threadIdx.x == 1023) *p = 0;
}

// The floor of a step's time from launches alone: one empty kernel timed with events (as a
// single run() is), and an empty kernel per layer in a graph of 32 (as time_graph times them).
void launch_floor(Bench& b, double* single_us, double* graph_us) {
  std::vector<double> t;
  for (int i = 0; i < 23; ++i) {
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev0, b.stream));
    empty_kernel<<<b.prop.multiProcessorCount * 4, 128, 0, b.stream>>>(nullptr);
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev1, b.stream));
    const float ms = b.elapsed_ms();
    if (i >= 3) t.push_back(ms * 1e3);
  }
  *single_us = median(t);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ADAKV_CUDA_CHECK(cudaStreamBeginCapture(b.stream, cudaStreamCaptureModeThreadLocal));
  for (int l = 0; l < 32; ++l) empty_kernel<<<b.prop.multiProcessorCount * 4, 128, 0, b.stream>>>(nullptr);
  ADAKV_CUDA_CHECK(cudaStreamEndCapture(b.stream, &graph));
  ADAKV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  t.clear();
  for (int i = 0; i < 13; ++i) {
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev0, b.stream));
    ADAKV_CUDA_CHECK(cudaGraphLaunch(exec, b.stream));
    ADAKV_CUDA_CHECK(cudaEventRecord(b.ev1, b.stream));
    const float ms = b.elapsed_ms();
    if (i >= 3) t.push_back(ms * 1e3 / 32);
  }
  *graph_us = median(t);
  ADAKV_CUDA_CHECK(cudaGraphExecDestroy(exec));
  ADAKV_CUDA_CHECK(cudaGraphDestroy(graph));
}

// Variant roles in the table.
enum Role { kTwoKernel, kFusedMerge, kAutoMerge, kAttnOnly, kNaive, kBlockKernel, kBlockOverlap, kBlockFused, kBlockAttn, kBlockFew, kBlockPrefetch, kBlockPrefetchOneBlock, kBlockAttnOneBlock, kBlockPrefetchAligned, kBlockAttnAligned, kBlockKernelAligned, kMergeWidthFixed, kDiagnostic };

// The timeline of N back-to-back layers (as time_graph runs them) from the kernels' global-timer
// stamps of the last replay: one line of offsets per variant and shape. hot: every layer reads
// the first layer's pages, so that from the second layer on K/V come from L2 (steps up to about
// 40 MB): the chain of a layer without DRAM.
std::string timeline_line(Bench& b, DecodeAttention& attn, const Shape& s, const std::string& name, bool hot) {
  const int n = int(std::min<int64_t>(32, s.pages > 0 ? b.max_pages / s.pages : 0));
  if (n < 5) return "";
  if (!plan_for(attn, s, b.stream)) std::exit(1);
  ADAKV_CUDA_CHECK(cudaStreamSynchronize(b.stream));
  const int ab = attn.last_plan().num_warps, mb = s.view.num_rows * (kQoHeads / kKvHeads);
  unsigned long long *ta = nullptr, *tm = nullptr;
  ADAKV_CUDA_CHECK(cudaMalloc(&ta, sizeof(*ta) * 3 * size_t(ab) * n));
  ADAKV_CUDA_CHECK(cudaMalloc(&tm, sizeof(*tm) * 3 * size_t(mb) * n));
  ADAKV_CUDA_CHECK(cudaMemset(ta, 0, sizeof(*ta) * 3 * size_t(ab) * n));
  ADAKV_CUDA_CHECK(cudaMemset(tm, 0, sizeof(*tm) * 3 * size_t(mb) * n));
  const float scale = 1.f / std::sqrt(float(s.d));
  const double per_layer = read_roofline::time_layers(b.timer(), n, [&](int l) {
    PagedKvView v = s.view;
    v.page_ids = s.view.page_ids + (hot ? 0 : int64_t(l) * s.pages);
    attn.set_trace(ta + 3 * size_t(ab) * l, tm + 3 * size_t(mb) * l);
    if (!attn.run(v, b.q, int64_t(kQoHeads) * s.d, b.out, int64_t(kQoHeads) * s.d, b.lse, scale, b.stream))
      std::exit(1);
  });
  attn.set_trace(nullptr, nullptr);
  std::vector<uint64_t> ha(3 * size_t(ab) * n), hm(3 * size_t(mb) * n);
  ADAKV_CUDA_CHECK(cudaMemcpy(ha.data(), ta, ha.size() * 8, cudaMemcpyDeviceToHost));
  ADAKV_CUDA_CHECK(cudaMemcpy(hm.data(), tm, hm.size() * 8, cudaMemcpyDeviceToHost));
  ADAKV_CUDA_CHECK(cudaFree(ta));
  ADAKV_CUDA_CHECK(cudaFree(tm));
  const bool merged = attn.last_merge() == DecodeMerge::kKernel;
  const decode_timeline::Summary t = decode_timeline::summarize(ha, ab, hm, merged ? mb : 0, n);
  char line[320];
  std::snprintf(line, sizeof(line),
              "%3d %5d %3dK %7s %6.0f %-12s | %5.2f %5.1f | %6.2f %6.2f %5.2f | %5.2f %5.2f %5.2f | %6.2f %6.2f %5.2f "
              "%5.2f %5.2f | %5.2f | %2d %4.0f\n",
              s.d, s.batch, s.ctx / 1024, s.dist(), s.bytes / 1e6, (name + (hot ? "/hot" : "")).c_str(), per_layer, pct(b, s.bytes, per_layer),
              t.attn_start_first, t.attn_start_last, t.go_last, t.done_first, t.done_median, t.done_last,
              t.merge_start_first, t.merge_start_last, t.ready_first, t.ready_last, t.merge_done_last, t.next_go,
              t.layers, t.resolution_ns);
  return line;
}

struct Result {
  Shape shape;
  double plan_us = 0;
  std::vector<std::string> names;
  std::vector<int> roles;
  std::vector<double> us, diff;  // per variant; diff against variant 0 (attn-only: not compared)
  std::vector<double> graph_us;  // per variant; 0 = not timed
  int layers = 0;
  std::string auto_merge;
  double plan_v2_us = 0, plan_v3_us = 0, plan_v3r_us = 0;  // DecodeAttention::plan() host time (build + upload call)
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, do_sweep = true, small = false, lean = false, timeline = false, all_sizes = false;
  bool ceiling = true;
  std::vector<std::string> only;  // --only a,b,c: just the variants of these names (without the -pX)
  Bench b;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
    } else if (!std::strcmp(argv[i], "--small")) {
      small = true;  // v3 check: batch 1/8/32 x 4K-32K (+ batch 1 128K), no naive, no sweep
      do_sweep = false;
    } else if (!std::strcmp(argv[i], "--lean")) {
      lean = small = true;  // --small with only the variants the top lists (and the ceilings)
      do_sweep = false;
    } else if (!std::strcmp(argv[i], "--all-sizes")) {
      all_sizes = true;  // with --lean: every batch and context (and the naive baseline)
    } else if (!std::strcmp(argv[i], "--timeline")) {
      timeline = true;  // with --lean: per-layer timelines of each variant (see the top)
    } else if (!std::strcmp(argv[i], "--no-ceiling")) {
      ceiling = false;  // skip the read / copy ceilings at each step's size (A/B runs of builds)
    } else if (!std::strcmp(argv[i], "--no-sweep")) {
      do_sweep = false;
    } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
      for (std::string list = argv[++i]; !list.empty();) {
        const size_t comma = list.find(',');
        only.push_back(list.substr(0, comma));
        list = comma == std::string::npos ? "" : list.substr(comma + 1);
      }
    } else if (!std::strcmp(argv[i], "--plan-costs") && i + 1 < argc) {
      PlanCosts& c = g_plan_costs;
      if (std::sscanf(argv[++i], "%d,%d,%d,%d", &c.item, &c.merge, &c.min_pages, &c.align) != 4) {
        std::fprintf(stderr, "--plan-costs: expected ITEM,MERGE,MINPAGES,ALIGN (integers, -1 keeps), got %s\n", argv[i]);
        return 2;
      }
    } else if (!std::strcmp(argv[i], "--prefetch-pages") && i + 1 < argc) {
      g_prefetch_pages = std::atoi(argv[++i]);
      if (g_prefetch_pages < 0 || g_prefetch_pages > 32) {
        std::fprintf(stderr, "--prefetch-pages: 0..32, got %s\n", argv[i]);
        return 2;
      }
    } else if (!std::strcmp(argv[i], "--merge-slices") && i + 1 < argc) {
      g_merge_slices = std::atoi(argv[++i]);
      if (g_merge_slices != 0 && g_merge_slices != 1 && g_merge_slices != 4) {
        std::fprintf(stderr, "--merge-slices: 0, 1 or 4, got %s\n", argv[i]);
        return 1;
      }
    } else if (!std::strcmp(argv[i], "--ppi64") && i + 1 < argc) {
      g_ppi64 = std::atoi(argv[++i]);
      if (g_ppi64 != 1 && g_ppi64 != 2 && g_ppi64 != 4) {
        std::fprintf(stderr, "--ppi64: 1, 2 or 4, got %s\n", argv[i]);
        return 2;
      }
    } else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      b.reps = std::max(3, std::atoi(argv[++i]));
    }
  }
  int dev = 0;
  ADAKV_CUDA_CHECK(cudaGetDevice(&dev));
  ADAKV_CUDA_CHECK(cudaGetDeviceProperties(&b.prop, dev));
  std::printf("device: %s, %d SMs, L2 %d MB, %.1f GB memory\n", b.prop.name, b.prop.multiProcessorCount,
              b.prop.l2CacheSize >> 20, b.prop.totalGlobalMem / 1e9);
  ADAKV_CUDA_CHECK(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
  ADAKV_CUDA_CHECK(cudaEventCreate(&b.ev0));
  ADAKV_CUDA_CHECK(cudaEventCreate(&b.ev1));
  const size_t flush_bytes = std::max<size_t>(size_t(2) * b.prop.l2CacheSize, size_t(1) << 30);
  b.flush_words = flush_bytes / 16;
  ADAKV_CUDA_CHECK(cudaMalloc(&b.flush_buf, flush_bytes));
  ADAKV_CUDA_CHECK(cudaMemset(b.flush_buf, 1, flush_bytes));
  ADAKV_CUDA_CHECK(cudaMalloc(&b.sink, sizeof(unsigned)));
  measure_ceilings(b);
  std::printf("copy bandwidth (D2D memcpy 1 GiB, read+write): %.0f GB/s; read-only kernel (1 GiB): %.0f GB/s\n",
              b.copy_bw / 1e9, b.read_bw / 1e9);

  const std::vector<int> batches = quick   ? std::vector<int>{1, 32}
                                   : small && !all_sizes ? std::vector<int>{1, 8, 32}
                                                         : std::vector<int>{1, 8, 32, 64};
  const std::vector<int> contexts = quick ? std::vector<int>{4096, 32768} : std::vector<int>{4096, 16384, 32768, 131072};
  // --small: steps up to 1.1 GB only (batch 1 to 128K, batch 8 to 32K, batch 32 at 4K).
  const auto wanted = [&](int batch, int ctx) { return !small || all_sizes || double(batch) * ctx <= 131072.0; };

  // One pool sized for the largest d=128 shape (d=64 uses the same memory, half-size pages).
  for (int batch : batches)
    for (int ctx : contexts)
      if (double(batch) * kKvHeads * ctx * 128 * 4 <= kMaxKvBytes && wanted(batch, ctx))
        b.max_pages = std::max<int64_t>(b.max_pages, int64_t(batch) * kKvHeads * (ctx / kPageSize + 1));
  // --small: room for a graph of 32 layers of the batch 8 x 4K step (134 MB each at d 128).
  if (small) b.max_pages = std::max<int64_t>(b.max_pages, int64_t(32) * 8 * kKvHeads * (4096 / kPageSize + 1));
  b.max_pages += 1024;
  size_t free_mem = 0, total_mem = 0;
  ADAKV_CUDA_CHECK(cudaMemGetInfo(&free_mem, &total_mem));
  const size_t page_bytes = size_t(kPageSize) * 128 * 2;
  const size_t budget = free_mem > (size_t(3) << 30) ? free_mem - (size_t(3) << 30) : 0;
  b.max_pages = std::min<int64_t>(b.max_pages, int64_t(budget / (2 * page_bytes)));
  ADAKV_CUDA_CHECK(cudaMalloc(&b.k_pool, b.max_pages * page_bytes));
  ADAKV_CUDA_CHECK(cudaMalloc(&b.v_pool, b.max_pages * page_bytes));
  fill_random_bf16<<<b.prop.multiProcessorCount * 16, 256, 0, b.stream>>>(b.k_pool, b.max_pages * page_bytes / 2, 11);
  fill_random_bf16<<<b.prop.multiProcessorCount * 16, 256, 0, b.stream>>>(b.v_pool, b.max_pages * page_bytes / 2, 13);
  ADAKV_CUDA_CHECK(cudaGetLastError());
  std::printf("KV pool: 2 x %.1f GB (%lld pages of 16 x 128 bf16)\n", b.max_pages * page_bytes / 1e9,
              (long long)b.max_pages);
  b.perm.resize(b.max_pages);
  std::iota(b.perm.begin(), b.perm.end(), 0);
  std::mt19937_64 rng(12345);
  std::shuffle(b.perm.begin(), b.perm.end(), rng);
  const int max_rows = kMaxBatch * kKvHeads;
  ADAKV_CUDA_CHECK(cudaMalloc(&b.offsets, (max_rows + 1) * sizeof(int32_t)));
  ADAKV_CUDA_CHECK(cudaMalloc(&b.ids, b.max_pages * sizeof(int32_t)));
  ADAKV_CUDA_CHECK(cudaMemcpy(b.ids, b.perm.data(), b.max_pages * sizeof(int32_t), cudaMemcpyHostToDevice));
  ADAKV_CUDA_CHECK(cudaMalloc(&b.lengths, max_rows * sizeof(int32_t)));
  ADAKV_CUDA_CHECK(cudaMalloc(&b.q, size_t(kMaxBatch) * kQoHeads * 128 * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&b.out, size_t(kMaxBatch) * kQoHeads * 128 * 2));
  ADAKV_CUDA_CHECK(cudaMalloc(&b.lse, size_t(kMaxBatch) * kQoHeads * 4));
  ADAKV_CUDA_CHECK(cudaDeviceSynchronize());

  double floor_single = 0, floor_graph = 0;
  launch_floor(b, &floor_single, &floor_graph);
  std::printf("launch floor: empty kernel %.1f us (events, one launch), %.2f us per kernel in a graph of 32\n",
              floor_single, floor_graph);
  if (do_sweep && !quick) sweep(b);

  std::vector<Result> results;
  std::string timelines;
  for (int d : {128, 64}) {
    struct Variant {
      std::string name;
      int role;
      std::unique_ptr<DecodeAttention> attn;
    };
    std::vector<Variant> variants;
    const std::vector<int> ppis = d == 128 ? std::vector<int>{1, 2} : std::vector<int>{2, 4};
    const int main_ppi = d == 64 && g_ppi64 > 0 ? g_ppi64 : ppis.back();
    if (lean) {
      const std::string sfx = "-p" + std::to_string(main_ppi);
      variants.push_back({"b2" + sfx, kBlockKernel,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 0, true, DecodeMerge::kKernel, true)});
      variants.push_back({"bp8" + sfx, kBlockPrefetch,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 0, true, DecodeMerge::kKernel, true, true, 8)});
      // b2 and bp8 with the row-aligned split (no slot runs pieces of two split rows one after the
      // other).
      variants.push_back({"b2r" + sfx, kBlockKernelAligned,
                          make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kKernel, true)});
      variants.push_back({"bp8r" + sfx, kBlockPrefetchAligned,
                          make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kKernel, true, true, 8)});
      variants.push_back({"bpa8r" + sfx, kBlockAttnAligned,
                          make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kNone, true, true, 8)});
      // The fused merge (the block that brings a row's last partial merges it; no second kernel),
      // plainly launched (bfr) and overlapped with 2 pages requested before the wait (bfp2r).
      variants.push_back({"bfr" + sfx, kBlockFused,
                          make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kFused, true)});
      variants.push_back({"bfp2r" + sfx, kBlockFused,
                          make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kFused, true, true,
                                         2)});
      if (all_sizes) variants.push_back({"naive", kNaive, make_attention(d, DecodeSplit::kOneBlockPerRow, 2, 0, true)});
      // b2r / bp2r with the merge kernel's blocks fixed at 4..32 warps (b2r: from the plan's longest
      // row; 4: the width before, 32 partials per L2 round trip).
      for (int mw : {4, 8, 16, 32}) {
        variants.push_back({"b2r" + std::to_string(mw) + "w" + sfx, kMergeWidthFixed,
                            make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kKernel, true,
                                           false, 0, mw)});
        variants.push_back({"bp2r" + std::to_string(mw) + "w" + sfx, kMergeWidthFixed,
                            make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kKernel, true,
                                           true, 2, mw)});
      }
      // b2r / bp2r with the aligned split tried only from 8 slots per row (the default before 4):
      // batch 8 of 8 kv heads then keeps the balanced split.
      variants.push_back({"b2r8s" + sfx, kMergeWidthFixed,
                          make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kKernel, true,
                                         false, 0, 0, 8)});
      variants.push_back({"bp2r8s" + sfx, kMergeWidthFixed,
                          make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kKernel, true,
                                         true, 2, 0, 8)});
      // DecodeMerge::kAuto, the engine's merge (fused while no row has more than 16 pieces, or 40
      // where the merge kernel's grid exceeds the SMs, else the merge kernel), plainly launched (a2r) and overlapped (ap2r: the engine's configuration);
      // bpa2r: bp2r without the merge (timing only).
      variants.push_back({"a2r" + sfx, kMergeWidthFixed,
                          make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kAuto, true)});
      // Both as the engine runs them: its pages per iteration (the options' default) and prefetch.
      const int engine_ppi = DecodeAttentionOptions{}.pages_per_iter;
      const std::string esfx = "-p" + std::to_string(engine_ppi);
      variants.push_back({"ap2r" + esfx, kMergeWidthFixed,
                          make_attention(d, DecodeSplit::kRowAligned, engine_ppi, 0, true, DecodeMerge::kAuto, true, true,
                                         2)});
      variants.push_back({"bpa2r" + esfx, kBlockAttnAligned,
                          make_attention(d, DecodeSplit::kRowAligned, engine_ppi, 0, true, DecodeMerge::kNone, true, true,
                                         2)});
      // Diagnostics at d 128, timing only (outputs not compared): ap2r / bpa2r without the
      // attention arithmetic (ap2rn / bpa2rn: diagnostic_no_math), with the merge cut to one
      // partial per group (ap2rf, and ap2rnf without the arithmetic: diagnostic_merge_floor, 4-warp
      // 1-slice merge kernel), and the fused merge forced, cut the same way, without the
      // arithmetic (afnf).
      struct Diagnostic {
        const char* name;
        DecodeMerge merge;
        bool no_math, merge_floor;
      };
      for (const Diagnostic& dg : {Diagnostic{"ap2rn", DecodeMerge::kAuto, true, false},
                                   Diagnostic{"bpa2rn", DecodeMerge::kNone, true, false},
                                   Diagnostic{"ap2rf", DecodeMerge::kAuto, false, true},
                                   Diagnostic{"ap2rnf", DecodeMerge::kAuto, true, true},
                                   Diagnostic{"afnf", DecodeMerge::kFused, true, true}}) {
        if (d != 128) break;
        DecodeAttentionOptions o =
            attention_options(d, DecodeSplit::kRowAligned, engine_ppi, 0, true, dg.merge, true, true, 2);
        o.diagnostic_no_math = dg.no_math;
        o.diagnostic_merge_floor = dg.merge_floor;
        if (dg.merge_floor && dg.merge != DecodeMerge::kFused) {
          o.merge_warps = 4;  // the floor exists for the 4-warp, 1-slice merge kernel
          o.merge_slices = 1;
        }
        variants.push_back({dg.name + esfx, kDiagnostic, create_attention(o)});
      }
      // The boundary overlapped with fewer pages requested before the wait (bp0r: none).
      for (int pf : {0, 2, 4})
        variants.push_back({"bp" + std::to_string(pf) + "r" + sfx, kBlockPrefetchAligned,
                            make_attention(d, DecodeSplit::kRowAligned, main_ppi, 0, true, DecodeMerge::kKernel, true,
                                           true, pf)});
      // bp8 with one block per SM: the next layer's blocks fit beside this layer's from its start.
      variants.push_back({"bp8w" + sfx, kBlockPrefetchOneBlock,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 4, true, DecodeMerge::kKernel, true, true, 8)});
      variants.push_back({"bpa8w" + sfx, kBlockAttnOneBlock,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 4, true, DecodeMerge::kNone, true, true, 8)});
      // The same without the merge (split rows left unmerged: timing only): the merge's share.
      variants.push_back({"bpa8" + sfx, kBlockAttn,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 0, true, DecodeMerge::kNone, true, true, 8)});
    } else {
      for (int ppi : ppis)
        variants.push_back({"k2-p" + std::to_string(ppi), kTwoKernel,
                            make_attention(d, DecodeSplit::kBalanced, ppi, 0, true, DecodeMerge::kKernel)});
      for (int ppi : ppis)
        variants.push_back({"fu-p" + std::to_string(ppi), kFusedMerge,
                            make_attention(d, DecodeSplit::kBalanced, ppi, 0, true, DecodeMerge::kFused)});
      variants.push_back({"auto-p" + std::to_string(main_ppi), kAutoMerge,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 0, true, DecodeMerge::kAuto)});
      variants.push_back({"attn-p" + std::to_string(main_ppi), kAttnOnly,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 0, true, DecodeMerge::kNone)});
      if (!small) variants.push_back({"naive", kNaive, make_attention(d, DecodeSplit::kOneBlockPerRow, 2, 0, true)});
      // v3: block items (4 warps per piece, combined in shared memory; absolute item offsets).
      for (int ppi : ppis) {
        const std::string sfx = "-p" + std::to_string(ppi);
        variants.push_back({"b2" + sfx, kBlockKernel,
                            make_attention(d, DecodeSplit::kBalanced, ppi, 0, true, DecodeMerge::kKernel, true)});
        variants.push_back({"bo" + sfx, kBlockOverlap,
                            make_attention(d, DecodeSplit::kBalanced, ppi, 0, true, DecodeMerge::kKernel, true, true)});
        variants.push_back({"bf" + sfx, kBlockFused,
                            make_attention(d, DecodeSplit::kBalanced, ppi, 0, true, DecodeMerge::kFused, true)});
        for (int pf : ppi == main_ppi ? std::vector<int>{4, 8, 16, 32} : std::vector<int>{8})
          variants.push_back({"bp" + std::to_string(pf) + sfx, kBlockPrefetch,
                              make_attention(d, DecodeSplit::kBalanced, ppi, 0, true, DecodeMerge::kKernel, true, true, pf)});
      }
      // v3 with one block per SM (half or a third of the loads in flight, half the partials).
      // The same with the layer boundary overlapped: one block per SM leaves room for the next
      // layer's blocks to become resident (and prefetch) while this layer still runs.
      for (int pf : {8, 16})
        variants.push_back({"bp" + std::to_string(pf) + "w-p" + std::to_string(main_ppi), kBlockPrefetch,
                            make_attention(d, DecodeSplit::kBalanced, main_ppi, 4, true, DecodeMerge::kKernel, true, true,
                                           pf)});
      variants.push_back({"bw4-p" + std::to_string(main_ppi), kBlockFew,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 4, true, DecodeMerge::kKernel, true)});
      variants.push_back({"battn-p" + std::to_string(main_ppi), kBlockAttn,
                          make_attention(d, DecodeSplit::kBalanced, main_ppi, 0, true, DecodeMerge::kNone, true)});
    }
    if (!only.empty())
      std::erase_if(variants, [&](const Variant& v) {
        const std::string base = v.name.substr(0, v.name.rfind("-p"));
        return std::find(only.begin(), only.end(), base) == only.end();
      });
    if (variants.empty()) {
      std::fprintf(stderr, "--only: no variant of that name\n");
      return 1;
    }
    for (const Variant& v : variants)
      std::printf("d %d %s: %d warp slots on the device\n", d, v.name.c_str(), v.attn->device_warp_slots());
    for (int batch : batches) {
      for (int ctx : contexts) {
        if (!wanted(batch, ctx)) continue;
        for (bool ada : {false, true}) {
          Result res;
          res.shape.d = d;
          res.shape.batch = batch;
          res.shape.ctx = ctx;
          res.shape.ada = ada;
          if (!setup_shape(b, &res.shape)) {
            std::printf("skip d %d batch %d ctx %d %s: does not fit the pool\n", d, batch, ctx, res.shape.dist());
            continue;
          }
          std::vector<double> t;  // host planner time
          for (int i = 0; i < 7; ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            auto p = adakv::cuda::decode_attention_plan(res.shape.len, variants[0].attn->device_warp_slots(), {});
            t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            if (!p) return 1;
          }
          res.plan_us = median(t) * 1e6;
          // plan() as a step calls it (host build + staging + async upload), v2 and v3.
          for (int which = 0; which < 3; ++which) {
            DecodeAttention* pa = nullptr;
            const int role = which == 0 ? kTwoKernel : which == 1 ? kBlockKernel : kBlockKernelAligned;
            for (Variant& v : variants)
              if (v.role == role) pa = v.attn.get();
            if (pa == nullptr) continue;
            t.clear();
            for (int i = 0; i < 9; ++i) {
              ADAKV_CUDA_CHECK(cudaStreamSynchronize(b.stream));
              const auto t0 = std::chrono::steady_clock::now();
              if (!plan_for(*pa, res.shape, b.stream)) return 1;
              t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            }
            (which == 0 ? res.plan_v2_us : which == 1 ? res.plan_v3_us : res.plan_v3r_us) = median(t) * 1e6;
          }
          std::vector<uint16_t> ref, out;
          for (Variant& v : variants) {
            res.names.push_back(v.name);
            res.roles.push_back(v.role);
            res.us.push_back(time_run(b, *v.attn, res.shape, &out));
            if (ref.empty() && v.role != kDiagnostic) ref = out;  // a diagnostic's output is meaningless
            res.diff.push_back(v.role == kAttnOnly || v.role == kBlockAttn || v.role == kBlockAttnOneBlock ||
                                       v.role == kBlockAttnAligned || v.role == kDiagnostic
                                   ? 0.0
                                                                                                           : max_diff(ref, out));
            if (v.role == kAutoMerge)
              res.auto_merge = v.attn->last_merge() == DecodeMerge::kFused ? "fused" : "kernel";
            // Graph timing for the two-kernel and the auto variant at the main pages/iter, on
            // steps up to 1.1 GB (larger ones are already near the ceiling per call).
            double g = 0;
            const bool graph_it =
                (v.role == kAutoMerge || v.role == kBlockKernel || v.role == kBlockOverlap || v.role == kBlockFused ||
                 v.role == kBlockPrefetch ||
                 v.role == kBlockFew || v.role == kBlockAttn || v.role == kBlockPrefetchOneBlock ||
                 v.role == kBlockAttnOneBlock || v.role == kBlockPrefetchAligned || v.role == kBlockAttnAligned ||
                 v.role == kBlockKernelAligned || v.role == kMergeWidthFixed || v.role == kDiagnostic || (lean && v.role == kNaive) ||
                 (v.role == kTwoKernel && v.name.back() - '0' == main_ppi)) &&
                res.shape.bytes <= 1.1e9;
            if (graph_it) g = time_graph(b, *v.attn, res.shape, &res.layers);
            res.graph_us.push_back(g);
          }
          if (timeline && ((d == 128 && ((batch == 1 && ctx <= 16384) || (batch == 8 && ctx == 4096))) ||
                           (d == 64 && batch == 1 && ctx == 4096)))
            for (Variant& v : variants)
              for (bool hot : {false, true})
                if (!hot || res.shape.bytes < 40e6) timelines += timeline_line(b, *v.attn, res.shape, v.name, hot);
          std::printf("done d %d batch %d ctx %d %s\n", d, batch, ctx, res.shape.dist());
          std::fflush(stdout);
          res.shape.len.clear();
          results.push_back(std::move(res));
        }
      }
    }
  }

  // The ceiling at each step's own size (read_roofline.cuh), once per distinct byte count.
  std::map<int64_t, read_roofline::Result> roof;
  std::map<std::pair<int, int64_t>, double> paged;  // (d, pages) -> the best paged read per layer, us
  std::map<std::pair<int, int64_t>, std::string> paged_cfg;
  if (ceiling) {
    const read_roofline::Timer timer = b.timer();
    const size_t pool_bytes = size_t(b.max_pages) * size_t(kPageSize) * 128 * 2;
    for (const Result& r : results) {
      const int64_t key = int64_t(r.shape.bytes);
      if (r.shape.bytes > 1.1e9) continue;
      const std::pair<int, int64_t> pkey{r.shape.d, r.shape.pages};
      const int layers = int(std::min<int64_t>(32, b.max_pages / r.shape.pages));
      if (!paged.count(pkey) && layers >= 2)
        paged[pkey] = read_roofline::measure_paged(timer, b.prop.multiProcessorCount, b.k_pool, b.v_pool, b.ids,
                                                   r.shape.pages, kPageSize * r.shape.d * 2, layers, &paged_cfg[pkey],
                                                   b.sink);
      if (roof.count(key)) continue;
      roof[key] = read_roofline::measure(timer, b.prop.multiProcessorCount, b.k_pool, b.v_pool, pool_bytes, b.flush_buf,
                                         b.flush_words * 16, r.shape.bytes, b.sink);
    }
  }
  std::printf("\n== the ceiling at the step's size: per layer in a graph of N back-to-back layers, %% of the 1 GiB copy "
              "(%s) ==\n%8s | %2s | %7s %5s %-8s | %7s %5s %-8s | %2s %7s %5s\n",
              b.prop.name, "KV_MB", "N", "read_us", "%", "cfg", "pdl_us", "%", "cfg", "N", "copy_us", "%");
  for (const auto& [bytes, x] : roof)
    std::printf("%8.1f | %2d | %7.2f %5.1f %-8s | %7.2f %5.1f %-8s | %2d %7.2f %5.1f\n", bytes / 1e6, x.layers,
                x.read_us, pct(b, double(bytes), x.read_us), x.read_cfg.c_str(), x.read_pdl_us,
                pct(b, double(bytes), x.read_pdl_us), x.read_pdl_cfg.c_str(), x.copy_layers, x.copy_us,
                x.copy_us > 0 ? pct(b, 2.0 * double(bytes), x.copy_us) : 0.0);
  for (const auto& [bytes, x] : roof) std::printf("read configs at %.1f MB (us per layer):%s\n", bytes / 1e6, x.all.c_str());

  if (const char* out_dir = std::getenv("OUT")) {
    const std::string path = std::string(out_dir) + "/bench_decode_attention.csv";
    if (FILE* f = std::fopen(path.c_str(), "w")) {
      std::fprintf(f, "# device %s, copy_GBps %.1f, read_GBps %.1f, launch floor %.2f us single, %.2f us in graph\n",
                   b.prop.name, b.copy_bw / 1e9, b.read_bw / 1e9, floor_single, floor_graph);
      std::fprintf(f, "head_dim,batch,context,dist,max_over_mean,kv_bytes,plan_us,variant,us,GBps,pct_copy,max_abs_diff,"
                      "graph_layers,graph_us_per_layer,graph_pct_copy\n");
      for (const Result& r : results)
        for (size_t v = 0; v < r.us.size(); ++v)
          std::fprintf(f, "%d,%d,%d,%s,%.2f,%.0f,%.1f,%s,%.2f,%.1f,%.1f,%.4g,%d,%.2f,%.1f\n", r.shape.d, r.shape.batch,
                       r.shape.ctx, r.shape.dist(), r.shape.max_over_mean, r.shape.bytes, r.plan_us, r.names[v].c_str(),
                       r.us[v], r.shape.bytes / (r.us[v] * 1e-6) / 1e9, pct(b, r.shape.bytes, r.us[v]), r.diff[v],
                       r.graph_us[v] > 0 ? r.layers : 0, r.graph_us[v],
                       r.graph_us[v] > 0 ? pct(b, r.shape.bytes, r.graph_us[v]) : 0.0);
      std::fclose(f);
      std::printf("wrote %s\n", path.c_str());
    }
  }

  // Table: per call (cold, events around one run(), L2 flushed): best two-kernel variant (the
  // previous design), best fused-merge variant, the auto variant (the default: fused or kernel
  // by partials per row) and the attention kernel alone (no merge: a lower bound of a step);
  // per layer in a graph of N layers: two-kernel and auto; naive per call.
  bool mismatch = false;
  for (const Result& r : results) {
    double diff = 0;
    for (double x : r.diff) diff = std::max(diff, x);
    mismatch = mismatch || !(diff < 0.05);
  }
  if (!small) {
  std::printf("\n== decode attention v2 table (%s; copy %.0f GB/s, read-only %.0f GB/s; launch floor %.1f us per call, "
              "%.2f us per kernel in a graph; %% = of copy) ==\n",
              b.prop.name, b.copy_bw / 1e9, b.read_bw / 1e9, floor_single, floor_graph);
  std::printf("%3s %5s %4s %7s %5s %6s | %7s %5s | %7s %5s %-5s| %7s %5s %-6s| %6s | %2s %6s %5s %6s %5s | %5s | %5s\n", "d",
              "batch", "ctx", "dist", "max/m", "KV_MB", "k2_us", "%", "fu_us", "%", "var", "auto_us", "%", "merge",
              "attn", "N", "g_k2", "%", "g_auto", "%", "naive", "plan");
  for (const Result& r : results) {
    const auto best_of = [&](int role) {
      int best = -1;
      for (size_t v = 0; v < r.us.size(); ++v)
        if (r.roles[v] == role && (best < 0 || r.us[v] < r.us[best])) best = int(v);
      return best;
    };
    const int k2 = best_of(kTwoKernel), fu = best_of(kFusedMerge), au = best_of(kAutoMerge), at = best_of(kAttnOnly),
              nv = best_of(kNaive);
    double gk2 = 0, gau = 0;
    for (size_t v = 0; v < r.us.size(); ++v) {
      if (r.graph_us[v] <= 0 || (r.roles[v] != kAutoMerge && r.roles[v] != kTwoKernel)) continue;
      (r.roles[v] == kAutoMerge ? gau : gk2) = r.graph_us[v];
    }
    double diff = 0;
    for (double x : r.diff) diff = std::max(diff, x);
    const bool bad = !(diff < 0.05);
    mismatch = mismatch || bad;
    const double by = r.shape.bytes;
    char graph[64] = "  -      -     -      -     -";
    if (gk2 > 0 && gau > 0)
      std::snprintf(graph, sizeof(graph), "%2d %6.1f %5.1f %6.1f %5.1f", r.layers, gk2, pct(b, by, gk2), gau,
                    pct(b, by, gau));
    std::printf("%3d %5d %3dK %7s %5.1f %6.0f | %7.1f %5.1f | %7.1f %5.1f %-5s| %7.1f %5.1f %-6s| %6.1f | %s | %5.1f | %5.1f%s\n",
                r.shape.d, r.shape.batch, r.shape.ctx / 1024, r.shape.dist(), r.shape.max_over_mean, by / 1e6,
                r.us[k2], pct(b, by, r.us[k2]), r.us[fu], pct(b, by, r.us[fu]), r.names[fu].c_str() + 3, r.us[au],
                pct(b, by, r.us[au]), r.auto_merge.c_str(), r.us[at], graph, pct(b, by, r.us[nv]), r.plan_us,
                bad ? "  MISMATCH" : "");
  }
  }
  // v3 table: v2 (warp items, merge kernel) against v3 block items: merge kernel (b2), merge
  // kernel with the prologue overlapped (bo), fused merge (bf); best pages/iter of each; per call
  // and per layer in a graph of N layers; battn = v3 attention kernel alone (per call).
  std::printf("\n== decode attention v3 (%s; copy %.0f GB/s; launch floor %.1f us per call, %.2f us per kernel in a "
              "graph; %% = of copy; g = graph per layer) ==\n",
              b.prop.name, b.copy_bw / 1e9, floor_single, floor_graph);
  std::printf("%3s %5s %4s %7s %5s %6s | %6s %5s %5s | %6s %5s %-3s %5s %-3s| %5s %5s | %6s %5s %-6s| %6s %6s %6s | %6s %5s %6s | %5s %5s | %6s | %5s %5s | %2s | %6s %6s %6s | %5s %6s %6s %-8s\n", "d",
              "batch", "ctx", "dist", "max/m", "KV_MB", "v2_us", "%", "g%", "b2_us", "%", "pp", "g%", "pp", "bo_g%",
              "bo%", "bp8_g%", "bp_g%", "bp", "b2r_g%", "bpr_g%", "bar_g%", "bpw_g%", "ba_g%", "baw_g%", "bf%", "bf_g%", "battn", "w4%", "w4_g%", "N", "plv2us", "plv3us", "plv3r", "rd_g%",
              "bp/rd", "prd_g%", "cfg");
  for (const Result& r : results) {
    const auto best = [&](int role, bool graph) {
      int bi = -1;
      for (size_t v = 0; v < r.us.size(); ++v) {
        if (r.roles[v] != role) continue;
        const double x = graph ? r.graph_us[v] : r.us[v];
        if (x <= 0) continue;
        if (bi < 0 || x < (graph ? r.graph_us[bi] : r.us[bi])) bi = int(v);
      }
      return bi;
    };
    const double by = r.shape.bytes;
    const auto pc = [&](int v, bool graph) { return v < 0 ? 0.0 : pct(b, by, graph ? r.graph_us[v] : r.us[v]); };
    const int v2 = best(kTwoKernel, false), v2g = best(kTwoKernel, true), b2 = best(kBlockKernel, false),
              b2g = best(kBlockKernel, true), bog = best(kBlockOverlap, true), bo = best(kBlockOverlap, false),
              bf = best(kBlockFused, false), bfg = best(kBlockFused, true), ba = best(kBlockAttn, false),
              w4 = best(kBlockFew, false), w4g = best(kBlockFew, true), bpg = best(kBlockPrefetch, true),
              bpwg = best(kBlockPrefetchOneBlock, true), bag = best(kBlockAttn, true),
              bawg = best(kBlockAttnOneBlock, true), bprg = best(kBlockPrefetchAligned, true),
              barg = best(kBlockAttnAligned, true), b2rg = best(kBlockKernelAligned, true);
    // The fixed setting: 8 pages prefetched per warp at the main pages/iter.
    int bp8 = -1;
    for (size_t v = 0; v < r.names.size(); ++v)
      if (r.names[v] == "bp8-p" + std::to_string(r.shape.d == 128 ? 2 : 4)) bp8 = int(v);
    double diff = 0;
    for (double x : r.diff) diff = std::max(diff, x);
    // The best pure read of these bytes (plain or overlapped) and the best bp against it.
    double rd = 0;
    if (const auto it = roof.find(int64_t(by)); it != roof.end()) {
      const double t = std::min(it->second.read_us > 0 ? it->second.read_us : 1e30,
                                it->second.read_pdl_us > 0 ? it->second.read_pdl_us : 1e30);
      rd = t < 1e30 ? pct(b, by, t) : 0;
    }
    const std::pair<int, int64_t> pkey{r.shape.d, r.shape.pages};
    const double prd = paged.count(pkey) ? pct(b, by, paged.at(pkey)) : 0;
    std::printf("%3d %5d %3dK %7s %5.1f %6.0f | %6.1f %5.1f %5.1f | %6.1f %5.1f %-3s %5.1f %-3s| %5.1f %5.1f | %6.1f %5.1f %-6s| %6.1f %6.1f %6.1f | %6.1f %5.1f %6.1f | %5.1f %5.1f | %6.1f | %5.1f %5.1f | %2d | %6.1f %6.1f %6.1f | %5.1f %6.2f %6.1f %-8s%s\n",
                r.shape.d, r.shape.batch, r.shape.ctx / 1024, r.shape.dist(), r.shape.max_over_mean, by / 1e6,
                v2 < 0 ? 0.0 : r.us[v2], pc(v2, false), pc(v2g, true), b2 < 0 ? 0.0 : r.us[b2], pc(b2, false),
                b2 < 0 ? "-" : r.names[b2].c_str() + 3, pc(b2g, true), b2g < 0 ? "-" : r.names[b2g].c_str() + 3,
                pc(bog, true), pc(bo, false), pc(bp8, true), pc(bpg, true),
                bpg < 0 ? "-" : r.names[bpg].c_str() + 2, pc(b2rg, true), pc(bprg, true), pc(barg, true), pc(bpwg, true), pc(bag, true), pc(bawg, true), pc(bf, false), pc(bfg, true), ba < 0 ? 0.0 : r.us[ba], pc(w4, false),
                pc(w4g, true), r.layers,
                r.plan_v2_us, r.plan_v3_us, r.plan_v3r_us, rd, rd > 0 ? pc(bpg, true) / rd : 0.0, prd,
                paged_cfg.count(pkey) ? paged_cfg.at(pkey).c_str() : "-", diff < 0.05 ? "" : "  MISMATCH");
  }
  if (lean) {
    // Every variant per layer in the graph (% of the 1 GiB copy); per call where a step is too
    // large for a graph of layers (marked c).
    std::printf("\n== decode attention, lean (%s; copy %.0f GB/s): per layer in a graph of N layers, %% of copy ==\n",
                b.prop.name, b.copy_bw / 1e9);
    const std::vector<std::string>* header = nullptr;  // a header line wherever the variants change
    for (const Result& r : results) {
      if (header == nullptr || *header != r.names) {
        header = &r.names;
        std::printf("%3s %5s %4s %7s %6s |", "d", "batch", "ctx", "dist", "KV_MB");
        for (const std::string& n : r.names) std::printf(" %9.9s", n.c_str());
        std::printf("\n");
      }
      double diff = 0;
      for (double x : r.diff) diff = std::max(diff, x);
      std::printf("%3d %5d %3dK %7s %6.0f |", r.shape.d, r.shape.batch, r.shape.ctx / 1024, r.shape.dist(),
                  r.shape.bytes / 1e6);
      for (size_t v = 0; v < r.names.size(); ++v) {
        if (r.graph_us[v] > 0) {
          std::printf(" %9.1f", pct(b, r.shape.bytes, r.graph_us[v]));
        } else {
          std::printf(" %8.1fc", pct(b, r.shape.bytes, r.us[v]));
        }
      }
      std::printf("%s\n", diff < 0.05 ? "" : "  MISMATCH");
    }
  }
  if (!timelines.empty())
    std::printf("\n== timeline per layer in a graph of N layers (%s): us after the layer's first block past its wait, mean "
                "over the middle layers ==\n%3s %5s %4s %7s %6s %-12s | %5s %5s | %6s %6s %5s | %5s %5s %5s | %6s %6s %5s %5s "
                "%5s | %5s | %2s %4s\n%s",
                b.prop.name, "d", "batch", "ctx", "dist", "KV_MB", "variant", "us", "%", "a_st0", "a_st1", "go1", "dn0",
                "dn50", "dn1", "m_st0", "m_st1", "rdy0", "rdy1", "mdn1", "next", "L", "res", timelines.c_str());
  if (mismatch) std::printf("MISMATCH: variants disagree by 0.05 or more (or a NaN) somewhere above\n");
  return mismatch ? 2 : 0;
}
