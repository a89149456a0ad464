// config.json parsing against configs shaped like the published Hugging Face files (transformers
// 4.x form) and as transformers 5.x re-saves them, with values checked by hand; plus every
// refusal. Expected values below were read off the public config files, not from the parser.
#include "model/model_config.h"

#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "safetensors_test_writer.h"

namespace adakv {
namespace {

using Json = nlohmann::json;
using testing::TempDir;
using testing::write_file;

// meta-llama/Llama-3.1-8B-Instruct config.json (transformers 4.43).
const char* kLlama31Instruct = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// The same model as transformers 5.24 writes it back (rope_parameters, dtype, explicit head_dim).
const char* kLlama31InstructV5 = R"({"architectures": ["LlamaForCausalLM"], "attention_bias": false,
  "attention_dropout": 0.0, "bos_token_id": 128000, "dtype": "bfloat16", "eos_token_id": [128001, 128008, 128009],
  "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 8, "pad_token_id": null, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"},
  "tie_word_embeddings": false, "transformers_version": "5.24.0", "use_cache": true, "vocab_size": 128256})";

// meta-llama/Llama-2-7b-hf config.json (transformers 4.31: no rope_theta, rope_scaling null).
const char* kLlama2 = R"({
  "_name_or_path": "meta-llama/Llama-2-7b-hf",
  "architectures": ["LlamaForCausalLM"],
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 11008,
  "max_position_embeddings": 4096,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 32,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "tie_word_embeddings": false,
  "torch_dtype": "float16",
  "transformers_version": "4.31.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})";

// mistralai/Mistral-7B-v0.1 config.json.
const char* kMistral7B = R"({
  "architectures": ["MistralForCausalLM"],
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "sliding_window": 4096,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.34.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})";

const char* kMistral7BV5 = R"({"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
  "dtype": "bfloat16", "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pad_token_id": null,
  "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "sliding_window": 4096,
  "tie_word_embeddings": false, "transformers_version": "5.24.0", "use_cache": true, "vocab_size": 32000})";

// Qwen/Qwen2.5-0.5B config.json: tied embeddings, sliding_window set but use_sliding_window false.
const char* kQwen25 = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 24,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1",
  "use_cache": true,
  "use_mrope": false,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

const char* kQwen25V5 = R"({"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "dtype": "bfloat16", "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
  "intermediate_size": 4864, "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention",
  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
  "full_attention", "full_attention"], "max_position_embeddings": 32768, "max_window_layers": 24,
  "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
  "pad_token_id": null, "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
  "sliding_window": null, "tie_word_embeddings": true, "transformers_version": "5.24.0", "use_cache": true,
  "use_mrope": false, "use_sliding_window": false, "vocab_size": 151936})";

// Qwen/Qwen3-0.6B config.json: head_dim 128 although hidden/heads = 64; rope_theta an integer.
const char* kQwen3 = R"({
  "architectures": ["Qwen3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 1024,
  "initializer_range": 0.02,
  "intermediate_size": 3072,
  "max_position_embeddings": 40960,
  "max_window_layers": 28,
  "model_type": "qwen3",
  "num_attention_heads": 16,
  "num_hidden_layers": 28,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": null,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

const char* kQwen3V5 = R"({"architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
  "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
  "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention",
  "full_attention", "full_attention", "full_attention", "full_attention", "full_attention"],
  "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16,
  "num_hidden_layers": 28, "num_key_value_heads": 8, "pad_token_id": null, "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "sliding_window": null,
  "tie_word_embeddings": true, "transformers_version": "5.24.0", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936})";

ModelConfig parse_ok(const std::string& text) {
  auto cfg = parse_model_config(text, "config.json");
  EXPECT_TRUE(cfg) << cfg.status().message();
  return cfg ? *cfg : ModelConfig{};
}

// `base` with fields changed by `edit` (a null Json value stays a null field; erase removes it).
std::string edited(const char* base, const std::function<void(Json&)>& edit) {
  Json j = Json::parse(base);
  edit(j);
  return j.dump();
}

void expect_llama31(const ModelConfig& c) {
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.family, ModelFamily::kLlama);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.group_size(), 4);
  EXPECT_EQ(c.q_dim(), 4096);
  EXPECT_EQ(c.kv_dim(), 1024);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.dtype, DType::kBF16);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
}

