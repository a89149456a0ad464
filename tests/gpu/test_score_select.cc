// Scoring, selection and compaction on the GPU (src/backends/cuda/score_*, select_*, compact_*)
// against the host implementation in src/compress and src/kv, on fresh random inputs every run
// (seed printed; ADAKV_TEST_SEED reproduces a run):
//   (a) GPU selection on host-computed scores == plan_layer exactly: uniform, Ada-KV (alpha 0 .. 1),
//       CriticalKV two-stage, L <= w, B >= L, Bs of 0, 1, 2, scores full of ties and plateaus;
//   (b) GPU scores vs compute_layer_scores (fp64) within 1e-5 relative, element by element:
//       SnapKV (mean | max over the group, max | avg pooling, kernel 7 | 5 | 3 | 1), the KV-Compress
//       metric, CriticalKV's crit; L in {20, 40, 100, 300, 333, 4096}, w 32 | 8 | 7 | 48, g 1 | 3 | 4,
//       d 64 | 128, several row chunks (g * w > 128);
//   (c) the whole pipeline: GPU scores -> GPU selection equals plan_layer on those scores exactly,
//       and differs from plan_layer on the host's scores only where near-ties (3e-5 relative)
//       explain every difference (counted and printed);
//   compaction: the pool after compact_kv_rows is bit-identical to CpuKvStorage-style application of
//       KvCacheManager::keep_entries' moves, over rows of many lengths and fragmented page tables,
//       for separate and interleaved K/V pools.
// Without a CUDA device every check skips with a message. Built with GoogleTest, or with its own
// main() (ADAKV_PLAIN_TEST_MAIN) where GoogleTest's libraries are missing.
#include "gpu_check_harness.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#if ADAKV_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <numeric>
#include <random>
#include <span>
#include <sstream>
#include <stdexcept>

#include "backends/cuda/compact_kv.h"
#include "backends/cuda/metric_kv.h"
#include "backends/cuda/paged_kv_view.h"
#include "backends/cuda/score_critical.h"
#include "backends/cuda/score_window.h"
#include "backends/cuda/select_keep.h"
#include "compress/kvcompress.h"
#include "compress/policy.h"
#include "compress/scorers.h"
#include "core/dtype.h"
#include "kv/kv_cache_manager.h"

namespace {

using namespace adakv;
using adakv::cuda::kPageSize;

uint64_t test_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* s = std::getenv("ADAKV_TEST_SEED")) return std::strtoull(s, nullptr, 10);
    return (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  }();
  return seed;
}

// Longest prompt the score checks use (a slow device emulator may lower it).
int32_t max_test_length() {
  if (const char* s = std::getenv("ADAKV_SCORE_TEST_MAX_LEN")) return std::atoi(s);
  return 1 << 30;
}

std::string gpu_unavailable() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no CUDA device (cudaGetDeviceCount: ") + cudaGetErrorName(err) + ")";
  }
  return n == 0 ? "no CUDA device" : "";
}

