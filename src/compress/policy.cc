#include "compress/policy.h"

#include <algorithm>
#include <string>

#include "compress/scorers.h"
#include "core/check.h"
#include "core/parallel.h"

namespace adakv {

int32_t layer_selection_budget(const CompressConfig& c, int32_t num_layers, int32_t layer, int32_t prompt_length) {
  const int32_t bs = c.budget - c.window;
  if (!policy_uses_pyramid(c.policy)) return bs;
  const int32_t prefix = std::max(0, prompt_length - c.window);
  return pyramid_schedule(num_layers, bs, prefix, c.beta, c.pyramid_reference_rounding)[static_cast<size_t>(layer)];
}

Expected<LayerScores> compute_layer_scores(const CompressConfig& c, int32_t layer, const LayerTensors& t) {
  const std::string where = "compress layer " + std::to_string(layer) + ": ";
  if (t.num_kv_heads < 1 || t.num_heads % t.num_kv_heads != 0)
    return invalid_argument(where + "query heads must be a multiple of kv heads");
  if (t.lengths.size() != static_cast<size_t>(t.num_kv_heads) || t.keys.size() != static_cast<size_t>(t.num_kv_heads))
    return invalid_argument(where + "lengths and keys need one entry per kv head");
  LayerScores s;
  s.lengths = t.lengths;
  const KvPolicy p = c.policy;
  if (p == KvPolicy::kFull || p == KvPolicy::kStreamingLlm) return s;

  const int32_t group = t.num_heads / t.num_kv_heads;
  const bool window_scores = policy_uses_window_scores(p) || p == KvPolicy::kKvCompress;
  const bool critical = policy_is_two_stage(p);
  if (critical && (t.o_proj == nullptr || t.values.size() != static_cast<size_t>(t.num_kv_heads) || t.hidden_size < 1))
    return invalid_argument(where + kv_policy_name(p) + " needs values and the fp32 o_proj weight");
  for (int32_t h = 0; h < t.num_kv_heads; ++h) {
    const int32_t L = t.lengths[static_cast<size_t>(h)];
    const int32_t w = std::min(c.window, L);  // L <= w: nothing is scored, everything is window
    if (window_scores && t.num_queries < w)
      return invalid_argument(where + "needs the last " + std::to_string(w) + " queries, got " + std::to_string(t.num_queries));
    if (t.num_queries > L) return invalid_argument(where + "more queries than entries in a row");
  }

  const size_t hkv = static_cast<size_t>(t.num_kv_heads);
  const bool per_entry = p == KvPolicy::kH2o || p == KvPolicy::kKvCompress;
  s.scores.resize(policy_uses_window_scores(p) || p == KvPolicy::kH2o || p == KvPolicy::kRandom ? hkv : 0);
  s.crit.resize(critical ? hkv : 0);
  s.metric.resize(per_entry ? hkv : 0);
  // Heads are independent: each task writes only its own head's vectors.
  parallel_for(t.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int32_t h = static_cast<int32_t>(begin); h < static_cast<int32_t>(end); ++h) {
      const size_t hs = static_cast<size_t>(h);
      const int32_t L = t.lengths[hs];
      const int32_t n = std::max(0, L - c.window);
      HeadAttentionInputs in;
      in.queries = t.queries;
      in.num_queries = t.num_queries;
      in.num_heads = t.num_heads;
      in.head_dim = t.head_dim;
      in.kv_head = h;
      in.group = group;
      in.keys = t.keys[hs];
      in.key_stride = t.kv_stride;
      in.length = L;
      if (policy_uses_window_scores(p)) {
        const std::vector<double> pooled = snapkv_head_scores(in, c.window, c.gqa, c.pool, c.pool_kernel);  // [n]
        s.scores[hs] = to_float(pooled);
        if (critical) {
          const std::vector<double> norms = critical_value_norms(t.values[hs], t.kv_stride, n, t.o_proj, t.hidden_size,
                                                                 t.num_heads, t.head_dim, h, group);
          std::vector<double> crit(static_cast<size_t>(n));
          for (int32_t j = 0; j < n; ++j)
            crit[static_cast<size_t>(j)] = (pooled[static_cast<size_t>(j)] + kCriticalEpsilon) * norms[static_cast<size_t>(j)];
          s.crit[hs] = to_float(crit);
        }
      } else if (p == KvPolicy::kH2o) {
        s.metric[hs] = to_float(accumulated_probs(in, c.gqa));  // [L]
        s.scores[hs].assign(s.metric[hs].begin(), s.metric[hs].begin() + n);
      } else if (p == KvPolicy::kRandom) {
        s.scores[hs] = random_scores(c.seed, layer, h, n);
      } else if (p == KvPolicy::kKvCompress && L > 0) {
        s.metric[hs] = to_float(kvcompress_head_metric(in, std::min(c.window, L), c.pool, c.pool_kernel));
      }
    }
  });
  return s;
}