TEST(ModelConfig, Llama31V4) { expect_llama31(parse_ok(kLlama31Instruct)); }
TEST(ModelConfig, Llama31V5) { expect_llama31(parse_ok(kLlama31InstructV5)); }

void expect_llama2(const ModelConfig& c) {
  EXPECT_EQ(c.family, ModelFamily::kLlama);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.intermediate_size, 11008);
  EXPECT_EQ(c.num_kv_heads, 32);
  EXPECT_EQ(c.group_size(), 1);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);  // absent in the file: transformers' default
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.dtype, DType::kF16);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2}));
  EXPECT_FALSE(c.tie_word_embeddings);
}

TEST(ModelConfig, Llama2V4) {
  const ModelConfig c = parse_ok(kLlama2);
  expect_llama2(c);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
}

TEST(ModelConfig, Llama2LinearScalingBothForms) {
  // 4.x with the old "type" key ...
  const ModelConfig v4 = parse_ok(edited(kLlama2, [](Json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}}; }));
  expect_llama2(v4);
  EXPECT_EQ(v4.rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(v4.rope_scaling.factor, 2.0);
  // ... and as transformers 5.24 re-saves that config (both keys inside rope_parameters).
  const ModelConfig v5 = parse_ok(R"({"architectures": ["LlamaForCausalLM"], "attention_bias": false,
    "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "float16", "eos_token_id": 2, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": null, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_parameters": {"factor": 2.0, "rope_theta": 10000.0, "rope_type": "linear",
    "type": "linear"}, "tie_word_embeddings": false, "transformers_version": "5.24.0", "use_cache": true,
    "vocab_size": 32000})");
  expect_llama2(v5);
  EXPECT_EQ(v5.rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(v5.rope_scaling.factor, 2.0);
}

void expect_mistral(const ModelConfig& c) {
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
  EXPECT_EQ(c.family, ModelFamily::kMistral);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2}));
}

TEST(ModelConfig, Mistral7BV4) { expect_mistral(parse_ok(kMistral7B)); }
TEST(ModelConfig, Mistral7BV5) { expect_mistral(parse_ok(kMistral7BV5)); }

TEST(ModelConfig, MistralSlidingWindowNullAbsentAndAttentionBiasIgnored) {
  EXPECT_EQ(parse_ok(edited(kMistral7B, [](Json& j) { j["sliding_window"] = nullptr; })).sliding_window, 0);
  // MistralConfig's default when the key is missing is 4096.
  EXPECT_EQ(parse_ok(edited(kMistral7B, [](Json& j) { j.erase("sliding_window"); })).sliding_window, 4096);
  EXPECT_EQ(parse_ok(edited(kMistral7B, [](Json& j) { j["sliding_window"] = 8192; })).sliding_window, 8192);
  // MistralAttention builds its projections without bias whatever the config says.
  const ModelConfig c = parse_ok(edited(kMistral7B, [](Json& j) { j["attention_bias"] = true; }));
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
}

void expect_qwen25(const ModelConfig& c) {
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_EQ(c.family, ModelFamily::kQwen2);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_EQ(c.hidden_size, 896);
  EXPECT_EQ(c.intermediate_size, 4864);
  EXPECT_EQ(c.num_layers, 24);
  EXPECT_EQ(c.num_heads, 14);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.group_size(), 7);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1000000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.sliding_window, 0);  // use_sliding_window is false
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{151643}));
}

TEST(ModelConfig, Qwen25V4) { expect_qwen25(parse_ok(kQwen25)); }
TEST(ModelConfig, Qwen25V5) { expect_qwen25(parse_ok(kQwen25V5)); }

TEST(ModelConfig, QwenBiasesIgnoreAttentionBias) {
  const ModelConfig c = parse_ok(edited(kQwen25, [](Json& j) { j["attention_bias"] = false; }));
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
}

