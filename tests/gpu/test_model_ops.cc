// The model ops of src/backends/cuda (model_ops.h, gemm_lt.h, sampling.h) against the CPU
// oracle (src/backends/cpu, engine/sampler.h) on fresh random inputs every run (seed printed;
// ADAKV_TEST_SEED reproduces one). Tolerances: ||out - ref|| / ||ref|| <= 1e-2 where the output is
// bf16 (its rounding alone is ~2e-3), tighter where it is fp32; NaN never passes. Outputs are
// poisoned before each launch, so an unwritten element fails. Without a CUDA device every test
// skips with a message.
#include <gtest/gtest.h>

#if ADAKV_HAVE_CUDA

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/cpu_attention.h"
#include "backends/cpu/cpu_ops.h"
#include "backends/cuda/gemm_lt.h"
#include "backends/cuda/gemv.h"
#include "backends/cuda/model_ops.h"
#include "backends/cuda/paged_kv_view.h"
#include "backends/cuda/sampling.h"
#include "core/dtype.h"
#include "engine/sampler.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"
#include "model/rope.h"
#include "cuda_test_support.h"

namespace adakv {
namespace {

using cuda::kPageSize;

uint64_t test_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* s = std::getenv("ADAKV_TEST_SEED")) return std::strtoull(s, nullptr, 10);
    const uint64_t s = (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
    std::printf("model ops test seed %llu (ADAKV_TEST_SEED reproduces it)\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

#define SKIP_WITHOUT_DEVICE() \
  if (!have_device()) GTEST_SKIP() << "no CUDA device: GPU model-op tests skipped"

#define CK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr
#define OK(expr)                                  \
  do {                                            \
    const Status s_ = (expr);                     \
    ASSERT_TRUE(s_.is_ok()) << s_.message();      \
  } while (0)

// Host <-> device buffers of one element type.
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)), cudaSuccess); }
  ~Dev() { cudaFree(p); }
  void put(const std::vector<T>& v) { EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess); }
  std::vector<T> get() const {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  void poison() { EXPECT_EQ(cudaMemset(p, 0xff, n * sizeof(T)), cudaSuccess); }  // NaN for floats
};

std::vector<float> randn(std::mt19937_64& rng, size_t n, float scale = 1.f, float offset = 0.f) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = offset + scale * dist(rng);
  return v;
}
std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(v[i]);
  return b;
}
std::vector<float> from_bf16(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = bf16_to_f32(b[i]);
  return v;
}
std::vector<float> round_bf16(const std::vector<float>& v) { return from_bf16(to_bf16(v)); }

// ||a - b|| / ||b||; infinity on any NaN.
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

__nv_bfloat16* bf(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

// The device KV pool and a step's batch view as the model's kernels take them, over test buffers.
cuda::DeviceKvPool pool_of(Dev<uint16_t>& k, Dev<uint16_t>& v, Dev<int32_t>& positions, int64_t page_elems,
                           const Dev<int32_t>& table, int32_t max_pages_per_row) {
  cuda::DeviceKvPool pool;
  pool.k_pool = bf(k.p);
  pool.v_pool = bf(v.p);
  pool.positions = positions.p;
  pool.page_stride = page_elems;
  pool.page_table = table.p;
  pool.max_pages_per_row = max_pages_per_row;
  return pool;
}
cuda::StepBatchView batch_of(const Dev<int32_t>& seq_ids, const Dev<int32_t>& seq_ntok, const Dev<int32_t>& row_len,
                             const Dev<int32_t>& token_seq, const Dev<int32_t>& token_index,
                             const Dev<int32_t>& positions, int32_t n, int32_t layers, int32_t kv_heads) {
  cuda::StepBatchView bv;
  bv.seq_ids = seq_ids.p;
  bv.seq_ntok = seq_ntok.p;
  bv.row_len = row_len.p;
  bv.token_seq = token_seq.p;
  bv.token_index = token_index.p;
  bv.positions = positions.p;
  bv.num_tokens = n;
  bv.num_layers = layers;
  bv.num_kv_heads = kv_heads;
  return bv;
}

TEST(CudaModelOps, EmbedGather) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 1);
  for (int64_t hidden : {64, 100, 4096}) {
    const int64_t vocab = 777;
    const int32_t n = 37;
    const std::vector<uint16_t> table = to_bf16(randn(rng, size_t(vocab * hidden)));
    std::vector<int32_t> tok(n);
    for (int32_t& t : tok) t = int32_t(rng() % vocab);
    Dev<uint16_t> dt(table.size());
    Dev<int32_t> dk(n);
    Dev<float> dx(size_t(n * hidden));
    dt.put(table);
    dk.put(tok);
    dx.poison();
    OK(cuda::embed_gather(bf(dt.p), hidden, dk.p, n, dx.p, nullptr));
    const std::vector<float> x = dx.get();
    for (int32_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < hidden; ++i)
        ASSERT_EQ(x[size_t(t * hidden + i)], bf16_to_f32(table[size_t(tok[t] * hidden + i)])) << "hidden " << hidden;
  }
}

