#include "compress/scorers.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/check.h"

namespace adakv {

namespace {

void check_inputs(const HeadAttentionInputs& in) {
  ADAKV_CHECK(in.queries != nullptr && in.keys != nullptr, "scorer inputs need queries and keys");
  ADAKV_CHECK(in.group >= 1 && in.num_heads % in.group == 0, "group must divide the query heads");
  ADAKV_CHECK((in.kv_head + 1) * in.group <= in.num_heads, "kv head out of range for the query heads");
  ADAKV_CHECK(in.num_queries >= 0 && in.num_queries <= in.length, "more queries than keys");
  ADAKV_CHECK(in.key_stride >= in.head_dim, "key stride shorter than a key");
}

// Softmax probabilities of query row `qi` (0-based among the last num_queries) of query head `h`
// over the keys it sees; out[j] for j < visible, the rest untouched. Returns `visible`.
int32_t attention_row(const HeadAttentionInputs& in, int32_t qi, int32_t h, std::vector<double>& logits) {
  const int32_t visible = in.length - in.num_queries + qi + 1;  // causal, bottom-right aligned
  const float* q = in.queries + (static_cast<int64_t>(qi) * in.num_heads + h) * in.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(in.head_dim));
  double m = -std::numeric_limits<double>::infinity();
  for (int32_t j = 0; j < visible; ++j) {
    const float* k = in.keys + j * in.key_stride;
    double dot = 0.0;
    for (int32_t t = 0; t < in.head_dim; ++t) dot += static_cast<double>(q[t]) * static_cast<double>(k[t]);
    logits[static_cast<size_t>(j)] = dot * scale;
    m = std::max(m, logits[static_cast<size_t>(j)]);
  }
  double sum = 0.0;
  for (int32_t j = 0; j < visible; ++j) {
    const double e = std::exp(logits[static_cast<size_t>(j)] - m);
    logits[static_cast<size_t>(j)] = e;
    sum += e;
  }
  for (int32_t j = 0; j < visible; ++j) logits[static_cast<size_t>(j)] /= sum;
  return visible;
}

// [g][L]: sum over the last `window` queries of p^power (power 1 or 2).
std::vector<double> window_prob_sums(const HeadAttentionInputs& in, int32_t window, int power) {
  check_inputs(in);
  ADAKV_CHECK(window >= 1 && window <= in.num_queries, "window needs that many trailing queries");
  const size_t L = static_cast<size_t>(in.length);
  std::vector<double> out(static_cast<size_t>(in.group) * L, 0.0);
  std::vector<double> row(L);
  for (int32_t gi = 0; gi < in.group; ++gi) {
    const int32_t h = in.kv_head * in.group + gi;
    double* acc = out.data() + static_cast<size_t>(gi) * L;
    for (int32_t qi = in.num_queries - window; qi < in.num_queries; ++qi) {
      const int32_t visible = attention_row(in, qi, h, row);
      for (int32_t j = 0; j < visible; ++j) {
        const double p = row[static_cast<size_t>(j)];
        acc[j] += power == 1 ? p : p * p;
      }
    }
  }
  return out;
}

}  // namespace

std::vector<double> window_mean_probs(const HeadAttentionInputs& in, int32_t window) {
  std::vector<double> s = window_prob_sums(in, window, 1);
  for (double& v : s) v /= window;
  return s;
}

std::vector<double> window_squared_probs(const HeadAttentionInputs& in, int32_t window) {
  return window_prob_sums(in, window, 2);
}

std::vector<double> accumulated_probs(const HeadAttentionInputs& in, GqaReduce reduce) {
  check_inputs(in);
  const size_t L = static_cast<size_t>(in.length);
  std::vector<double> acc(L, 0.0);
  std::vector<double> per_head(static_cast<size_t>(in.group) * L);
  std::vector<double> row(L);
  for (int32_t qi = 0; qi < in.num_queries; ++qi) {
    int32_t visible = 0;
    for (int32_t gi = 0; gi < in.group; ++gi) {
      visible = attention_row(in, qi, in.kv_head * in.group + gi, row);
      std::copy_n(row.data(), visible, per_head.data() + static_cast<size_t>(gi) * L);
      std::fill(per_head.data() + static_cast<size_t>(gi) * L + visible, per_head.data() + (gi + 1) * L, 0.0);
    }
    const std::vector<double> r = reduce_group(per_head, in.group, in.length, reduce);
    for (int32_t j = 0; j < visible; ++j) acc[static_cast<size_t>(j)] += r[static_cast<size_t>(j)];
  }
  return acc;
}

