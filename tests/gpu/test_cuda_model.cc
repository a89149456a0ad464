// The CUDA forward pass (src/backends/cuda/cuda_model.h) against the CPU forward in the same
// binary: every fixture architecture (tests/fixtures/models) and the shipped adakv-tiny-v1
// (head dim 64: the tensor-core attention paths); logits within bf16 tolerance, greedy tokens, a
// batch of sequences in one step (decode + chunked prefill over prior entries + fresh prompts)
// equal to each sequence alone, and the device compression's keep sets against the host policy.
// Without a CUDA device every test skips with a message.
#include <gtest/gtest.h>

#if ADAKV_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_generate.h"
#include "backends/cuda/cuda_model.h"
#include "compress/policy.h"
#include "core/dtype.h"
#include "engine/generator.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"
#include "model/transformer.h"

namespace adakv {
namespace {

namespace fs = std::filesystem;

bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
#define SKIP_WITHOUT_DEVICE() \
  if (!have_device()) GTEST_SKIP() << "no CUDA device: GPU model tests skipped"

const fs::path kModels = fs::path(ADAKV_FIXTURES_DIR) / "models";
const fs::path kTiny = fs::path(ADAKV_SOURCE_DIR) / "models" / "adakv-tiny-v1";

std::vector<fs::path> model_dirs() {
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(kModels))
    if (e.is_directory() && fs::exists(e.path() / "reference.json")) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  if (fs::exists(kTiny / "config.json")) dirs.push_back(kTiny);
  return dirs;
}

std::vector<int32_t> prompt_of(const fs::path& dir, int32_t vocab, int32_t n_random) {
  if (fs::exists(dir / "reference.json")) {
    std::ifstream f(dir / "reference.json");
    const nlohmann::json j = nlohmann::json::parse(f);
    return j["prompt_ids"].get<std::vector<int32_t>>();
  }
  std::mt19937 rng(7);
  std::vector<int32_t> p(static_cast<size_t>(n_random));
  for (int32_t& t : p) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
  return p;
}

double rel_err(std::span<const float> a, std::span<const float> b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// CPU logits of every position of `tokens` appended in the given chunks.
std::vector<float> cpu_logits(const Transformer& model, const std::vector<int32_t>& tokens,
                              const std::vector<int32_t>& chunks) {
  const KvLayout layout = model.kv_layout(16);
  const int64_t pages = (static_cast<int64_t>(tokens.size()) / 16 + 2) * layout.num_layers * layout.num_kv_heads;
  KvCacheManager m(layout, pages);
  CpuKvStorage st(layout, pages);
  const SeqId seq = m.add_sequence();
  std::vector<float> all, lg;
  ForwardOptions fo;
  fo.all_logits = true;
  size_t at = 0;
  for (int32_t c : chunks) {
    EXPECT_TRUE(model.forward(std::span<const int32_t>(tokens.data() + at, size_t(c)), {&m, &st, seq}, fo, &lg).is_ok());
    all.insert(all.end(), lg.begin(), lg.end());
    at += size_t(c);
  }
  return all;
}

constexpr double kLogitTol = 3e-2;  // bf16 weights and activations against the fp32 forward

TEST(CudaModel, LogitsAndGreedyMatchCpu) {
  SKIP_WITHOUT_DEVICE();
  for (const fs::path& dir : model_dirs()) {
    auto cpu = Transformer::load(dir.string());
    ASSERT_TRUE(cpu.has_value()) << cpu.status().message();
    const ModelConfig& c = (*cpu)->config();
    const std::vector<int32_t> prompt = prompt_of(dir, int32_t(c.vocab_size), 300);
    cuda::CudaModelOptions o;
    o.max_seqs = 2;
    o.max_step_tokens = 512;
    o.max_logit_rows = 512;
    o.num_pages = 4096;
    auto gpu = cuda::CudaModel::load(dir.string(), o);
    ASSERT_TRUE(gpu.has_value()) << gpu.status().message();
    // The whole prompt in one step, logits of every position.
    const std::vector<float> ref = cpu_logits(**cpu, prompt, {int32_t(prompt.size())});
    KvCacheManager m((*gpu)->kv_layout(), (*gpu)->num_pages());
    const SeqId seq = m.add_sequence();
    cuda::SeqStep s;
    s.seq = seq;
    s.tokens = prompt;
    s.all_logits = true;
    cuda::StepResult out;
    const Status st = (*gpu)->step({&s, 1}, m, true, &out);
    ASSERT_TRUE(st.is_ok()) << st.message();
    const double err = rel_err(out.logits, ref);
    int argmax_equal = 0;
    const size_t V = size_t(c.vocab_size);
    for (size_t t = 0; t < prompt.size(); ++t) {
      const auto a = std::span<const float>(out.logits).subspan(t * V, V);
      const auto b = std::span<const float>(ref).subspan(t * V, V);
      argmax_equal += std::max_element(a.begin(), a.end()) - a.begin() == std::max_element(b.begin(), b.end()) - b.begin();
    }
    std::printf("  %-16s logits rel err %.2e over %zu positions, argmax equal at %d\n", dir.filename().c_str(), err,
                prompt.size(), argmax_equal);
    EXPECT_LE(err, kLogitTol) << dir.filename();
    m.release(seq);
    (*gpu)->on_release(seq);

    // Greedy continuation, 16 tokens. Free-running, one near-tie sends the two precisions down
    // different paths, so the check is teacher-forced: at every step of the CPU's greedy path the
    // device must pick the CPU's token wherever the CPU's top-2 margin exceeds twice the largest
    // logit difference the two forwards show at that step (what bf16 can decide).
    GenerateOptions g;
    g.max_new_tokens = 16;
    g.ignore_eos = true;
    auto cpu_out = generate(**cpu, prompt, g, nullptr);
    auto gpu_out = cuda::generate(**gpu, prompt, g, nullptr);
    ASSERT_TRUE(cpu_out.has_value() && gpu_out.has_value());
    size_t free_run = 0;
    while (free_run < cpu_out->tokens.size() && free_run < gpu_out->tokens.size() &&
           cpu_out->tokens[free_run] == gpu_out->tokens[free_run])
      ++free_run;
    std::vector<int32_t> seqtoks = prompt;
    seqtoks.insert(seqtoks.end(), cpu_out->tokens.begin(), cpu_out->tokens.end());
    const std::vector<float> cref = cpu_logits(**cpu, seqtoks, {int32_t(seqtoks.size())});
    KvCacheManager m2((*gpu)->kv_layout(), (*gpu)->num_pages());
    const SeqId s2 = m2.add_sequence();
    cuda::SeqStep tf;
    tf.seq = s2;
    tf.tokens = seqtoks;
    tf.all_logits = true;
    ASSERT_TRUE((*gpu)->step({&tf, 1}, m2, true, &out).is_ok());
    int decided = 0, agree = 0;
    for (size_t i = 0; i < cpu_out->tokens.size(); ++i) {
      const size_t row = prompt.size() - 1 + i;  // logits that chose token i
      const auto a = std::span<const float>(out.logits).subspan(row * V, V);
      const auto b = std::span<const float>(cref).subspan(row * V, V);
      float top1 = -INFINITY, top2 = -INFINITY, maxdiff = 0;
      for (size_t v = 0; v < V; ++v) {
        maxdiff = std::max(maxdiff, std::abs(a[v] - b[v]));
        if (b[v] > top1) {
          top2 = top1;
          top1 = b[v];
        } else if (b[v] > top2) {
          top2 = b[v];
        }
      }
      const int32_t gpu_pick = int32_t(std::max_element(a.begin(), a.end()) - a.begin());
      if (top1 - top2 > 2 * maxdiff) {
        ++decided;
        agree += gpu_pick == cpu_out->tokens[i];
        EXPECT_EQ(gpu_pick, cpu_out->tokens[i]) << dir.filename() << " step " << i << ": margin " << top1 - top2
                                                << ", max logit difference " << maxdiff;
      }
    }
    std::printf("  %-16s greedy: free-running %zu of 16 equal; teacher-forced %d of %d decidable steps equal\n",
                dir.filename().c_str(), free_run, agree, decided);
    m2.release(s2);
    (*gpu)->on_release(s2);
  }
}

// Several sequences in one step must give what each gives alone: a decode token, a chunk over
// prior entries (the gather path), a fresh prompt; then a second step of decode tokens for all.
TEST(CudaModel, BatchedStepEqualsSingle) {
  SKIP_WITHOUT_DEVICE();
  for (const fs::path& dir : {kModels / "llama3", kModels / "qwen3", kTiny}) {
    if (!fs::exists(dir / "config.json")) continue;
    auto cpu = Transformer::load(dir.string());
    ASSERT_TRUE(cpu.has_value());
    const int32_t V = int32_t((*cpu)->config().vocab_size);
    cuda::CudaModelOptions o;
    o.max_seqs = 4;
    o.max_step_tokens = 512;
    o.max_logit_rows = 512;
    o.num_pages = 8192;
    auto gpu = cuda::CudaModel::load(dir.string(), o);
    ASSERT_TRUE(gpu.has_value()) << gpu.status().message();
    std::mt19937 rng(11);
    auto rand_tokens = [&](int n) {
      std::vector<int32_t> t(static_cast<size_t>(n));
      for (int32_t& x : t) x = int32_t(rng() % uint32_t(V));
      return t;
    };
    const std::vector<int32_t> a = rand_tokens(37), b = rand_tokens(70), cc = rand_tokens(45);
    KvCacheManager m((*gpu)->kv_layout(), (*gpu)->num_pages());
    const SeqId sa = m.add_sequence(), sb = m.add_sequence(), sc = m.add_sequence();
    cuda::StepResult out;
    // Step 1: a's first 36 tokens, b's first 50.
    cuda::SeqStep s1[2];
    s1[0].seq = sa;
    s1[0].tokens = std::span<const int32_t>(a.data(), 36);
    s1[1].seq = sb;
    s1[1].tokens = std::span<const int32_t>(b.data(), 50);
    ASSERT_TRUE((*gpu)->step(s1, m, false, &out).is_ok());
    // Step 2: a's last token (decode), b's last 20 (chunk over prior entries), c whole (fresh).
    cuda::SeqStep s2[3];
    s2[0].seq = sb;
    s2[0].tokens = std::span<const int32_t>(b.data() + 50, 20);
    s2[0].all_logits = true;
    s2[1].seq = sa;
    s2[1].tokens = std::span<const int32_t>(a.data() + 36, 1);
    s2[2].seq = sc;
    s2[2].tokens = cc;
    s2[2].all_logits = true;
    const Status st = (*gpu)->step(s2, m, true, &out);
    ASSERT_TRUE(st.is_ok()) << st.message();
    const size_t VV = size_t(V);
    const std::vector<float> rb = cpu_logits(**cpu, b, {50, 20}), ra = cpu_logits(**cpu, a, {36, 1}),
                             rc = cpu_logits(**cpu, cc, {45});
    const std::span<const float> got(out.logits);
    const double eb = rel_err(got.subspan(0, 20 * VV), std::span<const float>(rb).subspan(50 * VV, 20 * VV));
    const double ea = rel_err(got.subspan(20 * VV, VV), std::span<const float>(ra).subspan(36 * VV, VV));
    const double ec = rel_err(got.subspan(21 * VV, 45 * VV), rc);
    std::printf("  %-16s batched step: chunk over prior %.2e, decode %.2e, fresh %.2e\n", dir.filename().c_str(), eb, ea, ec);
    EXPECT_LE(eb, kLogitTol);
    EXPECT_LE(ea, kLogitTol);
    EXPECT_LE(ec, kLogitTol);
  }
}

// Device compression (ada-snapkv, pyramidkv) on adakv-tiny-v1: the GPU's keep lists are exactly
// plan_layer's on the GPU's scores, and equal plan_layer(compute_layer_scores) of the host on the
// same bf16 queries and keys except where near-ties explain a difference; the manager holds what
// the keep lists say, and decoding continues on the compacted pool.
TEST(CudaModel, CompressionKeepSetsMatchHostPolicy) {
  SKIP_WITHOUT_DEVICE();
  if (!fs::exists(kTiny / "config.json")) GTEST_SKIP() << "models/adakv-tiny-v1 missing";
  for (const char* policy : {"ada-snapkv", "pyramidkv", "snapkv", "ada-pyramidkv"}) {
    CompressConfig cc;
    cc.policy = parse_kv_policy(policy).value();
    cc.budget = 96;
    cc.window = 16;
    cuda::CudaModelOptions o;
    o.max_seqs = 1;
    o.max_step_tokens = 1024;
    o.num_pages = 4096;
    o.compress = &cc;
    o.audit_compression = true;
    auto gpu = cuda::CudaModel::load(kTiny.string(), o);
    ASSERT_TRUE(gpu.has_value()) << gpu.status().message();
    const ModelConfig& c = (*gpu)->config();
    const std::vector<int32_t> prompt = prompt_of(kTiny, int32_t(c.vocab_size), 700);
    KvCacheManager m((*gpu)->kv_layout(), (*gpu)->num_pages());
    const SeqId seq = m.add_sequence();
    cuda::SeqStep s;
    s.seq = seq;
    s.tokens = prompt;
    s.compress = true;
    cuda::StepResult out;
    const Status st = (*gpu)->step({&s, 1}, m, false, &out);
    ASSERT_TRUE(st.is_ok()) << st.message();
    const auto& audit = (*gpu)->compression_audit();
    ASSERT_EQ(audit.size(), size_t(c.num_layers));
    const int32_t H = int32_t(c.num_heads), Hkv = int32_t(c.num_kv_heads), d = int32_t(c.head_dim);
    int64_t kept = 0, differ = 0, near_tie = 0;
    for (const cuda::CompressionAuditLayer& a : audit) {
      const int32_t L = a.length, n = L - cc.window;
      LayerScores gs;
      gs.lengths.assign(size_t(Hkv), L);
      for (int32_t h = 0; h < Hkv; ++h)
        gs.scores.emplace_back(a.scores.begin() + long(h) * n, a.scores.begin() + long(h + 1) * n);
      const LayerPlan gplan = plan_layer(cc, a.layer, a.selection_budget, gs);
      for (int32_t h = 0; h < Hkv; ++h) {
        EXPECT_EQ(a.keep[size_t(h)], gplan.keep[size_t(h)]) << policy << " layer " << a.layer << " head " << h
                                                           << ": device selection differs from plan_layer";
        EXPECT_EQ(m.length(seq, a.layer, h), int32_t(a.keep[size_t(h)].size()));
      }
      // The host policy on the same bf16 inputs.
      std::vector<float> q(a.queries.size()), k(a.keys.size());
      for (size_t i = 0; i < q.size(); ++i) q[i] = bf16_to_f32(a.queries[i]);
      for (size_t i = 0; i < k.size(); ++i) k[i] = bf16_to_f32(a.keys[i]);
      LayerTensors t;
      t.num_heads = H;
      t.num_kv_heads = Hkv;
      t.head_dim = d;
      t.queries = q.data();
      t.num_queries = cc.window;
      t.lengths.assign(size_t(Hkv), L);
      for (int32_t h = 0; h < Hkv; ++h) t.keys.push_back(k.data() + size_t(h) * d);
      t.kv_stride = int64_t{Hkv} * d;
      auto hs = compute_layer_scores(cc, a.layer, t);
      ASSERT_TRUE(hs.has_value()) << hs.status().message();
      const LayerPlan hplan = plan_layer(cc, a.layer, a.selection_budget, *hs);
      for (int32_t h = 0; h < Hkv; ++h) {
        const auto& gk = a.keep[size_t(h)];
        const auto& hk = hplan.keep[size_t(h)];
        kept += int64_t(hk.size());
        std::vector<int32_t> sym;
        std::set_symmetric_difference(gk.begin(), gk.end(), hk.begin(), hk.end(), std::back_inserter(sym));
        differ += int64_t(sym.size());
        // A difference is a near-tie when its host score is within 1e-4 relative of the host's
        // selection threshold for that head.
        if (!sym.empty()) {
          const std::vector<float>& sc = (*hs).scores[size_t(h)];
          float thr = INFINITY;
          for (int32_t j : hk)
            if (j < n) thr = std::min(thr, sc[size_t(j)]);
          for (int32_t j : sym)
            near_tie += std::abs(sc[size_t(j)] - thr) <= 1e-4f * std::max(std::abs(thr), 1e-12f);
        }
      }
    }
    std::printf("  %-14s keep sets: %lld entries kept over %d layers; device vs host policy on the same inputs: %lld "
                "differ (%lld near-ties)\n",
                policy, static_cast<long long>(kept), int(audit.size()), static_cast<long long>(differ),
                static_cast<long long>(near_tie));
    EXPECT_EQ(differ, near_tie) << policy << ": keep-set differences not explained by near-ties";
    // Decode on the compacted pool continues (no NaN, finite logits).
    const int32_t next = 5;
    cuda::SeqStep d1;
    d1.seq = seq;
    d1.tokens = std::span<const int32_t>(&next, 1);
    ASSERT_TRUE((*gpu)->step({&d1, 1}, m, true, &out).is_ok());
    for (float v : out.logits) ASSERT_TRUE(std::isfinite(v));
  }
}

// StreamingLLM and ada-snapkv through cuda::generate against the CPU generate: the cache holds as
// many entries on both sides after prefill and periodic compression; greedy agreement is printed.
TEST(CudaModel, CompressedGenerateMatchesCpu) {
  SKIP_WITHOUT_DEVICE();
  if (!fs::exists(kTiny / "config.json")) GTEST_SKIP() << "models/adakv-tiny-v1 missing";
  auto cpu = Transformer::load(kTiny.string());
  ASSERT_TRUE(cpu.has_value());
  const std::vector<int32_t> prompt = prompt_of(kTiny, int32_t((*cpu)->config().vocab_size), 400);
  for (const char* policy : {"streamingllm", "ada-snapkv"}) {
    CompressConfig cc;
    cc.policy = parse_kv_policy(policy).value();
    cc.budget = 128;
    cc.interval = 4;
    cuda::CudaModelOptions o;
    o.max_seqs = 1;
    o.max_step_tokens = 1024;
    o.num_pages = 4096;
    o.compress = &cc;
    auto gpu = cuda::CudaModel::load(kTiny.string(), o);
    ASSERT_TRUE(gpu.has_value()) << gpu.status().message();
    GenerateOptions g;
    g.max_new_tokens = 12;
    g.ignore_eos = true;
    g.compress = &cc;
    auto a = generate(**cpu, prompt, g, nullptr);
    auto b = cuda::generate(**gpu, prompt, g, nullptr);
    ASSERT_TRUE(a.has_value() && b.has_value()) << (b.has_value() ? "" : b.status().message());
    int same = 0;
    for (size_t i = 0; i < std::min(a->tokens.size(), b->tokens.size()); ++i) same += a->tokens[i] == b->tokens[i];
    std::printf("  %-14s greedy after compression: %d of %zu tokens equal; kv entries cpu %lld gpu %lld\n", policy, same,
                a->tokens.size(), static_cast<long long>(a->stats.kv.entries), static_cast<long long>(b->stats.kv.entries));
    EXPECT_EQ(a->stats.kv.entries, b->stats.kv.entries) << policy;
    // Tokens are reported, not required: after compression the two precisions see different
    // near-ties (ada-snapkv may even keep different entries), and a greedy path diverges at the first.
  }
}

}  // namespace
}  // namespace adakv

#else  // built without CUDA

TEST(CudaModel, NeedsCuda) { GTEST_SKIP() << "adakv was built without CUDA: GPU tests skipped"; }

#endif  // ADAKV_HAVE_CUDA
