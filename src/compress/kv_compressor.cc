#include "compress/kv_compressor.h"

#include <algorithm>
#include <string>

#include "compress/kvcompress.h"
#include "compress/scorers.h"
#include "core/check.h"

namespace adakv {

KvCompressor::KvCompressor(const CompressConfig& config, const KvLayout& layout, int32_t num_heads, int64_t num_slots)
    : config_(config),
      layout_(layout),
      num_heads_(num_heads),
      group_(num_heads / layout.num_kv_heads),
      num_slots_(num_slots) {
  ADAKV_CHECK(validate_compress_config(config).is_ok(), "KvCompressor needs a validated config");
  ADAKV_CHECK(num_heads % layout.num_kv_heads == 0, "query heads must be a multiple of kv heads");
  ensure_metric(config.policy);
}

void KvCompressor::ensure_metric(KvPolicy p) {
  if ((p == KvPolicy::kH2o || p == KvPolicy::kKvCompress) && metric_.empty())
    metric_.assign(static_cast<size_t>(num_slots_), 0.0f);
}

void KvCompressor::set_config(SeqId seq, const CompressConfig& config) {
  ADAKV_CHECK(seq >= 0, "set_config: bad sequence id");
  ADAKV_CHECK(validate_compress_config(config).is_ok(), "KvCompressor::set_config needs a validated config");
  if (static_cast<size_t>(seq) >= seq_config_.size()) seq_config_.resize(static_cast<size_t>(seq) + 1);
  seq_config_[static_cast<size_t>(seq)] = config;
  ensure_metric(config.policy);
}

const CompressConfig& KvCompressor::config(SeqId seq) const {
  if (seq >= 0 && static_cast<size_t>(seq) < seq_config_.size() && seq_config_[static_cast<size_t>(seq)].has_value())
    return *seq_config_[static_cast<size_t>(seq)];
  return config_;
}

namespace {
int32_t queries_needed_for(const CompressConfig& c, int32_t prompt_length) {
  if (c.policy == KvPolicy::kH2o) return prompt_length;
  if (policy_uses_window_scores(c.policy) || c.policy == KvPolicy::kKvCompress) return std::min(c.window, prompt_length);
  return 0;
}
}  // namespace

int32_t KvCompressor::queries_needed(int32_t prompt_length) const { return queries_needed_for(config_, prompt_length); }

int32_t KvCompressor::queries_needed(SeqId seq, int32_t prompt_length) const {
  return queries_needed_for(config(seq), prompt_length);
}

void KvCompressor::gather_row(const KvCacheManager& m, const CpuKvStorage& st, SeqId seq, int32_t layer,
                              int32_t kv_head, bool values, std::vector<float>& out) const {
  const int32_t n = m.length(seq, layer, kv_head);
  const int32_t d = layout_.head_dim;
  out.resize(static_cast<size_t>(n) * static_cast<size_t>(d));
  for (int32_t i = 0; i < n; ++i) {
    const KvSlot s = m.slot(seq, layer, kv_head, i);
    std::copy_n(values ? st.value(s) : st.key(s), d, out.data() + static_cast<size_t>(i) * static_cast<size_t>(d));
  }
}

void KvCompressor::apply_moves(CpuKvStorage& st, std::span<const KvMove> moves) {
  st.apply(moves);
  if (metric_.empty()) return;
  for (const KvMove& mv : moves) metric_[static_cast<size_t>(mv.dst)] = metric_[static_cast<size_t>(mv.src)];
}

void KvCompressor::apply_keep(KvCacheManager& m, CpuKvStorage& st, SeqId seq, const LayerPlan& plan) {
  for (int32_t h = 0; h < layout_.num_kv_heads; ++h) {
    const std::vector<int32_t>& keep = plan.keep[static_cast<size_t>(h)];
    if (static_cast<int32_t>(keep.size()) == m.length(seq, plan.layer, h)) continue;  // kept whole
    const std::vector<KvMove> moves = m.keep_entries(seq, plan.layer, h, keep);
    apply_moves(st, moves);
  }
}

const LayerScores* LayerScoreCache::find(int32_t layer, const ScoreKey& key, int32_t num_queries) const {
  const auto it = entries_.find({layer, key, num_queries});
  if (it == entries_.end()) {
    ++misses_;
    return nullptr;
  }
  ++hits_;
  return &it->second;
}

const LayerScores& LayerScoreCache::insert(int32_t layer, const ScoreKey& key, int32_t num_queries,
                                           LayerScores scores) {
  return entries_.insert_or_assign({layer, key, num_queries}, std::move(scores)).first->second;
}

Expected<LayerScores> KvCompressor::layer_scores(const KvCacheManager& m, const CpuKvStorage& st, SeqId seq,
                                                 int32_t layer, const float* queries, int32_t num_queries,
                                                 const float* o_proj, int32_t hidden_size) const {
  const CompressConfig& cfg = config(seq);
  const int32_t hkv = layout_.num_kv_heads;
  LayerTensors t;
  t.num_heads = num_heads_;
  t.num_kv_heads = hkv;
  t.head_dim = layout_.head_dim;
  t.queries = queries;
  t.num_queries = num_queries;
  t.kv_stride = layout_.head_dim;
  t.o_proj = o_proj;
  t.hidden_size = hidden_size;
  int32_t prompt_length = 0;
  for (int32_t h = 0; h < hkv; ++h) {
    t.lengths.push_back(m.length(seq, layer, h));
    prompt_length = std::max(prompt_length, t.lengths.back());
  }
  const KvPolicy p = cfg.policy;
  if (p == KvPolicy::kFull || p == KvPolicy::kStreamingLlm) {
    LayerScores s;
    s.lengths = std::move(t.lengths);
    return s;
  }
  if (num_queries < queries_needed(seq, prompt_length))
    return invalid_argument("compress layer " + std::to_string(layer) + ": " + kv_policy_name(p) + " needs the last " +
                            std::to_string(queries_needed(seq, prompt_length)) + " queries, got " + std::to_string(num_queries));

  std::vector<std::vector<float>> keys(static_cast<size_t>(hkv)), values;  // [Hkv][L_h][d]
  for (int32_t h = 0; h < hkv; ++h) {
    gather_row(m, st, seq, layer, h, false, keys[static_cast<size_t>(h)]);
    t.keys.push_back(keys[static_cast<size_t>(h)].data());
  }
  if (policy_is_two_stage(p)) {
    values.resize(static_cast<size_t>(hkv));
    for (int32_t h = 0; h < hkv; ++h) {
      gather_row(m, st, seq, layer, h, true, values[static_cast<size_t>(h)]);
      t.values.push_back(values[static_cast<size_t>(h)].data());
    }
  }
  return compute_layer_scores(cfg, layer, t);
}

Expected<LayerPlan> KvCompressor::after_prefill_layer(KvCacheManager& m, CpuKvStorage& st, SeqId seq, int32_t layer,
                                                      const float* queries, int32_t num_queries, const float* o_proj,
                                                      int32_t hidden_size) {
  ADAKV_ASSIGN_OR_RETURN(LayerScores scores, layer_scores(m, st, seq, layer, queries, num_queries, o_proj, hidden_size));
  return after_prefill_layer(m, st, seq, layer, scores);
}

Expected<LayerPlan> KvCompressor::after_prefill_layer(KvCacheManager& m, CpuKvStorage& st, SeqId seq, int32_t layer,
                                                      const float* queries, int32_t num_queries, const float* o_proj,
                                                      int32_t hidden_size, LayerScoreCache& cache) {
  const ScoreKey key = score_key(config(seq));
  if (key.kind == ScoreKind::kNone)  // nothing to compute
    return after_prefill_layer(m, st, seq, layer, queries, num_queries, o_proj, hidden_size);
  if (const LayerScores* cached = cache.find(layer, key, num_queries)) return after_prefill_layer(m, st, seq, layer, *cached);
  ADAKV_ASSIGN_OR_RETURN(LayerScores scores, layer_scores(m, st, seq, layer, queries, num_queries, o_proj, hidden_size));
  return after_prefill_layer(m, st, seq, layer, cache.insert(layer, key, num_queries, std::move(scores)));
}

namespace {
// Whether `s` has the arrays `c`'s policy plans with, sized for rows of `lengths`.
bool scores_fit(const CompressConfig& c, const LayerScores& s, const std::vector<int32_t>& lengths) {
  if (s.lengths != lengths) return false;
  const KvPolicy p = c.policy;
  if (p == KvPolicy::kFull || p == KvPolicy::kStreamingLlm) return true;
  const size_t hkv = lengths.size();
  const bool selects = policy_uses_window_scores(p) || p == KvPolicy::kH2o || p == KvPolicy::kRandom;
  const bool per_entry = p == KvPolicy::kH2o || p == KvPolicy::kKvCompress;
  if (selects && s.scores.size() != hkv) return false;
  if (policy_is_two_stage(p) && s.crit.size() != hkv) return false;
  if (per_entry && s.metric.size() != hkv) return false;
  for (size_t h = 0; h < hkv; ++h) {
    const size_t n = static_cast<size_t>(std::max(0, lengths[h] - c.window));
    if (selects && s.scores[h].size() != n) return false;
    if (policy_is_two_stage(p) && s.crit[h].size() != n) return false;
    if (per_entry && s.metric[h].size() != static_cast<size_t>(lengths[h])) return false;
  }
  return true;
}
}  // namespace

Expected<LayerPlan> KvCompressor::after_prefill_layer(KvCacheManager& m, CpuKvStorage& st, SeqId seq, int32_t layer,
                                                      const LayerScores& scores) {
  const CompressConfig& cfg = config(seq);
  const int32_t hkv = layout_.num_kv_heads;
  std::vector<int32_t> lengths;
  int32_t prompt_length = 0;
  for (int32_t h = 0; h < hkv; ++h) {
    lengths.push_back(m.length(seq, layer, h));
    prompt_length = std::max(prompt_length, lengths.back());
  }
  const KvPolicy p = cfg.policy;
  if (!scores_fit(cfg, scores, lengths))
    return invalid_argument("compress layer " + std::to_string(layer) + ": the given scores do not fit " +
                            kv_policy_name(p) + " on the layer's rows (lengths or score arrays differ)");
  if (p == KvPolicy::kFull) {
    LayerPlan plan;
    plan.layer = layer;
    plan.lengths = std::move(lengths);
    return plan;
  }
  if (p == KvPolicy::kStreamingLlm) {
    LayerPlan plan = plan_streaming(cfg, layer, lengths);
    apply_keep(m, st, seq, plan);
    return plan;
  }
  if (p == KvPolicy::kKvCompress) {  // seed the metric; eviction is cross-layer (after_prefill)
    for (int32_t h = 0; h < hkv; ++h)
      for (int32_t i = 0; i < lengths[static_cast<size_t>(h)]; ++i)
        metric_[static_cast<size_t>(m.slot(seq, layer, h, i))] = scores.metric[static_cast<size_t>(h)][static_cast<size_t>(i)];
    LayerPlan plan;
    plan.layer = layer;
    plan.lengths = std::move(lengths);
    return plan;
  }
  if (p == KvPolicy::kH2o) {
    // The prompt's accumulated attention becomes the entries' running metric (window included).
    for (int32_t h = 0; h < hkv; ++h)
      for (int32_t i = 0; i < lengths[static_cast<size_t>(h)]; ++i)
        metric_[static_cast<size_t>(m.slot(seq, layer, h, i))] = scores.metric[static_cast<size_t>(h)][static_cast<size_t>(i)];
  }
  const int32_t bs = layer_selection_budget(cfg, layout_.num_layers, layer, prompt_length);
  LayerPlan plan = plan_layer(cfg, layer, bs, scores);
  apply_keep(m, st, seq, plan);
  return plan;
}

int64_t KvCompressor::after_prefill(KvCacheManager& m, CpuKvStorage& st, SeqId seq) {
  const CompressConfig& cfg = config(seq);
  if (cfg.policy != KvPolicy::kKvCompress) return 0;
  return compress_kvcompress(m, st, seq);
}

void KvCompressor::on_append(const KvCacheManager& m, SeqId seq, int32_t new_entries) {
  if (!has_metric(config(seq))) return;
  for (int32_t l = 0; l < layout_.num_layers; ++l)
    for (int32_t h = 0; h < layout_.num_kv_heads; ++h) {
      const int32_t n = m.length(seq, l, h);
      ADAKV_CHECK(new_entries <= n, "on_append: more new entries than the row holds");
      for (int32_t i = n - new_entries; i < n; ++i) metric_[static_cast<size_t>(m.slot(seq, l, h, i))] = 0.0f;
    }
}

void KvCompressor::add_attention(const KvCacheManager& m, SeqId seq, int32_t layer, int32_t kv_head, const float* probs) {
  const CompressConfig& cfg = config(seq);
  if (!has_metric(cfg)) return;
  const int32_t n = m.length(seq, layer, kv_head);
  const bool squared = cfg.policy == KvPolicy::kKvCompress;
  for (int32_t i = 0; i < n; ++i) {
    double v = 0.0;
    for (int32_t g = 0; g < group_; ++g) {
      const double p = probs[static_cast<size_t>(g) * static_cast<size_t>(n) + static_cast<size_t>(i)];
      if (squared) {
        v += p * p;  // KV-Compress: sum over the group of p^2
      } else if (cfg.gqa == GqaReduce::kMax) {
        v = g == 0 ? p : std::max(v, p);
      } else {
        v += p / group_;
      }
    }
    metric_[static_cast<size_t>(m.slot(seq, layer, kv_head, i))] += static_cast<float>(v);
  }
}

void KvCompressor::observe_decode(const KvCacheManager& m, const CpuKvStorage& st, SeqId seq, int32_t layer,
                                  const float* query) {
  if (!has_metric(config(seq))) return;
  std::vector<float> keys;
  for (int32_t h = 0; h < layout_.num_kv_heads; ++h) {
    gather_row(m, st, seq, layer, h, false, keys);
    HeadAttentionInputs in;
    in.queries = query;
    in.num_queries = 1;
    in.num_heads = num_heads_;
    in.head_dim = layout_.head_dim;
    in.kv_head = h;
    in.group = group_;
    in.keys = keys.data();
    in.key_stride = layout_.head_dim;
    in.length = m.length(seq, layer, h);
    if (in.length == 0) continue;
    const std::vector<float> probs = to_float(window_mean_probs(in, 1));  // [g][L]
    add_attention(m, seq, layer, h, probs.data());
  }
}

int64_t KvCompressor::after_decode_step(KvCacheManager& m, CpuKvStorage& st, SeqId seq) {
  const CompressConfig& cfg = config(seq);
  if (!policy_is_continual(cfg.policy)) return 0;
  if (static_cast<size_t>(seq) >= decode_steps_.size()) decode_steps_.resize(static_cast<size_t>(seq) + 1, 0);
  const int64_t step = ++decode_steps_[static_cast<size_t>(seq)];
  if (step % cfg.interval != 0) return 0;
  return compress_now(m, st, seq);
}

int64_t KvCompressor::compress_now(KvCacheManager& m, CpuKvStorage& st, SeqId seq) {
  const CompressConfig& cfg = config(seq);
  switch (cfg.policy) {
    case KvPolicy::kH2o: return compress_h2o(m, st, seq);
    case KvPolicy::kStreamingLlm: return compress_streaming(m, st, seq);
    case KvPolicy::kKvCompress: return compress_kvcompress(m, st, seq);
    default: return 0;
  }
}

void KvCompressor::on_release(SeqId seq) {
  if (static_cast<size_t>(seq) < decode_steps_.size()) decode_steps_[static_cast<size_t>(seq)] = 0;
  if (static_cast<size_t>(seq) < seq_config_.size()) seq_config_[static_cast<size_t>(seq)].reset();
}

int64_t KvCompressor::compress_h2o(KvCacheManager& m, CpuKvStorage& st, SeqId seq) {
  const CompressConfig& cfg = config(seq);
  const int64_t before = m.used_pages();
  for (int32_t l = 0; l < layout_.num_layers; ++l) {
    LayerScores s;
    for (int32_t h = 0; h < layout_.num_kv_heads; ++h) {
      const int32_t n = m.length(seq, l, h);
      s.lengths.push_back(n);
      std::vector<float> sc(static_cast<size_t>(std::max(0, n - cfg.window)));
      for (size_t i = 0; i < sc.size(); ++i) sc[i] = metric_[static_cast<size_t>(m.slot(seq, l, h, static_cast<int32_t>(i)))];
      s.scores.push_back(std::move(sc));
    }
    apply_keep(m, st, seq, plan_layer(cfg, l, cfg.budget - cfg.window, s));
  }
  return before - m.used_pages();
}

int64_t KvCompressor::compress_streaming(KvCacheManager& m, CpuKvStorage& st, SeqId seq) {
  const CompressConfig& cfg = config(seq);
  const int64_t before = m.used_pages();
  for (int32_t l = 0; l < layout_.num_layers; ++l) {
    std::vector<int32_t> lengths;
    for (int32_t h = 0; h < layout_.num_kv_heads; ++h) lengths.push_back(m.length(seq, l, h));
    apply_keep(m, st, seq, plan_streaming(cfg, l, lengths));
  }
  return before - m.used_pages();
}

int64_t KvCompressor::compress_kvcompress(KvCacheManager& m, CpuKvStorage& st, SeqId seq) {
  const CompressConfig& cfg = config(seq);
  const int64_t before = m.used_pages();
  const int32_t hkv = layout_.num_kv_heads;
  const size_t num_rows = static_cast<size_t>(layout_.num_layers) * static_cast<size_t>(hkv);
  std::vector<std::vector<float>> metric(num_rows);       // [rows][n]
  std::vector<std::vector<int32_t>> positions(num_rows);  // [rows][n]
  std::vector<KvCompressRow> rows(num_rows);
  int64_t logical = m.logical_length(seq);
  for (int32_t l = 0; l < layout_.num_layers; ++l)
    for (int32_t h = 0; h < hkv; ++h) {
      const size_t r = static_cast<size_t>(l) * static_cast<size_t>(hkv) + static_cast<size_t>(h);
      const int32_t n = m.length(seq, l, h);
      for (int32_t i = 0; i < n; ++i) {
        const KvSlot s = m.slot(seq, l, h, i);
        metric[r].push_back(metric_[static_cast<size_t>(s)]);
        positions[r].push_back(st.position(s));
        logical = std::max<int64_t>(logical, st.position(s) + 1);
      }
      rows[r] = {metric[r], positions[r]};
    }
  const int64_t t = cfg.max_cache_tokens > 0 ? cfg.max_cache_tokens : cfg.budget;
  const std::vector<std::vector<int32_t>> evict =
      kvcompress_select(rows, static_cast<int64_t>(num_rows) * t, layout_.page_size, logical, cfg.protected_window);
  for (int32_t l = 0; l < layout_.num_layers; ++l)
    for (int32_t h = 0; h < hkv; ++h) {
      const auto& e = evict[static_cast<size_t>(l) * static_cast<size_t>(hkv) + static_cast<size_t>(h)];
      if (e.empty()) continue;
      apply_moves(st, m.evict_entries(seq, l, h, e));
    }
  return before - m.used_pages();
}

}  // namespace adakv
