// CPU ops against direct double-precision implementations of the formulas, on random inputs:
// linear (sgemm and the sgemv path), RMSNorm, SwiGLU, RoPE in its three variants (default, linear,
// llama3 with all three frequency bands present), and paged attention with GQA, rows of different
// lengths, scattered pages and non-contiguous stored positions (as after compression).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <numeric>
#include <random>
#include <vector>

#include "backends/cpu/cpu_attention.h"
#include "backends/cpu/cpu_ops.h"
#include "model/rope.h"

namespace adakv {
namespace {

std::vector<float> random_vector(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TEST(CpuOps, LinearMatchesDoubleProductWithBias) {
  std::mt19937 rng(1);
  const int64_t n = 37, k = 29;
  const std::vector<float> w = random_vector(n * k, rng);
  const std::vector<float> bias = random_vector(n, rng);
  for (int64_t m : {1, 5}) {  // m == 1 takes the sgemv path
    const std::vector<float> x = random_vector(m * k, rng);
    std::vector<float> y(m * n);
    cpu::linear(x.data(), w.data(), bias.data(), y.data(), m, n, k);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        double ref = bias[j];
        for (int64_t i = 0; i < k; ++i) ref += static_cast<double>(x[r * k + i]) * w[j * k + i];
        EXPECT_NEAR(y[r * n + j], ref, 1e-4) << "m=" << m << " r=" << r << " j=" << j;
      }
    }
  }
}

TEST(CpuOps, RmsNormMatchesFormula) {
  std::mt19937 rng(2);
  const int64_t rows = 7, dim = 64;
  const float eps = 1e-5f;
  const std::vector<float> x = random_vector(rows * dim, rng, 3.0f);
  const std::vector<float> w = random_vector(dim, rng);
  std::vector<float> y(rows * dim);
  cpu::rms_norm(x.data(), w.data(), y.data(), rows, dim, eps);
  for (int64_t r = 0; r < rows; ++r) {
    double ms = 0;
    for (int64_t i = 0; i < dim; ++i) ms += static_cast<double>(x[r * dim + i]) * x[r * dim + i];
    ms /= dim;
    const double inv = 1.0 / std::sqrt(ms + eps);
    for (int64_t i = 0; i < dim; ++i) {
      const double ref = w[i] * x[r * dim + i] * inv;
      EXPECT_NEAR(y[r * dim + i], ref, 1e-5 * (1.0 + std::abs(ref)));
    }
  }
  // In place (y aliases x) gives the same result.
  std::vector<float> z = x;
  cpu::rms_norm(z.data(), w.data(), z.data(), rows, dim, eps);
  EXPECT_EQ(z, y);
}

TEST(CpuOps, SwigluMatchesFormula) {
  std::mt19937 rng(3);
  const int64_t rows = 4, inter = 48;
  const std::vector<float> gu = random_vector(rows * 2 * inter, rng, 4.0f);
  std::vector<float> out(rows * inter);
  cpu::swiglu(gu.data(), out.data(), rows, inter);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < inter; ++i) {
      const double g = gu[r * 2 * inter + i];
      const double u = gu[r * 2 * inter + inter + i];
      const double ref = g / (1.0 + std::exp(-g)) * u;
      EXPECT_NEAR(out[r * inter + i], ref, 1e-5 * (1.0 + std::abs(ref)));
    }
  }
}

// Inverse frequencies straight from the published formulas, in double.
std::vector<double> reference_inv_freq(int64_t d, double theta, const RopeScaling& s) {
  std::vector<double> inv(d / 2);
  for (int64_t i = 0; i < d / 2; ++i) inv[i] = std::pow(theta, -2.0 * i / d);
  if (s.type == RopeScalingType::kLinear) {
    for (double& f : inv) f /= s.factor;
  } else if (s.type == RopeScalingType::kLlama3) {
    const double old_len = static_cast<double>(s.original_max_position_embeddings);
    for (double& f : inv) {
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen < old_len / s.high_freq_factor) continue;  // high frequency: unchanged
      if (wavelen > old_len / s.low_freq_factor) {            // low frequency: / factor
        f /= s.factor;
        continue;
      }
      const double smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = (1 - smooth) * f / s.factor + smooth * f;
    }
  }
  return inv;
}

struct RopeCase {
  const char* name;
  int64_t head_dim;
  double theta;
  RopeScaling scaling;
};

std::vector<RopeCase> rope_cases() {
  RopeScaling none;
  RopeScaling linear;
  linear.type = RopeScalingType::kLinear;
  linear.factor = 4.0;
  RopeScaling llama3;
  llama3.type = RopeScalingType::kLlama3;
  llama3.factor = 8.0;
  llama3.low_freq_factor = 1.0;
  llama3.high_freq_factor = 4.0;
  llama3.original_max_position_embeddings = 32;
  return {{"default", 16, 10000.0, none},
          {"default_d32", 32, 1000000.0, none},
          {"linear", 16, 10000.0, linear},
          {"llama3", 16, 10000.0, llama3}};
}

