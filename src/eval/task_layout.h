// Internal to the task generators (tasks.cc, task_layout.cc, word_tasks.cc): a needle task
// before its haystack, the prompt layout, and the fitting of a prompt under its token target.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "eval/haystack.h"
#include "eval/rng.h"
#include "eval/sample.h"
#include "eval/tasks.h"

namespace adakv::eval {

struct NeedleSpec {
  std::vector<Needle> needles;  // in order of appearance (ascending depths)
  std::string question;         // "What is the pass key?"
  std::string lead;             // "The pass key is"
  std::vector<std::string> answers;
  // Strings (keys, values) that must occur in the context only where the needles hold them.
  std::vector<std::string> unique;
  Metric metric = Metric::kStringMatchAll;
  int max_new_tokens = 32;
};

struct PromptLayout {
  std::string prompt;
  size_t question_offset = 0;
};
// The trained layout: context + "\n\n" + question (+ " " + lead in raw format), the chat
// template around it in chat format.
PromptLayout layout_prompt(const PromptFormat& format, std::string_view context, std::string_view question,
                           std::string_view lead);

// The sample of `spec` in a haystack context that fills options.target_tokens; nullopt when a
// string of spec.unique also occurs in the haystack text (the caller draws another spec). rng
// advances past what the context used.
Expected<std::optional<Sample>> make_needle_sample(const Haystack& haystack, const NeedleSpec& spec,
                                                   const TaskOptions& options, Rng& rng);

Expected<Sample> make_cwe_sample(const Haystack& haystack, const TaskOptions& options, Rng& rng);
Expected<Sample> make_fwe_sample(const Haystack& haystack, const TaskOptions& options, Rng& rng);

// Non-overlapping occurrences of `needle` in `text`.
int count_occurrences(std::string_view text, std::string_view needle);

}  // namespace adakv::eval