TEST(ModelConfig, QwenSlidingWindowOnlyWhenEnabledAndSomeLayerSlides) {
  // 4.x: layers at index >= max_window_layers slide.
  EXPECT_EQ(parse_ok(edited(kQwen25, [](Json& j) {
              j["use_sliding_window"] = true;
              j["sliding_window"] = 4096;
              j["max_window_layers"] = 21;
            })).sliding_window,
            4096);
  EXPECT_EQ(parse_ok(edited(kQwen25, [](Json& j) {
              j["use_sliding_window"] = true;
              j["max_window_layers"] = 24;  // = num_hidden_layers: no layer slides
            })).sliding_window,
            0);
  // 5.x: layer_types decides.
  EXPECT_EQ(parse_ok(edited(kQwen3V5, [](Json& j) {
              j["use_sliding_window"] = true;
              j["sliding_window"] = 2048;
              j["layer_types"][27] = "sliding_attention";
            })).sliding_window,
            2048);
  EXPECT_EQ(parse_ok(edited(kQwen3V5, [](Json& j) {
              j["use_sliding_window"] = true;
              j["sliding_window"] = 2048;
            })).sliding_window,
            0);
  // Without use_sliding_window nothing slides, whatever the other fields say.
  EXPECT_EQ(parse_ok(edited(kQwen3V5, [](Json& j) {
              j["sliding_window"] = 2048;
              j["layer_types"][0] = "sliding_attention";
            })).sliding_window,
            0);
}

void expect_qwen3(const ModelConfig& c) {
  EXPECT_EQ(c.architecture, "Qwen3ForCausalLM");
  EXPECT_EQ(c.family, ModelFamily::kQwen3);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_EQ(c.hidden_size, 1024);
  EXPECT_EQ(c.intermediate_size, 3072);
  EXPECT_EQ(c.num_layers, 28);
  EXPECT_EQ(c.num_heads, 16);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);  // not 1024 / 16
  EXPECT_EQ(c.q_dim(), 2048);
  EXPECT_EQ(c.kv_dim(), 1024);
  EXPECT_EQ(c.max_position_embeddings, 40960);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1000000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.dtype, DType::kBF16);
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{151645}));
}

TEST(ModelConfig, Qwen3V4) { expect_qwen3(parse_ok(kQwen3)); }
TEST(ModelConfig, Qwen3V5) { expect_qwen3(parse_ok(kQwen3V5)); }

TEST(ModelConfig, AttentionBiasMeansQkvAndOForLlamaAndQwen3) {
  for (const char* base : {kLlama31Instruct, kQwen3}) {
    const ModelConfig c = parse_ok(edited(base, [](Json& j) { j["attention_bias"] = true; }));
    EXPECT_TRUE(c.qkv_bias);
    EXPECT_TRUE(c.o_bias);
  }
}

TEST(ModelConfig, HeadDimDefaults) {
  // null -> hidden / heads, for every family.
  EXPECT_EQ(parse_ok(edited(kQwen3, [](Json& j) { j["head_dim"] = nullptr; })).head_dim, 64);
  EXPECT_EQ(parse_ok(edited(kLlama31InstructV5, [](Json& j) { j["head_dim"] = nullptr; })).head_dim, 128);
  // absent -> the config class default: hidden / heads, except Qwen3Config's 128.
  EXPECT_EQ(parse_ok(edited(kQwen25, [](Json& j) { j.erase("head_dim"); })).head_dim, 64);
  EXPECT_EQ(parse_ok(edited(kQwen3, [](Json& j) {
              j.erase("head_dim");
              j["hidden_size"] = 2048;
            })).head_dim,
            128);
  // An explicit value that differs from hidden/heads is kept (Llama allows it too).
  EXPECT_EQ(parse_ok(edited(kLlama2, [](Json& j) { j["head_dim"] = 64; })).head_dim, 64);
}

TEST(ModelConfig, KvHeadsDefaultToHeads) {
  EXPECT_EQ(parse_ok(edited(kLlama31Instruct, [](Json& j) { j.erase("num_key_value_heads"); })).num_kv_heads, 32);
  EXPECT_EQ(parse_ok(edited(kLlama31Instruct, [](Json& j) { j["num_key_value_heads"] = nullptr; })).num_kv_heads, 32);
}