TEST(CudaModelOps, RmsNormResidual) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 2);
  for (int32_t dim : {64, 384, 4096, 9000}) {
    const int32_t rows = 19;
    const float eps = 1e-5f;
    const std::vector<float> x = randn(rng, size_t(rows) * dim, 2.f);
    const std::vector<uint16_t> delta = to_bf16(randn(rng, size_t(rows) * dim));
    const std::vector<float> bias = randn(rng, size_t(dim), 0.1f), w = randn(rng, size_t(dim), 0.2f, 1.f);
    // Reference: x + (delta + bias), then the CPU RMSNorm.
    std::vector<float> xr(x.size());
    for (size_t i = 0; i < x.size(); ++i) xr[i] = x[i] + (bf16_to_f32(delta[i]) + bias[i % size_t(dim)]);
    std::vector<float> ref(x.size());
    cpu::rms_norm(xr.data(), w.data(), ref.data(), rows, dim, eps);
    Dev<float> dx(x.size()), dw(w.size()), db(bias.size());
    Dev<uint16_t> dd(delta.size()), dout(x.size());
    dx.put(x);
    dw.put(w);
    db.put(bias);
    dd.put(delta);
    dout.poison();
    cuda::RmsNormArgs a;
    a.x = dx.p;
    a.delta = bf(dd.p);
    a.delta_bias = db.p;
    a.weight = dw.p;
    a.out = bf(dout.p);
    a.rows = rows;
    a.dim = dim;
    a.eps = eps;
    OK(cuda::rms_norm_residual(a, nullptr));
    EXPECT_LE(rel_err(dx.get(), xr), 1e-6) << "residual, dim " << dim;
    EXPECT_LE(rel_err(from_bf16(dout.get()), ref), 1e-2) << "norm, dim " << dim;
    // Selected rows only (the final norm): x is read, not written.
    std::vector<int32_t> idx = {3, 0, 18, 7};
    Dev<int32_t> di(idx.size());
    di.put(idx);
    dx.put(x);
    dout.poison();
    a.row_index = di.p;
    a.out_rows = int32_t(idx.size());
    OK(cuda::rms_norm_residual(a, nullptr));
    EXPECT_LE(rel_err(dx.get(), x), 0.0);
    const std::vector<float> out = from_bf16(dout.get());
    for (size_t r = 0; r < idx.size(); ++r) {
      std::vector<float> o(out.begin() + long(r * dim), out.begin() + long((r + 1) * dim));
      std::vector<float> e(ref.begin() + long(idx[r]) * dim, ref.begin() + long(idx[r] + 1) * dim);
      EXPECT_LE(rel_err(o, e), 1e-2) << "row_index, dim " << dim;
    }
  }
}