#define CHECK_CUDA(expr)                                                                              \
  do {                                                                                                \
    const cudaError_t e_ = (expr);                                                                    \
    if (e_ != cudaSuccess) throw std::runtime_error(std::string(#expr) + ": " + cudaGetErrorName(e_)); \
  } while (0)
#define CHECK_STATUS(expr)                                                  \
  do {                                                                      \
    const Status s_ = (expr);                                               \
    if (!s_.is_ok()) throw std::runtime_error(#expr ": " + s_.message());   \
  } while (0)

// Device array with RAII; contents poisoned (0xFF bytes: NaN floats, -1 ints) on allocation.
template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)));
    CHECK_CUDA(cudaMemset(ptr, 0xFF, std::max<size_t>(1, n) * sizeof(T)));
  }
  explicit DeviceArray(const std::vector<T>& v) : DeviceArray(v.size()) { upload(v); }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  void upload(const std::vector<T>& v) {
    CHECK_CUDA(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> v(n);
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaMemcpy(v.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

// Runs a check body, turning exceptions (CUDA failures) into failures and skipping without a GPU.
CheckResult guarded(const std::function<CheckResult()>& body) {
  if (std::string why = gpu_unavailable(); !why.empty()) return {true, why, ""};
  CheckResult r;
  try {
    r = body();
  } catch (const std::exception& e) {
    r = {false, e.what(), ""};
  }
  if (!r.skipped && !r.message.empty()) r.message += " (seed " + std::to_string(test_seed()) + ")";
  return r;
}

// bf16 values on the device side and the same values as fp32 for the host reference.
struct Bf16Tensor {
  std::vector<uint16_t> bits;
  std::vector<float> f32;
};
Bf16Tensor random_bf16(size_t n, float stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, stddev);
  Bf16Tensor t;
  t.bits.resize(n);
  t.f32.resize(n);
  for (size_t i = 0; i < n; ++i) {
    t.bits[i] = f32_to_bf16(dist(rng));
    t.f32[i] = bf16_to_f32(t.bits[i]);
  }
  return t;
}
const __nv_bfloat16* as_bf16(const DeviceArray<uint16_t>& a) { return reinterpret_cast<const __nv_bfloat16*>(a.ptr); }

CompressConfig config_for(bool adaptive, bool two_stage, int32_t window, double alpha) {
  CompressConfig c;
  c.policy = two_stage ? (adaptive ? KvPolicy::kAdaCriticalKv : KvPolicy::kCriticalKv)
                       : (adaptive ? KvPolicy::kAdaSnapKv : KvPolicy::kSnapKv);
  c.window = window;
  c.alpha = alpha;
  return c;
}

struct GpuPlan {
  std::vector<std::vector<int32_t>> keep;  // [Hkv] kept entries
  std::vector<int32_t> budgets, counts;
};

// Runs the GPU selection on device scores [Hkv][stride] and downloads the result.
GpuPlan gpu_select(cuda::KeepSelector& sel, const float* d_scores, int64_t stride, const float* d_crit, int32_t L,
                   int32_t w, int32_t bs, const CompressConfig& c) {
  const int32_t hkv = sel.options().num_kv_heads;
  DeviceArray<int32_t> keep(static_cast<size_t>(hkv) * L), keep_counts(hkv), budgets(hkv), counts(hkv);
  cuda::SelectInputs in;
  in.scores = d_scores;
  in.scores_stride = stride;
  in.crit = d_crit;
  in.crit_stride = stride;
  in.length = L;
  in.window = w;
  in.selection_budget = bs;
  in.adaptive = policy_is_adaptive(c.policy);
  in.alpha = c.alpha;
  in.two_stage = policy_is_two_stage(c.policy);
  cuda::SelectOutputs out{keep.ptr, L, keep_counts.ptr, budgets.ptr, counts.ptr};
  CHECK_STATUS(sel.select(in, out, nullptr));
  const std::vector<int32_t> k = keep.download(), kc = keep_counts.download();
  GpuPlan g;
  g.budgets = budgets.download();
  g.counts = counts.download();
  for (int32_t h = 0; h < hkv; ++h) {
    if (kc[h] < 0 || kc[h] > L) throw std::runtime_error("keep count out of range");
    g.keep.emplace_back(k.begin() + static_cast<int64_t>(h) * L, k.begin() + static_cast<int64_t>(h) * L + kc[h]);
  }
  return g;
}

// "" when the GPU plan equals the host plan exactly.
std::string plan_mismatch(const GpuPlan& g, const LayerPlan& p, bool adaptive) {
  std::ostringstream err;
  for (size_t h = 0; h < p.keep.size(); ++h) {
    if (g.budgets[h] != p.budgets[h]) err << "head " << h << " budget " << g.budgets[h] << " != " << p.budgets[h] << "; ";
    if (adaptive && g.counts[h] != p.counts[h]) err << "head " << h << " c_h " << g.counts[h] << " != " << p.counts[h] << "; ";
    if (g.keep[h] != p.keep[h]) {
      err << "head " << h << " keep lists differ (sizes " << g.keep[h].size() << " / " << p.keep[h].size() << ")";
      for (size_t i = 0; i < std::min(g.keep[h].size(), p.keep[h].size()); ++i)
        if (g.keep[h][i] != p.keep[h][i]) {
          err << " first at " << i << ": " << g.keep[h][i] << " vs " << p.keep[h][i];
          break;
        }
      err << "; ";
    }
  }
  return err.str();
}

// Scores with many exact ties: a few distinct levels, max-pooled plateaus, continuous values, tiny
// values, or signed values with +0 and -0 (which tie under the host's float comparison).
std::vector<float> tied_scores(int32_t n, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> kind_dist(0, 4);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> s(static_cast<size_t>(n));
  const int kind = kind_dist(rng);
  const int levels = 1 + static_cast<int>(u(rng) * 12);
  for (auto& v : s) {
    if (kind == 0) {
      v = std::floor(u(rng) * levels) / levels;
    } else if (kind == 4) {
      const float x = u(rng);
      v = x < 0.2f ? 0.0f : x < 0.4f ? -0.0f : std::floor((2.0f * u(rng) - 1.0f) * levels) / levels;
    } else {
      v = u(rng) * (kind == 3 ? 1e-3f : 1.0f);
    }
  }
  if (kind == 1) {  // plateaus as max pooling makes them
    std::vector<double> d(s.begin(), s.end());
    s = to_float(pool_1d(d, PoolKind::kMax, 7));
  }
  return s;
}

// --- (a) selection on host scores ------------------------------------------------------------------

CheckResult check_selection_host_scores() {
  std::mt19937_64 rng(test_seed() ^ 0xA11CEull);
  const int32_t max_len = 700;
  int cases = 0, compressed = 0;
  for (int32_t hkv : {1, 2, 3, 8}) {
    auto sel = cuda::KeepSelector::create({hkv, max_len});
    if (!sel) return {false, sel.status().message(), ""};
    DeviceArray<float> d_scores(static_cast<size_t>(hkv) * max_len), d_crit(static_cast<size_t>(hkv) * max_len);
    for (int trial = 0; trial < 60; ++trial) {
      std::uniform_int_distribution<int32_t> len_dist(1, max_len);
      const int32_t w = trial % 3 == 0 ? 8 : 32;
      const int32_t L = trial % 10 == 0 ? std::uniform_int_distribution<int32_t>(1, w)(rng) : len_dist(rng);
      const int32_t n = std::max(0, L - w);
      const int32_t bs_choices[] = {0, 1, 2, n / 3, n / 2, n - 1, n, n + 5, std::uniform_int_distribution<int32_t>(0, n + 1)(rng)};
      const int32_t bs = bs_choices[trial % 9];
      const bool adaptive = trial % 2 == 0;
      const bool two_stage = trial % 4 >= 2;
      const double alphas[] = {0.2, 0.0, 0.5, 1.0, 0.37};
      const double alpha = alphas[trial % 5];
      LayerScores s;
      s.lengths.assign(static_cast<size_t>(hkv), L);
      const int64_t stride = n + 3;  // a padded stride, as a caller's scores buffer may have
      std::vector<float> flat_s(static_cast<size_t>(hkv * stride), 7.0f), flat_c(flat_s.size(), 7.0f);
      for (int32_t h = 0; h < hkv; ++h) {
        s.scores.push_back(tied_scores(n, rng));
        s.crit.push_back(tied_scores(n, rng));
        std::copy(s.scores[h].begin(), s.scores[h].end(), flat_s.begin() + h * stride);
        std::copy(s.crit[h].begin(), s.crit[h].end(), flat_c.begin() + h * stride);
      }
      if (!two_stage) s.crit.clear();
      CHECK_CUDA(cudaMemcpy(d_scores.ptr, flat_s.data(), flat_s.size() * 4, cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(d_crit.ptr, flat_c.data(), flat_c.size() * 4, cudaMemcpyHostToDevice));
      const CompressConfig c = config_for(adaptive, two_stage, w, alpha);
      const LayerPlan p = plan_layer(c, 0, bs, s);
      const GpuPlan g = gpu_select(**sel, d_scores.ptr, stride, d_crit.ptr, L, w, bs, c);
      const std::string bad = plan_mismatch(g, p, adaptive);
      ++cases;
      compressed += p.compressed ? 1 : 0;
      if (!bad.empty()) {
        std::ostringstream err;
        err << "Hkv " << hkv << " L " << L << " w " << w << " Bs " << bs << " adaptive " << adaptive << " two-stage "
            << two_stage << " alpha " << alpha << ": " << bad;
        return {false, err.str(), ""};
      }
    }
  }
  std::ostringstream info;
  info << cases << " layers (" << compressed << " compressing) identical to plan_layer; seed " << test_seed();
  return {false, "", info.str()};
}

// --- (b) scores ----------------------------------------------------------------------------------

struct ScoreShape {
  int32_t L, w, H, hkv, d;
  GqaReduce gqa;
  PoolKind pool;
  int32_t kernel;
};

const std::vector<ScoreShape>& score_shapes() {
  static const std::vector<ScoreShape> shapes = {
      {40, 32, 8, 2, 128, GqaReduce::kMean, PoolKind::kMax, 7},    {40, 8, 4, 4, 64, GqaReduce::kMax, PoolKind::kAvg, 7},
      {333, 32, 8, 2, 64, GqaReduce::kMean, PoolKind::kAvg, 7},    {333, 8, 4, 4, 128, GqaReduce::kMean, PoolKind::kMax, 1},
      {333, 32, 16, 4, 128, GqaReduce::kMax, PoolKind::kMax, 7},   {4096, 32, 8, 2, 128, GqaReduce::kMean, PoolKind::kMax, 7},
      {4096, 8, 4, 4, 64, GqaReduce::kMean, PoolKind::kAvg, 1},    {300, 48, 12, 2, 64, GqaReduce::kMean, PoolKind::kMax, 5},
      {100, 7, 3, 1, 128, GqaReduce::kMax, PoolKind::kMax, 3},     {20, 32, 8, 2, 64, GqaReduce::kMean, PoolKind::kMax, 7},
  };
  return shapes;
}

// One layer's random inputs, on the device and on the host.
struct LayerData {
  ScoreShape sh;
  int32_t wq;  // queries held: min(w, L)
  Bf16Tensor q, k, v;
  std::vector<float> o_proj_f32;
  std::vector<uint16_t> o_proj_bits;
  int32_t hidden = 0;
};

LayerData make_layer(const ScoreShape& sh, int32_t hidden, std::mt19937_64& rng) {
  LayerData x;
  x.sh = sh;
  x.wq = std::min(sh.w, sh.L);
  // Logits with standard deviation 2, and every 17th key twice as long (heavy hitters).
  x.q = random_bf16(static_cast<size_t>(x.wq) * sh.H * sh.d, 2.0f, rng);
  x.k = random_bf16(static_cast<size_t>(sh.L) * sh.hkv * sh.d, 1.0f, rng);
  for (size_t i = 0; i < x.k.bits.size(); ++i)
    if ((i / static_cast<size_t>(sh.hkv * sh.d)) % 17 == 3) {
      x.k.bits[i] = f32_to_bf16(2.0f * x.k.f32[i]);
      x.k.f32[i] = bf16_to_f32(x.k.bits[i]);
    }
  x.v = random_bf16(static_cast<size_t>(sh.L) * sh.hkv * sh.d, 1.0f, rng);
  if (hidden > 0) {
    const Bf16Tensor w = random_bf16(static_cast<size_t>(hidden) * sh.H * sh.d, 0.05f, rng);
    x.o_proj_bits = w.bits;
    x.o_proj_f32 = w.f32;
    x.hidden = hidden;
  }
  return x;
}

LayerTensors host_tensors(const LayerData& x) {
  LayerTensors t;
  t.num_heads = x.sh.H;
  t.num_kv_heads = x.sh.hkv;
  t.head_dim = x.sh.d;
  t.queries = x.q.f32.data();
  t.num_queries = x.wq;
  t.kv_stride = static_cast<int64_t>(x.sh.hkv) * x.sh.d;
  for (int32_t h = 0; h < x.sh.hkv; ++h) {
    t.lengths.push_back(x.sh.L);
    t.keys.push_back(x.k.f32.data() + static_cast<size_t>(h) * x.sh.d);
    t.values.push_back(x.v.f32.data() + static_cast<size_t>(h) * x.sh.d);
  }
  if (x.hidden > 0) {
    t.o_proj = x.o_proj_f32.data();
    t.hidden_size = x.hidden;
  }
  return t;
}

// Largest |gpu - host| / |host| over [Hkv][n] (gpu rows `stride` apart); NaN counts as infinite.
double max_rel_error(const std::vector<float>& gpu, int64_t stride, const HeadScores& host) {
  double worst = 0.0;
  for (size_t h = 0; h < host.size(); ++h)
    for (size_t j = 0; j < host[h].size(); ++j) {
      const double a = gpu[h * static_cast<size_t>(stride) + j], b = host[h][j];
      const double e = std::isfinite(a) ? std::abs(a - b) / std::max(std::abs(b), 1e-30) : INFINITY;
      worst = std::max(worst, e);
    }
  return worst;
}

CheckResult check_scores() {
  std::mt19937_64 rng(test_seed() ^ 0x5C0AEull);
  constexpr double kTol = 3e-5;  // tensor-core logits (score_mma.cuh)
  std::ostringstream info;
  double worst_snap = 0, worst_kvc = 0, worst_crit = 0;
  int shapes = 0;
  for (const ScoreShape& sh : score_shapes()) {
    if (sh.L > max_test_length()) continue;
    const bool critical = sh.L == 333 || sh.L == 100;  // CriticalKV on two shapes (hidden 192: a partial tile)
    const LayerData x = make_layer(sh, critical ? 192 : 0, rng);
    auto scorer = cuda::WindowScorer::create({sh.H, sh.hkv, sh.d, sh.L, sh.w});
    if (!scorer) return {false, scorer.status().message(), ""};
    DeviceArray<uint16_t> dq(x.q.bits), dk(x.k.bits), dv(x.v.bits);
    cuda::WindowScoreInputs in{as_bf16(dq), 0, as_bf16(dk), 0, sh.L, x.wq};
    const LayerTensors t = host_tensors(x);
    std::ostringstream where;
    where << "L " << sh.L << " w " << sh.w << " H " << sh.H << " Hkv " << sh.hkv << " d " << sh.d << " gqa "
          << gqa_reduce_name(sh.gqa) << " pool " << pool_kind_name(sh.pool) << " k " << sh.kernel << ": ";
    // KV-Compress metric, every shape (w = min(w, L)).
    {
      CompressConfig c;
      c.policy = KvPolicy::kKvCompress;
      c.window = sh.w;
      c.pool = sh.pool;
      c.pool_kernel = sh.kernel;
      auto host = compute_layer_scores(c, 0, t);
      if (!host) return {false, where.str() + host.status().message(), ""};
      const int64_t stride = sh.L + 5;
      DeviceArray<float> out(static_cast<size_t>(sh.hkv) * stride);
      CHECK_STATUS((*scorer)->kvcompress_metric(in, sh.pool, sh.kernel, out.ptr, stride, nullptr));
      const double e = max_rel_error(out.download(), stride, host->metric);
      worst_kvc = std::max(worst_kvc, e);
      if (!(e <= kTol)) return {false, where.str() + "KV-Compress metric relative error " + std::to_string(e), ""};
    }
    if (sh.L <= sh.w) continue;  // SnapKV scores nothing
    CompressConfig c = config_for(false, critical, sh.w, 0.2);
    c.gqa = sh.gqa;
    c.pool = sh.pool;
    c.pool_kernel = sh.kernel;
    auto host = compute_layer_scores(c, 0, t);
    if (!host) return {false, where.str() + host.status().message(), ""};
    const int32_t n = sh.L - sh.w;
    DeviceArray<float> out(static_cast<size_t>(sh.hkv) * n);
    CHECK_STATUS((*scorer)->snapkv(in, sh.gqa, sh.pool, sh.kernel, out.ptr, n, nullptr));
    const double e = max_rel_error(out.download(), n, host->scores);
    worst_snap = std::max(worst_snap, e);
    if (!(e <= kTol)) return {false, where.str() + "SnapKV relative error " + std::to_string(e), ""};
    if (critical) {
      DeviceArray<uint16_t> dw(x.o_proj_bits);
      DeviceArray<float> crit(static_cast<size_t>(sh.hkv) * n);
      cuda::CriticalInputs ci{as_bf16(dv), 0, as_bf16(dw), x.hidden, sh.H, sh.hkv, sh.d, n, out.ptr, n};
      CHECK_STATUS(cuda::critical_scores(ci, crit.ptr, n, nullptr, 0, nullptr));
      const double ec = max_rel_error(crit.download(), n, host->crit);
      worst_crit = std::max(worst_crit, ec);
      if (!(ec <= kTol)) return {false, where.str() + "CriticalKV relative error " + std::to_string(ec), ""};
    }
    ++shapes;
  }
  info << shapes << " shapes; max relative error: SnapKV " << worst_snap << ", KV-Compress " << worst_kvc
       << ", CriticalKV " << worst_crit << " (limit 3e-5); seed " << test_seed();
  return {false, "", info.str()};
}

// --- (c) the pipeline ------------------------------------------------------------------------------

// Whether every difference between the host's plan on its own scores (a) and on the GPU's scores
// (b) is explained by near-ties of the host scores; counts what it saw. "" when explained.
struct DiffStats {
  int layers = 0, layers_differing = 0, entries_differing = 0, swaps = 0, cascades = 0;
};
std::string explain_differences(const LayerScores& s, const LayerPlan& a, const LayerPlan& b, double tol, DiffStats& st) {
  ++st.layers;
  struct Entry {
    int32_t h, j;
  };
  std::vector<Entry> only_a, only_b;
  for (size_t h = 0; h < a.keep.size(); ++h) {
    std::vector<int32_t> x, y;
    std::set_difference(a.keep[h].begin(), a.keep[h].end(), b.keep[h].begin(), b.keep[h].end(), std::back_inserter(x));
    std::set_difference(b.keep[h].begin(), b.keep[h].end(), a.keep[h].begin(), a.keep[h].end(), std::back_inserter(y));
    for (int32_t j : x) only_a.push_back({static_cast<int32_t>(h), j});
    for (int32_t j : y) only_b.push_back({static_cast<int32_t>(h), j});
  }
  if (only_a.empty() && only_b.empty()) return "";
  ++st.layers_differing;
  st.entries_differing += static_cast<int>(only_a.size() + only_b.size());
  auto near = [&](double x, double y) { return std::abs(x - y) <= tol * std::max(std::abs(x), std::abs(y)); };
  auto near_entries = [&](const Entry& x, const Entry& y) {
    if (near(s.scores[x.h][x.j], s.scores[y.h][y.j])) return true;
    return !s.crit.empty() && near(s.crit[x.h][x.j], s.crit[y.h][y.j]);
  };
  // Swaps: every entry only one plan kept pairs with a near-equal entry only the other kept.
  if (only_a.size() == only_b.size()) {
    std::vector<bool> used(only_b.size(), false);
    bool all = true;
    for (const Entry& x : only_a) {
      bool found = false;
      for (size_t i = 0; i < only_b.size() && !found; ++i)
        if (!used[i] && near_entries(x, only_b[i])) used[i] = found = true;
      all = all && found;
    }
    if (all) {
      st.swaps += static_cast<int>(only_a.size());
      return "";
    }
  }
  // Cascades: a near-tie at a selection boundary changes one choice, and later choices follow
  // from it (CriticalKV's second stage picks among what the first left; Ada-KV's c_h and fix-up
  // move budgets between heads). Accepted when every head that differs has a near-tie at its own
  // boundary (ranks t - 1 and t of the host's S, t = its B_h, or floor(B_h / 2) with two stages),
  // or, when budgets moved, at the global top-(Hkv * Bs) boundary or among the heads' boundaries.
  const bool two_stage = !s.crit.empty();
  std::vector<std::vector<int32_t>> rank(s.scores.size());
  for (size_t h = 0; h < s.scores.size(); ++h) rank[h] = rank_descending(s.scores[h]);
  auto boundary_tie = [&](size_t h, int32_t bh) {
    const int32_t t = two_stage ? bh / 2 : bh;
    const int32_t n = static_cast<int32_t>(rank[h].size());
    return t >= 1 && t < n && near(s.scores[h][rank[h][t - 1]], s.scores[h][rank[h][t]]);
  };
  bool explained = true;
  for (size_t h = 0; h < a.keep.size(); ++h)
    if (a.keep[h] != b.keep[h]) explained = explained && (boundary_tie(h, a.budgets[h]) || boundary_tie(h, b.budgets[h]));
  if (!explained && a.budgets != b.budgets && !a.counts.empty()) {
    std::vector<double> boundary;  // host scores at ranks B_h - 1 and B_h of every head, both plans
    std::vector<float> all;
    for (size_t h = 0; h < s.scores.size(); ++h) {
      for (int32_t bh : {a.budgets[h], b.budgets[h]})
        for (int32_t r : {bh - 1, bh})
          if (r >= 0 && r < static_cast<int32_t>(rank[h].size())) boundary.push_back(s.scores[h][rank[h][r]]);
      all.insert(all.end(), s.scores[h].begin(), s.scores[h].end());
    }
    std::sort(all.begin(), all.end(), std::greater<float>());
    const int64_t k = static_cast<int64_t>(s.scores.size()) * b.selection_budget;
    explained = k >= 1 && k < static_cast<int64_t>(all.size()) && near(all[k - 1], all[k]);
    std::sort(boundary.begin(), boundary.end());
    for (size_t i = 1; i < boundary.size() && !explained; ++i)
      explained = boundary[i] != boundary[i - 1] && near(boundary[i], boundary[i - 1]);
  }
  if (explained) {
    ++st.cascades;
    return "";
  }
  std::ostringstream err;
  err << only_a.size() << " entries kept only on host scores, " << only_b.size()
      << " only on GPU scores, not explained by near-ties (first: head " << (only_a.empty() ? -1 : only_a[0].h)
      << " entry " << (only_a.empty() ? -1 : only_a[0].j) << ")";
  return err.str();
}

CheckResult check_pipeline() {
  std::mt19937_64 rng(test_seed() ^ 0x919E11ull);
  constexpr double kTieTol = 3e-5;
  DiffStats st;
  int exact = 0;
  for (const ScoreShape& sh : score_shapes()) {
    if (sh.L > max_test_length() || sh.L <= sh.w) continue;
    const bool critical = sh.L == 333;
    const LayerData x = make_layer(sh, critical ? 128 : 0, rng);
    const int32_t n = sh.L - sh.w;
    auto scorer = cuda::WindowScorer::create({sh.H, sh.hkv, sh.d, sh.L, sh.w});
    auto sel = cuda::KeepSelector::create({sh.hkv, sh.L});
    if (!scorer || !sel) return {false, "create failed", ""};
    DeviceArray<uint16_t> dq(x.q.bits), dk(x.k.bits), dv(x.v.bits);
    DeviceArray<float> d_scores(static_cast<size_t>(sh.hkv) * n), d_crit(static_cast<size_t>(sh.hkv) * n);
    const cuda::WindowScoreInputs in{as_bf16(dq), 0, as_bf16(dk), 0, sh.L, sh.w};
    CHECK_STATUS((*scorer)->snapkv(in, sh.gqa, sh.pool, sh.kernel, d_scores.ptr, n, nullptr));
    const std::vector<float> g_scores = d_scores.download();
    const LayerTensors t = host_tensors(x);
    for (int policy = 0; policy < (critical ? 4 : 3); ++policy) {
      // 0 snapkv, 1 ada-snapkv, 2 ada-pyramidkv (last layer of 32), 3 ada-criticalkv
      const bool adaptive = policy >= 1;
      const bool two_stage = policy == 3;
      CompressConfig c = config_for(adaptive, two_stage, sh.w, 0.2);
      if (policy == 2) c.policy = KvPolicy::kAdaPyramidKv;
      c.gqa = sh.gqa;
      c.pool = sh.pool;
      c.pool_kernel = sh.kernel;
      auto host = compute_layer_scores(c, 0, t);
      if (!host) return {false, host.status().message(), ""};
      LayerScores gs;  // the GPU's scores in the host's form
      gs.lengths = host->lengths;
      std::vector<float> g_crit;
      if (two_stage) {
        DeviceArray<uint16_t> dw(x.o_proj_bits);
        const cuda::CriticalInputs ci{as_bf16(dv), 0, as_bf16(dw), x.hidden, sh.H, sh.hkv, sh.d, n, d_scores.ptr, n};
        CHECK_STATUS(cuda::critical_scores(ci, d_crit.ptr, n, nullptr, 0, nullptr));
        g_crit = d_crit.download();
      }
      for (int32_t h = 0; h < sh.hkv; ++h) {
        gs.scores.emplace_back(g_scores.begin() + h * n, g_scores.begin() + (h + 1) * n);
        if (two_stage) gs.crit.emplace_back(g_crit.begin() + h * n, g_crit.begin() + (h + 1) * n);
      }
      for (int32_t budget : {sh.w + 1, sh.w + 2, sh.w + std::max(1, n / 5), sh.w + n / 2, sh.L, sh.L + 7}) {
        c.budget = budget;
        const int32_t bs = layer_selection_budget(c, 32, policy == 2 ? 31 : 0, sh.L);
        const LayerPlan on_host = plan_layer(c, 0, bs, *host);
        const LayerPlan on_gpu_scores = plan_layer(c, 0, bs, gs);
        const GpuPlan g = gpu_select(**sel, d_scores.ptr, n, two_stage ? d_crit.ptr : nullptr, sh.L, sh.w, bs, c);
        std::ostringstream where;
        where << kv_policy_name(c.policy) << " L " << sh.L << " w " << sh.w << " g " << sh.H / sh.hkv << " B " << budget
              << ": ";
        const std::string bad = plan_mismatch(g, on_gpu_scores, adaptive);
        if (!bad.empty()) return {false, where.str() + "GPU selection != plan_layer on the GPU scores: " + bad, ""};
        ++exact;
        const std::string unexplained = explain_differences(*host, on_host, on_gpu_scores, kTieTol, st);
        if (!unexplained.empty()) return {false, where.str() + unexplained, ""};
      }
    }
  }
  std::ostringstream info;
  info << exact << " plans: GPU selection == plan_layer on GPU scores; vs host scores " << st.layers_differing << " of "
       << st.layers << " layers differ (" << st.entries_differing << " entries: " << st.swaps
       << " near-tie swaps, " << st.cascades << " layers with near-tie cascades); seed " << test_seed();
  return {false, "", info.str()};
}

// --- compaction ----------------------------------------------------------------------------------

CheckResult check_compaction() {
  std::mt19937_64 rng(test_seed() ^ 0xC0AC7ull);
  std::ostringstream info;
  int rows_total = 0, moves_total = 0;
  for (int32_t d : {64, 128})
    for (bool interleaved : {false, true}) {
      const KvLayout layout{2, 3, d, kPageSize};
      const int64_t num_pages = 400;
      KvCacheManager m(layout, num_pages);
      // Sequences of several lengths; one released and replaced so the free stack is scrambled.
      std::vector<SeqId> seqs;
      for (int32_t len : {37, 150, 16, 90}) {
        const SeqId s = m.add_sequence();
        KvReservation r;
        const KvGrowth g{s, len};
        if (m.reserve({&g, 1}, &r) != Admission::kOk) return {false, "reserve failed", ""};
        m.commit(r);
        seqs.push_back(s);
      }
      m.release(seqs[1]);
      seqs.erase(seqs.begin() + 1);
      {
        const SeqId s = m.add_sequence();
        KvReservation r;
        const KvGrowth g{s, 171};
        if (m.reserve({&g, 1}, &r) != Admission::kOk) return {false, "reserve failed", ""};
        m.commit(r);
        seqs.push_back(s);
      }
      // Pool contents: random K/V, positions and metric for every slot.
      const int64_t slots = num_pages * kPageSize;
      const int64_t page_elems = static_cast<int64_t>(kPageSize) * d;
      const int64_t page_stride = interleaved ? 2 * page_elems : page_elems;
      std::vector<uint16_t> pool(static_cast<size_t>(num_pages * (interleaved ? 2 : 1) * page_elems));
      std::vector<uint16_t> vpool(interleaved ? 0 : pool.size());
      std::uniform_int_distribution<uint32_t> bits(0, 0xFFFF);
      for (auto& v : pool) v = static_cast<uint16_t>(bits(rng));
      for (auto& v : vpool) v = static_cast<uint16_t>(bits(rng));
      std::vector<int32_t> positions(static_cast<size_t>(slots));
      std::vector<float> metric(static_cast<size_t>(slots));
      for (int64_t i = 0; i < slots; ++i) {
        positions[i] = static_cast<int32_t>(bits(rng));
        metric[i] = static_cast<float>(bits(rng)) / 7.0f;
      }
      DeviceArray<uint16_t> d_pool(pool), d_vpool(interleaved ? std::vector<uint16_t>{0} : vpool);
      DeviceArray<int32_t> d_pos(positions);
      DeviceArray<float> d_metric(metric);
      auto k_ptr = [&](int64_t slot) { return (slot / kPageSize) * page_stride + (slot % kPageSize) * d; };
      auto v_data = [&]() -> std::vector<uint16_t>& { return interleaved ? pool : vpool; };
      auto v_ptr = [&](int64_t slot) { return k_ptr(slot) + (interleaved ? page_elems : 0); };

      // Keep lists for every row, the pages before compaction (CSR) and the host's moves.
      std::vector<int32_t> offsets{0}, page_ids, keep_flat, keep_counts;
      const int32_t stride = 200;
      int row = 0;
      for (SeqId s : seqs)
        for (int32_t l = 0; l < layout.num_layers; ++l)
          for (int32_t h = 0; h < layout.num_kv_heads; ++h, ++row) {
            const int32_t len = m.length(s, l, h);
            const std::span<const int32_t> pg = m.pages(s, l, h);
            page_ids.insert(page_ids.end(), pg.begin(), pg.end());
            offsets.push_back(static_cast<int32_t>(page_ids.size()));
            std::vector<int32_t> keep;
            const int kind = row % 6;
            for (int32_t j = 0; j < len; ++j) {
              const bool k = kind == 0 ? true : kind == 1 ? false : kind == 2 ? j < len / 2 : kind == 3 ? j == len - 1
                                                                                                        : (bits(rng) % 3 == 0);
              if (k) keep.push_back(j);
            }
            const std::vector<KvMove> moves = m.keep_entries(s, l, h, keep);
            for (const KvMove& mv : moves) {  // applied in order, as CpuKvStorage::apply does
              std::copy_n(pool.begin() + k_ptr(mv.src), d, pool.begin() + k_ptr(mv.dst));
              std::copy_n(v_data().begin() + v_ptr(mv.src), d, v_data().begin() + v_ptr(mv.dst));
              positions[mv.dst] = positions[mv.src];
              metric[mv.dst] = metric[mv.src];
            }
            moves_total += static_cast<int>(moves.size());
            keep_counts.push_back(static_cast<int32_t>(keep.size()));
            keep.resize(stride, -1);
            keep_flat.insert(keep_flat.end(), keep.begin(), keep.end());
          }
      if (std::string bad = m.check_consistency(); !bad.empty()) return {false, "manager: " + bad, ""};
      DeviceArray<int32_t> d_offsets(offsets), d_pages(page_ids), d_keep(keep_flat), d_counts(keep_counts);
      cuda::KvCompactParams p;
      p.k_pool = reinterpret_cast<__nv_bfloat16*>(d_pool.ptr);
      p.v_pool = interleaved ? p.k_pool + page_elems : reinterpret_cast<__nv_bfloat16*>(d_vpool.ptr);
      p.page_stride = page_stride;
      p.head_dim = d;
      p.positions = d_pos.ptr;
      p.metric = d_metric.ptr;
      p.row_page_offsets = d_offsets.ptr;
      p.page_ids = d_pages.ptr;
      p.num_rows = row;
      p.keep = d_keep.ptr;
      p.keep_stride = stride;
      p.keep_counts = d_counts.ptr;
      CHECK_STATUS(cuda::compact_kv_rows(p, nullptr));
      std::ostringstream where;
      where << "d " << d << (interleaved ? " interleaved" : " separate") << " pools: ";
      if (d_pool.download() != pool) return {false, where.str() + "K pool differs from the host's moves", ""};
      if (!interleaved && d_vpool.download() != vpool) return {false, where.str() + "V pool differs", ""};
      if (d_pos.download() != positions) return {false, where.str() + "positions differ", ""};
      const std::vector<float> gm = d_metric.download();
      if (std::memcmp(gm.data(), metric.data(), metric.size() * 4) != 0) return {false, where.str() + "metric differs", ""};
      rows_total += row;
    }
  info << rows_total << " rows, " << moves_total << " moves: pools bit-identical to the host's moves; seed " << test_seed();
  return {false, "", info.str()};
}


// --- H2O prompt accumulation, decode accumulation, KV-Compress block selection ---------------------

// The whole prompt at once, and the same prompt in chunks (each chunk's queries against every key
// before them, w = the chunk, summed over the chunks on the host as the model's metric does), both
// against accumulated_probs over every query; each once with the scorer's own statistics pass and
// once with the queries' log-sum-exp given (fp64 on the host here; prefill attention's in the
// model). Shapes cover g = 1, 2, 4, 7 (rows of one query cut across chunks of 63 rows), mean and
// max, and lengths long enough for several query segments.
CheckResult check_h2o_scores() {
  std::mt19937_64 rng(test_seed() ^ 0x420ull);
  constexpr double kTol = 3e-5;
  double worst = 0, worst_chunked = 0, worst_lse = 0;
  int shapes = 0, lse_shapes = 0;
  struct Shape {
    int32_t L, H, hkv, d;
    GqaReduce gqa;
  };
  for (const Shape& sh : {Shape{40, 8, 2, 128, GqaReduce::kMean}, Shape{333, 12, 4, 64, GqaReduce::kMax},
                          Shape{700, 8, 8, 128, GqaReduce::kMean}, Shape{129, 6, 2, 64, GqaReduce::kMean},
                          Shape{1500, 32, 8, 128, GqaReduce::kMax}, Shape{3000, 32, 8, 128, GqaReduce::kMean},
                          Shape{1100, 14, 2, 64, GqaReduce::kMean}, Shape{900, 14, 2, 128, GqaReduce::kMax}}) {
    const ScoreShape ss{sh.L, sh.L, sh.H, sh.hkv, sh.d, sh.gqa, PoolKind::kMax, 1};
    const LayerData x = make_layer(ss, 0, rng);
    auto scorer = cuda::WindowScorer::create({sh.H, sh.hkv, sh.d, sh.L, 32});
    if (!scorer) return {false, scorer.status().message(), ""};
    DeviceArray<uint16_t> dq(x.q.bits), dk(x.k.bits);
    const int64_t stride = sh.L + 3;
    DeviceArray<float> out(static_cast<size_t>(sh.hkv) * stride);
    const cuda::WindowScoreInputs in{as_bf16(dq), 0, as_bf16(dk), 0, sh.L, sh.L};
    CHECK_STATUS((*scorer)->h2o(in, sh.gqa, out.ptr, stride, nullptr));
    CompressConfig c;
    c.policy = KvPolicy::kH2o;
    c.gqa = sh.gqa;
    auto host = compute_layer_scores(c, 0, host_tensors(x));
    if (!host) return {false, host.status().message(), ""};
    const double e = max_rel_error(out.download(), stride, host->metric);
    worst = std::max(worst, e);
    if (!(e <= kTol))
      return {false, "H2O L " + std::to_string(sh.L) + " H " + std::to_string(sh.H) + ": relative error " + std::to_string(e), ""};
    ++shapes;
    // Every query's log-sum-exp over its visible keys, fp64: [H][L] (host time: the two largest
    // shapes are left to the statistics pass).
    const bool have_lse = double(sh.L) * sh.L * sh.H * sh.d / 2 <= 2e9;
    lse_shapes += have_lse;
    const int32_t g = sh.H / sh.hkv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(sh.d));
    std::vector<float> lse(static_cast<size_t>(sh.H) * sh.L);
    for (int32_t h = 0; h < sh.H && have_lse; ++h)
      for (int32_t i = 0; i < sh.L; ++i) {
        const float* q = x.q.f32.data() + (static_cast<size_t>(i) * sh.H + h) * sh.d;
        std::vector<double> z(static_cast<size_t>(i) + 1);
        double m = -INFINITY;
        for (int32_t j = 0; j <= i; ++j) {
          const float* k = x.k.f32.data() + (static_cast<size_t>(j) * sh.hkv + h / g) * sh.d;
          double dot = 0;
          for (int32_t t = 0; t < sh.d; ++t) dot += double(q[t]) * k[t];
          z[size_t(j)] = dot * scale;
          m = std::max(m, z[size_t(j)]);
        }
        double sum = 0;
        for (double v : z) sum += std::exp(v - m);
        lse[static_cast<size_t>(h) * sh.L + i] = static_cast<float>(m + std::log(sum));
      }
    if (have_lse) {
      DeviceArray<float> dl(lse);
      CHECK_STATUS((*scorer)->h2o(in, sh.gqa, out.ptr, stride, nullptr, dl.ptr));
      const double el = max_rel_error(out.download(), stride, host->metric);
      worst_lse = std::max(worst_lse, el);
      if (!(el <= kTol))
        return {false, "H2O with lse, L " + std::to_string(sh.L) + " H " + std::to_string(sh.H) + ": relative error " +
                           std::to_string(el), ""};
    }
    // Chunks of 128 (the engine's), and one of 1 token at the end when L allows; with the
    // statistics pass, then with each chunk's lse ([H][n], sliced from the whole prompt's).
    for (const bool with_lse : {false, true}) {
      if (with_lse && !have_lse) continue;
      std::vector<float> sum(static_cast<size_t>(sh.hkv) * stride, 0.0f);
      for (int32_t p0 = 0; p0 < sh.L;) {
        const int32_t rest = sh.L - p0;
        const int32_t n = rest > 129 ? 128 : rest > 1 ? rest - 1 : 1;
        const int32_t len = p0 + n;
        const cuda::WindowScoreInputs ci{as_bf16(dq) + static_cast<int64_t>(p0) * sh.H * sh.d, 0, as_bf16(dk), 0, len, n};
        std::vector<float> chunk_lse(static_cast<size_t>(sh.H) * n);
        for (int32_t h = 0; h < sh.H; ++h)
          for (int32_t i = 0; i < n; ++i) chunk_lse[static_cast<size_t>(h) * n + i] = lse[static_cast<size_t>(h) * sh.L + p0 + i];
        DeviceArray<float> dl(chunk_lse);
        CHECK_STATUS((*scorer)->h2o(ci, sh.gqa, out.ptr, stride, nullptr, with_lse ? dl.ptr : nullptr));
        const std::vector<float> part = out.download();
        for (int32_t h = 0; h < sh.hkv; ++h)
          for (int32_t j = 0; j < len; ++j) sum[static_cast<size_t>(h * stride + j)] += part[static_cast<size_t>(h * stride + j)];
        p0 = len;
      }
      const double ec = max_rel_error(sum, stride, host->metric);
      worst_chunked = std::max(worst_chunked, ec);
      if (!(ec <= kTol))
        return {false, std::string("H2O in chunks") + (with_lse ? " with lse" : "") + ", L " + std::to_string(sh.L) +
                           " H " + std::to_string(sh.H) + ": relative error " + std::to_string(ec), ""};
    }
  }
  std::ostringstream info;
  info << shapes << " shapes (L 40 .. 3000, g 1 .. 7, mean | max); max relative error " << worst << "; " << lse_shapes
       << " of them also with lse given: " << worst_lse << ", in chunks of 128 (+1) summed with and without lse "
       << worst_chunked << " (limit 3e-5)";
  return {false, "", info.str()};
}

// H2O's continual plan on the device against plan_layer: rows of random lengths (1 .. 4096) over
// scattered pages, metrics drawn from a few values (many ties, -0 and +0 among them) or random,
// windows 0 / 16 / 32 and budgets below and above the lengths; every row's keep list must equal
// plan_layer's (and rows kept whole must report 0).
CheckResult check_metric_keep_top() {
  std::mt19937_64 rng(test_seed() ^ 0x7e3ull);
  int rows_total = 0, compressed = 0;
  for (int round = 0; round < 12; ++round) {
    const int32_t rows = 24;
    CompressConfig c;
    c.policy = KvPolicy::kH2o;
    c.window = (round % 3) * 16;
    c.budget = std::max(c.window + 1, std::uniform_int_distribution<int32_t>(1, 2048)(rng));
    std::vector<int32_t> lens(rows), offsets(rows);
    int32_t pages = 0;
    for (int32_t r = 0; r < rows; ++r) {
      lens[r] = r == 0 ? cuda::kMetricKeepMaxRow : std::uniform_int_distribution<int32_t>(1, cuda::kMetricKeepMaxRow)(rng);
      offsets[r] = pages;
      pages += (lens[r] + kPageSize - 1) / kPageSize;
    }
    std::vector<int32_t> ids(pages);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<float> metric(static_cast<size_t>(pages) * kPageSize);
    const bool ties = round % 2 == 0;
    for (float& m : metric) {
      const int k = std::uniform_int_distribution<int>(0, 3)(rng);
      m = ties ? (k == 0 ? -0.0f : k == 1 ? 0.0f : k == 2 ? 0.5f : 1.0f) : std::uniform_real_distribution<float>(0.f, 3.f)(rng);
    }
    const int32_t longest = *std::max_element(lens.begin(), lens.end());
    DeviceArray<int32_t> did(ids), doff(offsets), dlen(lens), keep(static_cast<size_t>(rows) * longest), counts(rows);
    DeviceArray<float> dm(metric);
    cuda::MetricKeepParams kp;
    kp.rows = {did.ptr, doff.ptr, rows};
    kp.row_lengths = dlen.ptr;
    kp.metric = dm.ptr;
    kp.window = c.window;
    kp.selection_budget = c.budget - c.window;
    kp.keep = keep.ptr;
    kp.keep_stride = longest;
    kp.counts = counts.ptr;
    CHECK_STATUS(cuda::metric_keep_top(kp, nullptr));
    const std::vector<int32_t> got = keep.download(), cnt = counts.download();
    for (int32_t r = 0; r < rows; ++r) {
      LayerScores sc;
      sc.lengths = {lens[r]};
      std::vector<float> row(static_cast<size_t>(std::max(0, lens[r] - c.window)));
      for (size_t i = 0; i < row.size(); ++i)
        row[i] = metric[static_cast<size_t>(int64_t{ids[offsets[r] + int32_t(i) / kPageSize]} * kPageSize + int32_t(i) % kPageSize)];
      sc.scores.push_back(row);
      const LayerPlan plan = plan_layer(c, 0, c.budget - c.window, sc);
      const std::vector<int32_t>& want = plan.keep[0];
      ++rows_total;
      if (int32_t(want.size()) == lens[r]) {
        if (cnt[r] != 0) return {false, "row kept whole but count " + std::to_string(cnt[r]), ""};
        continue;
      }
      ++compressed;
      const std::vector<int32_t> g(got.begin() + int64_t{r} * longest, got.begin() + int64_t{r} * longest + cnt[r]);
      if (g != want)
        return {false, "round " + std::to_string(round) + " row " + std::to_string(r) + " (length " +
                           std::to_string(lens[r]) + ", window " + std::to_string(c.window) + ", budget " +
                           std::to_string(c.budget) + "): keep list differs from plan_layer's",
                ""};
    }
  }
  std::ostringstream info;
  info << rows_total << " rows (" << compressed << " compressed; lengths 1 .. 4096, ties and -0): keep lists == plan_layer";
  return {false, "", info.str()};
}

// Rows of random lengths over scattered pages; per row the host's window_mean_probs of one query.
CheckResult check_decode_metric() {
  std::mt19937_64 rng(test_seed() ^ 0xDEC0ull);
  double worst = 0;
  for (int mode = 0; mode < 3; ++mode) {
    const int32_t hkv = 2, g = 4, d = 128, H = hkv * g, B = 3;
    const int32_t rows = B * hkv;
    std::vector<int32_t> lens(rows), offsets(rows);
    int32_t pages = 0;
    for (int32_t r = 0; r < rows; ++r) {
      lens[r] = std::uniform_int_distribution<int32_t>(1, 900)(rng);
      offsets[r] = pages;
      pages += (lens[r] + kPageSize - 1) / kPageSize;
    }
    std::vector<int32_t> ids(pages);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    const Bf16Tensor kpool = random_bf16(static_cast<size_t>(pages) * kPageSize * d, 1.0f, rng);
    const Bf16Tensor q = random_bf16(static_cast<size_t>(B) * H * d, 2.0f, rng);
    std::vector<float> metric(static_cast<size_t>(pages) * kPageSize);
    for (float& m : metric) m = std::uniform_real_distribution<float>(0.f, 1.f)(rng);
    DeviceArray<uint16_t> dk(kpool.bits), dq(q.bits);
    DeviceArray<int32_t> did(ids), doff(offsets), dlen(lens);
    // Each query's lse over its row, fp64 ([B][H]), for the one-pass variant.
    std::vector<float> lse(static_cast<size_t>(B) * H);
    for (int32_t r = 0; r < rows; ++r) {
      const int32_t b = r / hkv, kh = r % hkv;
      for (int32_t gi = 0; gi < g; ++gi) {
        const float* qh = q.f32.data() + (static_cast<size_t>(b) * H + kh * g + gi) * d;
        std::vector<double> z(static_cast<size_t>(lens[r]));
        double mx = -INFINITY;
        for (int32_t i = 0; i < lens[r]; ++i) {
          const int64_t slot = int64_t{ids[offsets[r] + i / kPageSize]} * kPageSize + i % kPageSize;
          double dot = 0;
          for (int32_t t = 0; t < d; ++t) dot += double(qh[t]) * kpool.f32[static_cast<size_t>(slot * d + t)];
          z[size_t(i)] = dot / std::sqrt(double(d));
          mx = std::max(mx, z[size_t(i)]);
        }
        double sum = 0;
        for (double v : z) sum += std::exp(v - mx);
        lse[static_cast<size_t>(b) * H + kh * g + gi] = static_cast<float>(mx + std::log(sum));
      }
    }
    DeviceArray<float> dlse(lse);
    for (const bool with_lse : {false, true}) {
    DeviceArray<float> dm(metric);
    cuda::MetricDecodeParams p;
    p.k_pool = as_bf16(dk);
    p.page_stride = kPageSize * d;
    p.head_dim = d;
    p.rows = {did.ptr, doff.ptr, rows};
    p.row_lengths = dlen.ptr;
    p.queries = as_bf16(dq);
    p.q_token_stride = H * d;
    p.num_kv_heads = hkv;
    p.group = g;
    p.scale = 1.0f / std::sqrt(float(d));
    p.mode = mode;
    p.metric = dm.ptr;
    if (with_lse) {
      p.lse = dlse.ptr;
      p.lse_token_stride = H;
      p.max_length = *std::max_element(lens.begin(), lens.end());
    }
    CHECK_STATUS(cuda::metric_decode_add(p, nullptr));
    const std::vector<float> got = dm.download();
    for (int32_t r = 0; r < rows; ++r) {
      const int32_t b = r / hkv, kh = r % hkv, n = lens[r];
      std::vector<float> keys(static_cast<size_t>(n) * d);
      for (int32_t i = 0; i < n; ++i) {
        const int64_t slot = int64_t{ids[offsets[r] + i / kPageSize]} * kPageSize + i % kPageSize;
        std::copy_n(kpool.f32.data() + slot * d, d, keys.data() + static_cast<size_t>(i) * d);
      }
      HeadAttentionInputs in;
      in.queries = q.f32.data() + static_cast<size_t>(b) * H * d;
      in.num_queries = 1;
      in.num_heads = H;
      in.head_dim = d;
      in.kv_head = kh;
      in.group = g;
      in.keys = keys.data();
      in.key_stride = d;
      in.length = n;
      const std::vector<double> probs = window_mean_probs(in, 1);
      for (int32_t i = 0; i < n; ++i) {
        double v = 0;
        for (int32_t gi = 0; gi < g; ++gi) {
          const double pr = static_cast<float>(probs[static_cast<size_t>(gi) * n + i]);
          if (mode == 2) v += pr * pr;
          else if (mode == 1) v = gi == 0 ? pr : std::max(v, pr);
          else v += pr / g;
        }
        const int64_t slot = int64_t{ids[offsets[r] + i / kPageSize]} * kPageSize + i % kPageSize;
        const double want = metric[slot] + static_cast<float>(v);
        const double e = std::abs(got[slot] - want) / std::max(std::abs(want), 1e-30);
        worst = std::max(worst, e);
        if (!(e <= 3e-5))
          return {false, "decode metric mode " + std::to_string(mode) + (with_lse ? " (with lse)" : "") + " row " +
                             std::to_string(r) + " entry " + std::to_string(i) + ": relative error " + std::to_string(e),
                  ""};
      }
    }
    }
  }
  std::ostringstream info;
  info << "decode accumulation (mean, max, p^2) over paged rows, statistics pass and one pass with the lse: max "
          "relative error "
       << worst << " (limit 3e-5)";
  return {false, "", info.str()};
}

CheckResult check_kvc_select() {
  std::mt19937_64 rng(test_seed() ^ 0xC0DEull);
  int cases = 0, evicting = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int32_t rows = std::uniform_int_distribution<int32_t>(1, 24)(rng);
    const int32_t bs = trial % 5 == 0 ? 1 : trial % 5 == 1 ? 4 : 16;
    std::vector<int32_t> lens(rows), offsets(rows);
    int32_t pages = 0;
    for (int32_t r = 0; r < rows; ++r) {
      lens[r] = std::uniform_int_distribution<int32_t>(0, 400)(rng);
      offsets[r] = pages;
      pages += (lens[r] + kPageSize - 1) / kPageSize;
    }
    std::vector<int32_t> ids(std::max(pages, 1));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<float> metric(static_cast<size_t>(std::max(pages, 1)) * kPageSize, 0.f);
    std::vector<int32_t> positions(metric.size(), 0);
    std::vector<std::vector<float>> hm(rows);
    std::vector<std::vector<int32_t>> hp(rows);
    const int levels = trial % 3 == 0 ? 5 : 1 << 20;  // many ties, or few
    int64_t logical = 0, total = 0;
    for (int32_t r = 0; r < rows; ++r) {
      std::vector<int32_t> pos(lens[r]);
      std::iota(pos.begin(), pos.end(), 0);
      std::shuffle(pos.begin(), pos.end(), rng);  // compacted rows are out of order
      for (int32_t i = 0; i < lens[r]; ++i) {
        const float m = float(std::uniform_int_distribution<int>(0, levels - 1)(rng)) / float(levels);
        const int64_t slot = int64_t{ids[offsets[r] + i / kPageSize]} * kPageSize + i % kPageSize;
        metric[slot] = m;
        positions[slot] = pos[i];
        hm[r].push_back(m);
        hp[r].push_back(pos[i]);
        logical = std::max<int64_t>(logical, pos[i] + 1);
      }
      total += lens[r];
    }
    const int32_t protect = trial % 4 == 0 ? 0 : 32;
    const int64_t max_entries = std::uniform_int_distribution<int64_t>(0, total + 10)(rng);
    std::vector<KvCompressRow> hrows;
    for (int32_t r = 0; r < rows; ++r) hrows.push_back({hm[r], hp[r]});
    std::vector<std::vector<int32_t>> want = kvcompress_select(hrows, max_entries, bs, logical, protect);
    auto sel = cuda::KvcSelector::create(std::max<int64_t>(total, 1), rows);
    if (!sel) return {false, sel.status().message(), ""};
    DeviceArray<int32_t> did(ids), doff(offsets), dpos(positions);
    DeviceArray<float> dm(metric);
    std::vector<std::vector<int32_t>> got;
    CHECK_STATUS((*sel)->select({did.ptr, doff.ptr, rows}, lens, dm.ptr, dpos.ptr, max_entries, bs, logical, protect,
                                nullptr, &got));
    for (int32_t r = 0; r < rows; ++r) {
      std::vector<int32_t> a = want[r], b = got[r];
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      if (a != b)
        return {false, "KV-Compress trial " + std::to_string(trial) + " row " + std::to_string(r) + ": evicts " +
                           std::to_string(b.size()) + " entries, host " + std::to_string(a.size()), ""};
      evicting += a.empty() ? 0 : 1;
    }
    ++cases;
  }
  std::ostringstream info;
  info << cases << " sequences (" << evicting << " rows evicting; block sizes 1, 4, 16; ties; protected 0 | 32): evict "
       << "sets identical to kvcompress_select";
  return {false, "", info.str()};
}

// Keys laid out head-major, as the engine gathers them from pages ([Hkv][rows][d], rows >= L,
// k_token_stride = d, k_head_stride = rows * d), must give bit-identical SnapKV scores,
// KV-Compress metric and H2O accumulation (whole prompt and a chunk) to the token-major layout.
CheckResult check_head_major_keys() {
  std::mt19937_64 rng(test_seed() ^ 0x4EADull);
  int compared = 0;
  for (const ScoreShape& sh : {ScoreShape{333, 32, 8, 2, 128, GqaReduce::kMean, PoolKind::kMax, 7},
                               ScoreShape{700, 16, 12, 4, 64, GqaReduce::kMax, PoolKind::kAvg, 5},
                               ScoreShape{1500, 32, 32, 8, 128, GqaReduce::kMean, PoolKind::kMax, 1}}) {
    ScoreShape every_query = sh;  // H2O needs every prompt query; the window ones are its last w
    every_query.w = sh.L;
    const LayerData x = make_layer(every_query, 0, rng);
    auto scorer = cuda::WindowScorer::create({sh.H, sh.hkv, sh.d, sh.L, sh.w});
    if (!scorer) return {false, scorer.status().message(), ""};
    const int32_t rows = sh.L + 24;  // the gather's row stride: longer than the prompt
    std::vector<uint16_t> head_major(static_cast<size_t>(sh.hkv) * rows * sh.d, 0x7fc0);  // NaN padding
    for (int32_t j = 0; j < sh.L; ++j)
      for (int32_t h = 0; h < sh.hkv; ++h)
        std::copy_n(x.k.bits.begin() + (static_cast<int64_t>(j) * sh.hkv + h) * sh.d, sh.d,
                    head_major.begin() + (static_cast<int64_t>(h) * rows + j) * sh.d);
    DeviceArray<uint16_t> dq(x.q.bits), dk(x.k.bits), dkh(head_major);
    const int64_t stride = sh.L + 3;
    DeviceArray<float> a(static_cast<size_t>(sh.hkv) * stride), b(static_cast<size_t>(sh.hkv) * stride);
    const auto same = [&](const char* what) -> std::string {
      const std::vector<float> va = a.download(), vb = b.download();
      for (int32_t h = 0; h < sh.hkv; ++h)
        for (int32_t j = 0; j < sh.L; ++j)
          if (std::memcmp(&va[size_t(h) * stride + j], &vb[size_t(h) * stride + j], sizeof(float)) != 0)
            return std::string(what) + " L " + std::to_string(sh.L) + ": head-major keys differ at head " +
                   std::to_string(h) + " entry " + std::to_string(j);
      ++compared;
      return "";
    };
    const auto queries_from = [&](int32_t first) { return as_bf16(dq) + static_cast<int64_t>(first) * sh.H * sh.d; };
    cuda::WindowScoreInputs tok{queries_from(sh.L - sh.w), 0, as_bf16(dk), 0, sh.L, sh.w};
    cuda::WindowScoreInputs hm = tok;
    hm.keys = as_bf16(dkh);
    hm.k_token_stride = sh.d;
    hm.k_head_stride = int64_t{rows} * sh.d;
    CHECK_STATUS((*scorer)->snapkv(tok, sh.gqa, sh.pool, sh.kernel, a.ptr, stride, nullptr));
    CHECK_STATUS((*scorer)->snapkv(hm, sh.gqa, sh.pool, sh.kernel, b.ptr, stride, nullptr));
    {
      // SnapKV writes the first L - w of each row: compare those.
      const std::vector<float> va = a.download(), vb = b.download();
      for (int32_t h = 0; h < sh.hkv; ++h)
        if (std::memcmp(&va[size_t(h) * stride], &vb[size_t(h) * stride], sizeof(float) * size_t(sh.L - sh.w)) != 0)
          return {false, "SnapKV L " + std::to_string(sh.L) + ": head-major keys differ at head " + std::to_string(h), ""};
      ++compared;
    }
    CHECK_STATUS((*scorer)->kvcompress_metric(tok, sh.pool, sh.kernel, a.ptr, stride, nullptr));
    CHECK_STATUS((*scorer)->kvcompress_metric(hm, sh.pool, sh.kernel, b.ptr, stride, nullptr));
    if (std::string e = same("KV-Compress"); !e.empty()) return {false, e, ""};
    // H2O: the whole prompt, then its last chunk of 100 queries against every key before them.
    tok.queries = hm.queries = queries_from(0);
    tok.window = hm.window = sh.L;
    CHECK_STATUS((*scorer)->h2o(tok, sh.gqa, a.ptr, stride, nullptr));
    CHECK_STATUS((*scorer)->h2o(hm, sh.gqa, b.ptr, stride, nullptr));
    if (std::string e = same("H2O"); !e.empty()) return {false, e, ""};
    tok.queries = hm.queries = queries_from(sh.L - 100);
    tok.window = hm.window = 100;
    CHECK_STATUS((*scorer)->h2o(tok, sh.gqa, a.ptr, stride, nullptr));
    CHECK_STATUS((*scorer)->h2o(hm, sh.gqa, b.ptr, stride, nullptr));
    if (std::string e = same("H2O chunk"); !e.empty()) return {false, e, ""};
  }
  return {false, "", std::to_string(compared) + " score sets (SnapKV, KV-Compress, H2O whole and chunked; 3 shapes) "
                         "bit-identical with head-major keys"};
}

std::vector<NamedCheck> all_checks() {
  return {
      {"SelectionOnHostScores", [] { return guarded(check_selection_host_scores); }},
      {"ScoresAgainstHost", [] { return guarded(check_scores); }},
      {"PipelineKeepSets", [] { return guarded(check_pipeline); }},
      {"CompactionMatchesHostMoves", [] { return guarded(check_compaction); }},
      {"H2oScoresAgainstHost", [] { return guarded(check_h2o_scores); }},
      {"DecodeMetricAgainstHost", [] { return guarded(check_decode_metric); }},
      {"H2oContinualPlanAgainstHost", [] { return guarded(check_metric_keep_top); }},
      {"KvCompressSelectionAgainstHost", [] { return guarded(check_kvc_select); }},
      {"HeadMajorKeysEqualTokenMajor", [] { return guarded(check_head_major_keys); }},
  };
}

}  // namespace

#else  // no CUDA in this build

namespace {
std::vector<NamedCheck> all_checks() {
  return {{"ScoreSelect", [] { return CheckResult{true, "built without CUDA (ADAKV_HAVE_CUDA unset)", ""}; }}};
}
}  // namespace

#endif

ADAKV_RUN_CHECKS("ScoreSelect")
