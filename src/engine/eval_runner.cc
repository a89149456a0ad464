#include "engine/eval_runner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <tuple>

#include "engine/compression_observer.h"
#include "engine/generator.h"
#include "engine/prefill_snapshot.h"

namespace adakv {

const char* eval_protocol_name(EvalProtocol p) { return p == EvalProtocol::kInside ? "inside" : "after"; }

Expected<std::vector<EvalProtocol>> parse_eval_protocols(std::string_view text) {
  if (text == "inside") return std::vector<EvalProtocol>{EvalProtocol::kInside};
  if (text == "after") return std::vector<EvalProtocol>{EvalProtocol::kAfter};
  if (text == "both") return std::vector<EvalProtocol>{EvalProtocol::kInside, EvalProtocol::kAfter};
  return invalid_argument("--protocol: '" + std::string(text) + "' is not one of inside | after | both");
}

struct EvalRunner::OProjCache {
  std::mutex mu;
  std::shared_ptr<const std::vector<std::vector<float>>> o_proj;
};

EvalRunner::EvalRunner(const Transformer& model, std::shared_ptr<const Tokenizer> tokenizer, EvalRunOptions options)
    : model_(model), tokenizer_(std::move(tokenizer)), options_(options), o_proj_cache_(std::make_shared<OProjCache>()) {
  eos_ids_ = model_.config().eos_token_ids;
  for (int32_t id : tokenizer_->eos_ids()) eos_ids_.push_back(id);
}

Expected<std::shared_ptr<const std::vector<std::vector<float>>>> EvalRunner::o_proj() const {
  std::lock_guard<std::mutex> lock(o_proj_cache_->mu);
  if (!o_proj_cache_->o_proj) {
    ADAKV_ASSIGN_OR_RETURN(std::vector<std::vector<float>> w, load_o_proj(model_.dir(), model_.config()));
    o_proj_cache_->o_proj = std::make_shared<const std::vector<std::vector<float>>>(std::move(w));
  }
  return o_proj_cache_->o_proj;
}

eval::TokenizeFn EvalRunner::tokenize_fn() const {
  std::shared_ptr<const Tokenizer> tok = tokenizer_;
  return [tok](std::string_view text) { return tok->encode(text, /*add_special=*/true); };
}

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// LongBench's middle truncation, keeping track of where the question part starts: the cut is in
// the middle, so the question (at the end) keeps its tokens unless it is longer than half.
eval::PromptTokens truncate_prompt(const eval::PromptTokens& p, size_t max_tokens) {
  if (max_tokens == 0 || p.ids.size() <= max_tokens) return p;
  eval::PromptTokens out;
  out.ids = eval::truncate_middle(p.ids, max_tokens);
  const size_t half = max_tokens / 2;
  const size_t tail_start = p.ids.size() - half;  // first original index of the kept tail
  out.question_start = p.question_start >= tail_start ? half + (p.question_start - tail_start)
                                                      : std::min(p.question_start, half);
  return out;
}

}  // namespace

