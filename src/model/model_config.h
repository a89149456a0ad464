// Everything the engine needs to know about a checkpoint's architecture, read from config.json
// (transformers 4.x and 5.x forms) and generation_config.json.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"

namespace adakv {

enum class ModelFamily { kLlama, kMistral, kQwen2, kQwen3 };

enum class RopeScalingType { kNone, kLinear, kLlama3 };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  double factor = 1.0;
  // llama3 only
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;  // e.g. "LlamaForCausalLM", as in config.json
  ModelFamily family = ModelFamily::kLlama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // explicit value; null -> hidden/heads; absent -> hidden/heads (Qwen3Config: 128)
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // bias on q/k/v projections (Qwen2 always; Llama/Qwen3 attention_bias)
  bool o_bias = false;    // bias on o_proj (Llama/Qwen3 attention_bias; never Qwen2)
  bool qk_norm = false;         // per-head RMSNorm on q and k before RoPE (Qwen3)
  // 0: none. Mistral: the int (absent -> 4096, null -> none); Qwen2/3: only with use_sliding_window and
  // at least one sliding layer. Contexts beyond it are refused, not approximated.
  int64_t sliding_window = 0;
  DType dtype = DType::kBF16;   // torch_dtype / dtype of the checkpoint
  int32_t bos_token_id = -1;    // -1: none. Absent: Llama/Mistral 1 (their config defaults)
  // config.json then generation_config.json, deduplicated, in order. Absent: Llama/Mistral {2}.
  std::vector<int32_t> eos_token_ids;

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  int64_t group_size() const { return num_heads / num_kv_heads; }
};

// Parses config.json text; `source` names the file in error messages. Refuses (kUnimplemented)
// anything the engine cannot run exactly: unknown architecture, activation other than silu,
// unsupported rope scaling, MLP bias, quantization, inconsistent head counts; also missing
// required fields and wrong JSON types, naming the field. Malformed JSON is kDataLoss. Fields
// that transformers defaults when absent take the same defaults here.
Expected<ModelConfig> parse_model_config(const std::string& json_text, const std::string& source);

// Reads DIR/config.json (kNotFound when missing) and, when present, DIR/generation_config.json
// (extra eos ids; its bos_token_id, when set, wins).
Expected<ModelConfig> load_model_config(const std::string& model_dir);

}  // namespace adakv
