// Hugging Face tokenizer.json, without Python: byte-level BPE (GPT-2, Llama 3, Qwen2/3; split
// regexes through PCRE2 with Unicode) and SentencePiece-style BPE (Llama 2, Mistral, TinyLlama:
// "▁" prepending, byte fallback). Added and special tokens are matched in the text and never
// split. BOS/EOS come from tokenizer_config.json / config.json.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace adakv {

class Tokenizer {
 public:
  // Loads DIR/tokenizer.json and DIR/tokenizer_config.json (bos/eos tokens, tokenizer class), as
  // transformers 5 does; eos_ids also get eos_token_id of DIR/generation_config.json (else
  // DIR/config.json) when present.
  static Expected<std::shared_ptr<Tokenizer>> load(const std::string& model_dir);
  // From the text of tokenizer.json (and optionally tokenizer_config.json and the model's
  // config.json, whose model_type can change the tokenizer class transformers uses); `source`
  // names the file in errors. With both configs empty: tokenizer.json as the `tokenizers`
  // library runs it.
  static Expected<std::shared_ptr<Tokenizer>> from_json(const std::string& tokenizer_json,
                                                        const std::string& tokenizer_config_json,
                                                        const std::string& source,
                                                        const std::string& model_config_json = "");
  virtual ~Tokenizer() = default;

  // Token ids of `text`; with add_special, what transformers' tokenizer adds (e.g. BOS).
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special = true) const = 0;
  // Text of `ids`; special tokens dropped when skip_special.
  virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when none
  virtual std::vector<int32_t> eos_ids() const = 0;
  virtual bool is_special(int32_t id) const = 0;
  virtual int32_t token_to_id(std::string_view token) const = 0;  // -1 when unknown
};

// Incremental detokenizer for streaming: push ids as they are generated, get only text that
// is complete UTF-8 (never a broken sequence), and the rest at the end.
class StreamDecoder {
 public:
  explicit StreamDecoder(std::shared_ptr<const Tokenizer> tokenizer, bool skip_special = true);
  std::string push(int32_t id);
  std::string finish();

 private:
  std::string flush(bool final);

  std::shared_ptr<const Tokenizer> tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  // ids_[prefix_offset_, read_offset_) were emitted already and give the context that the
  // next ids are decoded in; ids_[read_offset_, end) are waiting for a complete character.
  size_t prefix_offset_ = 0;
  size_t read_offset_ = 0;
};

}  // namespace adakv
