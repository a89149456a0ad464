// One evaluation sample, from any source (synthetic tasks, LongBench, kvpress-style files), in
// the form the engine's eval commands consume: a prompt with the question inside, split at the
// point where the question begins (for the protocol that compresses the context before the
// question is known), the reference answers, and the metric that scores a generation.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "eval/haystack.h"
#include "eval/metrics.h"

namespace adakv::eval {

// How a prompt is laid out. Raw: the text itself (the model continues it). Chat: the user turn
// wrapped as user_prefix + text + assistant_prefix; the defaults are adakv-tiny-v1's template
// ("<|user|>\n" ... "<|eot|><|assistant|>\n"; the tokenizer adds <|begin_of_text|>).
struct PromptFormat {
  bool chat = false;
  std::string user_prefix = "<|user|>\n";
  std::string assistant_prefix = "<|eot|><|assistant|>\n";

  static PromptFormat raw() { return {}; }
  static PromptFormat tiny_chat() {
    PromptFormat f;
    f.chat = true;
    return f;
  }
};

struct Sample {
  std::string task;  // "niah", "multikey", ..., "longbench/hotpotqa", "kvpress"
  std::string id;    // unique within its source, e.g. "niah/s1/i3" or LongBench's _id
  std::string context;        // the long text: haystack with needles, LongBench's context
  std::string question;       // what is asked, e.g. "What is the pass key?"
  std::string answer_prefix;  // raw format: the prompt ends with it; chat: the answer starts so
  // The whole prompt, question inside, without BOS (the tokenizer adds it).
  std::string prompt;
  // prompt[0, question_offset) is the part that holds the context and no question;
  // prompt[question_offset, end) is the question part (appended after compression in the
  // question-after-context protocol).
  size_t question_offset = 0;
  std::vector<std::string> answers;
  std::vector<std::string> all_classes;  // LongBench classification sets
  Metric metric = Metric::kStringMatchAll;
  std::string dataset;  // LongBench dataset name: scoring then follows eval.py (first-line rule)
  int max_new_tokens = 32;
  bool stop_at_newline = false;  // LongBench samsum: "\n" also ends the generation

  // Synthetic tasks only.
  int target_tokens = 0;                  // the prompt length asked for (specials included)
  int prompt_tokens = 0;                  // the prompt's length with the generator's tokenizer
  std::vector<double> depths;             // [needles] requested relative depths
  std::vector<double> needle_depths;      // [needles] actual: haystack-token fraction before it
  std::vector<int> needle_positions;      // [needles] index of the needle's first prompt token
};

// The score in [0, 1] of a generated continuation (text after the prompt, special tokens
// removed): LongBench's eval.py rule when `dataset` is set, else the sample's metric.
double score_prediction(const Sample& sample, std::string_view prediction);

struct PromptTokens {
  std::vector<int32_t> ids;  // [tokens] the whole prompt
  // ids[0, question_start) encode the context part exactly as the whole prompt does; the rest
  // (usually one token more than the question text, where the two parts merge) is the question.
  size_t question_start = 0;
};
// The prompt through `tokenize`, and where its question part starts: the longest common prefix
// of the encodings of the whole prompt and of prompt[0, question_offset).
PromptTokens tokenize_prompt(const Sample& sample, const TokenizeFn& tokenize);

// ids[0, max_tokens / 2) + ids[end - max_tokens / 2, end) when longer than max_tokens:
// LongBench's middle truncation (pred.py cuts the tokens and decodes the two halves).
std::vector<int32_t> truncate_middle(const std::vector<int32_t>& ids, size_t max_tokens);

}  // namespace adakv::eval