TEST(ModelConfig, RopeFormsAndPrecedence) {
  // Older "type" key with rope_type "default" spelled out: no scaling.
  ModelConfig c = parse_ok(edited(kLlama2, [](Json& j) { j["rope_scaling"] = {{"rope_type", "default"}}; }));
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  // A theta inside rope_parameters wins over a top-level one; absent inside, the top-level counts.
  c = parse_ok(edited(kQwen3V5, [](Json& j) { j["rope_theta"] = 5.0; }));
  EXPECT_DOUBLE_EQ(c.rope_theta, 1000000.0);
  c = parse_ok(edited(kQwen3V5, [](Json& j) {
    j["rope_theta"] = 5.0;
    j["rope_parameters"].erase("rope_theta");
  }));
  EXPECT_DOUBLE_EQ(c.rope_theta, 5.0);
  // rope_scaling wins over rope_parameters (transformers' convert_rope_params_to_dict).
  c = parse_ok(edited(kQwen3V5, [](Json& j) { j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 3.0}}; }));
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 3.0);
  // rope_scaling replaces rope_parameters whole, theta included, and the v5 file has no top-level
  // rope_theta: transformers 5.24 gives {'rope_type': 'linear', 'factor': 3.0, 'rope_theta': 10000.0}.
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  // llama3 without original_max_position_embeddings takes max_position_embeddings.
  c = parse_ok(edited(kLlama31Instruct, [](Json& j) {
    j["rope_scaling"].erase("original_max_position_embeddings");
    j["max_position_embeddings"] = 16384;
  }));
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 16384);
  // Neither rope_theta nor any rope dict: 10000.
  c = parse_ok(edited(kQwen3, [](Json& j) {
    j.erase("rope_theta");
    j.erase("rope_scaling");
  }));
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
}

TEST(ModelConfig, TokenIdsAndDefaults) {
  ModelConfig c = parse_ok(edited(kLlama31Instruct, [](Json& j) { j["eos_token_id"] = {7, 9, 7, 8, 9}; }));
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{7, 9, 8}));
  c = parse_ok(edited(kQwen3, [](Json& j) {
    j["eos_token_id"] = nullptr;
    j["bos_token_id"] = nullptr;
  }));
  EXPECT_TRUE(c.eos_token_ids.empty());
  EXPECT_EQ(c.bos_token_id, -1);
  // Absent: the config class default (LlamaConfig 1/2; Qwen none).
  c = parse_ok(edited(kLlama2, [](Json& j) {
    j.erase("eos_token_id");
    j.erase("bos_token_id");
  }));
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2}));
  c = parse_ok(edited(kQwen3, [](Json& j) {
    j.erase("eos_token_id");
    j.erase("bos_token_id");
  }));
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_TRUE(c.eos_token_ids.empty());
}

TEST(ModelConfig, SmallFieldDefaults) {
  const ModelConfig c = parse_ok(edited(kQwen25, [](Json& j) {
    j.erase("tie_word_embeddings");
    j.erase("rms_norm_eps");
    j.erase("max_position_embeddings");
    j.erase("hidden_act");
    j.erase("torch_dtype");
    j["dtype"] = "float32";
  }));
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.dtype, DType::kF32);
  // "dtype" (5.x) wins over "torch_dtype" when a file has both.
  EXPECT_EQ(parse_ok(edited(kLlama2, [](Json& j) { j["dtype"] = "bfloat16"; })).dtype, DType::kBF16);
}

TEST(ModelConfig, ModelTypeFallback) {
  ModelConfig c = parse_ok(edited(kQwen25, [](Json& j) { j.erase("architectures"); }));
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_EQ(c.family, ModelFamily::kQwen2);
  c = parse_ok(edited(kMistral7B, [](Json& j) { j["architectures"] = Json::array(); }));
  EXPECT_EQ(c.family, ModelFamily::kMistral);
}

// --- refusals --------------------------------------------------------------------------------

void expect_refused(const std::string& text, StatusCode code, const std::vector<std::string>& phrases) {
  auto cfg = parse_model_config(text, "/models/x/config.json");
  ASSERT_FALSE(cfg) << "expected refusal: " << phrases.front();
  EXPECT_EQ(cfg.status().code(), code) << cfg.status().message();
  const std::string& m = cfg.status().message();
  EXPECT_EQ(m.rfind("/models/x/config.json: ", 0), 0u) << m;
  EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  for (const std::string& p : phrases) EXPECT_NE(m.find(p), std::string::npos) << "missing '" << p << "' in: " << m;
}

void expect_unimplemented(const std::string& text, const std::vector<std::string>& phrases) {
  expect_refused(text, StatusCode::kUnimplemented, phrases);
}