TEST(CudaModelOps, QkvRope) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 3);
  struct Case { int32_t d, H, Hkv; bool bias, norm; RopeScalingType rope; };
  const Case cases[] = {{16, 8, 2, false, false, RopeScalingType::kLlama3}, {32, 4, 2, false, true, RopeScalingType::kNone},
                        {16, 4, 2, true, false, RopeScalingType::kLinear}, {64, 6, 2, false, false, RopeScalingType::kNone},
                        {128, 32, 8, true, true, RopeScalingType::kLlama3}, {256, 4, 1, false, false, RopeScalingType::kNone}};
  for (const Case& c : cases) {
    const int32_t n = 23, qd = c.H * c.d, kd = c.Hkv * c.d, row = qd + 2 * kd, stride = row + 8;
    RopeScaling sc;
    sc.type = c.rope;
    sc.factor = 8;
    sc.original_max_position_embeddings = 64;
    const std::vector<float> inv = rope_inv_freq(c.d, 500000.0, sc);
    std::vector<int32_t> pos(n);
    for (int32_t& p : pos) p = int32_t(rng() % 140000);
    const std::vector<uint16_t> qkv = to_bf16(randn(rng, size_t(n) * stride));
    const std::vector<float> bias = randn(rng, size_t(row), 0.5f);
    const std::vector<float> qn = randn(rng, size_t(c.d), 0.2f, 1.f), kn = randn(rng, size_t(c.d), 0.2f, 1.f);
    // CPU: bias, per-head RMSNorm of q and k, RoPE of q and k.
    std::vector<float> ref(size_t(n) * row);
    for (int32_t t = 0; t < n; ++t)
      for (int32_t i = 0; i < row; ++i)
        ref[size_t(t) * row + i] = bf16_to_f32(qkv[size_t(t) * stride + i]) + (c.bias ? bias[size_t(i)] : 0.f);
    if (c.norm)
      for (int32_t t = 0; t < n; ++t) {
        float* r = ref.data() + size_t(t) * row;
        cpu::rms_norm(r, qn.data(), r, c.H, c.d, 1e-6f);
        cpu::rms_norm(r + qd, kn.data(), r + qd, c.Hkv, c.d, 1e-6f);
      }
    cpu::apply_rope(ref.data(), n, c.H, c.d, row, inv.data(), pos.data());
    cpu::apply_rope(ref.data() + qd, n, c.Hkv, c.d, row, inv.data(), pos.data());

    Dev<uint16_t> dq(qkv.size());
    Dev<float> dinv(inv.size()), db(bias.size()), dqn(qn.size()), dkn(kn.size());
    Dev<int32_t> dpos(pos.size());
    Dev<float2> dcs(size_t(n) * c.d / 2);
    dq.put(qkv);
    dinv.put(inv);
    db.put(bias);
    dqn.put(qn);
    dkn.put(kn);
    dpos.put(pos);
    OK(cuda::rope_cos_sin(dinv.p, dpos.p, n, c.d / 2, dcs.p, nullptr));
    cuda::QkvRopeArgs a;
    a.qkv = bf(dq.p);
    a.row_stride = stride;
    a.n = n;
    a.num_heads = c.H;
    a.num_kv_heads = c.Hkv;
    a.head_dim = c.d;
    a.bias = c.bias ? db.p : nullptr;
    a.q_norm = c.norm ? dqn.p : nullptr;
    a.k_norm = c.norm ? dkn.p : nullptr;
    a.eps = 1e-6f;
    a.cos_sin = dcs.p;
    OK(cuda::qkv_rope(a, nullptr));
    const std::vector<uint16_t> got = dq.get();
    std::vector<float> g(ref.size());
    for (int32_t t = 0; t < n; ++t)
      for (int32_t i = 0; i < row; ++i) g[size_t(t) * row + i] = bf16_to_f32(got[size_t(t) * stride + i]);
    EXPECT_LE(rel_err(g, ref), 1e-2) << "d " << c.d << " bias " << c.bias << " norm " << c.norm;
    for (int32_t t = 0; t < n; ++t)  // the padding after the row is untouched
      for (int32_t i = row; i < stride; ++i) ASSERT_EQ(got[size_t(t) * stride + i], qkv[size_t(t) * stride + i]);
  }
}