TEST(CpuOps, RopeInverseFrequenciesMatchFormulas) {
  for (const RopeCase& c : rope_cases()) {
    const std::vector<float> got = rope_inv_freq(c.head_dim, c.theta, c.scaling);
    const std::vector<double> ref = reference_inv_freq(c.head_dim, c.theta, c.scaling);
    ASSERT_EQ(got.size(), ref.size()) << c.name;
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-6 * ref[i]) << c.name << " i=" << i;
  }
}

TEST(CpuOps, Llama3CaseCoversAllThreeBands) {
  // The llama3 case must exercise the unchanged, the divided and the smoothed band, or the
  // comparison above proves little.
  const RopeCase c = rope_cases()[3];
  const std::vector<double> plain = reference_inv_freq(c.head_dim, c.theta, RopeScaling{});
  const std::vector<float> got = rope_inv_freq(c.head_dim, c.theta, c.scaling);
  int unchanged = 0, divided = 0, smoothed = 0;
  for (size_t i = 0; i < plain.size(); ++i) {
    const double ratio = plain[i] / got[i];
    if (std::abs(ratio - 1.0) < 1e-5) {
      ++unchanged;
    } else if (std::abs(ratio - c.scaling.factor) < 1e-4) {
      ++divided;
    } else {
      EXPECT_GT(ratio, 1.0);
      EXPECT_LT(ratio, c.scaling.factor);
      ++smoothed;
    }
  }
  EXPECT_GT(unchanged, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(smoothed, 0);
}

TEST(CpuOps, ApplyRopeMatchesRotateHalfInDouble) {
  std::mt19937 rng(4);
  for (const RopeCase& c : rope_cases()) {
    const int64_t n = 5, heads = 3, d = c.head_dim;
    const int64_t stride = heads * d + 7;  // rows with padding: rope must honour the stride
    std::vector<float> x = random_vector(n * stride, rng);
    const std::vector<float> orig = x;
    const std::vector<int32_t> positions = {0, 1, 17, 40, 123};
    const std::vector<float> inv = rope_inv_freq(d, c.theta, c.scaling);
    cpu::apply_rope(x.data(), n, heads, d, stride, inv.data(), positions.data());
    const std::vector<double> ref_inv = reference_inv_freq(d, c.theta, c.scaling);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* o = orig.data() + t * stride + h * d;
        const float* r = x.data() + t * stride + h * d;
        for (int64_t i = 0; i < d; ++i) {
          const int64_t j = i % (d / 2);
          const double angle = ref_inv[j] * positions[t];
          // q * cos + rotate_half(q) * sin, rotate_half(q) = [-q2, q1].
          const double rot = i < d / 2 ? -static_cast<double>(o[i + d / 2]) : static_cast<double>(o[i - d / 2]);
          const double ref = o[i] * std::cos(angle) + rot * std::sin(angle);
          // fp32 angles carry ~1e-7 relative error, so the tolerance grows with the position.
          EXPECT_NEAR(r[i], ref, 1e-5 + 2e-6 * positions[t]) << c.name << " t=" << t << " h=" << h << " i=" << i;
        }
      }
      // The padding after the heads is untouched.
      for (int64_t i = heads * d; i < stride; ++i) EXPECT_EQ(x[t * stride + i], orig[t * stride + i]);
    }
  }
}

// Naive attention in double: each query head over its KV head's entries (kept as plain lists),
// masked by stored position <= query position.
struct Entry {
  int32_t pos;
  std::vector<float> k, v;
};

