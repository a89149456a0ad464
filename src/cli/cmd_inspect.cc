// adakv inspect: runs the prefill of a prompt (or a context file) with compression and writes
// what the policy decided, per layer and kv head: the kept count and kept token positions, and
// the allocation inputs (per-head budgets B_h, Ada-KV counts c_h, the layer's selection budget,
// which is the pyramid schedule for PyramidKV). tools/plot_budgets.py draws it.
// --dump-qk DIR instead writes the full prefill's post-RoPE queries, keys, values and o_proj of
// every layer as raw float32 (qk_dump.json describes them), the inputs from which
// tools/reference/gen_model_fixtures.py computes reference keep sets.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/kv_flags.h"
#include "compress/kv_compressor.h"
#include "core/mapped_file.h"
#include "engine/compression_observer.h"
#include "io/tokenizer.h"
#include "model/transformer.h"

namespace adakv::cli {
namespace {

struct InspectArgs {
  std::string model_dir;
  std::string prompt;
  std::string context_file;
  std::string json_path;
  std::string dump_dir;
  int32_t page_size = 16;
  KvFlags kv;
};

// Collects every layer's queries of one step: [layers][n][H][d].
struct QueryTap : LayerObserver {
  std::vector<std::vector<float>> q;
  void on_layer_queries(const LayerQueries& lq) override {
    if (q.size() <= static_cast<size_t>(lq.layer)) q.resize(static_cast<size_t>(lq.layer) + 1);
    q[static_cast<size_t>(lq.layer)].assign(lq.q.begin(), lq.q.end());
  }
};

void write_f32(const std::string& path, const std::vector<float>& v) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
  if (!out) fail(internal_error(path + ": cannot write"));
}

void dump_qk(const InspectArgs& args, const Transformer& model, const std::vector<int32_t>& tokens) {
  const ModelConfig& mc = model.config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  const KvLayout layout = model.kv_layout(args.page_size);
  const int64_t num_pages = (n + args.page_size - 1) / args.page_size * layout.num_layers * layout.num_kv_heads;
  KvCacheManager manager(layout, num_pages);
  CpuKvStorage storage(layout, num_pages);
  const SeqId seq = manager.add_sequence();
  QueryTap tap;
  ForwardOptions fwd;
  fwd.observer = &tap;
  std::vector<float> logits;
  if (Status s = model.forward(tokens, KvContext{&manager, &storage, seq}, fwd, &logits); !s.is_ok()) fail(s);
  const int64_t N = mc.num_layers, H = mc.num_heads, Hkv = mc.num_kv_heads, d = mc.head_dim;
  std::vector<float> q, k, v, o;  // [N][n][H][d], [N][n][Hkv][d] x2, [N][hidden][H d]
  for (int64_t l = 0; l < N; ++l) {
    q.insert(q.end(), tap.q[static_cast<size_t>(l)].begin(), tap.q[static_cast<size_t>(l)].end());
    for (int32_t t = 0; t < n; ++t)
      for (int32_t h = 0; h < Hkv; ++h) {
        const KvSlot s = manager.slot(seq, static_cast<int32_t>(l), h, t);
        k.insert(k.end(), storage.key(s), storage.key(s) + d);
        v.insert(v.end(), storage.value(s), storage.value(s) + d);
      }
  }
  for (const auto& layer : value_or_fail(load_o_proj(args.model_dir, mc))) o.insert(o.end(), layer.begin(), layer.end());
  std::filesystem::create_directories(args.dump_dir);
  write_f32(args.dump_dir + "/queries.f32", q);
  write_f32(args.dump_dir + "/keys.f32", k);
  write_f32(args.dump_dir + "/values.f32", v);
  write_f32(args.dump_dir + "/o_proj.f32", o);
  nlohmann::json j;
  j["model"] = args.model_dir;
  j["tokens"] = tokens;
  j["queries"] = {N, n, H, d};
  j["keys"] = {N, n, Hkv, d};
  j["values"] = {N, n, Hkv, d};
  j["o_proj"] = {N, mc.hidden_size, H * d};
  std::ofstream(args.dump_dir + "/qk_dump.json") << j.dump(1) << "\n";
  std::fprintf(stderr, "adakv: inspect: dumped %lld layers x %lld tokens to %s\n", static_cast<long long>(N),
               static_cast<long long>(n), args.dump_dir.c_str());
}

void run_inspect(const InspectArgs& args) {
  const CompressConfig config = kv_config_or_fail(args.kv);
  std::unique_ptr<Transformer> model = value_or_fail(Transformer::load(args.model_dir));
  std::shared_ptr<Tokenizer> tokenizer = value_or_fail(Tokenizer::load(args.model_dir));
  std::string text = args.prompt;
  if (!args.context_file.empty()) text = value_or_fail(read_text_file(args.context_file));
  const std::vector<int32_t> tokens = tokenizer->encode(text, /*add_special=*/true);
  if (tokens.empty()) fail(invalid_argument("the prompt is empty (no tokens)"));
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n > model->context_length())
    fail(out_of_range("prompt of " + std::to_string(n) + " tokens exceeds the model's context of " +
                      std::to_string(model->context_length())));