// qkv_rope with an append target (the decode forward's path) against qkv_rope then kv_append:
// the same qkv bits and the same pool bits (K after RoPE, V after the bias, each slot's
// position), on a pool whose untouched slots are poisoned and must stay so. Two sequences of 1
// and 3 tokens over random row lengths and scattered pages, layer 1 of 2.
TEST(CudaModelOps, QkvRopeAppendsLikeKvAppend) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 11);
  for (const int32_t d : {16, 64, 128}) {
    const int32_t H = 8, Hkv = 2, L = 2, B = 2, n = 4, layer = 1, maxp = 4, num_pages = 64;
    const int32_t qd = H * d, row = qd + 2 * Hkv * d, stride = row + 8;
    const std::vector<int32_t> seq_ids = {5, 2}, ntok = {1, 3}, tseq = {0, 1, 1, 1}, tidx = {0, 0, 1, 2};
    std::vector<int32_t> pos = {70, 31, 32, 33};
    std::vector<int32_t> rowlen(size_t(B) * L * Hkv);
    for (int32_t b = 0; b < B; ++b)
      for (int32_t i = 0; i < L * Hkv; ++i) rowlen[size_t(b * L * Hkv + i)] = ntok[size_t(b)] + int32_t(rng() % 60);
    // Every row of seq ids 0..5 gets maxp distinct pages (a shuffled pool).
    std::vector<int32_t> pages(num_pages);
    for (int32_t i = 0; i < num_pages; ++i) pages[size_t(i)] = i;
    std::shuffle(pages.begin(), pages.end(), rng);
    std::vector<int32_t> table(size_t(6) * L * Hkv * maxp, -1);
    for (int32_t b = 0; b < B; ++b)
      for (int32_t i = 0; i < L * Hkv; ++i)
        for (int32_t j = 0; j < maxp; ++j)
          table[size_t((seq_ids[size_t(b)] * L * Hkv + i) * maxp + j)] = pages[size_t((b * L * Hkv + i) * maxp + j)];
    const std::vector<float> inv = rope_inv_freq(d, 10000.0, RopeScaling{});
    const std::vector<uint16_t> qkv = to_bf16(randn(rng, size_t(n) * stride));
    const std::vector<float> bias = randn(rng, size_t(row), 0.5f);
    Dev<float> dinv(inv.size()), db(bias.size());
    Dev<int32_t> dpos{size_t(n)}, dtable(table.size()), dseq(2), dnt(2), drl(rowlen.size()), dts{size_t(n)}, dti{size_t(n)};
    Dev<float2> dcs(size_t(n) * d / 2);
    dinv.put(inv);
    db.put(bias);
    dpos.put(pos);
    dtable.put(table);
    dseq.put(seq_ids);
    dnt.put(ntok);
    drl.put(rowlen);
    dts.put(tseq);
    dti.put(tidx);
    OK(cuda::rope_cos_sin(dinv.p, dpos.p, n, d / 2, dcs.p, nullptr));
    const int64_t page_elems = int64_t{cuda::kPageSize} * d;
    // [0]: qkv_rope then kv_append; [1]: qkv_rope with the append target.
    std::vector<uint16_t> got_qkv[2], got_k[2], got_v[2];
    std::vector<int32_t> got_pos[2];
    for (int fused = 0; fused < 2; ++fused) {
      Dev<uint16_t> dq(qkv.size()), dk(size_t(num_pages) * page_elems), dv(size_t(num_pages) * page_elems);
      Dev<int32_t> dposp(size_t(num_pages) * cuda::kPageSize);
      dq.put(qkv);
      dk.poison();
      dv.poison();
      dposp.poison();
      const cuda::DeviceKvPool pool = pool_of(dk, dv, dposp, page_elems, dtable, maxp);
      const cuda::StepBatchView bv = batch_of(dseq, dnt, drl, dts, dti, dpos, n, L, Hkv);
      cuda::QkvRopeArgs a;
      a.qkv = bf(dq.p);
      a.row_stride = stride;
      a.n = n;
      a.num_heads = H;
      a.num_kv_heads = Hkv;
      a.head_dim = d;
      a.bias = db.p;
      a.cos_sin = dcs.p;
      if (fused) {
        a.pool = pool;
        a.batch = bv;
        a.layer = layer;
      }
      OK(cuda::qkv_rope(a, nullptr));
      if (!fused) OK(cuda::kv_append(pool, bv, layer, bf(dq.p), stride, qd, qd + Hkv * d, d, nullptr));
      got_qkv[fused] = dq.get();
      got_k[fused] = dk.get();
      got_v[fused] = dv.get();
      got_pos[fused] = dposp.get();
    }
    EXPECT_EQ(got_qkv[0], got_qkv[1]) << "d " << d;
    EXPECT_EQ(got_k[0], got_k[1]) << "d " << d;
    EXPECT_EQ(got_v[0], got_v[1]) << "d " << d;
    EXPECT_EQ(got_pos[0], got_pos[1]) << "d " << d;
    // The reference itself wrote something: 2 * n * Hkv entries of K, the rest still poisoned.
    int64_t written = 0;
    for (const uint16_t x : got_k[0]) written += x != 0xffff;
    EXPECT_EQ(written, int64_t{n} * Hkv * d) << "d " << d;
  }
}

TEST(CudaModelOps, SwiGlu) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 4);
  for (int32_t inter : {128, 1000, 14336, 13}) {
    const int32_t rows = 9;
    const std::vector<uint16_t> gu = to_bf16(randn(rng, size_t(rows) * 2 * inter, 3.f));
    std::vector<float> ref(size_t(rows) * inter);
    cpu::swiglu(from_bf16(gu).data(), ref.data(), rows, inter);
    Dev<uint16_t> dg(gu.size()), dout(ref.size());
    dg.put(gu);
    dout.poison();
    OK(cuda::swiglu(bf(dg.p), bf(dout.p), rows, inter, nullptr));
    EXPECT_LE(rel_err(from_bf16(dout.get()), ref), 1e-2) << "inter " << inter;
  }
}

