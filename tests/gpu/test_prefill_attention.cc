// Prefill attention (src/backends/cuda/prefill_attention.h) against a CPU fp64 reference computed
// from the same bf16 values, on fresh random data each run (seed printed; ADAKV_TEST_SEED
// reproduces a run):
//   - prompts of 1, 17, 128, 1000 and 4096 tokens, GQA 32/8, 4/1 (one kv head) and 4/4 (MHA),
//     head dims 64 and 128, every key-tile size of each head dim;
//   - the bottom-right causal mask with fewer queries than keys (a chunk of a chunked prefill, one
//     appended query), the unmasked case, a fused-QKV strided layout, a peaky softmax;
//   - output and lse poisoned (NaN) before each run: every element must be written and finite,
//     and the padding between output rows must stay untouched;
//   - the reference covers every row up to 1000 queries and a fixed + random subset of rows
//     beyond (tile edges, first and last rows), relative error per (row, head) < 1e-2, lse error
//     < 1e-3; a rerun on the same inputs must give identical bits (a race would not);
//   - argument checks (no GPU needed): unsupported head dim, causal with fewer keys than
//     queries, bad strides, misaligned pointers, and an empty call.
// Without a CUDA device the GPU cases skip with a message. Built with GoogleTest, or with its own
// main() (ADAKV_PLAIN_TEST_MAIN) on a machine that has no GoogleTest libraries.
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
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "backends/cuda/prefill_attention.h"
#include "device_array.h"
#include "core/dtype.h"

namespace {

using adakv::bf16_to_f32;
using adakv::f32_to_bf16;
using adakv::cuda::PrefillAttentionArgs;
using adakv::cuda::PrefillAttentionOptions;

constexpr uint16_t kBf16NaN = 0x7fc0;

uint64_t test_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* s = std::getenv("ADAKV_TEST_SEED")) return std::strtoull(s, nullptr, 10);
    return (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  }();
  return seed;
}

std::string gpu_unavailable() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no CUDA device (cudaGetDeviceCount: ") + cudaGetErrorName(err) + ")";
  }
  if (n == 0) return "no CUDA device";
  return "";
}