Expected<std::vector<EvalRow>> EvalRunner::run(const EvalItem& item, const std::vector<EvalConfig>& configs,
                                               const std::vector<EvalProtocol>& protocols,
                                               const std::function<void()>& on_run_done) const {
  const eval::Sample& s = item.sample;
  const eval::PromptTokens tokens =
      truncate_prompt(eval::tokenize_prompt(s, tokenize_fn()), static_cast<size_t>(std::max<int64_t>(0, options_.max_length)));
  const std::span<const int32_t> all(tokens.ids);
  if (tokens.question_start == 0 || tokens.question_start >= tokens.ids.size()) {
    return invalid_argument("sample " + s.id + ": the prompt has no context part before its question");
  }

  GenerateOptions base;
  base.max_new_tokens = s.max_new_tokens;
  base.sampling.temperature = 0.0f;  // greedy
  base.eos_ids = eos_ids_;

  // Shared prefill: one full-cache prefill per protocol (the whole prompt for inside, the
  // context part for after), made before the first config that needs it. With max_new_tokens 0
  // generate() runs nothing at all, so there is nothing to share.
  const bool share = options_.share_prefill && s.max_new_tokens > 0;
  if (share) {
    // generate()'s own check, so both paths fail alike.
    const Status fits = check_fits_context(static_cast<int64_t>(all.size()), s.max_new_tokens, model_.context_length());
    if (!fits.is_ok()) return fits.with_context("sample " + s.id);
  }
  int32_t num_queries[2] = {0, 0};
  if (share) {
    std::vector<const CompressConfig*> compress;
    for (const EvalConfig& c : configs) compress.push_back(&c.compress);
    num_queries[static_cast<int>(EvalProtocol::kInside)] =
        max_queries_needed(model_, compress, static_cast<int32_t>(all.size()));
    num_queries[static_cast<int>(EvalProtocol::kAfter)] =
        max_queries_needed(model_, compress, static_cast<int32_t>(tokens.question_start));
  }
  std::optional<PrefillSnapshot> snapshots[2];
  // Per snapshot: each layer's scores, computed once per score_key and reused by every budget
  // and every policy that scores alike (snapkv / ada-snapkv / pyramidkv / ada-pyramidkv, ...).
  LayerScoreCache score_caches[2];
  std::shared_ptr<const std::vector<std::vector<float>>> o_proj_weights;

  std::vector<EvalRow> rows;
  for (const EvalConfig& config : configs) {
    for (EvalProtocol protocol : protocols) {
      GenerateOptions options = base;
      options.compress = &config.compress;
      std::span<const int32_t> prompt = all;
      if (protocol == EvalProtocol::kAfter) {
        options.context = all.first(tokens.question_start);
        prompt = all.subspan(tokens.question_start);
      }
      const double start = now_seconds();
      double shared_seconds = 0.0;  // this run's share of the shared prefill
      double captured_seconds = 0.0;  // the shared prefill, when this run made it
      Expected<GenerateResult> result = [&]() -> Expected<GenerateResult> {
        if (!share) return generate(model_, prompt, options, {});
        const int p = static_cast<int>(protocol);
        const std::span<const int32_t> prefill = protocol == EvalProtocol::kAfter ? options.context : prompt;
        const std::span<const int32_t> append =
            protocol == EvalProtocol::kAfter ? prompt : std::span<const int32_t>();
        if (!snapshots[p].has_value()) {
          ADAKV_ASSIGN_OR_RETURN(
              snapshots[p], capture_prefill(model_, prefill, static_cast<int64_t>(all.size()) + s.max_new_tokens,
                                            base.page_size, num_queries[p]));
          captured_seconds = snapshots[p]->seconds;
        }
        shared_seconds = snapshots[p]->seconds / static_cast<double>(configs.size());
        const std::vector<std::vector<float>>* o = nullptr;
        if (policy_is_two_stage(config.compress.policy)) {
          if (!o_proj_weights) {
            ADAKV_ASSIGN_OR_RETURN(o_proj_weights, o_proj());
          }
          o = o_proj_weights.get();
        }
        ADAKV_ASSIGN_OR_RETURN(std::unique_ptr<ReplayedPrefill> cache,
                               replay_prefill(model_, *snapshots[p], &config.compress, o, &score_caches[p]));
        PrefilledSequence seq;
        seq.manager = &cache->manager;
        seq.storage = &cache->storage;
        seq.seq = cache->seq;
        seq.compressor = cache->compressor.get();
        seq.logits = snapshots[p]->logits;
        return continue_generation(model_, seq, append, options, {});
      }();
      if (!result.has_value()) return result.status().with_context("sample " + s.id);
      EvalRow row;
      row.task = s.task;
      row.id = s.id;
      row.length = item.length;
      row.depth = item.depth;
      row.index = item.index;
      row.policy = config.policy;
      row.budget = config.budget;
      row.protocol = protocol;
      row.prompt_tokens = static_cast<int64_t>(tokens.ids.size());
      row.question_tokens = static_cast<int64_t>(tokens.ids.size() - tokens.question_start);
      const KvCacheStats& kv = result->stats.kv_after_prefill;
      row.kept_fraction = kv.full_entries > 0 ? static_cast<double>(kv.entries) / kv.full_entries : 1.0;
      row.prediction = tokenizer_->decode(result->tokens, /*skip_special=*/true);
      if (s.stop_at_newline) {
        // The generation would have ended at its first newline; greedy decoding makes the text
        // before it the same either way.
        const size_t nl = row.prediction.find('\n');
        if (nl != std::string::npos) row.prediction.resize(nl);
      }
      row.score = eval::score_prediction(s, row.prediction);
      row.seconds = now_seconds() - start - captured_seconds + shared_seconds;
      rows.push_back(std::move(row));
      if (on_run_done) on_run_done();
    }
  }
  return rows;
}