// Projections through GemmLt: cuBLASLt, and for m <= 32 the GEMV kernels (gemv.h: CUDA cores up to
// 2 rows, tensor cores above), which split K into slices summed in order: shapes with 1 and
// several slices (k 8 .. 14336), n not a multiple of the row tiles, m of 1..8, 12, 16, 31, 32 (token
// tiles partly filled); each GEMV result also bit-identical on a second call (the slices' order is
// fixed).
TEST(CudaModelOps, GemmLt) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 5);
  auto gemm = cuda::GemmLt::create();
  ASSERT_TRUE(gemm.has_value()) << gemm.status().message();
  struct Shape { int64_t m, n, k; };
  for (const Shape s : {Shape{1, 2000, 64}, Shape{7, 384, 384}, Shape{33, 1024, 768}, Shape{300, 2048, 4096}, Shape{8, 8192, 384},
                        Shape{1, 4096, 4096}, Shape{2, 1000, 14336}, Shape{3, 6144, 4104}, Shape{4, 37, 2048},
                        Shape{5, 4099, 6144}, Shape{6, 512, 8}, Shape{8, 4096, 14336}, Shape{16, 4096, 4096},
                        Shape{31, 1111, 2056}, Shape{32, 640, 14336}, Shape{12, 130, 1000}}) {
    for (const bool gemv : {true, false}) {
    (*gemm)->set_gemv(gemv);
    (*gemm)->set_gemv_rows(cuda::kGemvMaxRows);  // the kernels at every m they take (small weights)
    const std::vector<float> x = round_bf16(randn(rng, size_t(s.m * s.k)));
    const std::vector<float> w = round_bf16(randn(rng, size_t(s.n * s.k), 0.05f));
    std::vector<float> ref(size_t(s.m * s.n));
    cpu::linear(x.data(), w.data(), nullptr, ref.data(), s.m, s.n, s.k);
    Dev<uint16_t> dx(x.size()), dw(w.size()), dy(ref.size());
    Dev<float> dyf(ref.size());
    dx.put(to_bf16(x));
    dw.put(to_bf16(w));
    dy.poison();
    dyf.poison();
    OK((*gemm)->linear(bf(dx.p), bf(dw.p), dy.p, DType::kBF16, s.m, s.n, s.k, nullptr));
    OK((*gemm)->linear(bf(dx.p), bf(dw.p), dyf.p, DType::kF32, s.m, s.n, s.k, nullptr));
    CK(cudaDeviceSynchronize());
    const bool via_gemv = gemv && s.m <= cuda::kGemvMaxRows &&
                          (s.m <= cuda::kGemvSimdRows || s.n * s.k <= cuda::kGemvTensorMaxWeight);
    const char* path = via_gemv ? " (gemv)" : " (cuBLASLt)";
    EXPECT_LE(rel_err(from_bf16(dy.get()), ref), 1e-2) << s.m << "x" << s.n << "x" << s.k << " bf16 out" << path;
    EXPECT_LE(rel_err(dyf.get(), ref), 1e-4) << s.m << "x" << s.n << "x" << s.k << " fp32 out" << path;
    if (via_gemv) {  // the same bits again
      const std::vector<float> first = dyf.get();
      dyf.poison();
      OK((*gemm)->linear(bf(dx.p), bf(dw.p), dyf.p, DType::kF32, s.m, s.n, s.k, nullptr));
      CK(cudaDeviceSynchronize());
      EXPECT_EQ(dyf.get(), first) << s.m << "x" << s.n << "x" << s.k << ": gemv not deterministic";
    }
    }
  }
  (*gemm)->set_gemv(true);
}

// The down projection with its SwiGLU (GemmLt::linear_swiglu): fused into the CUDA-core GEMV at
// m <= 2, swiglu() then linear() above. Against swiglu() then linear() run separately: the same
// bits where both take the same GEMV (the fused load rounds SwiGLU to bf16 as swiglu() does), and
// against the CPU (SwiGLU in fp32, bf16-rounded, then the fp32 product).
TEST(CudaModelOps, SwigluFusedIntoDownProjection) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 11);
  auto gemm = cuda::GemmLt::create();
  ASSERT_TRUE(gemm.has_value()) << gemm.status().message();
  struct Shape { int64_t m, n, k; };
  for (const Shape s : {Shape{1, 4096, 14336}, Shape{2, 1000, 2056}, Shape{1, 37, 8}, Shape{3, 512, 4104},
                        Shape{8, 640, 2048}}) {
    const std::vector<float> gu = round_bf16(randn(rng, size_t(s.m * 2 * s.k), 2.f));
    const std::vector<float> w = round_bf16(randn(rng, size_t(s.n * s.k), 0.05f));
    std::vector<float> act(size_t(s.m * s.k));
    for (int64_t r = 0; r < s.m; ++r)
      for (int64_t i = 0; i < s.k; ++i) {
        const float g = gu[size_t(r * 2 * s.k + i)], u = gu[size_t(r * 2 * s.k + s.k + i)];
        act[size_t(r * s.k + i)] = g / (1.f + std::exp(-g)) * u;
      }
    const std::vector<float> act_bf = round_bf16(act);
    std::vector<float> ref(size_t(s.m * s.n));
    cpu::linear(act_bf.data(), w.data(), nullptr, ref.data(), s.m, s.n, s.k);
    Dev<uint16_t> dgu(gu.size()), dw(w.size()), dact(act.size());
    Dev<float> dfused(ref.size()), dsplit(ref.size());
    dgu.put(to_bf16(gu));
    dw.put(to_bf16(w));
    dact.poison();
    dfused.poison();
    dsplit.poison();
    OK((*gemm)->linear_swiglu(bf(dgu.p), bf(dact.p), bf(dw.p), dfused.p, DType::kF32, s.m, s.n, s.k, nullptr));
    OK(cuda::swiglu(bf(dgu.p), bf(dact.p), int32_t(s.m), int32_t(s.k), nullptr));
    OK((*gemm)->linear(bf(dact.p), bf(dw.p), dsplit.p, DType::kF32, s.m, s.n, s.k, nullptr));
    CK(cudaDeviceSynchronize());
    const std::vector<float> fused = dfused.get();
    EXPECT_EQ(fused, dsplit.get()) << s.m << "x" << s.n << "x" << s.k << ": fused differs from swiglu + linear";
    EXPECT_LE(rel_err(fused, ref), 1e-3) << s.m << "x" << s.n << "x" << s.k;
  }
}

