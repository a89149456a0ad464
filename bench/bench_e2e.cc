// End to end on the GPU: a random-weight bf16 model with Llama-3.1-8B's shapes generated on the
// device (CudaModel::random: no checkpoint file), through the whole CUDA forward pass.
//   prefill:  one prompt of --ctx tokens (default 32768) in one step, full cache and with
//             ada-snapkv (budget --budget, default 1024) compressing it on the device; tokens/s.
//   decode:   batch 1, 8, 32 of sequences holding --ctx tokens, greedy on the device, full cache
//             against ada-snapkv; tokens/s and the step's achieved bytes/s (weights + K/V read)
//             over the measured device copy bandwidth.
// Decode contexts: the full-cache rows are --ctx entries committed in the manager (the pool's
// random K/V: decode time does not depend on the values); the ada rows take the per-head lengths
// that the real ada-snapkv prefill above produced, for every sequence. A configuration whose
// cache does not fit the pool is reported as OOM (the pool is --gpu-memory-fraction of what the
// weights and workspace leave).
// Peer: tools/bench/e2e_transformers.py, same shapes, in the same device call.
// ADAKV_PROFILE_OPS=1: also a table of the device time per op for the second full prefill and per
// decode configuration (the decode steps then run without CUDA graphs, so their tokens/s are not
// the product's).
#if ADAKV_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "backends/cuda/cuda_model.h"
#include "backends/cuda/gemm_lt.h"
#include "backends/cuda/gemv.h"
#include "backends/cuda/model_ops.h"
#include "compress/compress_config.h"
#include "kv/kv_cache_manager.h"
#include "model/model_config.h"

using namespace adakv;

namespace {

ModelConfig llama31_8b() {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 128256;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_layers = 32;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling.type = RopeScalingType::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 8192;
  c.max_position_embeddings = 131072;
  return c;
}

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

void die(const Status& s, const char* what) {
  if (s.is_ok()) return;
  std::fprintf(stderr, "bench_e2e: %s: %s\n", what, s.message().c_str());
  std::exit(1);
}

// Device-to-device copy bandwidth (bytes read + written), median of 10 copies of 2 GiB.
double copy_bandwidth() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) return 0;
  cudaMemset(a, 1, bytes);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    cudaEventRecord(e0);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float t = 0;
    cudaEventElapsedTime(&t, e0, e1);
    if (i >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(bytes) / (ms[ms.size() / 2] * 1e-3);
}

