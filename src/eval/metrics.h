// Scoring of generated answers, numerically as the reference Python scripts compute it:
//   LongBench (THUDM/LongBench v1 metrics.py + eval.py): qa_f1_score, rouge_score (ROUGE-L F of
//     the `rouge` package), classification_score, retrieval_score, count_score, code_sim_score,
//     and eval.py's per-sample rule (first line only for trec/triviaqa/samsum/lsht, then the max
//     over all ground truths);
//   RULER (scripts/eval/synthetic/constants.py): string_match_all / string_match_part, after
//     RULER's postprocess_pred;
//   adakv's pass-key exact match.
// Every score is in [0, 1] (LongBench and RULER print 100x the mean). Checked against
// tests/fixtures/eval/metrics.json, written by tools/fixtures/eval_metrics.py with the real
// `rouge` and `fuzzywuzzy` packages.
//
// Known differences from the Python, all outside what the fixtures exercise:
//   - rouge: the `rouge` package reconstructs the LCS recursively; for a sentence pair with
//     more than about 1000 words together Python hits its recursion limit, LongBench's bare
//     except turns that into 0.0, and adakv computes the real score.
//   - retrieval: a ground truth without "Paragraph N" raises IndexError in Python; here it
//     scores 0.
//   - Unicode tables are Python 3.11's (Unicode 14.0); characters assigned later may differ
//     from a newer Python.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace adakv::eval {

enum class Metric {
  kQaF1,             // LongBench qa_f1_score
  kRougeL,           // LongBench rouge_score
  kClassification,   // LongBench classification_score (needs all_classes)
  kRetrieval,        // LongBench retrieval_score
  kCount,            // LongBench count_score
  kCodeSim,          // LongBench code_sim_score
  kStringMatchAll,   // RULER: fraction of the answers found in the prediction
  kStringMatchPart,  // RULER: 1 if any answer is found
  kPasskey,          // first run of ASCII digits in the prediction == the key
};

std::string_view metric_name(Metric m);  // "qa_f1", "rouge", ..., "string_match_all", "passkey"
Expected<Metric> parse_metric(std::string_view name);

// LongBench's normalize_answer: lower case, ASCII punctuation removed, the words a/an/the
// removed, whitespace collapsed to single spaces.
std::string normalize_answer(std::string_view s);

double qa_f1_score(std::string_view prediction, std::string_view ground_truth);
double rouge_l_score(std::string_view prediction, std::string_view ground_truth);
double classification_score(std::string_view prediction, std::string_view ground_truth,
                            const std::vector<std::string>& all_classes);
double retrieval_score(std::string_view prediction, std::string_view ground_truth);
double count_score(std::string_view prediction, std::string_view ground_truth);
double code_sim_score(std::string_view prediction, std::string_view ground_truth);
// fuzzywuzzy's fuzz.ratio(a, b): an integer 0..100 (100 when equal, 0 when one is empty).
int fuzz_ratio(std::string_view a, std::string_view b);

// RULER's postprocess_pred: strip, every control character U+0000..U+001F to "\n", strip.
std::string ruler_postprocess(std::string_view prediction);
// On the prediction as given (call ruler_postprocess first, as RULER does); 0 for no references.
double string_match_all(std::string_view prediction, const std::vector<std::string>& references);
double string_match_part(std::string_view prediction, const std::vector<std::string>& references);
double passkey_score(std::string_view prediction, std::string_view key);

// One prediction against all its answers: LongBench's metrics are maximised over the answers
// (0 when there are none); string matches take the answers as their reference list (with
// ruler_postprocess applied to the prediction); kPasskey compares with answers[0].
double score(Metric metric, std::string_view prediction, const std::vector<std::string>& answers,
             const std::vector<std::string>& all_classes = {});

// LongBench's dataset -> metric map (the 16 English and code sets, plus the Chinese ones whose
// metrics adakv does not implement: those return kUnimplemented). A "_e" suffix (LongBench-E)
// is accepted.
Expected<Metric> longbench_metric(std::string_view dataset);
// eval.py's score of one sample: for trec, triviaqa, samsum and lsht only the first line of the
// prediction (after leading newlines) is scored.
Expected<double> longbench_score(std::string_view dataset, std::string_view prediction,
                                 const std::vector<std::string>& answers,
                                 const std::vector<std::string>& all_classes);

}  // namespace adakv::eval