// K/V append into pages and the generic paged attention, for a batch holding a decode token, a
// chunk appended to a row with prior entries (rows of different lengths, as after compression)
// and a fresh prompt, against the CPU's paged_attention over the same bf16 values.
TEST(CudaModelOps, KvAppendAndGenericAttention) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 6);
  for (int32_t d : {16, 32, 64, 128}) {
    const int32_t L = 2, Hkv = 2, H = 6, layer = 1, num_pages = 256;
    KvLayout layout{L, Hkv, d, kPageSize};
    KvCacheManager m(layout, num_pages);
    CpuKvStorage store(layout, num_pages);
    // Three sequences; sequence 1 first gets 40 entries, then drops some per head.
    std::vector<SeqId> seqs = {m.add_sequence(), m.add_sequence(), m.add_sequence()};
    const std::vector<int32_t> prior = {21, 40, 0};
    const std::vector<int32_t> ntok = {1, 9, 30};
    for (int s = 0; s < 3; ++s) {
      if (prior[size_t(s)] == 0) continue;
      KvGrowth gr{seqs[size_t(s)], prior[size_t(s)]};
      KvReservation r;
      ASSERT_EQ(m.reserve({&gr, 1}, &r), Admission::kOk);
      m.commit(r);
    }
    // Prior entries: random bf16 K/V, written on both sides below.
    std::vector<int32_t> keep;
    for (int32_t i = 0; i < 40; i += 3) keep.push_back(i);
    (void)m.keep_entries(seqs[1], layer, 0, keep);  // row (1, layer, 0) keeps 14 of 40
    std::vector<KvGrowth> grs;
    for (int s = 0; s < 3; ++s) grs.push_back({seqs[size_t(s)], ntok[size_t(s)]});
    KvReservation r;
    ASSERT_EQ(m.reserve(grs, &r), Admission::kOk);
    m.commit(r);

    const int64_t page_elems = int64_t{kPageSize} * d;
    std::vector<float> kpool = round_bf16(randn(rng, size_t(num_pages * page_elems)));
    std::vector<float> vpool = round_bf16(randn(rng, size_t(num_pages * page_elems)));
    // Page table mirror: 3 seqs x 4 rows x max pages.
    const int32_t maxp = 8;
    std::vector<int32_t> table(size_t(3 * L * Hkv * maxp), 0);
    for (int s = 0; s < 3; ++s)
      for (int32_t l = 0; l < L; ++l)
        for (int32_t h = 0; h < Hkv; ++h) {
          auto p = m.pages(seqs[size_t(s)], l, h);
          for (size_t i = 0; i < p.size(); ++i) table[size_t(((s * L + l) * Hkv + h) * maxp) + i] = p[i];
        }
    // The step's tokens: qkv rows [q | k | v].
    const int32_t n = 1 + 9 + 30, qd = H * d, kd = Hkv * d, stride = qd + 2 * kd;
    const std::vector<float> qkv = round_bf16(randn(rng, size_t(n) * stride));
    std::vector<int32_t> seq_ids = {seqs[0], seqs[1], seqs[2]}, tseq, tidx, pos;
    std::vector<int32_t> rowlen(size_t(3 * L * Hkv));
    for (int s = 0; s < 3; ++s) {
      for (int32_t l = 0; l < L; ++l)
        for (int32_t h = 0; h < Hkv; ++h) rowlen[size_t((s * L + l) * Hkv + h)] = m.length(seqs[size_t(s)], l, h);
      for (int32_t i = 0; i < ntok[size_t(s)]; ++i) {
        tseq.push_back(s);
        tidx.push_back(i);
        pos.push_back(prior[size_t(s)] + i);
      }
    }
    // CPU side: storage holds the pool values, then the step's K/V at their slots.
    for (int64_t slot = 0; slot < int64_t{num_pages} * kPageSize; ++slot) {
      std::copy_n(kpool.data() + slot * d, d, store.key(slot));
      std::copy_n(vpool.data() + slot * d, d, store.value(slot));
    }
    for (int32_t t = 0; t < n; ++t) {
      const int s = tseq[size_t(t)];
      for (int32_t h = 0; h < Hkv; ++h) {
        const int32_t len = m.length(seqs[size_t(s)], layer, h);
        const KvSlot slot = m.slot(seqs[size_t(s)], layer, h, len - ntok[size_t(s)] + tidx[size_t(t)]);
        std::copy_n(qkv.data() + size_t(t) * stride + qd + h * d, d, store.key(slot));
        std::copy_n(qkv.data() + size_t(t) * stride + qd + kd + h * d, d, store.value(slot));
      }
    }
    std::vector<float> ref(size_t(n) * qd);
    for (int s = 0, t0 = 0; s < 3; t0 += ntok[size_t(s)], ++s) {
      cpu::PagedKvRows rows;
      rows.storage = &store;
      rows.page_size = kPageSize;
      for (int32_t h = 0; h < Hkv; ++h) {
        rows.pages.push_back(m.pages(seqs[size_t(s)], layer, h));
        rows.lengths.push_back(m.length(seqs[size_t(s)], layer, h));
      }
      // Positions: the CPU masks by stored position; prior entries hold positions below the step's.
      std::vector<float> q(size_t(ntok[size_t(s)]) * qd);
      std::vector<int32_t> qpos(size_t(ntok[size_t(s)]));
      for (int32_t i = 0; i < ntok[size_t(s)]; ++i) {
        std::copy_n(qkv.data() + size_t(t0 + i) * stride, qd, q.data() + size_t(i) * qd);
        qpos[size_t(i)] = 1000 + i;
      }
      for (int32_t h = 0; h < Hkv; ++h) {
        const int32_t len = rows.lengths[size_t(h)];
        for (int32_t e = 0; e < len; ++e)
          store.position(rows.slot(h, e)) = e < len - ntok[size_t(s)] ? e : 1000 + (e - (len - ntok[size_t(s)]));
      }
      cpu::paged_attention(q.data(), qpos.data(), ntok[size_t(s)], H, rows, 1.f / std::sqrt(float(d)),
                           ref.data() + size_t(t0) * qd);
    }

    Dev<uint16_t> dk(kpool.size()), dv(vpool.size()), dqkv(qkv.size()), dout(size_t(n) * qd);
    Dev<int32_t> dtable(table.size()), dseq(3), dnt(3), drl(rowlen.size()), dts{size_t(n)}, dti{size_t(n)}, dpos{size_t(n)},
        dposp{size_t(num_pages) * kPageSize};
    dk.put(to_bf16(kpool));
    dv.put(to_bf16(vpool));
    dqkv.put(to_bf16(qkv));
    dtable.put(table);
    dseq.put(seq_ids);
    dnt.put(ntok);
    drl.put(rowlen);
    dts.put(tseq);
    dti.put(tidx);
    dpos.put(pos);
    dout.poison();
    const cuda::DeviceKvPool pool = pool_of(dk, dv, dposp, page_elems, dtable, maxp);
    const cuda::StepBatchView bv = batch_of(dseq, dnt, drl, dts, dti, dpos, n, L, Hkv);
    OK(cuda::kv_append(pool, bv, layer, bf(dqkv.p), stride, qd, qd + kd, d, nullptr));
    OK(cuda::attention_generic(pool, bv, layer, H, d, bf(dqkv.p), stride, bf(dout.p), qd, 1.f / std::sqrt(float(d)), nullptr));
    // The pool now equals the CPU storage at every slot the step wrote.
    const std::vector<float> kgot = from_bf16(dk.get());
    for (int64_t slot = 0; slot < int64_t{num_pages} * kPageSize; ++slot)
      for (int32_t i = 0; i < d; ++i) ASSERT_EQ(kgot[size_t(slot * d + i)], store.key(slot)[i]) << "slot " << slot;
    EXPECT_LE(rel_err(from_bf16(dout.get()), ref), 1e-2) << "d " << d;
    // Gather of rows (prefill over prior entries): row h of (seq 1, layer) into [Hkv][64][d].
    std::vector<int32_t> lens = {m.length(seqs[1], layer, 0), m.length(seqs[1], layer, 1)};
    Dev<int32_t> dl(2);
    dl.put(lens);
    Dev<uint16_t> gk(size_t(Hkv) * 64 * d), gv(size_t(Hkv) * 64 * d);
    OK(cuda::kv_gather_rows(pool, seqs[1], layer, L, Hkv, d, dl.p, 64, bf(gk.p), bf(gv.p), 64 * d, nullptr));
    const std::vector<float> gkh = from_bf16(gk.get());
    for (int32_t h = 0; h < Hkv; ++h)
      for (int32_t e = 0; e < lens[size_t(h)]; ++e)
        for (int32_t i = 0; i < d; ++i)
          ASSERT_EQ(gkh[size_t((h * 64 + e) * d + i)], store.key(m.slot(seqs[1], layer, h, e))[i]);
  }
}

