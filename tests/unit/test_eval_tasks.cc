// The synthetic task generators (src/eval/tasks.h) with the test model's tokenizer and the
// shipped held-out haystack: determinism, prompt length against the real tokenizer, needle
// position against re-encoding, the trained prompt layout, answers that the context really
// implies (re-derived here by parsing the context), and each answer occurring in the context
// only inside its needle.
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "eval/tasks.h"
#include "io/tokenizer.h"

namespace adakv::eval {
namespace {

const std::string kModelDir = std::string(ADAKV_SOURCE_DIR) + "/models/adakv-tiny-v1";
const std::string kHaystackPath = std::string(ADAKV_SOURCE_DIR) + "/data/haystack/validation.txt";

std::shared_ptr<Tokenizer> model_tokenizer() {
  static std::shared_ptr<Tokenizer> tok = [] {
    auto t = Tokenizer::load(kModelDir);
    EXPECT_TRUE(t.has_value()) << t.status().message();
    return *t;
  }();
  return tok;
}

TokenizeFn encode_fn() {
  return [t = model_tokenizer()](std::string_view s) { return t->encode(s, /*add_special=*/true); };
}

const Haystack& haystack() {
  static std::shared_ptr<const Haystack> hay = [] {
    auto h = Haystack::load(kHaystackPath, encode_fn());
    EXPECT_TRUE(h.has_value()) << h.status().message();
    return *h;
  }();
  return *hay;
}

int count_of(const std::string& text, const std::string& s) {
  int n = 0;
  for (size_t p = text.find(s); p != std::string::npos; p = text.find(s, p + s.size())) ++n;
  return n;
}

Sample make(Task task, int tokens, uint64_t seed, uint64_t index, bool chat = false, double depth = -1) {
  TaskOptions o;
  o.target_tokens = tokens;
  o.depth = depth;
  if (chat) o.format = PromptFormat::tiny_chat();
  auto s = make_task_sample(haystack(), task, o, seed, index);
  EXPECT_TRUE(s.has_value()) << task_name(task) << ": " << s.status().message();
  return s.has_value() ? *s : Sample{};
}

TEST(EvalTasks, Deterministic) {
  for (Task task : {Task::kNiah, Task::kMultiKey, Task::kVariableTracking, Task::kCommonWords, Task::kFrequentWords}) {
    Sample a = make(task, 2048, 5, 3), b = make(task, 2048, 5, 3);
    EXPECT_EQ(a.prompt, b.prompt) << task_name(task);
    EXPECT_EQ(a.answers, b.answers);
    EXPECT_EQ(a.id, b.id);
    EXPECT_NE(make(task, 2048, 5, 4).prompt, a.prompt) << task_name(task);
    EXPECT_NE(make(task, 2048, 6, 3).prompt, a.prompt) << task_name(task);
  }
}

TEST(EvalTasks, PromptLengthAgainstTheTokenizer) {
  auto tok = model_tokenizer();
  for (Task task : {Task::kNiah, Task::kSingle, Task::kMultiKey, Task::kMultiKeyBlock, Task::kMultiValue,
                    Task::kMultiQuery, Task::kVariableTracking, Task::kCommonWords, Task::kFrequentWords}) {
    for (int tokens : {512, 2048, 8192}) {
      for (bool chat : {false, true}) {
        Sample s = make(task, tokens, 1, static_cast<uint64_t>(tokens), chat);
        const int real = static_cast<int>(tok->encode(s.prompt, true).size());
        EXPECT_EQ(real, s.prompt_tokens) << s.id;
        EXPECT_LE(real, tokens) << s.id;
        // Needle tasks fill up to a word; list tasks to a list entry.
        const bool list = task == Task::kCommonWords || task == Task::kFrequentWords;
        EXPECT_GE(real, tokens - (list ? 32 : 8)) << s.id << (chat ? " chat" : " raw");
      }
    }
  }
}

TEST(EvalTasks, TrainedPromptLayout) {
  Sample raw = make(Task::kNiah, 1024, 2, 0, false, 0.5);
  const std::string key = raw.answers.at(0);
  EXPECT_EQ(raw.question, "What is the pass key?");
  EXPECT_EQ(raw.answer_prefix, "The pass key is");
  EXPECT_EQ(raw.prompt.substr(0, raw.question_offset), raw.context);
  EXPECT_EQ(raw.prompt.substr(raw.question_offset), "\n\nWhat is the pass key? The pass key is");
  EXPECT_EQ(raw.metric, Metric::kPasskey);
  EXPECT_EQ(count_of(raw.context, "The pass key is " + key + ". Remember it. " + key + " is the pass key."), 1);
  EXPECT_EQ(count_of(raw.context, key), 2);  // both inside the one needle
  EXPECT_EQ(score_prediction(raw, " " + key + "."), 1.0);
  EXPECT_EQ(score_prediction(raw, " 1" + key + "."), 0.0);

  Sample chat = make(Task::kNiah, 1024, 2, 0, true, 0.5);
  EXPECT_EQ(chat.prompt.substr(0, 9), "<|user|>\n");
  EXPECT_EQ(chat.prompt.substr(9, chat.question_offset - 9), chat.context);
  EXPECT_EQ(chat.prompt.substr(chat.question_offset), "\n\nWhat is the pass key?<|eot|><|assistant|>\n");

  // The question part in tokens: what follows the shared prefix of the two encodings.
  PromptTokens pt = tokenize_prompt(raw, encode_fn());
  auto tok = model_tokenizer();
  EXPECT_EQ(pt.ids, tok->encode(raw.prompt, true));
  const size_t head = tok->encode(raw.context, true).size();
  EXPECT_LE(pt.question_start, head);
  EXPECT_GE(pt.question_start + 2, head);
  std::vector<int32_t> tail(pt.ids.begin() + static_cast<std::ptrdiff_t>(pt.question_start), pt.ids.end());
  EXPECT_NE(tok->decode(tail).find("What is the pass key? The pass key is"), std::string::npos);
}

TEST(EvalTasks, NiahGridNeedlePositions) {
  auto tok = model_tokenizer();
  const std::vector<NiahCell> grid = niah_grid({1024, 4096}, even_depths(5), 2);
  ASSERT_EQ(grid.size(), 20u);
  EXPECT_EQ(grid[7].target_tokens, 1024);
  EXPECT_EQ(grid[7].depth, 0.75);
  EXPECT_EQ(grid[7].trial, 1);
  for (size_t c = 0; c < grid.size(); ++c) {
    TaskOptions o;
    o.target_tokens = grid[c].target_tokens;
    o.depth = grid[c].depth;
    auto s = make_task_sample(haystack(), Task::kNiah, o, 42, c);
    ASSERT_TRUE(s.has_value()) << s.status().message();
    const std::string& key = s->answers[0];
    const std::string needle = "The pass key is " + key + ". Remember it. " + key + " is the pass key.";
    const size_t off = s->prompt.find(needle);
    ASSERT_NE(off, std::string::npos);
    // The reported first needle token against re-encoding the prompt before the needle (the
    // needle's first token may hold the space before it).
    const int before = static_cast<int>(tok->encode(s->prompt.substr(0, off), true).size());
    EXPECT_LE(std::abs(before - s->needle_positions[0]), 1) << s->id;
    // Depth: haystack tokens before the needle over all haystack tokens of the context.
    const int needle_tokens = static_cast<int>(tok->encode(" " + needle, false).size());
    const int context_tokens = static_cast<int>(tok->encode(s->context, false).size());
    const double measured = static_cast<double>(before - 1) / (context_tokens - needle_tokens);
    EXPECT_NEAR(measured, grid[c].depth, 100.0 / context_tokens) << s->id;
    EXPECT_EQ(s->depths[0], grid[c].depth);
  }
}

TEST(EvalTasks, AnswersFollowFromTheContext) {
  const std::regex kv("The value for key ([0-9a-f]{4}-[0-9a-f]{4}) is ([0-9]+)\\.");
  const std::regex magic("One of the special magic numbers for ([a-z]+) is: ([0-9]+)\\.");
  const std::regex var("VAR ([A-Z]{5}) = (VAR ([A-Z]{5})|([0-9]+))\\.");
  for (uint64_t i = 0; i < 6; ++i) {
    for (Task task : {Task::kSingle, Task::kMultiKey}) {
      Sample s = make(task, 2048, 3, i);
      std::map<std::string, std::string> values;
      for (std::sregex_iterator it(s.context.begin(), s.context.end(), kv), end; it != end; ++it) {
        EXPECT_TRUE(values.emplace((*it)[1], (*it)[2]).second) << "key twice in " << s.id;
      }
      EXPECT_EQ(values.size(), task == Task::kSingle ? 1u : 4u);
      const std::string key = s.question.substr(std::string("What is the value for key ").size(), 9);
      ASSERT_EQ(s.answers.size(), 1u);
      EXPECT_EQ(values[key], s.answers[0]) << s.id;
      for (const auto& [k, v] : values) EXPECT_EQ(count_of(s.context, v), 1) << s.id;
    }
    {
      Sample s = make(Task::kMultiKeyBlock, 2048, 3, i);
      const std::string key = s.question.substr(s.question.find("key ") + 4, 9);
      EXPECT_EQ(count_of(s.context, key + ": " + s.answers[0] + "\n"), 1) << s.id;
      EXPECT_EQ(count_of(s.context, s.answers[0]), 1) << s.id;
    }
    {
      Sample s = make(Task::kMultiValue, 2048, 3, i);
      const std::string word = s.question.substr(s.question.find(" for ") + 5);
      std::vector<std::string> found;
      for (std::sregex_iterator it(s.context.begin(), s.context.end(), magic), end; it != end; ++it) {
        if ((*it)[1] == word.substr(0, word.size() - 1)) found.push_back((*it)[2]);
      }
      EXPECT_EQ(found, s.answers) << s.id;  // all of them, in order of appearance
      for (const auto& v : s.answers) EXPECT_EQ(count_of(s.context, v), 1) << s.id;
    }
    {
      Sample s = make(Task::kMultiQuery, 2048, 3, i);
      std::map<std::string, std::string> values;
      for (std::sregex_iterator it(s.context.begin(), s.context.end(), magic), end; it != end; ++it) {
        values[(*it)[1]] = (*it)[2];
      }
      ASSERT_EQ(values.size(), 4u);
      // The words in the question's order give the answers' order.
      std::vector<std::pair<size_t, std::string>> asked;
      for (const auto& [w, v] : values) asked.emplace_back(s.question.find(" " + w), v);
      std::sort(asked.begin(), asked.end());
      std::vector<std::string> expected;
      for (const auto& a : asked) expected.push_back(a.second);
      EXPECT_EQ(expected, s.answers) << s.id;
    }
    {
      Sample s = make(Task::kVariableTracking, 2048, 3, i);
      std::map<std::string, std::string> assign;  // variable -> "VAR X" or a number
      int statements = 0;
      for (std::sregex_iterator it(s.context.begin(), s.context.end(), var), end; it != end; ++it, ++statements) {
        assign[(*it)[1]] = (*it)[3].matched ? "VAR " + (*it)[3].str() : (*it)[4].str();
      }
      EXPECT_EQ(statements, 8);  // 2 chains of 4 hops
      std::string x = s.question.substr(std::string("What is the value of VAR ").size(), 5);
      for (int hop = 0; hop < 8 && assign[x].rfind("VAR ", 0) == 0; ++hop) x = assign[x].substr(4);
      EXPECT_EQ(assign[x], s.answers.at(0)) << s.id;
      EXPECT_EQ(count_of(s.context, s.answers[0]), 1) << s.id;
    }
  }
}

TEST(EvalTasks, ValuesAbsentFromTheHaystack) {
  // Every sentence of this haystack holds every one-digit pass key but 7 and 9, so every
  // context does: every sample must pick 7 or 9.
  auto h = Haystack::from_text(
      "We counted 1 2 3 4 5 6 8 boats. They saw 8 6 5 4 3 2 1 gulls. Then 2 4 6 8 1 3 5 ships came. "
      "At last 8 1 2 3 4 5 6 lights shone. Nobody knew 6 5 4 3 2 1 8 names.\n",
      encode_fn(), "digits.txt");
  ASSERT_TRUE(h.has_value());
  TaskOptions o;
  o.target_tokens = 60;
  o.passkey_digits = 1;
  for (uint64_t i = 0; i < 5; ++i) {
    auto s = make_task_sample(**h, Task::kNiah, o, 1, i);
    ASSERT_TRUE(s.has_value()) << s.status().message();
    EXPECT_TRUE(s->answers[0] == "7" || s->answers[0] == "9") << s->answers[0];
  }
}

TEST(EvalTasks, CommonWordsList) {
  for (int tokens : {1024, 4096}) {
    Sample s = make(Task::kCommonWords, tokens, 9, 1);
    const bool short_ctx = tokens < 4096;
    std::map<std::string, int> counts;
    int entry = 0;
    const std::regex item("([0-9]+)\\. ([a-z]+)");
    for (std::sregex_iterator it(s.context.begin(), s.context.end(), item), end; it != end; ++it) {
      EXPECT_EQ(std::stoi((*it)[1]), ++entry);  // numbered 1, 2, 3, ...
      ++counts[(*it)[2]];
    }
    ASSERT_EQ(s.answers.size(), 10u);
    for (const auto& [w, n] : counts) {
      const bool common = std::find(s.answers.begin(), s.answers.end(), w) != s.answers.end();
      EXPECT_EQ(n, common ? (short_ctx ? 6 : 30) : (short_ctx ? 1 : 3)) << w;
    }
    EXPECT_GT(counts.size(), 10u);
    EXPECT_EQ(s.question, "What are the 10 most common words in the above list?");
    EXPECT_EQ(s.metric, Metric::kStringMatchAll);
  }
}

TEST(EvalTasks, FrequentWordsText) {
  Sample s = make(Task::kFrequentWords, 4096, 4, 2);
  std::map<std::string, int> counts;
  const std::string text = s.context.substr(s.context.find("words. ") + 7);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t e = text.find(' ', pos);
    if (e == std::string::npos) e = text.size();
    ++counts[text.substr(pos, e - pos)];
    pos = e + 1;
  }
  std::vector<std::pair<int, std::string>> ranked;
  for (const auto& [w, n] : counts) ranked.emplace_back(-n, w);
  std::sort(ranked.begin(), ranked.end());
  EXPECT_EQ(ranked[0].second, "...");
  ASSERT_EQ(s.answers.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(ranked[static_cast<size_t>(i) + 1].second, s.answers[static_cast<size_t>(i)]);
  EXPECT_LT(ranked[3].first, ranked[4].first);  // a strict top three
}

TEST(EvalTasks, FastEnoughForSweeps) {
  TaskOptions o;
  o.target_tokens = 8192;
  ASSERT_TRUE(make_task_sample(haystack(), Task::kNiah, o, 0, 0).has_value());  // warms unit counts
  const auto t0 = std::chrono::steady_clock::now();
  for (uint64_t i = 0; i < 10; ++i) ASSERT_TRUE(make_task_sample(haystack(), Task::kNiah, o, 0, i).has_value());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 10;
  std::printf("8K-token NIAH sample: %.2f ms\n", ms);
  EXPECT_LT(ms, 100.0);
}

TEST(EvalTasks, Errors) {
  TaskOptions o;
  o.target_tokens = 20;
  auto s = make_task_sample(haystack(), Task::kMultiKeyBlock, o, 0, 0);
  ASSERT_FALSE(s.has_value());
  EXPECT_NE(s.status().message().find("multikey_block"), std::string::npos) << s.status().message();
  EXPECT_FALSE(make_task_sample(haystack(), Task::kCommonWords, o, 0, 0).has_value());
  EXPECT_FALSE(make_task_sample(haystack(), Task::kFrequentWords, o, 0, 0).has_value());
  EXPECT_EQ(parse_task("vt").value(), Task::kVariableTracking);
  EXPECT_FALSE(parse_task("nope").has_value());
  EXPECT_EQ(ruler_tasks().size(), 8u);
  for (Task t : ruler_tasks()) EXPECT_EQ(parse_task(task_name(t)).value(), t);
}

}  // namespace
}  // namespace adakv::eval
