// RULER's word-frequency tasks (common words extraction, frequent words extraction) in adakv's
// prompt layout. Texts follow RULER's templates (scripts/data/synthetic/constants.py) without
// RULER's one-shot example for cwe.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "eval/task_layout.h"

namespace adakv::eval {
namespace {

constexpr int kMaxFits = 8;

// A word list's context as a function of its size n; token counts of its pieces give an estimate,
// the prompt's encoding the truth: n shrinks until the prompt fits.
struct Fitted {
  PromptLayout layout;
  int tokens = 0;  // of the whole prompt
  int n = 0;       // the list size that fits
};

template <typename Build>
Expected<Fitted> fit_prompt(const TokenCounter& counter, const TaskOptions& options, std::string_view question,
                            std::string_view lead, int n, int min_n, Build build) {
  const int target = options.target_tokens;
  for (int fit = 0; fit < kMaxFits && n >= min_n; ++fit) {
    PromptLayout lay = layout_prompt(options.format, build(n), question, lead);
    int tokens = counter.encode_count(lay.prompt);
    if (tokens <= target) return Fitted{std::move(lay), tokens, n};
    // Over by `tokens - target`: drop about that many tokens' worth of n (a step is >= 1 token).
    n -= std::max(1, (tokens - target) / 2);
  }
  return out_of_range("target of " + std::to_string(target) + " tokens is too short for this task");
}

// The context part of a laid-out prompt (without the chat template's user prefix).
std::string context_of(const PromptLayout& lay, const PromptFormat& format) {
  const size_t b = format.chat ? format.user_prefix.size() : 0;
  return lay.prompt.substr(b, lay.question_offset - b);
}

Sample word_sample(Fitted fitted, const PromptFormat& format, std::string question, std::string lead,
                   std::vector<std::string> answers, int max_new_tokens, int target) {
  Sample s;
  s.context = context_of(fitted.layout, format);
  s.question = std::move(question);
  s.answer_prefix = std::move(lead);
  s.prompt = std::move(fitted.layout.prompt);
  s.question_offset = fitted.layout.question_offset;
  s.answers = std::move(answers);
  s.metric = Metric::kStringMatchAll;
  s.max_new_tokens = max_new_tokens;
  s.target_tokens = target;
  s.prompt_tokens = fitted.tokens;
  return s;
}

// Riemann zeta(alpha) for alpha > 1: a partial sum and its Euler-Maclaurin tail.
double zeta(double alpha) {
  constexpr int kTerms = 1000;
  double sum = 0;
  for (int k = 1; k <= kTerms; ++k) sum += std::pow(static_cast<double>(k), -alpha);
  const double n = kTerms;
  return sum + std::pow(n, 1 - alpha) / (alpha - 1) - 0.5 * std::pow(n, -alpha) + alpha / 12 * std::pow(n, -alpha - 1);
}

}  // namespace

Expected<Sample> make_cwe_sample(const Haystack& haystack, const TaskOptions& options, Rng& rng) {
  const TokenCounter& counter = haystack.counter();
  const int target = options.target_tokens;
  const bool short_ctx = target < 4096;  // RULER uses fewer repeats below 4K
  const int cw = std::max(1, options.common_words);
  const int fc = options.common_repeats > 0 ? options.common_repeats : (short_ctx ? 6 : 30);
  const int fu = options.uncommon_repeats > 0 ? options.uncommon_repeats : (short_ctx ? 1 : 3);
  const std::vector<std::string>& words = haystack.words();
  if (static_cast<int>(words.size()) <= cw) {
    return invalid_argument(haystack.source() + ": too few distinct words for " + std::to_string(cw) + " common words");
  }
  const std::string header =
      "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
      "that appear most often.\n";
  const std::string question = "What are the " + std::to_string(cw) + " most common words in the above list?";
  const std::string lead = "The top " + std::to_string(cw) + " words that appear most often in the list are:";

  std::vector<size_t> perm(words.size());  // [words] random order: common words first
  std::iota(perm.begin(), perm.end(), 0);
  rng.shuffle(perm);
  const int max_uncommon = static_cast<int>(words.size()) - cw;

  // Estimate: the prompt around an empty list, " i." per entry, " word" per repetition.
  int est = counter.encode_count(layout_prompt(options.format, header, question, lead).prompt);
  int entries = 0;
  auto add_entries = [&](const std::string& w, int reps) {
    est += reps * counter.count(" " + w);
    for (int r = 0; r < reps; ++r) {
      std::string number = " ";  // built in steps: GCC 12 warns falsely on " " + to_string()
      number += std::to_string(++entries);
      number += '.';
      est += counter.count(number);
    }
  };
  for (int i = 0; i < cw; ++i) add_entries(words[perm[static_cast<size_t>(i)]], fc);
  if (est > target) {
    return out_of_range("cwe: target of " + std::to_string(target) + " tokens is too short for " +
                        std::to_string(cw) + " words repeated " + std::to_string(fc) + " times");
  }
  int uncommon = 0;
  while (uncommon < max_uncommon) {
    const int before = est, before_entries = entries;
    add_entries(words[perm[static_cast<size_t>(cw + uncommon)]], fu);
    if (est > target) {
      est = before;
      entries = before_entries;
      break;
    }
    ++uncommon;
  }

  std::vector<std::string> answers;
  for (int i = 0; i < cw; ++i) answers.push_back(words[perm[static_cast<size_t>(i)]]);
  const Rng start = rng;
  auto build = [&](int n_uncommon) {
    std::vector<const std::string*> list;  // [entries] the words in list order
    for (int i = 0; i < cw; ++i) list.insert(list.end(), static_cast<size_t>(fc), &words[perm[static_cast<size_t>(i)]]);
    for (int i = 0; i < n_uncommon; ++i) {
      list.insert(list.end(), static_cast<size_t>(fu), &words[perm[static_cast<size_t>(cw + i)]]);
    }
    rng = start;
    rng.shuffle(list);
    std::string text = header;
    for (size_t i = 0; i < list.size(); ++i) {
      if (i > 0) text += ' ';
      text += std::to_string(i + 1) + ". " + *list[i];
    }
    return text;
  };
  ADAKV_ASSIGN_OR_RETURN(Fitted fitted, fit_prompt(counter, options, question, lead, uncommon, 0, build));
  return word_sample(std::move(fitted), options.format, question, lead, std::move(answers), 120, target);
}

Expected<Sample> make_fwe_sample(const Haystack& haystack, const TaskOptions& options, Rng& rng) {
  const TokenCounter& counter = haystack.counter();
  const int target = options.target_tokens;
  const double alpha = options.fwe_alpha;
  if (!(alpha > 1.0)) return invalid_argument("fwe: alpha must be > 1, got " + std::to_string(alpha));
  const std::string header =
      "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
      "appeared coded words. ";
  const std::string question =
      "Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared "
      "words in the above coded text?";
  const std::string lead = "According to the coded text above, the three most frequently appeared words are:";
  const int fixed = counter.encode_count(layout_prompt(options.format, header, question, lead).prompt);
  const int budget = target - fixed;
  if (budget < 64) return out_of_range("fwe: target of " + std::to_string(target) + " tokens is too short");

  // RULER: a vocabulary of budget / 50 random 6-letter words whose first is "...", counts
  // floor(n * k^-alpha / zeta(alpha)) for rank k.
  const int vocab_size = std::max(8, budget / 50);
  std::vector<std::string> vocab{"..."};
  while (static_cast<int>(vocab.size()) < vocab_size) {
    std::string w;
    for (int i = 0; i < 6; ++i) w.push_back(static_cast<char>('a' + rng.uniform_int(0, 25)));
    if (std::find(vocab.begin(), vocab.end(), w) == vocab.end()) vocab.push_back(std::move(w));
  }
  const double z = zeta(alpha);
  std::vector<double> share(static_cast<size_t>(vocab_size));  // [rank] k^-alpha / zeta
  std::vector<int> word_tokens(static_cast<size_t>(vocab_size));
  for (int k = 0; k < vocab_size; ++k) {
    share[static_cast<size_t>(k)] = std::pow(static_cast<double>(k + 1), -alpha) / z;
    word_tokens[static_cast<size_t>(k)] = counter.count(" " + vocab[static_cast<size_t>(k)]);
  }
  auto counts = [&](int n) {
    std::vector<int> c(static_cast<size_t>(vocab_size));
    for (size_t k = 0; k < c.size(); ++k) c[k] = static_cast<int>(std::floor(n * share[k]));
    return c;
  };
  auto estimate = [&](int n) {
    std::vector<int> c = counts(n);
    int64_t t = 0;
    for (size_t k = 0; k < c.size(); ++k) t += static_cast<int64_t>(c[k]) * word_tokens[k];
    return t;
  };
  int lo = 1, hi = 64 * budget;  // largest n whose estimate fits
  while (lo < hi) {
    int mid = lo + (hi - lo + 1) / 2;
    if (estimate(mid) <= budget) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const Rng start = rng;
  auto build = [&](int n) {
    std::vector<int> c = counts(n);
    std::vector<const std::string*> list;  // [words] in text order
    for (size_t k = 0; k < c.size(); ++k) list.insert(list.end(), static_cast<size_t>(c[k]), &vocab[k]);
    rng = start;
    rng.shuffle(list);
    std::string text = header;
    for (size_t i = 0; i < list.size(); ++i) {
      if (i > 0) text += ' ';
      text += *list[i];
    }
    return text;
  };
  ADAKV_ASSIGN_OR_RETURN(Fitted fitted, fit_prompt(counter, options, question, lead, lo, 1, build));
  // The answer must be unambiguous: the word of rank 4 (the third after "...") strictly more
  // frequent than the one of rank 5.
  std::vector<int> c = counts(fitted.n);
  if (c[3] <= c[4]) {
    return out_of_range("fwe: target of " + std::to_string(target) + " tokens is too short for a clear top three");
  }
  std::vector<std::string> answers{vocab[1], vocab[2], vocab[3]};
  return word_sample(std::move(fitted), options.format, question, lead, std::move(answers), 50, target);
}

}  // namespace adakv::eval