TEST(CudaModelOps, Sampling) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(test_seed() + 7);
  struct Case { float temperature; int32_t top_k; float top_p; };
  const Case cases[] = {{0.f, 0, 1.f}, {1.f, 0, 1.f}, {0.7f, 50, 1.f}, {1.3f, 0, 0.9f}, {0.8f, 40, 0.95f},
                        {1.f, 1, 1.f}, {2.f, 0, 0.5f}, {1.f, 7, 0.3f}};
  const int32_t vocab = 5003, rows_per_case = 48;
  int total = 0, equal = 0;
  for (const Case& c : cases) {
    std::vector<float> logits;
    std::vector<cuda::DeviceSamplingRow> params;
    std::vector<int32_t> expect;
    for (int32_t r = 0; r < rows_per_case; ++r) {
      std::vector<float> row = randn(rng, size_t(vocab), 2.f);
      // Plateaus: ties at the top and in the body test the lowest-id and tie-ordering rules.
      if (r % 3 == 0)
        for (int32_t i = 0; i < vocab; i += 5) row[size_t(i)] = std::round(row[size_t(i)]);
      if (r % 4 == 0) row[size_t(vocab - 1)] = row[size_t(vocab / 2)] = *std::max_element(row.begin(), row.end());
      SamplingParams sp;
      sp.temperature = c.temperature;
      sp.top_k = c.top_k;
      sp.top_p = c.top_p;
      sp.seed = rng();
      Sampler cpu_sampler(sp);
      expect.push_back(cpu_sampler.sample(row));
      std::mt19937_64 u_rng(sp.seed);
      cuda::DeviceSamplingRow p;
      p.temperature = c.temperature;
      p.top_k = c.top_k;
      p.top_p = c.top_p;
      p.row = r;
      p.u = c.temperature > 0 ? static_cast<double>(u_rng() >> 11) * 0x1.0p-53 : 0.0;
      params.push_back(p);
      logits.insert(logits.end(), row.begin(), row.end());
    }
    Dev<float> dl(logits.size());
    Dev<cuda::DeviceSamplingRow> dp(params.size());
    Dev<int32_t> dout(params.size()), dam(params.size());
    dl.put(logits);
    dp.put(params);
    OK(cuda::sample_rows(dl.p, vocab, rows_per_case, vocab, dp.p, dout.p, nullptr));
    OK(cuda::argmax_rows(dl.p, vocab, rows_per_case, vocab, dam.p, nullptr));
    const std::vector<int32_t> got = dout.get(), am = dam.get();
    for (int32_t r = 0; r < rows_per_case; ++r) {
      const std::span<const float> row(logits.data() + size_t(r) * vocab, size_t(vocab));
      ASSERT_EQ(am[size_t(r)], argmax(row)) << "argmax row " << r;
      ++total;
      if (got[size_t(r)] == expect[size_t(r)]) {
        ++equal;
      } else if (c.temperature == 0.f) {
        ADD_FAILURE() << "greedy differs";
      } else {
        // Only a draw at a boundary of the cumulative distribution may differ (fp64 sums in
        // another order): the CPU's probability of the GPU's pick must be non-zero.
        SamplingParams sp;
        sp.temperature = c.temperature;
        sp.top_k = c.top_k;
        sp.top_p = c.top_p;
        const std::vector<double> probs = Sampler(sp).distribution(row);
        EXPECT_GT(probs[size_t(got[size_t(r)])], 0.0) << "sampled a token the CPU excludes (T " << c.temperature
                                                     << ", k " << c.top_k << ", p " << c.top_p << ")";
      }
    }
  }
  std::printf("  sampling: %d of %d draws identical to the CPU Sampler\n", equal, total);
  EXPECT_GE(equal, total * 98 / 100);
}

}  // namespace
}  // namespace adakv

#else  // built without CUDA

TEST(CudaModelOps, NeedsCuda) { GTEST_SKIP() << "adakv was built without CUDA: GPU tests skipped"; }

#endif  // ADAKV_HAVE_CUDA