TEST(ModelConfigRefusals, UnknownArchitecture) {
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["architectures"] = {"GPT2LMHeadModel"}; }),
                       {"'architectures'", "unsupported architecture 'GPT2LMHeadModel'",
                        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["architectures"] = {"LlamaForSequenceClassification"}; }),
                       {"unsupported architecture 'LlamaForSequenceClassification'"});
  expect_unimplemented(edited(kLlama2, [](Json& j) {
                         j.erase("architectures");
                         j["model_type"] = "gemma";
                       }),
                       {"'model_type'", "unsupported model type 'gemma'"});
  expect_unimplemented(edited(kLlama2, [](Json& j) {
                         j.erase("architectures");
                         j.erase("model_type");
                       }),
                       {"missing required field 'architectures'"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["architectures"] = {"Llama\nForCausalLM"}; }),
                       {"unsupported architecture 'Llama\\x0aForCausalLM'"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["architectures"] = "LlamaForCausalLM"; }),
                       {"field 'architectures' must be a list of class names, got string"});
}

TEST(ModelConfigRefusals, Activation) {
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["hidden_act"] = "gelu"; }),
                       {"field 'hidden_act' is 'gelu': not supported (only silu)"});
}

TEST(ModelConfigRefusals, RopeTypes) {
  // Qwen2.5's documented long-context switch (4.x, "type" key).
  expect_unimplemented(
      edited(kQwen25, [](Json& j) {
        j["rope_scaling"] = {{"factor", 4.0}, {"original_max_position_embeddings", 32768}, {"type", "yarn"}};
      }),
      {"field 'rope_scaling.type' is 'yarn': not supported (supported: default, linear, llama3)"});
  expect_unimplemented(edited(kLlama31InstructV5, [](Json& j) { j["rope_parameters"]["rope_type"] = "dynamic"; }),
                       {"field 'rope_parameters.rope_type' is 'dynamic': not supported"});
  expect_unimplemented(edited(kLlama31Instruct, [](Json& j) { j["rope_scaling"]["rope_type"] = "longrope"; }),
                       {"'rope_scaling.rope_type' is 'longrope'"});
  expect_unimplemented(edited(kLlama31Instruct, [](Json& j) { j["rope_scaling"].erase("low_freq_factor"); }),
                       {"missing required field 'rope_scaling.low_freq_factor'"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["rope_scaling"] = {{"type", "linear"}}; }),
                       {"missing required field 'rope_scaling.factor'"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["rope_scaling"] = "linear"; }),
                       {"field 'rope_scaling' must be an object, got string"});
  expect_unimplemented(edited(kLlama31Instruct, [](Json& j) { j["rope_scaling"]["factor"] = "8"; }),
                       {"field 'rope_scaling.factor' must be a number, got string"});
  expect_unimplemented(edited(kQwen3V5, [](Json& j) { j["rope_parameters"]["partial_rotary_factor"] = 0.5; }),
                       {"'rope_parameters.partial_rotary_factor'", "partial RoPE not supported"});
}

TEST(ModelConfigRefusals, MlpBiasAndQuantization) {
  expect_unimplemented(edited(kLlama31Instruct, [](Json& j) { j["mlp_bias"] = true; }),
                       {"field 'mlp_bias' is true: MLP biases are not supported"});
  expect_unimplemented(edited(kQwen3, [](Json& j) { j["quantization_config"] = {{"quant_method", "fp8"}}; }),
                       {"'quantization_config'", "quantized checkpoints are not supported"});
}

TEST(ModelConfigRefusals, HeadCounts) {
  expect_unimplemented(edited(kLlama31Instruct, [](Json& j) { j["num_key_value_heads"] = 5; }),
                       {"'num_attention_heads' (32) is not divisible by 'num_key_value_heads' (5)"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["hidden_size"] = 4100; }),
                       {"'hidden_size' (4100) is not divisible by 'num_attention_heads' (32)"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["num_attention_heads"] = 0; }),
                       {"field 'num_attention_heads' must be at least 1, got 0"});
}

TEST(ModelConfigRefusals, MissingRequiredFields) {
  for (const char* field : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads"}) {
    expect_unimplemented(edited(kQwen3, [&](Json& j) { j.erase(field); }),
                         {std::string("missing required field '") + field + "'"});
    expect_unimplemented(edited(kQwen3, [&](Json& j) { j[field] = nullptr; }),
                         {std::string("missing required field '") + field + "'"});
  }
}

