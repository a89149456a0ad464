// The ceiling of a decode step at its own size: the best a kernel that only reads the step's bytes
// (contiguous, 16-byte loads, nothing computed) reaches per layer in the decode benchmark's graph
// setting (N back-to-back layers in one CUDA graph, each depending on the one before, L2 flushed
// before each replay), and the same for a device-to-device copy of the step's bytes per layer.
//
// Why: the issue's ceiling is the copy bandwidth of 1 GiB. A step of 8-134 MB also pays a launch,
// the first bytes' latency and the last wave's drain once per layer; this says how much of the
// gap to 85 % any kernel would pay, so that the attention kernel is judged against what is
// possible at that size as well as against the large-copy rate.
//
// Read configurations tried (best reported): 1/2/4/8 blocks of 256 threads per SM, 4 or 8 loads
// of 16 bytes in flight per thread; plain launches, and programmatic dependent launches (each
// kernel lets the next one launch at its start, the next one asks for its first 0/4/16 pages of
// 4 KB in L2 before griddepcontrol.wait), which is how the attention's bpN variant overlaps the
// layer boundary. read_pages does the same over the step's own pages (scattered 4 KB / 2 KB pages
// through the page table), which separates what paging costs from what the attention adds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/dependent_launch.cuh"
#include "backends/cuda/stream_load.cuh"