// The decode step's projections alone: cuBLASLt (GemmLt with its GEMV routing off) against the
// GEMV kernels (gemv.h) called directly, whatever GemmLt would route; each shape at m = 1 .. 32
// rows, over 4 copies of the weight taken in turn so that L2 holds none of it; median of 20
// after 3.
// % = weight bytes / time / copy bandwidth (x and y are < 1 %).
void decode_gemms(double copy_bw) {
  struct Shape {
    const char* name;
    int64_t n, k;
    DType y;
  };
  const Shape shapes[] = {{"qkv", 6144, 4096, DType::kBF16},
                          {"o", 4096, 4096, DType::kBF16},
                          {"gate_up", 28672, 4096, DType::kBF16},
                          {"down", 4096, 14336, DType::kBF16},
                          {"lm_head", 128256, 4096, DType::kF32}};
  auto gemm = cuda::GemmLt::create();
  die(gemm.status(), "cuBLASLt");
  cudaStream_t st = nullptr;
  cudaStreamCreate(&st);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const int64_t partial_floats = int64_t{16} << 20, counter_count = 16384;
  float* partial = nullptr;
  int32_t* counters = nullptr;
  cudaMalloc(&partial, sizeof(float) * partial_floats);
  cudaMalloc(&counters, sizeof(int32_t) * counter_count);
  cudaMemset(counters, 0, sizeof(int32_t) * counter_count);
  std::printf("\n== decode projections (weights 4 copies, taken in turn)\n");
  std::printf("| proj | n x k | m | cuBLASLt µs | %% of copy bw | gemv µs | %% of copy bw | gemv / cuBLASLt |\n"
              "|---|---|---|---|---|---|---|---|\n");
  for (const Shape& sh : shapes) {
    const size_t welems = size_t(sh.n) * size_t(sh.k);
    __nv_bfloat16* w = nullptr;
    __nv_bfloat16* x = nullptr;
    void* y = nullptr;
    if (cudaMalloc(&w, 4 * welems * 2) != cudaSuccess || cudaMalloc(&x, size_t(32) * sh.k * 2) != cudaSuccess ||
        cudaMalloc(&y, size_t(32) * sh.n * 4) != cudaSuccess) {
      std::printf("| %s | out of memory |\n", sh.name);
      cudaFree(w);
      cudaFree(x);
      continue;
    }
    die(cuda::random_fill_bf16(w, int64_t(4 * welems), 5, 0.02f, 0.f, st), "fill");
    die(cuda::random_fill_bf16(x, 32 * sh.k, 6, 1.f, 0.f, st), "fill");
    for (const int64_t m : {1, 2, 3, 4, 8, 16, 32}) {
      double sec[2] = {0, 0};
      for (int mode = 0; mode < 2; ++mode) {
        gemm.value()->set_gemv(false);
        if (mode == 1 && m > cuda::kGemvMaxRows) continue;
        std::vector<float> ms;
        for (int i = 0; i < 23; ++i) {
          cudaEventRecord(e0, st);
          if (mode == 0) {
            die(gemm.value()->linear(x, w + size_t(i % 4) * welems, y, sh.y, m, sh.n, sh.k, st), "gemm");
          } else {  // the GEMV kernel itself, whatever GemmLt would route
            cuda::GemvArgs ga;
            ga.x = x;
            ga.ldx = sh.k;
            ga.w = w + size_t(i % 4) * welems;
            ga.y = y;
            ga.ldy = sh.n;
            ga.y_dtype = sh.y;
            ga.m = int32_t(m);
            ga.n = int32_t(sh.n);
            ga.k = int32_t(sh.k);
            ga.partial = partial;
            ga.partial_capacity = partial_floats;
            ga.counters = counters;
            ga.counter_capacity = counter_count;
            die(cuda::gemv_bf16(ga, st), "gemv");
          }
          cudaEventRecord(e1, st);
          cudaEventSynchronize(e1);
          float t = 0;
          cudaEventElapsedTime(&t, e0, e1);
          if (i >= 3) ms.push_back(t);
        }
        std::sort(ms.begin(), ms.end());
        sec[mode] = ms[ms.size() / 2] * 1e-3;
      }
      const double bytes = 2.0 * double(welems);
      if (m <= cuda::kGemvMaxRows)
        std::printf("| %s | %lld x %lld | %lld | %.1f | %.1f | %.1f | %.1f | %.2fx |\n", sh.name,
                    static_cast<long long>(sh.n), static_cast<long long>(sh.k), static_cast<long long>(m),
                    sec[0] * 1e6, 100.0 * bytes / sec[0] / copy_bw, sec[1] * 1e6, 100.0 * bytes / sec[1] / copy_bw,
                    sec[0] / sec[1]);
      else
        std::printf("| %s | %lld x %lld | %lld | %.1f | %.1f | - | - | - |\n", sh.name, static_cast<long long>(sh.n),
                    static_cast<long long>(sh.k), static_cast<long long>(m), sec[0] * 1e6,
                    100.0 * bytes / sec[0] / copy_bw);
    }
    gemm.value()->set_gemv(true);
    cudaFree(w);
    cudaFree(x);
    cudaFree(y);
  }
  cudaFree(partial);
  cudaFree(counters);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaStreamDestroy(st);
}

}  // namespace