TEST(ModelConfigRefusals, WrongJsonTypes) {
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["hidden_size"] = "4096"; }),
                       {"field 'hidden_size' must be an integer, got string \"4096\""});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["num_hidden_layers"] = 32.5; }),
                       {"field 'num_hidden_layers' must be an integer, got number"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["rms_norm_eps"] = "1e-5"; }),
                       {"field 'rms_norm_eps' must be a number, got string"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["tie_word_embeddings"] = "false"; }),
                       {"field 'tie_word_embeddings' must be a boolean, got string"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["eos_token_id"] = "2"; }),
                       {"field 'eos_token_id' must be a token id or a list of token ids, got string"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["eos_token_id"] = {2, -1}; }),
                       {"field 'eos_token_id' holds -1, not a token id"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["bos_token_id"] = 1.5; }),
                       {"field 'bos_token_id' must be an integer"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["torch_dtype"] = "float64"; }),
                       {"field 'torch_dtype' is 'float64': not supported"});
  expect_unimplemented(edited(kLlama2, [](Json& j) { j["vocab_size"] = 18446744073709551615ull; }),
                       {"field 'vocab_size' is out of range"});
}

TEST(ModelConfigRefusals, MalformedJson) {
  expect_refused("{\"architectures\": [\"LlamaForCausalLM\"],", StatusCode::kDataLoss,
                 {"config.json: malformed JSON: ", "parse error"});
  expect_refused("[1, 2]", StatusCode::kDataLoss, {"not a JSON object"});
}

// --- load_model_config: files on disk ---------------------------------------------------------

TEST(LoadModelConfig, MergesGenerationConfigEndTokens) {
  TempDir dir;
  // Llama-3.1-8B (base) lists one eos in config.json; its generation_config.json lists three.
  write_file(dir.path() / "config.json", edited(kLlama31Instruct, [](Json& j) { j["eos_token_id"] = 128001; }));
  write_file(dir.path() / "generation_config.json",
             std::string(R"({"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128008, 128009],)"
                         R"( "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.42.3"})"));
  auto c = load_model_config(dir.path().string());
  ASSERT_TRUE(c) << c.status().message();
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_EQ(c->bos_token_id, 128000);
}

TEST(LoadModelConfig, Qwen3GenerationConfigAddsEndOfText) {
  TempDir dir;
  write_file(dir.path() / "config.json", std::string(kQwen3));
  write_file(dir.path() / "generation_config.json",
             std::string(R"({"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],)"
                         R"( "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95})"));
  auto c = load_model_config(dir.path().string());
  ASSERT_TRUE(c) << c.status().message();
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{151645, 151643}));
  expect_qwen3(parse_ok(kQwen3));  // the file alone still gives one eos
}

TEST(LoadModelConfig, GenerationConfigBosOverridesAndIsOptional) {
  TempDir dir;
  write_file(dir.path() / "config.json", edited(kQwen3, [](Json& j) { j["bos_token_id"] = nullptr; }));
  auto c = load_model_config(dir.path().string());
  ASSERT_TRUE(c) << c.status().message();
  EXPECT_EQ(c->bos_token_id, -1);
  write_file(dir.path() / "generation_config.json", std::string(R"({"bos_token_id": 7})"));
  c = load_model_config(dir.path().string());
  ASSERT_TRUE(c) << c.status().message();
  EXPECT_EQ(c->bos_token_id, 7);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{151645}));
}

TEST(LoadModelConfig, Errors) {
  TempDir dir;
  auto missing = load_model_config(dir.path().string());
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(dir.file("config.json")), std::string::npos)
      << missing.status().message();

  write_file(dir.path() / "config.json", std::string("{\"hidden_size\": 4096,,}"));
  auto bad = load_model_config(dir.path().string());
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(bad.status().message().rfind(dir.file("config.json") + ": malformed JSON: ", 0), 0u)
      << bad.status().message();

  write_file(dir.path() / "config.json", std::string(kQwen3));
  write_file(dir.path() / "generation_config.json", std::string("{\"eos_token_id\": [1,"));
  auto bad_gen = load_model_config(dir.path().string());
  ASSERT_FALSE(bad_gen);
  EXPECT_EQ(bad_gen.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(bad_gen.status().message().find("generation_config.json: malformed JSON"), std::string::npos)
      << bad_gen.status().message();

  write_file(dir.path() / "generation_config.json", std::string(R"({"eos_token_id": "</s>"})"));
  auto typed = load_model_config(dir.path().string());
  ASSERT_FALSE(typed);
  EXPECT_EQ(typed.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(typed.status().message().find("generation_config.json: field 'eos_token_id' must be"), std::string::npos)
      << typed.status().message();
}

}  // namespace
}  // namespace adakv
