// Haystack contexts for needle tasks: natural text cut into sentence units, counted with the
// engine's own tokenizer, and assembled into a context of a given token length with needles
// placed between sentences at given relative depths.
//
// Why units: a context must come out at a token length that is known without re-encoding
// megabytes. Units are cut where byte-level BPE with a Llama-3-style split regex never merges
// across the cut (before the space that follows a sentence end, or after the newlines that do),
// so the tokens of a context are the sum of the tokens of its pieces; a unit is encoded once and
// its count cached. Other tokenizers (SentencePiece) may differ by a token or so per piece,
// which is why the task generators re-encode the final prompt and shrink until it fits.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "eval/rng.h"

namespace adakv::eval {

// The engine's encoder: token ids of a text, as the prompt will be encoded (with BOS or not).
// Haystack and the task generators call it from whatever thread generates a sample, so it must
// be safe to call concurrently when samples are generated in parallel (Tokenizer::encode is).
using TokenizeFn = std::function<std::vector<int32_t>(std::string_view)>;

// Token counts through a TokenizeFn. Whatever the function adds to every encoding (a BOS) is
// measured once as the encoding of "" and not counted for pieces of text.
class TokenCounter {
 public:
  explicit TokenCounter(TokenizeFn tokenize);
  // Tokens `text` contributes inside a longer text (specials excluded).
  int count(std::string_view text) const;
  // Tokens of the whole encoding of `text` (specials included): a prompt's length.
  int encode_count(std::string_view text) const;
  int special_tokens() const { return special_tokens_; }
  std::vector<int32_t> encode(std::string_view text) const { return tokenize_(text); }

 private:
  TokenizeFn tokenize_;
  int special_tokens_ = 0;
};

struct Needle {
  std::string text;  // e.g. "The pass key is 48213. Remember it. 48213 is the pass key."
  double depth = 0;  // in [0, 1]: the fraction of the haystack's tokens that comes before it
};

struct Context {
  std::string text;         // haystack with needles; no leading or trailing whitespace
  int tokens = 0;           // tokens of `text` as the sum of its pieces (specials excluded)
  int haystack_tokens = 0;  // of which haystack text
  std::vector<size_t> needle_offsets;     // [needles] byte offset of each needle's text in `text`
  std::vector<int> needle_token_offsets;  // [needles] tokens of `text` before the needle
  std::vector<double> needle_depths;      // [needles] haystack-token fraction before the needle
};

class Haystack {
 public:
  // The text of `path` (e.g. data/haystack/validation.txt).
  static Expected<std::shared_ptr<const Haystack>> load(const std::string& path, TokenizeFn tokenize);
  // `source` names the text in errors.
  static Expected<std::shared_ptr<const Haystack>> from_text(std::string text, TokenizeFn tokenize,
                                                             const std::string& source = "<haystack text>");
  Haystack(const Haystack&) = delete;
  Haystack& operator=(const Haystack&) = delete;

  // A context of at most `tokens` tokens (as summed pieces): whole units from a random unit of
  // the text (wrapping around at its end), then a prefix of the next unit cut before a space to
  // fill up, with each needle inserted at the unit boundary nearest its depth; needles keep
  // their order when their depths ascend. A needle after a unit that ends a line is followed by
  // "\n", otherwise it is preceded by " ", as the training data placed them.
  Expected<Context> build(int tokens, const std::vector<Needle>& needles, Rng& rng) const;

  const TokenCounter& counter() const { return counter_; }
  const std::string& source() const { return source_; }
  std::string_view text() const { return text_; }
  size_t num_units() const { return unit_starts_.size() - 1; }
  std::string_view unit(size_t i) const;
  int unit_tokens(size_t i) const;  // counted on first use, then cached (thread-safe)
  // Distinct lower-case words of 4-12 ASCII letters in the text, sorted (for common-word tasks).
  const std::vector<std::string>& words() const;

 private:
  Haystack(std::string text, TokenizeFn tokenize, std::string source);
  void cut_units();

  std::string text_;
  std::string source_;
  TokenCounter counter_;
  std::vector<size_t> unit_starts_;  // [units + 1] byte offsets; unit i is [starts[i], starts[i+1])
  std::unique_ptr<std::atomic<int32_t>[]> unit_tokens_;  // [units] token counts, -1 until counted
  mutable std::once_flag words_once_;
  mutable std::vector<std::string> words_;
};

}  // namespace adakv::eval