std::vector<double> reduce_group(std::span<const double> per_head, int32_t group, int32_t n, GqaReduce reduce) {
  ADAKV_CHECK(per_head.size() == static_cast<size_t>(group) * static_cast<size_t>(n), "reduce_group size mismatch");
  std::vector<double> out(static_cast<size_t>(n));
  for (int32_t j = 0; j < n; ++j) {
    double v = per_head[static_cast<size_t>(j)];
    for (int32_t gi = 1; gi < group; ++gi) {
      const double x = per_head[static_cast<size_t>(gi) * static_cast<size_t>(n) + static_cast<size_t>(j)];
      v = reduce == GqaReduce::kMax ? std::max(v, x) : v + x;
    }
    out[static_cast<size_t>(j)] = reduce == GqaReduce::kMean ? v / group : v;
  }
  return out;
}

std::vector<double> pool_1d(std::span<const double> x, PoolKind kind, int32_t kernel) {
  ADAKV_CHECK(kernel >= 1 && kernel % 2 == 1, "pool kernel must be odd");
  const int64_t n = static_cast<int64_t>(x.size());
  const int64_t half = kernel / 2;
  std::vector<double> out(x.size());
  for (int64_t j = 0; j < n; ++j) {
    const int64_t lo = std::max<int64_t>(0, j - half);
    const int64_t hi = std::min<int64_t>(n - 1, j + half);
    if (kind == PoolKind::kMax) {
      double m = x[static_cast<size_t>(lo)];
      for (int64_t t = lo + 1; t <= hi; ++t) m = std::max(m, x[static_cast<size_t>(t)]);
      out[static_cast<size_t>(j)] = m;
    } else {
      double s = 0.0;
      for (int64_t t = lo; t <= hi; ++t) s += x[static_cast<size_t>(t)];
      out[static_cast<size_t>(j)] = s / kernel;
    }
  }
  return out;
}

std::vector<double> snapkv_head_scores(const HeadAttentionInputs& in, int32_t window, GqaReduce gqa, PoolKind pool,
                                       int32_t kernel) {
  if (in.length <= window) return {};
  const int32_t prefix = in.length - window;
  const std::vector<double> mean = window_mean_probs(in, window);  // [g][L]
  // Only the prefix keys compete: gather [g][prefix].
  std::vector<double> per_head(static_cast<size_t>(in.group) * static_cast<size_t>(prefix));
  for (int32_t gi = 0; gi < in.group; ++gi)
    std::copy_n(mean.data() + static_cast<size_t>(gi) * static_cast<size_t>(in.length), prefix,
                per_head.data() + static_cast<size_t>(gi) * static_cast<size_t>(prefix));
  const std::vector<double> reduced = reduce_group(per_head, in.group, prefix, gqa);
  return pool_1d(reduced, pool, kernel);
}

std::vector<double> kvcompress_head_metric(const HeadAttentionInputs& in, int32_t window, PoolKind pool, int32_t kernel) {
  const std::vector<double> sq = window_squared_probs(in, window);
  const std::vector<double> summed = reduce_group(sq, in.group, in.length, GqaReduce::kSum);
  return pool_1d(summed, pool, kernel);
}

std::vector<double> critical_value_norms(const float* values, int64_t value_stride, int32_t length, const float* o_proj,
                                         int32_t hidden_size, int32_t num_heads, int32_t head_dim, int32_t kv_head,
                                         int32_t group) {
  ADAKV_CHECK(values != nullptr && o_proj != nullptr, "CriticalKV needs values and o_proj");
  const int64_t in_features = static_cast<int64_t>(num_heads) * head_dim;
  std::vector<double> out(static_cast<size_t>(length), 0.0);
  for (int32_t j = 0; j < length; ++j) {
    const float* v = values + j * value_stride;
    double total = 0.0;
    for (int32_t gi = 0; gi < group; ++gi) {
      const int64_t col = static_cast<int64_t>(kv_head * group + gi) * head_dim;
      double l1 = 0.0;
      for (int32_t o = 0; o < hidden_size; ++o) {
        const float* w = o_proj + o * in_features + col;
        double y = 0.0;
        for (int32_t t = 0; t < head_dim; ++t) y += static_cast<double>(v[t]) * static_cast<double>(w[t]);
        l1 += std::abs(y);
      }
      total += l1;
    }
    out[static_cast<size_t>(j)] = total / group;
  }
  return out;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::vector<float> random_scores(uint64_t seed, int32_t layer, int32_t kv_head, int32_t n) {
  const uint64_t base = splitmix64(splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(layer)) ^ static_cast<uint64_t>(kv_head));
  std::vector<float> out(static_cast<size_t>(std::max(n, 0)));
  for (int32_t j = 0; j < n; ++j)
    out[static_cast<size_t>(j)] = static_cast<float>(splitmix64(base ^ static_cast<uint64_t>(j)) >> 40) * (1.0f / 16777216.0f);
  return out;
}

std::vector<float> to_float(std::span<const double> x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<float>(x[i]);
  return out;
}

}  // namespace adakv