ScoreKey score_key(const CompressConfig& c) {
  ScoreKey k;
  const KvPolicy p = c.policy;
  if (p == KvPolicy::kFull || p == KvPolicy::kStreamingLlm) return k;
  k.window = c.window;  // every kind: n_h = L_h - w candidates (KV-Compress: its window queries)
  if (policy_uses_window_scores(p)) {
    k.kind = policy_is_two_stage(p) ? ScoreKind::kWindowCritical : ScoreKind::kWindow;
    k.gqa = c.gqa;
    k.pool = c.pool;
    k.pool_kernel = c.pool_kernel;
  } else if (p == KvPolicy::kH2o) {
    k.kind = ScoreKind::kH2o;
    k.gqa = c.gqa;
  } else if (p == KvPolicy::kRandom) {
    k.kind = ScoreKind::kRandom;
    k.seed = c.seed;
  } else if (p == KvPolicy::kKvCompress) {
    k.kind = ScoreKind::kKvCompress;
    k.pool = c.pool;
    k.pool_kernel = c.pool_kernel;
  }
  return k;
}

LayerPlan plan_layer(const CompressConfig& c, int32_t layer, int32_t selection_budget, const LayerScores& s) {
  const size_t num_heads = s.lengths.size();
  ADAKV_CHECK(s.scores.size() == num_heads, "plan_layer needs scores for every head");
  LayerPlan plan;
  plan.layer = layer;
  plan.selection_budget = selection_budget;
  plan.lengths = s.lengths;
  std::vector<int32_t> n(num_heads);
  for (size_t h = 0; h < num_heads; ++h) {
    n[h] = std::max(0, s.lengths[h] - c.window);
    ADAKV_CHECK(s.scores[h].size() == static_cast<size_t>(n[h]), "score length != candidates");
  }
  if (policy_is_adaptive(c.policy)) {
    AdaAllocation a = ada_allocate(s.scores, std::max(0, selection_budget), c.alpha);
    plan.counts = std::move(a.counts);
    plan.budgets = std::move(a.budgets);
  } else {
    plan.budgets = uniform_allocate(n, std::max(0, selection_budget));
  }
  const bool two_stage = policy_is_two_stage(c.policy);
  if (two_stage) ADAKV_CHECK(s.crit.size() == num_heads, "CriticalKV plan needs crit scores");
  plan.keep.resize(num_heads);
  for (size_t h = 0; h < num_heads; ++h) {
    const int32_t b = plan.budgets[h];
    std::vector<int32_t> chosen;
    if (b >= n[h]) {
      chosen.resize(static_cast<size_t>(n[h]));
      for (int32_t j = 0; j < n[h]; ++j) chosen[static_cast<size_t>(j)] = j;
    } else if (!two_stage) {
      chosen = top_k_indices(s.scores[h], b);
    } else {
      const int32_t first = b / 2;
      chosen = top_k_indices(s.scores[h], first);
      // Second stage: the rest by crit among the candidates stage one left.
      std::vector<float> crit = s.crit[h];
      std::vector<int32_t> rest_idx;
      std::vector<float> rest_crit;
      size_t ci = 0;
      for (int32_t j = 0; j < n[h]; ++j) {
        if (ci < chosen.size() && chosen[ci] == j) {
          ++ci;
          continue;
        }
        rest_idx.push_back(j);
        rest_crit.push_back(crit[static_cast<size_t>(j)]);
      }
      for (int32_t r : top_k_indices(rest_crit, b - first)) chosen.push_back(rest_idx[static_cast<size_t>(r)]);
      std::sort(chosen.begin(), chosen.end());
    }
    if (b < n[h]) plan.compressed = true;
    std::vector<int32_t>& keep = plan.keep[h];
    keep = std::move(chosen);
    for (int32_t j = n[h]; j < s.lengths[h]; ++j) keep.push_back(j);  // the window
  }
  return plan;
}

LayerPlan plan_streaming(const CompressConfig& c, int32_t layer, std::span<const int32_t> lengths) {
  LayerPlan plan;
  plan.layer = layer;
  plan.selection_budget = c.budget;
  plan.lengths.assign(lengths.begin(), lengths.end());
  plan.keep.resize(lengths.size());
  plan.budgets.resize(lengths.size());
  for (size_t h = 0; h < lengths.size(); ++h) {
    const int32_t L = lengths[h];
    std::vector<int32_t>& keep = plan.keep[h];
    if (L <= c.budget) {
      for (int32_t j = 0; j < L; ++j) keep.push_back(j);
    } else {
      plan.compressed = true;
      for (int32_t j = 0; j < c.sink; ++j) keep.push_back(j);
      for (int32_t j = L - (c.budget - c.sink); j < L; ++j) keep.push_back(j);
    }
    plan.budgets[h] = static_cast<int32_t>(keep.size());
  }
  return plan;
}

}  // namespace adakv