namespace {

std::string csv_quote(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

struct Acc {
  int64_t n = 0;
  double score = 0.0;
  double kept = 0.0;
};

// Config order as first seen in the rows, so tables follow the command line's order.
struct ConfigKey {
  std::string policy;
  int64_t budget;
  bool operator<(const ConfigKey& o) const { return std::tie(policy, budget) < std::tie(o.policy, o.budget); }
  bool operator==(const ConfigKey& o) const { return policy == o.policy && budget == o.budget; }
};

std::vector<ConfigKey> configs_in_order(const std::vector<EvalRow>& rows) {
  std::vector<ConfigKey> order;
  for (const EvalRow& r : rows) {
    ConfigKey k{r.policy, r.budget};
    if (std::find(order.begin(), order.end(), k) == order.end()) order.push_back(k);
  }
  return order;
}

}  // namespace

std::string eval_csv_header() {
  return "task,id,length,depth,sample,policy,budget,protocol,prompt_tokens,question_tokens,kept_fraction,score,seconds,"
         "prediction\n";
}

std::string eval_csv_row(const EvalRow& r) {
  return csv_quote(r.task) + "," + csv_quote(r.id) + "," + std::to_string(r.length) + "," +
         (r.depth < 0 ? std::string() : fmt("%.4g", r.depth)) + "," + std::to_string(r.index) + "," +
         csv_quote(r.policy) + "," + std::to_string(r.budget) + "," + eval_protocol_name(r.protocol) + "," +
         std::to_string(r.prompt_tokens) + "," + std::to_string(r.question_tokens) + "," +
         fmt("%.6f", r.kept_fraction) + "," + fmt("%.6f", r.score) + "," + fmt("%.3f", r.seconds) + "," +
         csv_quote(r.prediction) + "\n";
}

std::string eval_rows_csv(const std::vector<EvalRow>& rows) {
  std::string out = eval_csv_header();
  for (const EvalRow& r : rows) out += eval_csv_row(r);
  return out;
}

std::string eval_rows_json(const std::vector<EvalRow>& rows, const std::string& meta_json) {
  nlohmann::json j;
  j["meta"] = nlohmann::json::parse(meta_json, nullptr, /*allow_exceptions=*/false);
  if (j["meta"].is_discarded()) j["meta"] = nlohmann::json::object();
  // (task, policy, budget, protocol) -> mean; and over all tasks.
  std::map<std::tuple<std::string, std::string, int64_t, int>, Acc> by_task;
  std::map<std::tuple<std::string, int64_t, int>, Acc> overall;
  for (const EvalRow& r : rows) {
    const int p = static_cast<int>(r.protocol);
    Acc& a = by_task[{r.task, r.policy, r.budget, p}];
    Acc& b = overall[{r.policy, r.budget, p}];
    for (Acc* x : {&a, &b}) {
      ++x->n;
      x->score += r.score;
      x->kept += r.kept_fraction;
    }
  }
  nlohmann::json agg = nlohmann::json::array();
  for (const auto& [k, a] : by_task) {
    agg.push_back({{"task", std::get<0>(k)},
                   {"policy", std::get<1>(k)},
                   {"budget", std::get<2>(k)},
                   {"protocol", eval_protocol_name(static_cast<EvalProtocol>(std::get<3>(k)))},
                   {"n", a.n},
                   {"mean_score", a.score / a.n},
                   {"mean_kept_fraction", a.kept / a.n}});
  }
  nlohmann::json all = nlohmann::json::array();
  for (const auto& [k, a] : overall) {
    all.push_back({{"policy", std::get<0>(k)},
                   {"budget", std::get<1>(k)},
                   {"protocol", eval_protocol_name(static_cast<EvalProtocol>(std::get<2>(k)))},
                   {"n", a.n},
                   {"mean_score", a.score / a.n},
                   {"mean_kept_fraction", a.kept / a.n}});
  }
  j["aggregates"] = std::move(agg);
  j["overall"] = std::move(all);
  return j.dump(2) + "\n";
}

std::string eval_summary_table(const std::vector<EvalRow>& rows) {
  std::map<std::tuple<std::string, int64_t, int>, Acc> acc;
  bool has[2] = {false, false};
  for (const EvalRow& r : rows) {
    Acc& a = acc[{r.policy, r.budget, static_cast<int>(r.protocol)}];
    ++a.n;
    a.score += r.score;
    a.kept += r.kept_fraction;
    has[static_cast<int>(r.protocol)] = true;
  }
  std::string out;
  char buf[160];
  std::snprintf(buf, sizeof buf, "%-16s %7s %6s", "policy", "budget", "n");
  out += buf;
  for (int p = 0; p < 2; ++p) {
    if (!has[p]) continue;
    std::snprintf(buf, sizeof buf, " %8s %6s", eval_protocol_name(static_cast<EvalProtocol>(p)), "kept");
    out += buf;
  }
  out += "\n";
  for (const ConfigKey& k : configs_in_order(rows)) {
    int64_t n = 0;
    for (int p = 0; p < 2; ++p) {
      auto it = acc.find({k.policy, k.budget, p});
      if (it != acc.end()) n = std::max(n, it->second.n);
    }
    std::snprintf(buf, sizeof buf, "%-16s %7lld %6lld", k.policy.c_str(), static_cast<long long>(k.budget),
                  static_cast<long long>(n));
    out += buf;
    for (int p = 0; p < 2; ++p) {
      if (!has[p]) continue;
      auto it = acc.find({k.policy, k.budget, p});
      if (it == acc.end()) {
        std::snprintf(buf, sizeof buf, " %8s %6s", "-", "-");
      } else {
        std::snprintf(buf, sizeof buf, " %8.3f %6.3f", it->second.score / it->second.n, it->second.kept / it->second.n);
      }
      out += buf;
    }
    out += "\n";
  }
  return out;
}

ProgressBar::ProgressBar(std::FILE* out, int64_t total, std::string label)
    : out_(out), total_(total), label_(std::move(label)), start_(now_seconds()) {
  draw();
}

void ProgressBar::tick(int64_t n) {
  done_ += n;
  const double t = now_seconds();
  if (done_ >= total_ || t - last_draw_ >= 0.2) draw();
}

void ProgressBar::draw() {
  if (out_ == nullptr) return;
  last_draw_ = now_seconds();
  const double elapsed = last_draw_ - start_;
  constexpr int kWidth = 30;
  const int filled = total_ > 0 ? static_cast<int>(kWidth * done_ / total_) : kWidth;
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  const double rate = elapsed > 0 ? done_ / elapsed : 0.0;
  std::string eta = "?";
  if (rate > 0) {
    const long long s = std::llround((total_ - done_) / rate);
    char b[32];
    std::snprintf(b, sizeof b, "%lld:%02lld", s / 60, s % 60);
    eta = b;
  }
  std::fprintf(out_, "\r%s [%s] %lld/%lld runs, %.2f runs/s, ETA %s   ", label_.c_str(), bar.c_str(),
               static_cast<long long>(done_), static_cast<long long>(total_), rate, eta.c_str());
  std::fflush(out_);
}

void ProgressBar::finish() {
  draw();
  if (out_ != nullptr) std::fprintf(out_, "\n");
}

}  // namespace adakv