namespace read_roofline {

constexpr int kThreads = 256;
constexpr int64_t kPageWords = 256;  // 4 KB in 16-byte words

// Programmatic dependent launch from the device (dependent_launch.cuh; no-ops before sm_90 and
// where the launches are plain).
using adakv::cuda::await_preceding_grid;
using adakv::cuda::release_dependent_grid;

// One layer: reads words [0, 2 * half) of the step, k[0, half) then v[0, half); each block a
// contiguous chunk of chunk_words, kThreads x U words per iteration (coalesced).
template <int U>
__global__ void __launch_bounds__(kThreads) read_step(const uint4* k, const uint4* v, int64_t half, int64_t chunk_words,
                                                      int prefetch_pages, int pdl, unsigned* sink) {
  const int64_t begin = blockIdx.x * chunk_words, end = min(begin + chunk_words, 2 * half);
  const auto at = [&](int64_t w) { return w < half ? k + w : v + (w - half); };
  if (pdl) {
    release_dependent_grid();
    const int64_t w = begin + threadIdx.x * kPageWords;
    if (int(threadIdx.x) < prefetch_pages && w < end) {
      const int64_t stop = min(end, w < half ? half : 2 * half);  // a prefetch stays inside k or v
      adakv::cuda::prefetch_l2(at(w), uint32_t((stop - w < kPageWords ? stop - w : kPageWords) * 16));
    }
    await_preceding_grid();
  }
  unsigned acc = 0;
  for (int64_t base = begin; base < end; base += int64_t(U) * kThreads) {
    uint4 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t w = base + u * kThreads + threadIdx.x;
      x[u] = w < end ? adakv::cuda::load_stream(reinterpret_cast<const __nv_bfloat16*>(at(w))) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= x[u].x ^ x[u].y ^ x[u].z ^ x[u].w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

// The same as read_step over a layer's K/V pages as the attention finds them: pages ids[0, pages)
// of page_words 16-byte words each in k and v (block b: pages [b * block_pages, +block_pages),
// each page's K words then its V words). The block's page ids are staged in shared memory first
// (dynamic, block_pages ints); with pdl, that and an L2 prefetch of the block's first
// prefetch_pages pages happen before griddepcontrol.wait, as the attention's bpN variant does.
template <int U>
__global__ void __launch_bounds__(kThreads) read_pages(const uint4* k, const uint4* v, const int32_t* ids,
                                                       int64_t pages, int page_words, int64_t block_pages, int pdl,
                                                       int prefetch_pages, unsigned* sink) {
  extern __shared__ int32_t s_ids[];
  const int64_t first = blockIdx.x * block_pages, last = min(first + block_pages, pages);
  const int n = int(last - first);
  if (pdl) release_dependent_grid();
  for (int i = threadIdx.x; i < n; i += kThreads) {
    s_ids[i] = ids[first + i];
    if (pdl && i < prefetch_pages) {
      adakv::cuda::prefetch_l2(k + int64_t(s_ids[i]) * page_words, uint32_t(page_words * 16));
      adakv::cuda::prefetch_l2(v + int64_t(s_ids[i]) * page_words, uint32_t(page_words * 16));
    }
  }
  if (pdl) await_preceding_grid();
  __syncthreads();
  const int64_t words = int64_t(n) * 2 * page_words;
  unsigned acc = 0;
  for (int64_t base = 0; base < words; base += int64_t(U) * kThreads) {
    uint4 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t w = base + u * kThreads + threadIdx.x;
      x[u] = make_uint4(0, 0, 0, 0);
      if (w < words) {
        const int64_t j = w / (2 * page_words), r = w - j * 2 * page_words;
        const int64_t id = s_ids[j];
        const uint4* p = r < page_words ? k + id * page_words + r : v + id * page_words + (r - page_words);
        x[u] = adakv::cuda::load_stream(reinterpret_cast<const __nv_bfloat16*>(p));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= x[u].x ^ x[u].y ^ x[u].z ^ x[u].w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

struct Timer {
  cudaStream_t stream;
  cudaEvent_t ev0, ev1;
  std::function<void()> flush;  // evicts L2 (enqueued on stream)
  int reps;
};

// Median microseconds per layer of a graph of `layers` captures of enqueue(l).
inline double time_layers(const Timer& t, int layers, const std::function<void(int)>& enqueue) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ADAKV_CUDA_CHECK(cudaStreamBeginCapture(t.stream, cudaStreamCaptureModeThreadLocal));
  for (int l = 0; l < layers; ++l) enqueue(l);
  ADAKV_CUDA_CHECK(cudaStreamEndCapture(t.stream, &graph));
  ADAKV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<double> us;
  for (int i = 0; i < t.reps + 2; ++i) {
    t.flush();
    ADAKV_CUDA_CHECK(cudaEventRecord(t.ev0, t.stream));
    ADAKV_CUDA_CHECK(cudaGraphLaunch(exec, t.stream));
    ADAKV_CUDA_CHECK(cudaEventRecord(t.ev1, t.stream));
    ADAKV_CUDA_CHECK(cudaEventSynchronize(t.ev1));
    float ms = 0;
    ADAKV_CUDA_CHECK(cudaEventElapsedTime(&ms, t.ev0, t.ev1));
    if (i >= 2) us.push_back(ms * 1e3 / layers);
  }
  ADAKV_CUDA_CHECK(cudaGraphExecDestroy(exec));
  ADAKV_CUDA_CHECK(cudaGraphDestroy(graph));
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

struct Result {
  int layers = 0, copy_layers = 0;
  double read_us = 0, read_pdl_us = 0, copy_us = 0;  // per layer; 0 = not timed
  std::string read_cfg, read_pdl_cfg;
  std::string all;  // every configuration: "name us" pairs
};

inline cudaLaunchConfig_t launch_config(const Timer& t, unsigned blocks, bool pdl, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.stream = t.stream;
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cfg;
}

// Best per-layer microseconds of read_pages over `layers` layers (layer l: ids + l * pages) and
// its configuration; plain launches and dependent launches both tried.
inline double measure_paged(const Timer& t, int sms, const void* k_pool, const void* v_pool, const int32_t* ids,
                            int64_t pages, int page_bytes, int layers, std::string* best_cfg, unsigned* sink) {
  double best = 0;
  const int page_words = page_bytes / 16;
  for (int per_sm : {2, 4, 8})
    for (int unroll : {4, 8})
      for (int pf : {-1, 0, 8, 32}) {  // -1: plain launches; else pdl with pf pages prefetched
        const int pdl = pf >= 0;
        const int64_t blocks_wanted = int64_t(sms) * per_sm;
        const int64_t block_pages = (pages + blocks_wanted - 1) / blocks_wanted;
        const unsigned blocks = unsigned((pages + block_pages - 1) / block_pages);
        const double us = time_layers(t, layers, [&](int l) {
          cudaLaunchAttribute attr[1];
          cudaLaunchConfig_t cfg = launch_config(t, blocks, pdl, attr);
          cfg.dynamicSmemBytes = size_t(block_pages) * 4;
          const auto* k = static_cast<const uint4*>(k_pool);
          const auto* v = static_cast<const uint4*>(v_pool);
          const int32_t* li = ids + int64_t(l) * pages;
          const int npf = std::max(pf, 0);
          ADAKV_CUDA_CHECK(unroll == 4 ? cudaLaunchKernelEx(&cfg, read_pages<4>, k, v, li, pages, page_words,
                                                            block_pages, pdl, npf, sink)
                                       : cudaLaunchKernelEx(&cfg, read_pages<8>, k, v, li, pages, page_words,
                                                            block_pages, pdl, npf, sink));
        });
        if (best == 0 || us < best) {
          best = us;
          *best_cfg = std::to_string(per_sm) + "x" + std::to_string(unroll) + (pdl ? "-pf" + std::to_string(pf) : "");
        }
      }
  return best;
}

// The step's bytes (a multiple of 32) split in two halves read from k_pool and v_pool (each
// holding pool_bytes), layer l at offset l * half; the copy's layer l reads the step's bytes at
// k_pool + l * bytes and writes them to dst + l * bytes. Layers = min(32, what the buffers hold).
inline Result measure(const Timer& t, int sms, const void* k_pool, const void* v_pool, size_t pool_bytes, void* dst,
                      size_t dst_bytes, double step_bytes, unsigned* sink) {
  Result r;
  const int64_t half = int64_t(step_bytes) / 32;  // words per half
  const size_t bytes = size_t(half) * 32;
  r.layers = int(std::min<size_t>(32, pool_bytes / (size_t(half) * 16)));
  if (r.layers < 2 || bytes > dst_bytes) return r;
  const auto* k = static_cast<const uint4*>(k_pool);
  const auto* v = static_cast<const uint4*>(v_pool);
  for (int per_sm : {1, 2, 4, 8})
    for (int unroll : {4, 8})
      for (int pf : {-1, 0, 4, 16}) {  // -1: plain launches
        const int blocks = sms * per_sm;
        const int64_t chunk = (2 * half + blocks - 1) / blocks;
        const int64_t chunk_words = (chunk + kPageWords - 1) / kPageWords * kPageWords;
        const int pdl = pf >= 0;
        const double us = time_layers(t, r.layers, [&](int l) {
          cudaLaunchAttribute attr[1];
          cudaLaunchConfig_t cfg = launch_config(t, unsigned((2 * half + chunk_words - 1) / chunk_words), pdl, attr);
          const uint4 *kl = k + int64_t(l) * half, *vl = v + int64_t(l) * half;
          const int pages = std::max(pf, 0);
          ADAKV_CUDA_CHECK(unroll == 4 ? cudaLaunchKernelEx(&cfg, read_step<4>, kl, vl, half, chunk_words, pages, pdl, sink)
                                       : cudaLaunchKernelEx(&cfg, read_step<8>, kl, vl, half, chunk_words, pages, pdl, sink));
        });
        const std::string name = std::to_string(per_sm) + "x" + std::to_string(unroll) + (pdl ? "-pf" + std::to_string(pf) : "");
        char buf[64];
        std::snprintf(buf, sizeof(buf), " %s %.2f", name.c_str(), us);
        r.all += buf;
        double& best = pdl ? r.read_pdl_us : r.read_us;
        if (best == 0 || us < best) {
          best = us;
          (pdl ? r.read_pdl_cfg : r.read_cfg) = name;
        }
      }
  // Each layer copies to its own destination: one reused destination would stay in L2 and flatter
  // the small copies (its writes would never reach DRAM within the graph).
  r.copy_layers = int(std::min<size_t>({32, pool_bytes / bytes, dst_bytes / bytes}));
  if (r.copy_layers >= 2)
    r.copy_us = time_layers(t, r.copy_layers, [&](int l) {
      ADAKV_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + size_t(l) * bytes,
                                       static_cast<const char*>(k_pool) + size_t(l) * bytes, bytes,
                                       cudaMemcpyDeviceToDevice, t.stream));
    });
  return r;
}

}  // namespace read_roofline
