// Everything a tokenizer is made of, as read from tokenizer.json (+ tokenizer_config.json) by
// parse_tokenizer_spec; HfTokenizer (tokenizer.cc) runs it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/tokenizer_bpe.h"
#include "io/tokenizer_pipeline.h"

namespace adakv::tok {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;
  bool lstrip = false, rstrip = false, single_word = false;
  bool normalized = false;  // matched in the normalized text (else in the raw text)
};

struct TokenizerSpec {
  std::optional<Normalizer> normalizer;
  std::optional<PreTokenizer> pre_tokenizer;
  std::unique_ptr<BpeModel> model;
  std::optional<Decoder> decoder;  // none: tokens joined with " "
  // What the post-processor puts around the ids of a single sequence when add_special.
  std::vector<int32_t> prefix_ids, suffix_ids;
  std::vector<AddedToken> added_tokens;
  // [id] -> token text of the model vocabulary and the added tokens; `id_present` false for
  // holes in the numbering.
  std::vector<std::string> id_to_token;
  std::vector<bool> id_present;
  int32_t bos_id = -1;
  std::vector<int32_t> eos_ids;
};

// `config_json` (tokenizer_config.json) and `model_config_json` (config.json) both empty:
// tokenizer.json alone, as the `tokenizers` library runs it. Otherwise also what transformers 5's
// AutoTokenizer makes of them (the tokenizer class follows both files): BOS/EOS, special tokens missing from the
// file, and the pipeline its tokenizer class rebuilds (LlamaTokenizer: Metaspace instead of the
// normalizer; Qwen2Tokenizer: NFC + Qwen2 regex; GPT2Tokenizer: ByteLevel with its regex). `source` names the file in errors.
Expected<TokenizerSpec> parse_tokenizer_spec(const std::string& tokenizer_json, const std::string& config_json,
                                             const std::string& model_config_json, const std::string& source);

}  // namespace adakv::tok