// Standard normal samples from splitmix64 + Box-Muller: fast enough for 10^7 values per case.
struct Normal {
  uint64_t state;
  explicit Normal(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float operator()() {
    const double u1 = (double(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    const double u2 = double(next() >> 11) * (1.0 / 9007199254740992.0);
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
};

struct PrefillCase {
  int num_q = 128;
  int num_k = 0;  // 0: num_q
  int hq = 32, hkv = 8, d = 128;
  int block_n = 0;  // 0: default
  bool causal = true;
  bool fused_qkv = false;  // q, k, v interleaved per position as in a QKV projection's output
  float q_sigma = 1.f;     // larger: peakier softmax
  bool rerun = false;      // run twice, outputs must be bitwise equal
  bool wgmma = false;      // the wgmma kernel (head dim 128, compute capability 9.0 only)
};

std::string case_name(const PrefillCase& c) {
  std::ostringstream s;
  s << "d" << c.d << "_bn" << (c.block_n ? c.block_n : 64) << "_h" << c.hq << "x" << c.hkv << "_q" << c.num_q << "_k"
    << (c.num_k ? c.num_k : c.num_q) << (c.causal ? "" : "_nocausal") << (c.fused_qkv ? "_fused" : "")
    << (c.q_sigma != 1.f ? "_peaky" : "") << (c.wgmma ? "_wgmma" : "");
  return s.str();
}

// Query rows the reference checks: all of them when that is cheap (up to 8M (query, key, head)
// triples), else the tile edges, the first and last rows and random ones (64 in all).
std::vector<int> reference_rows(int num_q, int num_k, int heads, bool causal, std::mt19937_64& rng) {
  const double keys_per_row = causal ? num_k - num_q / 2.0 : num_k;
  if (double(num_q) * keys_per_row * heads <= 8e6) {
    std::vector<int> all(num_q);
    for (int i = 0; i < num_q; ++i) all[i] = i;
    return all;
  }
  std::set<int> rows = {0, 1, 2, 31, 32, 63, 64, 127, 128, 129, 255, 256, num_q / 2, num_q - 129, num_q - 128,
                        num_q - 65, num_q - 2, num_q - 1};
  std::uniform_int_distribution<int> pick(0, num_q - 1);
  while (rows.size() < 64) rows.insert(pick(rng));
  std::vector<int> v;
  for (int r : rows)
    if (r >= 0 && r < num_q) v.push_back(r);
  return v;
}

// bf16 -> float copy of rows [0, rows) of `width` elements, `stride` apart.
std::vector<float> to_float(const uint16_t* base, int rows, int64_t stride, int width) {
  std::vector<float> f(size_t(rows) * width);
  for (int i = 0; i < rows; ++i)
    for (int e = 0; e < width; ++e) f[size_t(i) * width + e] = bf16_to_f32(base[size_t(i) * stride + e]);
  return f;
}

#define CUDA_OK(expr)                                                                               \
  do {                                                                                              \
    const cudaError_t e_ = (expr);                                                                  \
    if (e_ != cudaSuccess) return {false, std::string(#expr) + ": " + cudaGetErrorString(e_), ""}; \
  } while (0)

CheckResult check_gpu(const PrefillCase& cs) {
  if (const std::string why = gpu_unavailable(); !why.empty()) return {true, why, ""};
  if (cs.wgmma) {
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (major != 9 || minor != 0) return {true, "the wgmma kernel needs a compute capability 9.0 device", ""};
  }
  const int lq = cs.num_q, lk = cs.num_k ? cs.num_k : cs.num_q;
  const int hq = cs.hq, hkv = cs.hkv, d = cs.d, g = hq / hkv;
  const std::string seed_note = " (seed " + std::to_string(test_seed()) + ", case " + case_name(cs) + ")";
  std::mt19937_64 rng(test_seed() ^ std::hash<std::string>{}(case_name(cs)));
  Normal normal(rng());

  // Layout. Fused: one buffer [L][(hq + 2 hkv) d] per position (q, then k, then v), queries being
  // the last lq positions; else dense q [lq][hq][d] and k/v [lk][hkv][d]. The output rows carry
  // 8 padding elements that must stay untouched.
  const int64_t q_stride = cs.fused_qkv ? int64_t{hq + 2 * hkv} * d : int64_t{hq} * d;
  const int64_t kv_stride = cs.fused_qkv ? q_stride : int64_t{hkv} * d;
  const int64_t out_stride = int64_t{hq} * d + 8;
  std::vector<uint16_t> hq_buf, hk_buf, hv_buf;
  size_t q_off = 0, k_off = 0, v_off = 0;
  if (cs.fused_qkv) {
    hq_buf.resize(size_t(lk) * q_stride);
    q_off = size_t(lk - lq) * q_stride;
    k_off = size_t(hq) * d;
    v_off = size_t(hq + hkv) * d;
    for (auto& x : hq_buf) x = f32_to_bf16(normal());
    for (int i = 0; i < lk; ++i)
      for (int e = 0; e < hq * d; ++e) hq_buf[size_t(i) * q_stride + e] = f32_to_bf16(normal() * cs.q_sigma);
  } else {
    hq_buf.resize(size_t(lq) * q_stride);
    hk_buf.resize(size_t(lk) * kv_stride);
    hv_buf.resize(size_t(lk) * kv_stride);
    for (auto& x : hq_buf) x = f32_to_bf16(normal() * cs.q_sigma);
    for (auto& x : hk_buf) x = f32_to_bf16(normal());
    for (auto& x : hv_buf) x = f32_to_bf16(normal());
  }
  // Host views: element e of head h at position i (key positions 0..lk-1, query rows 0..lq-1).
  const uint16_t* hq_base = hq_buf.data() + q_off;
  const uint16_t* hk_base = cs.fused_qkv ? hq_buf.data() + k_off : hk_buf.data();
  const uint16_t* hv_base = cs.fused_qkv ? hq_buf.data() + v_off : hv_buf.data();

  DeviceArray<uint16_t> dq(hq_buf.size()), dk(hk_buf.size()), dv(hv_buf.size());
  DeviceArray<uint16_t> dout(size_t(lq) * out_stride);
  DeviceArray<float> dlse(size_t(hq) * lq);
  if (!dq.ptr || !dk.ptr || !dv.ptr || !dout.ptr || !dlse.ptr) return {false, "cudaMalloc failed" + seed_note, ""};
  if (!dq.upload(hq_buf) || (!cs.fused_qkv && (!dk.upload(hk_buf) || !dv.upload(hv_buf))))
    return {false, "upload failed" + seed_note, ""};

  PrefillAttentionArgs a;
  const auto* dq_bf = reinterpret_cast<const __nv_bfloat16*>(dq.ptr);
  a.q = dq_bf + q_off;
  a.k = cs.fused_qkv ? dq_bf + k_off : reinterpret_cast<const __nv_bfloat16*>(dk.ptr);
  a.v = cs.fused_qkv ? dq_bf + v_off : reinterpret_cast<const __nv_bfloat16*>(dv.ptr);
  a.out = reinterpret_cast<__nv_bfloat16*>(dout.ptr);
  a.lse = dlse.ptr;
  a.num_q = lq;
  a.num_k = lk;
  a.num_qo_heads = hq;
  a.num_kv_heads = hkv;
  a.head_dim = d;
  a.q_row_stride = cs.fused_qkv ? q_stride : 0;
  a.k_row_stride = cs.fused_qkv ? kv_stride : 0;
  a.v_row_stride = cs.fused_qkv ? kv_stride : 0;
  a.out_row_stride = out_stride;
  a.softmax_scale = 1.f / std::sqrt(float(d));
  a.causal = cs.causal;
  PrefillAttentionOptions opt;
  opt.block_n = cs.block_n;
  if (cs.wgmma) opt.kernel = adakv::cuda::PrefillKernel::kWgmma;

  std::vector<uint16_t> out, out2;
  std::vector<float> lse, lse2;
  for (int run = 0; run < (cs.rerun ? 2 : 1); ++run) {
    // Poison: NaN everywhere (output padding included), so unwritten elements cannot pass.
    CUDA_OK(cudaMemset(dout.ptr, 0xff, dout.n * sizeof(uint16_t)));
    CUDA_OK(cudaMemset(dlse.ptr, 0xff, dlse.n * sizeof(float)));
    const adakv::Status st = adakv::cuda::prefill_attention(a, nullptr, opt);
    if (!st.is_ok()) return {false, "prefill_attention: " + st.message() + seed_note, ""};
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaGetLastError());
    if (!dout.download(run == 0 ? &out : &out2) || !dlse.download(run == 0 ? &lse : &lse2))
      return {false, "download failed" + seed_note, ""};
  }
  if (cs.rerun && (out != out2 || std::memcmp(lse.data(), lse2.data(), lse.size() * sizeof(float)) != 0))
    return {false, "two runs on the same inputs differ (a race?)" + seed_note, ""};

  // Every output element written and finite; padding untouched (0xffff poison).
  for (int i = 0; i < lq; ++i) {
    for (int e = 0; e < hq * d; ++e)
      if (!std::isfinite(bf16_to_f32(out[size_t(i) * out_stride + e]))) {
        std::ostringstream m;
        m << "row " << i << " head " << e / d << " dim " << e % d << " not written or not finite" << seed_note;
        return {false, m.str(), ""};
      }
    for (int e = hq * d; e < out_stride; ++e)
      if (out[size_t(i) * out_stride + e] != 0xffff) return {false, "output row padding overwritten" + seed_note, ""};
  }
  for (size_t i = 0; i < lse.size(); ++i)
    if (!std::isfinite(lse[i])) return {false, "lse " + std::to_string(i) + " not written" + seed_note, ""};

  // fp64 reference on the checked rows (from the same bf16 values), heads spread over threads.
  const std::vector<int> rows = reference_rows(lq, lk, hq, cs.causal, rng);
  const std::vector<float> fq = to_float(hq_base, lq, q_stride, hq * d);
  const std::vector<float> fk = to_float(hk_base, lk, kv_stride, hkv * d);
  const std::vector<float> fv = to_float(hv_base, lk, kv_stride, hkv * d);
  const double scale = 1.0 / std::sqrt(double(d));
  const int threads = std::max(1, std::min<int>(hq, int(std::thread::hardware_concurrency())));
  std::vector<double> worst_rel(threads, 0.0), worst_lse(threads, 0.0);
  std::vector<std::string> failure(threads);
  auto worker = [&](int tid) {
    std::vector<double> s(lk), acc(d);
    for (int h = tid; h < hq; h += threads) {
      const int kvh = h / g;
      for (int i : rows) {
        const int last = cs.causal ? i + (lk - lq) : lk - 1;
        const float* qrow = &fq[(size_t(i) * hq + h) * d];
        double mx = -INFINITY;
        for (int j = 0; j <= last; ++j) {
          const float* krow = &fk[(size_t(j) * hkv + kvh) * d];
          double dot = 0;
          for (int e = 0; e < d; ++e) dot += double(qrow[e]) * krow[e];
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int j = 0; j <= last; ++j) {
          const double w = std::exp(s[j] - mx);
          z += w;
          const float* vrow = &fv[(size_t(j) * hkv + kvh) * d];
          for (int e = 0; e < d; ++e) acc[e] += w * vrow[e];
        }
        double num = 0, den = 0;
        for (int e = 0; e < d; ++e) {
          const double ref = acc[e] / z;
          const double diff = bf16_to_f32(out[size_t(i) * out_stride + size_t(h) * d + e]) - ref;
          num += diff * diff;
          den += ref * ref;
        }
        const double rel = std::sqrt(num / std::max(den, 1e-30));
        const double lse_err = std::abs(double(lse[size_t(h) * lq + i]) - (mx + std::log(z)));
        worst_rel[tid] = std::max(worst_rel[tid], rel);
        worst_lse[tid] = std::max(worst_lse[tid], lse_err);
        if (!(rel < 1e-2) || !(lse_err < 1e-3)) {
          std::ostringstream m;
          m << "row " << i << " head " << h << " (" << last + 1 << " keys): relative error " << rel << ", lse error "
            << lse_err;
          failure[tid] = m.str();
          return;
        }
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
  for (auto& t : pool) t.join();
  for (const auto& f : failure)
    if (!f.empty()) return {false, f + seed_note, ""};
  std::ostringstream info;
  info << rows.size() << " rows x " << hq << " heads checked, max relative error "
       << *std::max_element(worst_rel.begin(), worst_rel.end()) << ", max lse error "
       << *std::max_element(worst_lse.begin(), worst_lse.end()) << ", seed " << test_seed();
  return {false, "", info.str()};
}

// Argument checks: each bad call must fail with a message before anything reaches the device.
CheckResult check_arguments() {
  alignas(16) static uint16_t dummy[64];
  auto* p = reinterpret_cast<__nv_bfloat16*>(dummy);
  PrefillAttentionArgs good;
  good.q = good.k = good.v = p;
  good.out = p;
  good.num_q = 16;
  good.num_k = 16;
  good.num_qo_heads = 32;
  good.num_kv_heads = 8;
  good.head_dim = 128;
  good.softmax_scale = 0.088f;
  struct Bad {
    const char* what;
    std::function<void(PrefillAttentionArgs&, PrefillAttentionOptions&)> edit;
  };
  const Bad bad[] = {
      {"head_dim 96", [](auto& a, auto&) { a.head_dim = 96; }},
      {"heads not divisible", [](auto& a, auto&) { a.num_kv_heads = 3; }},
      {"causal with fewer keys", [](auto& a, auto&) { a.num_k = 8; }},
      {"no keys", [](auto& a, auto&) { a.num_k = 0; a.causal = false; }},
      {"q stride not a multiple of 8", [](auto& a, auto&) { a.q_row_stride = 32 * 128 + 4; }},
      {"k stride below the row width", [](auto& a, auto&) { a.k_row_stride = 8 * 128 - 8; }},
      {"misaligned out", [p](auto& a, auto&) { a.out = p + 1; }},
      {"null v", [](auto& a, auto&) { a.v = nullptr; }},
      {"zero scale", [](auto& a, auto&) { a.softmax_scale = 0.f; }},
      {"block_n 128 at d 128", [](auto&, auto& o) { o.block_n = 128; }},
      {"block_n 32 at d 64", [](auto& a, auto& o) { a.head_dim = 64; o.block_n = 32; }},
      {"wgmma at d 64", [](auto& a, auto& o) { a.head_dim = 64; o.kernel = adakv::cuda::PrefillKernel::kWgmma; }},
  };
  for (const Bad& b : bad) {
    PrefillAttentionArgs a = good;
    PrefillAttentionOptions o;
    b.edit(a, o);
    const adakv::Status st = adakv::cuda::prefill_attention(a, nullptr, o);
    if (st.is_ok()) return {false, std::string("accepted: ") + b.what, ""};
    if (st.message().find("prefill attention") == std::string::npos)
      return {false, std::string("message does not name the function: ") + st.message(), ""};
  }
  // Nothing to do: succeeds without touching the pointers (null here) or the device.
  PrefillAttentionArgs empty = good;
  empty.num_q = 0;
  empty.q = empty.k = empty.v = nullptr;
  empty.out = nullptr;
  const adakv::Status st = adakv::cuda::prefill_attention(empty, nullptr);
  if (!st.is_ok()) return {false, "empty call failed: " + st.message(), ""};
  return {};
}

std::vector<NamedCheck> all_checks() {
  std::vector<NamedCheck> v;
  v.push_back({"Arguments", [] { return check_arguments(); }});
  auto add = [&v](PrefillCase c) { v.push_back({case_name(c), [c] { return check_gpu(c); }}); };
  for (int d : {128, 64}) {
    // Negative at d 128: the wgmma kernel with -bn keys per tile.
    const int variants[4] = {64, d == 128 ? 32 : 128, -64, -128};
    for (int bn : variants) {
      if (bn < 0 && d != 128) continue;
      auto mk = [&](int lq, int lk, int hq, int hkv) {
        PrefillCase c;
        c.num_q = lq;
        c.num_k = lk;
        c.hq = hq;
        c.hkv = hkv;
        c.d = d;
        c.block_n = bn < 0 ? -bn : bn;
        c.wgmma = bn < 0;
        return c;
      };
      add(mk(1, 0, 32, 8));
      add(mk(17, 0, 32, 8));
      add(mk(128, 0, 4, 1));
      add(mk(1000, 0, 32, 8));
      add(mk(1000, 0, 4, 4));  // MHA
      PrefillCase big = mk(4096, 0, 32, 8);
      big.rerun = true;
      add(big);
      add(mk(300, 1000, 32, 8));  // a chunk of a chunked prefill: bottom-right mask
      add(mk(1, 777, 32, 8));     // one query appended after a context
      add(mk(129, 4096, 4, 1));
    }
    PrefillCase nc;
    nc.num_q = 200;
    nc.num_k = 333;
    nc.hq = 4;
    nc.hkv = 1;
    nc.d = d;
    nc.causal = false;
    add(nc);
    PrefillCase fused;
    fused.num_q = 513;
    fused.num_k = 700;
    fused.d = d;
    fused.fused_qkv = true;
    add(fused);
    PrefillCase peaky;
    peaky.num_q = 1000;
    peaky.hq = 4;
    peaky.hkv = 1;
    peaky.d = d;
    peaky.q_sigma = 4.f;
    add(peaky);
    if (d == 128)  // the same three through the wgmma kernel, both key-tile sizes
      for (PrefillCase c : {nc, fused, peaky})
        for (int bn : {64, 128}) {
          c.wgmma = true;
          c.block_n = bn;
          add(c);
        }
  }
  return v;
}

}  // namespace

#else  // !ADAKV_HAVE_CUDA

namespace {
std::vector<NamedCheck> all_checks() {
  return {{"BuiltWithoutCuda", [] { return CheckResult{true, "adakv was built without CUDA (no nvcc)", ""}; }}};
}
}  // namespace

#endif  // ADAKV_HAVE_CUDA

ADAKV_RUN_CHECKS("PrefillAttention")
