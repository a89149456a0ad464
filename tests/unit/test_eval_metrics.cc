// The evaluation metrics against Python: every case of tests/fixtures/eval/metrics.json (written
// by tools/fixtures/eval_metrics.py from LongBench's formulas with the real `rouge` and
// `fuzzywuzzy` packages, and RULER's string matches) agrees to 1e-6; plus values derived by hand
// for the pieces (difflib ratios from Python's documentation, ROUGE-L and F1 by counting).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eval/metrics.h"
#include "eval/py_text.h"
#include "eval/sequence_matcher.h"

namespace adakv::eval {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::vector<std::string> strings_of(const json& j) {
  std::vector<std::string> out;
  if (j.is_array()) {
    for (const auto& s : j) out.push_back(s.get<std::string>());
  }
  return out;
}

TEST(EvalMetrics, MatchPythonReferenceFixtures) {
  std::ifstream f(fs::path(ADAKV_FIXTURES_DIR) / "eval" / "metrics.json");
  ASSERT_TRUE(f.good()) << "run tools/fixtures/eval_metrics.py";
  json doc = json::parse(f);
  const json& cases = doc.at("cases");
  ASSERT_GE(cases.size(), 100u);
  int checked = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const json& c = cases[i];
    const std::string metric = c.at("metric").get<std::string>();
    const std::string pred = c.at("prediction").get<std::string>();
    const double expected = c.at("expected").get<double>();
    const std::vector<std::string> classes = strings_of(c.value("all_classes", json()));
    double got = -1;
    if (metric == "longbench") {
      auto s = longbench_score(c.at("dataset").get<std::string>(), pred, strings_of(c.at("answers")), classes);
      ASSERT_TRUE(s.has_value()) << s.status().message();
      got = *s;
    } else if (c.contains("answers")) {
      got = score(*parse_metric(metric), pred, strings_of(c.at("answers")), classes);
    } else {
      got = score(*parse_metric(metric), pred, {c.at("ground_truth").get<std::string>()}, classes);
    }
    EXPECT_NEAR(got, expected, 1e-6) << "case " << i << " " << c.dump();
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(cases.size()));
}

TEST(EvalMetrics, SequenceMatcherMatchesDifflibDocumentation) {
  // difflib's documentation: SequenceMatcher(None, "abxcd", "abcd") has 4 matching characters.
  EXPECT_EQ(sequence_matcher_matches(U"abxcd", U"abcd"), 4u);
  EXPECT_NEAR(sequence_matcher_ratio(U"abxcd", U"abcd"), 8.0 / 9.0, 1e-15);
  // " abcd" / "abcd abcd": the longest block " abcd" matches the tail; nothing else fits.
  EXPECT_EQ(sequence_matcher_matches(U" abcd", U"abcd abcd"), 5u);
  EXPECT_EQ(sequence_matcher_ratio(U"", U""), 1.0);
  // Autojunk: in b of length 200, 'a' (199 times) is popular and cannot start a match; "b"
  // starts one, which then extends back over the a's in both strings.
  std::u32string a(100, U'a'), b(199, U'a');
  a += U'b';
  b += U'b';
  EXPECT_EQ(sequence_matcher_matches(a, b), 101u);
  // With no element to start from, difflib still extends the empty match at (0, 0) forward
  // over equal popular elements: 100 matches here, none once a[0] differs.
  std::u32string c(100, U'a');
  EXPECT_EQ(sequence_matcher_matches(c, b), 100u);
  EXPECT_EQ(sequence_matcher_matches(U"x" + c, b), 0u);
}

TEST(EvalMetrics, HandDerivedValues) {
  // normalize: "The Cat, sat!" -> "cat sat"; tokens {cat, sat} vs {cat, sat, down}: P 1, R 2/3.
  EXPECT_EQ(normalize_answer("The Cat, sat!"), "cat sat");
  EXPECT_NEAR(qa_f1_score("The Cat, sat!", "cat sat down"), 0.8, 1e-12);
  // ROUGE-L: words are case-sensitive; {The cat sat on the mat} vs {The cat is on the mat}:
  // union LCS {The, cat, on, the, mat} = 5 of 6 distinct words on each side.
  EXPECT_NEAR(rouge_l_score("The cat sat on the mat.", "The cat is on the mat."),
              2.0 * ((5.0 / 6 * 5.0 / 6) / (5.0 / 6 + 5.0 / 6 + 1e-8)), 1e-15);
  EXPECT_EQ(rouge_l_score("", "x"), 0.0);
  EXPECT_EQ(count_score("3 and 3 and 4", "3"), 2.0 / 3.0);
  EXPECT_EQ(retrieval_score("Paragraph 4", "Paragraph 4"), 1.0);
  EXPECT_EQ(fuzz_ratio("ab", "ac"), 50);
  EXPECT_EQ(fuzz_ratio("abcdefgh", "aijklmno"), 12);  // 12.5 rounds to even
  EXPECT_EQ(passkey_score("The pass key is 48213.", "48213"), 1.0);
  EXPECT_EQ(passkey_score("148213", "48213"), 0.0);
  EXPECT_EQ(string_match_all("RIVER 12", {"river", "12", "13"}), 2.0 / 3.0);
  EXPECT_EQ(ruler_postprocess("  a\tb\x01 "), "a\nb");
}

TEST(EvalMetrics, PythonLowercase) {
  EXPECT_EQ(py::lower_utf8("ΟΔΟΣ ΣΟΦΙΑΣ"), "οδος σοφιας");
  EXPECT_EQ(py::lower_utf8("Σ"), "σ");         // no cased letter before it
  EXPECT_EQ(py::lower_utf8("AΣB"), "aσb");     // a cased letter follows
  EXPECT_EQ(py::lower_utf8("A'Σ"), "a'ς");     // the apostrophe is case-ignorable
  EXPECT_EQ(py::lower_utf8("İ"), "i\xCC\x87");  // U+0130 -> i + U+0307
}

TEST(EvalMetrics, LongBenchDatasetMap) {
  EXPECT_EQ(*longbench_metric("hotpotqa"), Metric::kQaF1);
  EXPECT_EQ(*longbench_metric("gov_report_e"), Metric::kRougeL);
  EXPECT_EQ(*longbench_metric("repobench-p"), Metric::kCodeSim);
  EXPECT_EQ(*longbench_metric("trec"), Metric::kClassification);
  EXPECT_EQ(*longbench_metric("passage_count"), Metric::kCount);
  EXPECT_EQ(longbench_metric("dureader").status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(longbench_metric("nope").status().code(), StatusCode::kInvalidArgument);
  for (Metric m : {Metric::kQaF1, Metric::kRougeL, Metric::kClassification, Metric::kRetrieval, Metric::kCount,
                   Metric::kCodeSim, Metric::kStringMatchAll, Metric::kStringMatchPart, Metric::kPasskey}) {
    EXPECT_EQ(*parse_metric(metric_name(m)), m);
  }
}

}  // namespace
}  // namespace adakv::eval
