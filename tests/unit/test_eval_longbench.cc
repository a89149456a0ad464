// LongBench and kvpress-style JSONL readers (src/eval/longbench.h): fields, errors that name the
// file and line, LongBench's prompt templates and generation lengths, the question split, and
// the prompt-token helpers of sample.h.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

#include "eval/longbench.h"

namespace adakv::eval {
namespace {

namespace fs = std::filesystem;

std::string write_temp(const std::string& name, const std::string& text) {
  fs::path dir = fs::temp_directory_path() / ("adakv_eval_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  fs::path p = dir / name;
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}

TEST(EvalLongBench, ReadsRecords) {
  const std::string text =
      R"({"input": "Who wrote it?", "context": "Passage 1:\nIt was written by Ann.", "answers": ["Ann", "Ann Lee"], )"
      R"("length": 7, "dataset": "hotpotqa", "language": "en", "all_classes": null, "_id": "abc"})"
      "\n\n"
      R"({"input": "Q", "context": "C", "answers": ["Animal"], "all_classes": ["Animal", "Food"], "length": 1})"
      "\n";
  const std::string path = write_temp("trec.jsonl", text);
  auto records = read_longbench_jsonl(path);
  ASSERT_TRUE(records.has_value()) << records.status().message();
  ASSERT_EQ(records->size(), 2u);
  const LongBenchRecord& a = (*records)[0];
  EXPECT_EQ(a.id, "abc");
  EXPECT_EQ(a.dataset, "hotpotqa");
  EXPECT_EQ(a.context, "Passage 1:\nIt was written by Ann.");
  EXPECT_EQ(a.answers, (std::vector<std::string>{"Ann", "Ann Lee"}));
  EXPECT_TRUE(a.all_classes.empty());
  EXPECT_EQ(a.length, 7);
  const LongBenchRecord& b = (*records)[1];
  EXPECT_EQ(b.dataset, "trec");  // from the file name
  EXPECT_EQ(b.all_classes, (std::vector<std::string>{"Animal", "Food"}));
  EXPECT_EQ(b.id, "trec/1");
}

TEST(EvalLongBench, MalformedLinesNameFileAndLine) {
  struct Case {
    std::string text;
    std::string expect;
  } cases[] = {
      {"{\"input\": \"q\", \"context\": \"c\", \"answers\": []}\n\n{\"input\": \"q\", \"context\": ", ":3: not valid JSON"},
      {"{\"input\": \"q\", \"context\": \"c\"}\n", ":1: missing field \"answers\""},
      {"\n[1, 2]\n", ":2: not a JSON object"},
      {"{\"input\": \"q\", \"context\": 5, \"answers\": []}", ":1: field \"context\" is not a string"},
      {"{\"input\": \"q\", \"context\": \"c\", \"answers\": [1]}", ":1: field \"answers\" holds a non-string"},
      {"{\"input\": \"q\", \"context\": \"c\", \"answers\": [], \"length\": \"x\"}", ":1: field \"length\" is not an integer"},
  };
  for (const Case& c : cases) {
    const std::string path = write_temp("bad.jsonl", c.text);
    auto r = read_longbench_jsonl(path);
    ASSERT_FALSE(r.has_value()) << c.text;
    EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
    EXPECT_NE(r.status().message().find(path + c.expect), std::string::npos) << r.status().message();
  }
  auto missing = read_longbench_jsonl("/nonexistent/x.jsonl");
  EXPECT_FALSE(missing.has_value());
  auto no_dataset = parse_longbench_jsonl("{\"input\": \"q\", \"context\": \"c\", \"answers\": []}", "mem");
  ASSERT_FALSE(no_dataset.has_value());
  EXPECT_NE(no_dataset.status().message().find("mem:1"), std::string::npos);
}

TEST(EvalLongBench, PromptsAndGenerationLengths) {
  LongBenchRecord r;
  r.dataset = "hotpotqa";
  r.context = "Passage 1:\nAnn wrote {input} here.";  // braces in a value are never fields
  r.input = "Who wrote it?";
  r.answers = {"Ann"};
  auto s = longbench_sample(r, PromptFormat::raw());
  ASSERT_TRUE(s.has_value()) << s.status().message();
  const std::string head =
      "Answer the question based on the given passages. Only give me the answer and do not output any other words."
      "\n\nThe following are given passages.\nPassage 1:\nAnn wrote {input} here.";
  const std::string tail =
      "\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other "
      "words.\n\nQuestion: Who wrote it?\nAnswer:";
  EXPECT_EQ(s->prompt, head + tail);
  EXPECT_EQ(s->question_offset, head.size());
  EXPECT_EQ(s->max_new_tokens, 32);
  EXPECT_EQ(s->metric, Metric::kQaF1);
  EXPECT_EQ(score_prediction(*s, "Ann."), 1.0);

  auto chat = longbench_sample(r, PromptFormat::tiny_chat());
  ASSERT_TRUE(chat.has_value());
  EXPECT_EQ(chat->prompt, "<|user|>\n" + head + tail + "<|eot|><|assistant|>\n");
  EXPECT_EQ(chat->question_offset, 9 + head.size());

  // Few-shot and code sets stay raw in chat format, as LongBench's pred.py leaves them.
  r.dataset = "trec";
  r.context = "Question: What is a cat?\nType: Animal";
  r.input = "Question: What is rice?\nType:";
  r.all_classes = {"Animal", "Food"};
  r.answers = {"Food"};
  auto trec = longbench_sample(r, PromptFormat::tiny_chat());
  ASSERT_TRUE(trec.has_value());
  EXPECT_EQ(trec->prompt,
            "Please determine the type of the question below. Here are some examples of questions.\n\n"
            "Question: What is a cat?\nType: Animal\nQuestion: What is rice?\nType:");
  EXPECT_EQ(trec->max_new_tokens, 64);
  EXPECT_EQ(score_prediction(*trec, " Food\nAnimal"), 1.0);  // first line only
  EXPECT_EQ(score_prediction(*trec, "Animal\nFood"), 0.0);

  struct Expect {
    const char* name;
    int max_new;
    Metric metric;
  } expect[] = {{"narrativeqa", 128, Metric::kQaF1},   {"qasper", 128, Metric::kQaF1},
                {"multifieldqa_en", 64, Metric::kQaF1}, {"hotpotqa", 32, Metric::kQaF1},
                {"2wikimqa", 32, Metric::kQaF1},        {"musique", 32, Metric::kQaF1},
                {"gov_report", 512, Metric::kRougeL},   {"qmsum", 512, Metric::kRougeL},
                {"multi_news", 512, Metric::kRougeL},   {"trec", 64, Metric::kClassification},
                {"triviaqa", 32, Metric::kQaF1},        {"samsum", 128, Metric::kRougeL},
                {"passage_count", 32, Metric::kCount},  {"passage_retrieval_en", 32, Metric::kRetrieval},
                {"lcc", 64, Metric::kCodeSim},          {"repobench-p", 64, Metric::kCodeSim}};
  ASSERT_EQ(longbench_english_datasets().size(), 16u);
  for (const Expect& e : expect) {
    LongBenchRecord rec;
    rec.dataset = std::string(e.name) + "_e";
    rec.context = "CONTEXT";
    rec.input = "INPUT";
    auto x = longbench_sample(rec, PromptFormat::raw());
    ASSERT_TRUE(x.has_value()) << e.name;
    EXPECT_EQ(x->max_new_tokens, e.max_new) << e.name;
    EXPECT_EQ(x->metric, e.metric) << e.name;
    EXPECT_EQ(x->dataset, e.name);
    EXPECT_EQ(x->prompt.substr(x->question_offset - 7, 7), "CONTEXT") << e.name;
    const bool has_input = std::string(e.name) != "lcc" && std::string(e.name) != "gov_report" &&
                           std::string(e.name) != "multi_news" && std::string(e.name) != "passage_count";
    EXPECT_EQ(x->prompt.find("INPUT") != std::string::npos, has_input) << e.name;
    EXPECT_EQ(x->stop_at_newline, std::string(e.name) == "samsum");
  }
  LongBenchRecord zh;
  zh.dataset = "dureader";
  EXPECT_EQ(longbench_sample(zh, PromptFormat::raw()).status().code(), StatusCode::kUnimplemented);
}

TEST(EvalLongBench, FormatFields) {
  std::vector<size_t> ends;
  auto s = format_fields("a{x}b{{c}}{y}{x}", {"x", "y"}, {"X{y}", "Y"}, &ends);
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(*s, "aX{y}b{c}YX{y}");
  EXPECT_EQ(ends, (std::vector<size_t>{5, 10}));
  EXPECT_FALSE(format_fields("{z}", {"x"}, {"1"}).has_value());
  EXPECT_FALSE(format_fields("{x", {"x"}, {"1"}).has_value());
  EXPECT_FALSE(format_fields("x}", {"x"}, {"1"}).has_value());
}

TEST(EvalLongBench, KvpressRecords) {
  const std::string text =
      R"({"context": "Long text.", "question": "\nWhat?", "answer": "yes", "answer_prefix": "Answer:", "task": "qa_1", "max_new_tokens": 16, "id": 3})"
      "\n"
      R"({"context": "C2", "question": "Q2", "answers": ["a", "b"]})"
      "\n";
  const std::string path = write_temp("kv.jsonl", text);
  auto records = read_kvpress_jsonl(path);
  ASSERT_TRUE(records.has_value()) << records.status().message();
  ASSERT_EQ(records->size(), 2u);
  EXPECT_EQ((*records)[0].answers, std::vector<std::string>{"yes"});
  EXPECT_EQ((*records)[0].id, "3");
  EXPECT_EQ((*records)[1].answers, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ((*records)[1].id, path + ":2");

  Sample raw = kvpress_sample((*records)[0], PromptFormat::raw());
  EXPECT_EQ(raw.prompt, "Long text.\nWhat?\nAnswer:");
  EXPECT_EQ(raw.question_offset, 10u);
  EXPECT_EQ(raw.max_new_tokens, 16);
  EXPECT_EQ(raw.metric, Metric::kStringMatchPart);
  Sample chat = kvpress_sample((*records)[1], PromptFormat::tiny_chat());
  EXPECT_EQ(chat.prompt, "<|user|>\nC2Q2<|eot|><|assistant|>\n");
  EXPECT_EQ(chat.question_offset, 11u);
  EXPECT_EQ(chat.metric, Metric::kStringMatchAll);
  EXPECT_EQ(chat.max_new_tokens, 64);

  auto bad = parse_kvpress_jsonl("{\"context\": \"c\", \"question\": \"q\", \"answer\": \"a\"}\n{\"context\": \"c\"}\n", "kv.jsonl");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.status().message().find("kv.jsonl:2: missing field \"question\""), std::string::npos)
      << bad.status().message();
}

TEST(EvalLongBench, PromptTokensAndTruncation) {
  // Bytes as ids after a BOS: the question starts at the byte offset plus one.
  TokenizeFn bytes = [](std::string_view s) {
    std::vector<int32_t> ids{256};
    for (unsigned char c : s) ids.push_back(c);
    return ids;
  };
  Sample s;
  s.prompt = "context|question";
  s.question_offset = 7;
  PromptTokens pt = tokenize_prompt(s, bytes);
  EXPECT_EQ(pt.ids.size(), 17u);
  EXPECT_EQ(pt.question_start, 8u);
  EXPECT_EQ(truncate_middle({1, 2, 3, 4, 5, 6, 7}, 4), (std::vector<int32_t>{1, 2, 6, 7}));
  EXPECT_EQ(truncate_middle({1, 2, 3}, 4), (std::vector<int32_t>{1, 2, 3}));
}

}  // namespace
}  // namespace adakv::eval
