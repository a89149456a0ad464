// CPU decode speed: prefill a prompt of random token ids, then greedy-decode one token at a time
// over the per-head paged KV cache, and print prefill and decode tokens/s for a few prompt lengths.
//
//   bench_cpu_decode [MODEL_DIR]            a checkpoint folder (default: the llama3 fixture)
//   bench_cpu_decode --synthetic NAME       a random bf16 Llama checkpoint written once to
//                                           /tmp/adakv_bench_NAME (NAME: 100m, 1b = TinyLlama-1.1B shapes)
//   options: --decode N (tokens per row, default 32), --prompts 16,128,512
//
// Threads: ADAKV_NUM_THREADS (our pool and OpenBLAS get the same count).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/parallel.h"
#include "engine/sampler.h"
#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"
#include "model/transformer.h"

namespace fs = std::filesystem;
using namespace adakv;

namespace {

struct SyntheticSpec {
  const char* name;
  int64_t hidden, inter, layers, heads, kv_heads, vocab;
};

constexpr SyntheticSpec kSynthetic[] = {
    {"100m", 768, 2048, 12, 12, 4, 32000},
    {"1b", 2048, 5632, 22, 32, 4, 32000},  // TinyLlama-1.1B shapes
};

// Writes config.json and a bf16 model.safetensors of small random values (tied embeddings).
bool write_synthetic(const SyntheticSpec& s, const fs::path& dir) {
  fs::create_directories(dir);
  nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
                        {"hidden_size", s.hidden}, {"intermediate_size", s.inter},
                        {"num_hidden_layers", s.layers}, {"num_attention_heads", s.heads},
                        {"num_key_value_heads", s.kv_heads}, {"vocab_size", s.vocab},
                        {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0}, {"max_position_embeddings", 4096},
                        {"tie_word_embeddings", true}, {"torch_dtype", "bfloat16"}, {"hidden_act", "silu"},
                        {"bos_token_id", 1}, {"eos_token_id", 2}};
  std::ofstream(dir / "config.json") << cfg.dump(2);
  const int64_t d = s.hidden / s.heads;
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors = {{"model.embed_tokens.weight", {s.vocab, s.hidden}},
                                                                       {"model.norm.weight", {s.hidden}}};
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    tensors.push_back({p + "input_layernorm.weight", {s.hidden}});
    tensors.push_back({p + "post_attention_layernorm.weight", {s.hidden}});
    tensors.push_back({p + "self_attn.q_proj.weight", {s.heads * d, s.hidden}});
    tensors.push_back({p + "self_attn.k_proj.weight", {s.kv_heads * d, s.hidden}});
    tensors.push_back({p + "self_attn.v_proj.weight", {s.kv_heads * d, s.hidden}});
    tensors.push_back({p + "self_attn.o_proj.weight", {s.hidden, s.heads * d}});
    tensors.push_back({p + "mlp.gate_proj.weight", {s.inter, s.hidden}});
    tensors.push_back({p + "mlp.up_proj.weight", {s.inter, s.hidden}});
    tensors.push_back({p + "mlp.down_proj.weight", {s.hidden, s.inter}});
  }
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, shape] : tensors) {
    uint64_t n = 1;
    for (int64_t x : shape) n *= static_cast<uint64_t>(x);
    header[name] = {{"dtype", "BF16"}, {"shape", shape}, {"data_offsets", {offset, offset + 2 * n}}};
    offset += 2 * n;
  }
  std::string h = header.dump();
  while (h.size() % 8) h.push_back(' ');
  std::ofstream out(dir / "model.safetensors", std::ios::binary);
  const uint64_t len = h.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  uint64_t state = 0x9e3779b97f4a7c15ull;
  std::vector<uint16_t> buf;
  for (const auto& [name, shape] : tensors) {
    uint64_t n = 1;
    for (int64_t x : shape) n *= static_cast<uint64_t>(x);
    buf.resize(n);
    const bool norm = name.find("norm") != std::string::npos;
    for (uint64_t i = 0; i < n; ++i) {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;  // xorshift64
      const float u = static_cast<float>(state >> 40) / static_cast<float>(1 << 24) - 0.5f;  // [-0.5, 0.5)
      buf[i] = f32_to_bf16(norm ? 1.0f + 0.2f * u : 0.06f * u);
    }
    out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(2 * n));
  }
  return out.good();
}

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) v.push_back(std::stoll(item));
  return v;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  // bench/ sits in the source tree next to tests/ (CMake passes absolute source paths).
  std::string model_dir = (fs::path(__FILE__).parent_path().parent_path() / "tests/fixtures/models/llama3").string();
  int64_t decode_tokens = 32;
  std::vector<int64_t> prompts = {16, 128, 512};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_cpu_decode: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--synthetic") {
      const std::string name = next();
      const SyntheticSpec* spec = nullptr;
      for (const auto& s : kSynthetic) {
        if (name == s.name) spec = &s;
      }
      if (spec == nullptr) {
        std::fprintf(stderr, "bench_cpu_decode: unknown synthetic model %s (100m, 1b)\n", name.c_str());
        return 2;
      }
      const fs::path dir = fs::temp_directory_path() / ("adakv_bench_" + name);
      if (!fs::exists(dir / "model.safetensors")) {
        std::fprintf(stderr, "writing %s ...\n", dir.c_str());
        if (!write_synthetic(*spec, dir)) {
          std::fprintf(stderr, "bench_cpu_decode: could not write %s\n", dir.c_str());
          return 1;
        }
      }
      model_dir = dir.string();
    } else if (a == "--decode") {
      decode_tokens = std::stoll(next());
    } else if (a == "--prompts") {
      prompts = parse_list(next());
    } else if (!a.empty() && a[0] != '-') {
      model_dir = a;
    } else {
      std::fprintf(stderr, "usage: bench_cpu_decode [MODEL_DIR | --synthetic 100m|1b] [--decode N] [--prompts 16,128]\n");
      return 2;
    }
  }

  const double t0 = now_s();
  auto loaded = Transformer::load(model_dir);
  if (!loaded.has_value()) {
    std::fprintf(stderr, "bench_cpu_decode: %s\n", loaded.status().message().c_str());
    return 1;
  }
  const Transformer& model = **loaded;
  const double load_s = now_s() - t0;
  const ModelConfig& c = model.config();
  int64_t params = c.vocab_size * c.hidden_size * (c.tie_word_embeddings ? 1 : 2) +
                   c.num_layers * (c.hidden_size * (c.q_dim() + 2 * c.kv_dim()) + c.q_dim() * c.hidden_size +
                                   3 * c.hidden_size * c.intermediate_size);
  std::printf("model %s: %s, %.1fM params, %lld layers, hidden %lld, heads %lld/%lld, head_dim %lld; load %.2f s\n",
              model_dir.c_str(), c.architecture.c_str(), params / 1e6, static_cast<long long>(c.num_layers),
              static_cast<long long>(c.hidden_size), static_cast<long long>(c.num_heads),
              static_cast<long long>(c.num_kv_heads), static_cast<long long>(c.head_dim), load_s);
  std::printf("threads %d, fp32 weights %.1f MB owned\n\n", ThreadPool::global().num_threads(),
              model.owned_weight_bytes() / 1e6);
  std::printf("| prompt | prefill tok/s | decode tokens | decode tok/s | ms/token (median) |\n");
  std::printf("|-------:|--------------:|--------------:|-------------:|------------------:|\n");

  uint64_t rng = 12345;
  for (int64_t prompt_len : prompts) {
    if (prompt_len + decode_tokens > model.context_length()) {
      std::printf("| %6lld | (beyond the context of %lld) |\n", static_cast<long long>(prompt_len),
                  static_cast<long long>(model.context_length()));
      continue;
    }
    std::vector<int32_t> prompt(static_cast<size_t>(prompt_len));
    for (int32_t& id : prompt) {
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      id = static_cast<int32_t>((rng >> 33) % static_cast<uint64_t>(c.vocab_size));
    }
    const KvLayout layout = model.kv_layout(16);
    const int64_t pages = (prompt_len + decode_tokens + 15) / 16 * layout.num_layers * layout.num_kv_heads;
    KvCacheManager manager(layout, pages);
    CpuKvStorage storage(layout, pages);
    const KvContext kv{&manager, &storage, manager.add_sequence()};
    std::vector<float> logits;
    double t = now_s();
    Status st = model.forward(prompt, kv, ForwardOptions{}, &logits);
    const double prefill_s = now_s() - t;
    std::vector<double> steps;
    int32_t next = argmax(logits);
    for (int64_t i = 0; i < decode_tokens && st.is_ok(); ++i) {
      t = now_s();
      st = model.forward(std::span<const int32_t>(&next, 1), kv, ForwardOptions{}, &logits);
      steps.push_back(now_s() - t);
      next = argmax(logits);
    }
    if (!st.is_ok()) {
      std::fprintf(stderr, "bench_cpu_decode: %s\n", st.message().c_str());
      return 1;
    }
    double total = 0.0;
    for (double s : steps) total += s;
    std::sort(steps.begin(), steps.end());
    std::printf("| %6lld | %13.1f | %13lld | %12.2f | %17.3f |\n", static_cast<long long>(prompt_len),
                prompt_len / prefill_s, static_cast<long long>(decode_tokens), decode_tokens / total,
                1e3 * steps[steps.size() / 2]);
  }
  return 0;
}