int main(int argc, char** argv) {
  int32_t ctx = 32768, budget = 1024, steps = 24;
  double fraction = 0.9;
  bool gemms_only = false;  // --gemms: only the decode projections through cuBLASLt
  std::vector<int32_t> batches = {1, 8, 32};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--ctx") ctx = std::atoi(next().c_str());
    else if (a == "--budget") budget = std::atoi(next().c_str());
    else if (a == "--steps") steps = std::atoi(next().c_str());
    else if (a == "--gpu-memory-fraction") fraction = std::atof(next().c_str());
    else if (a == "--gemms") gemms_only = true;
    else if (a == "--batches") {
      batches.clear();
      std::string s = next();
      for (size_t p = 0; p < s.size();) {
        const size_t q = s.find(',', p);
        batches.push_back(std::atoi(s.substr(p, q - p).c_str()));
        p = q == std::string::npos ? s.size() : q + 1;
      }
    } else {
      std::fprintf(stderr, "usage: bench_e2e [--ctx N] [--budget B] [--steps N] [--batches 1,8,32] [--gpu-memory-fraction F] "
                           "[--gemms]\n");
      return 2;
    }
  }
  die(cuda::cuda_device_available(), "device");
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const double copy_bw = copy_bandwidth();
  std::printf("device %s, %d SMs; device copy bandwidth %.0f GB/s (read + write)\n", prop.name,
              prop.multiProcessorCount, copy_bw / 1e9);
  if (gemms_only) {
    decode_gemms(copy_bw);
    return 0;
  }

  const ModelConfig cfg = llama31_8b();
  CompressConfig cc;
  cc.policy = KvPolicy::kAdaSnapKv;
  cc.budget = budget;
  cuda::CudaModelOptions o;
  o.max_seqs = *std::max_element(batches.begin(), batches.end());
  o.max_step_tokens = ctx;
  o.max_context = ctx + steps + 16;
  o.gpu_memory_fraction = fraction;
  o.compress = &cc;
  double t0 = now_s();
  auto model_or = cuda::CudaModel::random(cfg, 1234, o);
  die(model_or.status(), "model");
  cuda::CudaModel& model = **model_or;
  std::printf("model: Llama-3.1-8B shapes, random bf16 weights on the device in %.1f s; %s\n", now_s() - t0,
              model.memory_summary().c_str());
  KvCacheManager mgr(model.kv_layout(), model.num_pages());
  const int32_t L = int32_t(cfg.num_layers), Hkv = int32_t(cfg.num_kv_heads);

  std::vector<int32_t> prompt(static_cast<size_t>(ctx));
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t((i * 2654435761u) % uint64_t(cfg.vocab_size));
  cuda::StepSampling greedy;
  cuda::StepResult out;

  // --- prefill ----------------------------------------------------------------------------------------
  auto prefill = [&](int32_t n, bool compress, std::vector<int32_t>* lengths) {
    const SeqId s = mgr.add_sequence();
    cuda::SeqStep st;
    st.seq = s;
    st.tokens = std::span<const int32_t>(prompt.data(), size_t(n));
    st.compress = compress;
    st.sampling = &greedy;
    const double w0 = now_s();
    die(model.step({&st, 1}, mgr, false, &out), "prefill");
    const double wall = now_s() - w0;
    if (lengths != nullptr) {
      lengths->clear();
      for (int32_t l = 0; l < L; ++l)
        for (int32_t h = 0; h < Hkv; ++h) lengths->push_back(mgr.length(s, l, h));
    }
    mgr.release(s);
    model.on_release(s);
    return std::make_pair(wall, double(model.last_step_ms()) * 1e-3);
  };
  prefill(std::min(ctx, 2048), false, nullptr);  // warm-up: cuBLASLt plans, kernels' first launches
  prefill(std::min(ctx, 2048), true, nullptr);
  std::vector<int32_t> ada_lengths;
  const auto pf_full = prefill(ctx, false, nullptr);
  model.reset_op_profile();  // ADAKV_PROFILE_OPS=1: the second full prefill, op by op (printed below)
  const auto pf_full2 = prefill(ctx, false, nullptr);
  const std::string prefill_ops = model.op_profile();
  const auto pf_ada = prefill(ctx, true, &ada_lengths);
  const double flops = 2.0 * 7.5e9 * ctx + 4.0 * 128 * 32 * 32 * (double(ctx) * (ctx + 1) / 2);
  std::printf("prefill %d tokens, full cache: %.3f s wall, %.3f s device (%.0f tokens/s; %.0f TFLOP/s on "
              "2 * 7.5e9 * L + attention FLOPs); again %.3f s\n",
              ctx, pf_full.first, pf_full.second, ctx / pf_full.second, flops / pf_full.second / 1e12, pf_full2.second);
  std::printf("prefill %d tokens, ada-snapkv %d (scores + selection + compaction on the device): %.3f s device "
              "(%.0f tokens/s, +%.1f %% over full)\n",
              ctx, budget, pf_ada.second, ctx / pf_ada.second, 100.0 * (pf_ada.second / std::min(pf_full.second, pf_full2.second) - 1.0));
  if (!prefill_ops.empty())
    std::printf("\n== prefill ops, %d tokens, full cache (ADAKV_PROFILE_OPS: events between ops)\n%s\n", ctx,
                prefill_ops.c_str());
  const int64_t ada_entries = std::accumulate(ada_lengths.begin(), ada_lengths.end(), int64_t{0});
  const int32_t ada_max = *std::max_element(ada_lengths.begin(), ada_lengths.end());
  std::printf("ada-snapkv rows after prefill: mean %.1f entries, longest %d (max/mean %.2f)\n",
              double(ada_entries) / double(ada_lengths.size()), ada_max,
              ada_max / (double(ada_entries) / double(ada_lengths.size())));

  // --- decode --------------------------------------------------------------------------------------------
  struct Row {
    int32_t batch;
    const char* cache;
    std::string result;
    std::string host;  // the step's host phases, mean ms (empty: not run)
  };
  std::vector<Row> rows;
  // Bytes a decode step must read: every weight but the embedding table (B rows of it), plus K/V.
  const double weight_bytes = double(model.weight_bytes()) - 2.0 * double(cfg.vocab_size) * double(cfg.hidden_size);
  for (int32_t B : batches)
    for (int mode = 0; mode < 2; ++mode) {
      const bool ada = mode == 1;
      std::vector<SeqId> seqs;
      bool oom = false;
      std::string why, host;
      int64_t kv_entries = 0;
      for (int32_t b = 0; b < B && !oom; ++b) {
        const SeqId s = mgr.add_sequence();
        seqs.push_back(s);
        KvGrowth g{s, ctx};
        KvReservation r;
        const Admission adm = mgr.reserve({&g, 1}, &r);
        if (adm != Admission::kOk) {
          oom = true;
          why = "OOM: " + std::to_string(r.pages_needed) + " pages for a " + std::to_string(ctx) + "-token sequence, " +
                std::to_string(mgr.free_pages()) + " free of " + std::to_string(mgr.num_pages()) + " (pool " +
                std::to_string(model.kv_pool_bytes() >> 30) + " GiB) at sequence " + std::to_string(b + 1);
          break;
        }
        mgr.commit(r);
        mgr.advance_logical_length(s, ctx);
        for (int32_t l = 0; l < L; ++l)
          for (int32_t h = 0; h < Hkv; ++h) {
            if (ada) {
              const int32_t len = ada_lengths[size_t(l * Hkv + h)];
              std::vector<int32_t> keep(static_cast<size_t>(len));
              std::iota(keep.begin(), keep.end(), 0);
              (void)mgr.keep_entries(s, l, h, keep);
            }
            kv_entries += mgr.length(s, l, h);
          }
      }
      if (!oom) {
        std::vector<int32_t> tok(static_cast<size_t>(B), 7);
        std::vector<cuda::SeqStep> st(static_cast<size_t>(B));
        auto one_step = [&] {
          for (int32_t b = 0; b < B; ++b) {
            st[size_t(b)].seq = seqs[size_t(b)];
            st[size_t(b)].tokens = std::span<const int32_t>(&tok[size_t(b)], 1);
            st[size_t(b)].sampling = &greedy;
          }
          const Status s = model.step(st, mgr, false, &out);
          for (int32_t b = 0; b < B && s.is_ok(); ++b) tok[size_t(b)] = out.sampled[size_t(b)];
          return s;
        };
        Status s = Status::ok();
        for (int i = 0; i < 3 && s.is_ok(); ++i) s = one_step();
        model.reset_op_profile();
        std::vector<double> dev_ms, plan_ms;
        // Host phases of the step (CudaModel::StepTiming), summed: where the wall time that the
        // device does not see goes.
        double prep = 0, mirror = 0, enqueue = 0, ahead = 0, wait = 0, results = 0, finish = 0;
        const double w0 = now_s();
        for (int i = 0; i < steps && s.is_ok(); ++i) {
          s = one_step();
          const auto& t = model.last_step_timing();
          dev_ms.push_back(model.last_step_ms());
          plan_ms.push_back(t.plan_ms);
          prep += t.prep_ms;
          mirror += t.mirror_ms;
          enqueue += t.enqueue_ms;
          ahead += t.plan_ahead_ms;
          wait += t.wait_ms;
          results += t.results_ms;
          finish += t.compress_ms;
        }
        const double wall = (now_s() - w0) / steps;
        if (!s.is_ok()) {
          why = "error: " + s.message();
        } else {
          std::sort(dev_ms.begin(), dev_ms.end());
          const double med = dev_ms[dev_ms.size() / 2] * 1e-3;
          const double plan_mean = std::accumulate(plan_ms.begin(), plan_ms.end(), 0.0) / double(plan_ms.size());
          const double kv_bytes = double(kv_entries + int64_t{B} * L * Hkv * steps / 2) * 128 * 2 * 2;
          char buf[256];
          std::snprintf(buf, sizeof buf, "%8.1f | %7.2f | %7.2f | %6.3f | %6.1f | %5.1f", B / wall, wall * 1e3, med * 1e3,
                        plan_mean, kv_bytes / 1e9, 100.0 * (weight_bytes + kv_bytes) / med / copy_bw);
          why = buf;
          std::snprintf(buf, sizeof buf, "%6.3f | %6.3f | %6.3f | %6.3f | %6.3f | %6.3f | %6.3f | %6.3f", prep / steps,
                        mirror / steps, plan_mean, enqueue / steps, ahead / steps, wait / steps, results / steps,
                        finish / steps);
          host = buf;
        }
      }
      for (SeqId s : seqs) {
        mgr.release(s);
        model.on_release(s);
      }
      rows.push_back({B, ada ? "ada-snapkv" : "full", why, host});
      // ADAKV_PROFILE_OPS=1: where the timed steps' device time went, op by op.
      if (const std::string ops = model.op_profile(); !ops.empty())
        std::printf("\n== decode ops, batch %d, %s (ADAKV_PROFILE_OPS: events between ops, no graphs)\n%s", B,
                    ada ? "ada-snapkv" : "full", ops.c_str());
    }

  std::printf("\n== e2e (Llama-3.1-8B shapes, random bf16, %s, context %d, ada-snapkv budget %d)\n", prop.name, ctx, budget);
  std::printf("prefill %d: full %.0f tokens/s (%.3f s), ada-snapkv %.0f tokens/s (%.3f s)\n", ctx, ctx / pf_full.second,
              pf_full.second, ctx / pf_ada.second, pf_ada.second);
  std::printf("| batch | cache | decode tokens/s | step ms (wall) | step ms (device, median) | decode plans ms (host, mean) | KV GB "
              "read | %% of copy bw |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) std::printf("| %d | %s | %s |\n", r.batch, r.cache, r.result.c_str());
  std::printf("\nhost phases of a decode step, mean ms (CudaModel::StepTiming; prepare and mirror run before the "
              "device's start event, the next step's plans (ahead) and the wait while the device runs, results and "
              "finish after its end)\n");
  std::printf("| batch | cache | prepare | page-table mirror | plans | enqueue | plans ahead | wait | results | finish |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows)
    if (!r.host.empty()) std::printf("| %d | %s | %s |\n", r.batch, r.cache, r.host.c_str());
  return 0;
}

#else  // built without CUDA

#include <cstdio>

int main() {
  std::fprintf(stderr, "bench_e2e: adakv was built without CUDA\n");
  return 2;
}

#endif  // ADAKV_HAVE_CUDA
