// Readers for evaluation sets that users bring as JSONL files, one sample a line:
//
//   LongBench (THUDM/LongBench v1 data files): {"context", "input", "answers": [..],
//     "all_classes": null | [..], "length", "dataset", "_id", "language"}; prompts are the
//     dataset's template from LongBench's config/dataset2prompt.json and the generation length
//     its config/dataset2maxlen.json; scoring follows eval.py (metrics.h).
//   kvpress-style: {"context", "question", "answer": ".." | [..]} with the optional
//     "answer_prefix", "task" and "max_new_tokens" of kvpress's evaluation datasets.
//
// A malformed line is an error that names the file and the line number.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "eval/sample.h"

namespace adakv::eval {

struct LongBenchRecord {
  std::string id;       // "_id"
  std::string dataset;  // "dataset", else the file's name without ".jsonl"
  std::string context;
  std::string input;
  std::vector<std::string> answers;
  std::vector<std::string> all_classes;  // empty when null
  int64_t length = 0;
  std::string language;
};

// Each non-blank line of `path`. A record without "dataset" takes the file's base name.
Expected<std::vector<LongBenchRecord>> read_longbench_jsonl(const std::string& path);
// The same over `text`; `source` names it in errors.
Expected<std::vector<LongBenchRecord>> parse_longbench_jsonl(std::string_view text, const std::string& source,
                                                             std::string_view default_dataset = "");

struct LongBenchDataset {
  std::string_view name;
  std::string_view prompt;  // with {context} and {input}, as Python's str.format reads it
  int max_new_tokens = 0;
  // pred.py applies the model's chat template to every dataset but these few-shot and code
  // completion sets: trec, triviaqa, samsum, lsht, lcc, repobench-p.
  bool chat_template = true;
};
// The 16 English and code datasets (LongBench-E's "_e" names are accepted).
Expected<LongBenchDataset> longbench_dataset(std::string_view name);
std::vector<std::string_view> longbench_english_datasets();

// The sample of a record: the dataset's prompt (in the chat template when format.chat and the
// dataset takes one), question_offset at the end of the substituted context, LongBench's
// max_new_tokens and metric; samsum stops at a newline as pred.py does.
Expected<Sample> longbench_sample(const LongBenchRecord& record, const PromptFormat& format);

// Python's str.format for named fields only ({name}, with {{ and }} for braces). The values are
// substituted once (text in a value is never read as a field). field_end[i] receives the byte
// offset in the result just after the first substitution of fields[i] (npos when absent).
Expected<std::string> format_fields(std::string_view tmpl, const std::vector<std::string_view>& fields,
                                    const std::vector<std::string_view>& values, std::vector<size_t>* field_end = nullptr);

struct KvpressRecord {
  std::string id;  // "id" or "_id", else "<file>:<line>"
  std::string context;
  std::string question;
  std::vector<std::string> answers;  // "answer" as a string or a list ("answers" also read)
  std::string answer_prefix;
  std::string task;
  int max_new_tokens = 0;  // 0 when absent
};

Expected<std::vector<KvpressRecord>> read_kvpress_jsonl(const std::string& path);
Expected<std::vector<KvpressRecord>> parse_kvpress_jsonl(std::string_view text, const std::string& source);

// kvpress's pipeline layout (its KVPressTextGenerationPipeline.preprocess): context + question + "\n" + answer_prefix in raw format; in chat
// format the context alone is the user turn's start and question + assistant prefix +
// answer_prefix follow. The question part starts with the question. Metric: RULER's
// string_match_part for tasks whose name starts with "qa", string_match_all otherwise.
Sample kvpress_sample(const KvpressRecord& record, const PromptFormat& format, int default_max_new_tokens = 64);

}  // namespace adakv::eval
