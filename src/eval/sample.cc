#include "eval/sample.h"

#include <algorithm>

namespace adakv::eval {

double score_prediction(const Sample& sample, std::string_view prediction) {
  if (!sample.dataset.empty()) {
    auto s = longbench_score(sample.dataset, prediction, sample.answers, sample.all_classes);
    if (s.has_value()) return *s;
  }
  return score(sample.metric, prediction, sample.answers, sample.all_classes);
}

PromptTokens tokenize_prompt(const Sample& sample, const TokenizeFn& tokenize) {
  PromptTokens out;
  out.ids = tokenize(sample.prompt);
  const size_t offset = std::min(sample.question_offset, sample.prompt.size());
  std::vector<int32_t> head = tokenize(std::string_view(sample.prompt).substr(0, offset));
  size_t n = std::min(head.size(), out.ids.size());
  size_t k = 0;
  while (k < n && head[k] == out.ids[k]) ++k;
  out.question_start = k;
  return out;
}

std::vector<int32_t> truncate_middle(const std::vector<int32_t>& ids, size_t max_tokens) {
  if (ids.size() <= max_tokens) return ids;
  const size_t half = max_tokens / 2;
  std::vector<int32_t> out(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(half));
  out.insert(out.end(), ids.end() - static_cast<std::ptrdiff_t>(half), ids.end());
  return out;
}

}  // namespace adakv::eval