// Builds rows holding entries at `row_positions` (one list per KV head) scattered over shuffled
// pages, runs paged_attention on random queries at `q_pos` and compares with the naive version.
void check_attention(const std::vector<std::vector<int32_t>>& row_positions, const std::vector<int32_t>& q_pos,
                     int32_t num_heads, cpu::AttentionPath path, uint32_t seed) {
  std::mt19937 rng(seed);
  const int32_t d = 16, page = 4;
  const int32_t num_kv_heads = static_cast<int32_t>(row_positions.size());
  const int64_t n = static_cast<int64_t>(q_pos.size());
  KvLayout layout;
  layout.num_layers = 1;
  layout.num_kv_heads = num_kv_heads;
  layout.head_dim = d;
  layout.page_size = page;
  int64_t pool_pages = 0;
  for (const auto& r : row_positions) pool_pages += (static_cast<int64_t>(r.size()) + page - 1) / page + 1;
  CpuKvStorage storage(layout, pool_pages);
  std::vector<int32_t> free_pages(pool_pages);
  std::iota(free_pages.begin(), free_pages.end(), 0);
  std::shuffle(free_pages.begin(), free_pages.end(), rng);
  std::vector<std::vector<int32_t>> pages(num_kv_heads);
  std::vector<std::vector<Entry>> entries(num_kv_heads);
  cpu::PagedKvRows rows;
  rows.storage = &storage;
  rows.page_size = page;
  for (int h = 0; h < num_kv_heads; ++h) {
    const int32_t len = static_cast<int32_t>(row_positions[h].size());
    for (int32_t p = 0; p < (len + page - 1) / page; ++p) {
      pages[h].push_back(free_pages.back());
      free_pages.pop_back();
    }
    for (int32_t i = 0; i < len; ++i) {
      Entry e{row_positions[h][i], random_vector(d, rng), random_vector(d, rng)};
      const KvSlot s = static_cast<KvSlot>(pages[h][i / page]) * page + i % page;
      std::copy(e.k.begin(), e.k.end(), storage.key(s));
      std::copy(e.v.begin(), e.v.end(), storage.value(s));
      storage.position(s) = e.pos;
      entries[h].push_back(std::move(e));
    }
    rows.lengths.push_back(len);
  }
  for (int h = 0; h < num_kv_heads; ++h) rows.pages.emplace_back(pages[h]);

  const std::vector<float> q = random_vector(n * num_heads * d, rng, 2.0f);
  std::vector<float> out(n * num_heads * d, -1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  cpu::paged_attention(q.data(), q_pos.data(), n, num_heads, rows, scale, out.data(), path);

  const int group = num_heads / num_kv_heads;
  for (int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < num_heads; ++h) {
      const std::vector<Entry>& row = entries[h / group];
      const float* qh = q.data() + (t * num_heads + h) * d;
      std::vector<double> logits;
      std::vector<const Entry*> seen;
      for (const Entry& e : row) {
        if (e.pos > q_pos[t]) continue;
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += static_cast<double>(qh[i]) * e.k[i];
        logits.push_back(dot / std::sqrt(static_cast<double>(d)));
        seen.push_back(&e);
      }
      const double mx = seen.empty() ? 0.0 : *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      for (double& l : logits) sum += (l = std::exp(l - mx));
      for (int i = 0; i < d; ++i) {
        double ref = 0;  // no visible entry: zeros
        for (size_t j = 0; j < seen.size(); ++j) ref += logits[j] / sum * seen[j]->v[i];
        ASSERT_NEAR(out[(t * num_heads + h) * d + i], ref, 1e-5) << "t=" << t << " h=" << h << " i=" << i;
      }
    }
  }
}

TEST(CpuOps, PagedAttentionMatchesNaiveWithGqaAndUnevenHeads) {
  // Head 0: a compressed row (positions with holes) plus the three new tokens; head 1: fewer
  // entries, positions out of order (as KV-Compress compaction leaves them), plus the new tokens.
  const std::vector<std::vector<int32_t>> rows = {
      {0, 1, 2, 5, 6, 9, 11, 12, 15, 17, 20, 21, 22},
      {3, 0, 19, 8, 20, 21, 22},
  };
  const std::vector<int32_t> q_pos = {20, 21, 22};
  for (auto path : {cpu::AttentionPath::kByToken, cpu::AttentionPath::kGemm, cpu::AttentionPath::kAuto}) {
    SCOPED_TRACE(static_cast<int>(path));
    check_attention(rows, q_pos, /*num_heads=*/8, path, 5);
  }
}

TEST(CpuOps, PagedAttentionPrefillShapesBothPaths) {
  // A causal prefill of 37 tokens into 4 KV heads (group 2), and the same with one head
  // compressed to every third position plus a query that sees nothing of one head.
  std::vector<int32_t> all(37);
  std::iota(all.begin(), all.end(), 0);
  std::vector<int32_t> thirds;
  for (int32_t p = 2; p < 37; p += 3) thirds.push_back(p);
  const std::vector<std::vector<int32_t>> full = {all, all, all, all};
  const std::vector<std::vector<int32_t>> mixed = {all, thirds, all, {}};
  for (auto path : {cpu::AttentionPath::kByToken, cpu::AttentionPath::kGemm}) {
    SCOPED_TRACE(static_cast<int>(path));
    check_attention(full, all, /*num_heads=*/8, path, 6);
    check_attention(mixed, all, /*num_heads=*/8, path, 7);
  }
}

TEST(CpuOps, PagedAttentionWithNoVisibleEntryGivesZeros) {
  KvLayout layout;
  layout.num_layers = 1;
  layout.num_kv_heads = 1;
  layout.head_dim = 4;
  layout.page_size = 4;
  CpuKvStorage storage(layout, 1);
  for (int i = 0; i < 2; ++i) {
    std::fill_n(storage.key(i), 4, 1.0f);
    std::fill_n(storage.value(i), 4, 1.0f);
    storage.position(i) = 10 + i;
  }
  const std::vector<int32_t> page_ids = {0};
  cpu::PagedKvRows rows;
  rows.storage = &storage;
  rows.page_size = 4;
  rows.pages.emplace_back(page_ids);
  rows.lengths.push_back(2);
  const std::vector<float> q(4, 1.0f);
  const std::vector<int32_t> pos = {5};
  std::vector<float> out(4, 7.0f);
  cpu::paged_attention(q.data(), pos.data(), 1, 1, rows, 0.5f, out.data());
  EXPECT_EQ(out, std::vector<float>(4, 0.0f));
}

}  // namespace
}  // namespace adakv