  if (!args.dump_dir.empty()) return dump_qk(args, *model, tokens);
  const ModelConfig& mc = model->config();
  const KvLayout layout = model->kv_layout(args.page_size);
  const int64_t num_pages = (n + args.page_size - 1) / args.page_size * layout.num_layers * layout.num_kv_heads;
  KvCacheManager manager(layout, num_pages);
  CpuKvStorage storage(layout, num_pages);
  const SeqId seq = manager.add_sequence();
  std::vector<std::vector<float>> o_proj;  // [layers][hidden][q_dim], two-stage policies only
  if (policy_is_two_stage(config.policy)) o_proj = value_or_fail(load_o_proj(args.model_dir, mc));
  KvCompressor compressor(config, layout, static_cast<int32_t>(mc.num_heads), storage.num_slots());
  CompressionObserver observer(compressor, mc, manager, storage, seq, &o_proj);
  ForwardOptions fwd;
  fwd.observer = &observer;
  std::vector<float> logits;
  observer.begin_step(CompressionObserver::Phase::kPrefill, n);
  if (Status s = model->forward(tokens, KvContext{&manager, &storage, seq}, fwd, &logits); !s.is_ok()) fail(s);
  if (Status s = observer.end_step(); !s.is_ok()) fail(s);

  using nlohmann::json;
  const KvCacheStats st = kv_cache_stats(manager, seq);
  json j;
  j["model"] = args.model_dir;
  j["policy"] = kv_policy_name(config.policy);
  j["budget"] = config.budget;
  j["window"] = config.window;
  j["alpha"] = config.alpha;
  j["beta"] = config.beta;
  j["prompt_tokens"] = n;
  j["num_layers"] = layout.num_layers;
  j["num_kv_heads"] = layout.num_kv_heads;
  j["page_size"] = layout.page_size;
  j["entries_kept"] = st.entries;
  j["entries_full"] = st.full_entries;
  j["pages_used"] = st.pages_used;
  j["pages_full"] = st.full_pages;
  json layers = json::array();
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    const LayerPlan& plan = observer.plans()[static_cast<size_t>(l)];
    json jl;
    jl["layer"] = l;
    jl["compressed"] = plan.compressed;
    jl["selection_budget"] = plan.selection_budget;  // Bs_l (pyramid schedule for PyramidKV)
    json heads = json::array();
    for (int32_t h = 0; h < layout.num_kv_heads; ++h) {
      json jh;
      jh["kv_head"] = h;
      const int32_t len = manager.length(seq, l, h);
      jh["length_before"] = plan.lengths.empty() ? len : plan.lengths[static_cast<size_t>(h)];
      jh["kept"] = len;
      jh["budget"] = plan.budgets.empty() ? json(nullptr) : json(plan.budgets[static_cast<size_t>(h)]);
      jh["ada_count"] = plan.counts.empty() ? json(nullptr) : json(plan.counts[static_cast<size_t>(h)]);
      std::vector<int32_t> pos;  // [kept] token positions, in entry order
      for (int32_t i = 0; i < len; ++i) pos.push_back(storage.position(manager.slot(seq, l, h, i)));
      jh["positions"] = pos;
      heads.push_back(std::move(jh));
    }
    jl["heads"] = std::move(heads);
    layers.push_back(std::move(jl));
  }
  j["layers"] = std::move(layers);
  std::ofstream out(args.json_path);
  out << j.dump(1) << "\n";
  if (!out) fail(internal_error(args.json_path + ": cannot write the JSON"));
  std::fprintf(stderr, "adakv: inspect %s: %lld tokens, %lld / %lld entries kept (%.2fx), %lld / %lld pages -> %s\n",
               kv_policy_name(config.policy), static_cast<long long>(n), static_cast<long long>(st.entries),
               static_cast<long long>(st.full_entries), st.compression_ratio(), static_cast<long long>(st.pages_used),
               static_cast<long long>(st.full_pages), args.json_path.c_str());
}

}  // namespace

void register_inspect(CLI::App& app) {
  auto args = std::make_shared<InspectArgs>();
  CLI::App* cmd = app.add_subcommand("inspect", "Prefill with compression and write what was kept, per layer and head");
  cmd->add_option("--model", args->model_dir, "Hugging Face checkpoint folder")->required()->check(CLI::ExistingDirectory);
  auto* prompt = cmd->add_option("--prompt", args->prompt, "Prompt text");
  auto* context = cmd->add_option("--context", args->context_file, "Text file used as the prompt")->check(CLI::ExistingFile);
  prompt->excludes(context);
  auto* json_opt = cmd->add_option("--json", args->json_path, "Output JSON file");
  auto* dump_opt = cmd->add_option("--dump-qk", args->dump_dir, "Write the full prefill's Q/K/V/o_proj to DIR instead");
  json_opt->excludes(dump_opt);
  cmd->add_option("--page-size", args->page_size, "KV page size")->capture_default_str()->check(CLI::Range(1, 4096));
  add_kv_flags(cmd, args->kv);
  cmd->callback([args] {
    if (args->prompt.empty() && args->context_file.empty()) fail(invalid_argument("--prompt or --context is required"));
    if (args->json_path.empty() && args->dump_dir.empty()) fail(invalid_argument("--json or --dump-qk is required"));
    run_inspect(*args);
  });
}

}  // namespace adakv::cli
