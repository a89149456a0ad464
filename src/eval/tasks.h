// Synthetic long-context tasks, generated on the fly and deterministic in (seed, task, index):
// needle-in-a-haystack over a grid of context lengths x depths, and RULER-style tasks. Where the
// test model was trained on a format (tools/train/synthetic.py), the task uses exactly that
// format, so the model can solve it:
//
//   niah        pass key: "The pass key is K. Remember it. K is the pass key." at a given depth;
//               "What is the pass key?" / "The pass key is"            metric passkey
//   single      one "The value for key 3f1a-92c4 is 581204."; asked     string_match_all
//   multikey    num_keys such sentences at random depths; one asked     string_match_all
//   multikey_block  one block "Here is a list of keys and values:\n3f1a-92c4: 581204\n...\nEnd of
//               the list." of block_lines lines; one key asked          string_match_all
//   multivalue  num_values "One of the special magic numbers for river is: 4182." (plus
//               value_distractors for another word); all values asked   string_match_all
//   multiquery  one such number for each of num_queries words; all asked at once ("for river,
//               falcon, cedar and ember") -- not a trained format       string_match_all
//   vt          chains "VAR ABCDE = 12345." "VAR FGHIJ = VAR ABCDE." of `hops` statements,
//               `chains` of them interleaved; the value of chain 0's last variable asked
//   cwe         RULER's common-words list "1. word 2. word ..." (words of the haystack text);
//               the 10 most common asked -- not trained                 string_match_all
//   fwe         RULER's frequent-words text (Zipf-distributed random 6-letter words, "..." the
//               most frequent); the three most frequent asked -- not trained  string_match_all
//
// Prompt layout (the trained one): context + "\n\n" + question, then " " + answer prefix in raw
// format, or wrapped in the chat template (the model then writes the answer prefix itself). The
// question part starts at the "\n\n". The prompt comes out at most target_tokens long (specials
// included), usually within a few tokens of it: the last sentence of the haystack is cut at a
// word to fill up. Any value or key that a needle holds appears nowhere else in the context.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "eval/haystack.h"
#include "eval/sample.h"

namespace adakv::eval {

enum class Task {
  kNiah,
  kSingle,
  kMultiKey,
  kMultiKeyBlock,
  kMultiValue,
  kMultiQuery,
  kVariableTracking,
  kCommonWords,
  kFrequentWords,
};

std::string_view task_name(Task task);  // "niah", "single", ..., "cwe", "fwe"
Expected<Task> parse_task(std::string_view name);
// Every task but niah, in the order above.
std::vector<Task> ruler_tasks();

struct TaskOptions {
  int target_tokens = 4096;  // prompt length, specials included
  PromptFormat format;       // raw by default
  double depth = -1;         // niah, single, multikey_block: in [0, 1]; < 0: uniform in [0.02, 0.98]
  int passkey_digits = 5;
  int num_keys = 4;          // multikey: keys in the context, one asked
  int block_lines = 16;      // multikey_block
  int num_values = 4;        // multivalue: values of the asked word
  int value_distractors = 0; // multivalue: values of another word
  int num_queries = 4;       // multiquery
  int hops = 4;              // vt: statements a chain
  int chains = 2;            // vt: chains, one asked
  int common_words = 10;     // cwe
  int common_repeats = 0;    // cwe: 0 = RULER's (30, or 6 below 4096 tokens)
  int uncommon_repeats = 0;  // cwe: 0 = RULER's (3, or 1 below 4096 tokens)
  double fwe_alpha = 2.0;    // fwe: Zipf exponent
};

// One sample of `task`, a function of (haystack text and tokenizer, task, options, seed, index)
// alone. Fails when target_tokens cannot hold the task.
Expected<Sample> make_task_sample(const Haystack& haystack, Task task, const TaskOptions& options, uint64_t seed,
                                  uint64_t index);

struct NiahCell {
  int target_tokens = 0;
  double depth = 0;
  int trial = 0;
};
// The needle grid, lengths x depths x trials in row-major order; run cell c as
// make_task_sample(haystack, Task::kNiah, {target_tokens, depth ...}, seed, c).
std::vector<NiahCell> niah_grid(const std::vector<int>& lengths, const std::vector<double>& depths, int trials);
// n depths evenly spaced over [0, 1] (n >= 2), or {0.5} for n == 1.
std::vector<double> even_depths(int n);

}  // namespace adakv::eval
