#include "eval/longbench.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/mapped_file.h"

namespace adakv::eval {
namespace {

using nlohmann::json;

// LongBench v1's config/dataset2prompt.json and config/dataset2maxlen.json for the English and
// code sets, as the KV-compression papers (SnapKV, PyramidKV, Ada-KV) ran them; narrativeqa keeps
// v1's "asconcisely" (a later LongBench commit spells it "as concisely").
constexpr LongBenchDataset kDatasets[] = {
    {"narrativeqa",
     "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
     "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
     "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
     "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
     128, true},
    {"qasper",
     "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
     "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
     "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
     "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
     "the above article as concisely as you can, using a single phrase or sentence if possible. If the question "
     "cannot be answered based on the information in the article, write \"unanswerable\". If the question is a "
     "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: "
     "{input}\n\nAnswer:",
     128, true},
    {"multifieldqa_en",
     "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
     "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
     64, true},
    {"hotpotqa",
     "Answer the question based on the given passages. Only give me the answer and do not output any other "
     "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
     "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
     32, true},
    {"2wikimqa",
     "Answer the question based on the given passages. Only give me the answer and do not output any other "
     "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
     "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
     32, true},
    {"musique",
     "Answer the question based on the given passages. Only give me the answer and do not output any other "
     "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
     "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
     32, true},
    {"gov_report",
     "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
     "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
     512, true},
    {"qmsum",
     "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
     "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
     "in one or more sentences.\n\nQuery: {input}\nAnswer:",
     512, true},
    {"multi_news",
     "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
     "write a one-page summary of all the news.\n\nSummary:",
     512, true},
    {"trec",
     "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
     64, false},
    {"triviaqa",
     "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
     "The following are some examples.\n\n{context}\n\n{input}",
     32, false},
    {"samsum",
     "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
     128, false},
    {"passage_count",
     "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
     "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
     "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
     "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, "
     "3, and so on.\n\nThe final answer is: ",
     32, true},
    {"passage_retrieval_en",
     "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
     "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
     "paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
     "etc.\n\nThe answer is: ",
     32, true},
    {"lcc", "Please complete the code given below. \n{context}Next line of code:\n", 64, false},
    {"repobench-p", "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, false},
};

std::string_view base_name(std::string_view dataset) {
  if (dataset.size() > 2 && dataset.substr(dataset.size() - 2) == "_e") dataset.remove_suffix(2);
  return dataset;
}

std::string where(const std::string& source, size_t line) { return source + ":" + std::to_string(line); }

// Calls fn(object, line number) for each non-blank line; a line that is not a JSON object is an
// error naming source and line.
template <typename Fn>
Status for_each_json_line(std::string_view text, const std::string& source, Fn fn) {
  size_t line_no = 0, pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::parse_error& e) {
      return data_loss(where(source, line_no) + ": not valid JSON (" + e.what() + ")");
    }
    if (!j.is_object()) return data_loss(where(source, line_no) + ": not a JSON object");
    ADAKV_RETURN_IF_ERROR(fn(j, line_no));
  }
  return Status::ok();
}

Status get_string(const json& j, const char* key, bool required, std::string* out, const std::string& at) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? data_loss(at + ": missing field \"" + key + "\"") : Status::ok();
  }
  if (!it->is_string()) return data_loss(at + ": field \"" + key + "\" is not a string");
  *out = it->get<std::string>();
  return Status::ok();
}

// A list of strings; with allow_string, a lone string is a list of one.
Status get_strings(const json& j, const char* key, bool required, bool allow_string, std::vector<std::string>* out,
                   const std::string& at) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? data_loss(at + ": missing field \"" + key + "\"") : Status::ok();
  }
  if (allow_string && it->is_string()) {
    out->push_back(it->get<std::string>());
    return Status::ok();
  }
  if (!it->is_array()) return data_loss(at + ": field \"" + key + "\" is not a list of strings");
  for (const json& e : *it) {
    if (!e.is_string()) return data_loss(at + ": field \"" + key + "\" holds a non-string");
    out->push_back(e.get<std::string>());
  }
  return Status::ok();
}

Status get_int(const json& j, const char* key, int64_t* out, const std::string& at) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::ok();
  if (!it->is_number_integer()) return data_loss(at + ": field \"" + key + "\" is not an integer");
  *out = it->get<int64_t>();
  return Status::ok();
}

}  // namespace

Expected<std::vector<LongBenchRecord>> parse_longbench_jsonl(std::string_view text, const std::string& source,
                                                             std::string_view default_dataset) {
  std::vector<LongBenchRecord> out;
  Status st = for_each_json_line(text, source, [&](const json& j, size_t line) -> Status {
    const std::string at = where(source, line);
    LongBenchRecord r;
    ADAKV_RETURN_IF_ERROR(get_string(j, "context", true, &r.context, at));
    ADAKV_RETURN_IF_ERROR(get_string(j, "input", true, &r.input, at));
    ADAKV_RETURN_IF_ERROR(get_strings(j, "answers", true, false, &r.answers, at));
    ADAKV_RETURN_IF_ERROR(get_strings(j, "all_classes", false, false, &r.all_classes, at));
    ADAKV_RETURN_IF_ERROR(get_int(j, "length", &r.length, at));
    ADAKV_RETURN_IF_ERROR(get_string(j, "dataset", false, &r.dataset, at));
    ADAKV_RETURN_IF_ERROR(get_string(j, "_id", false, &r.id, at));
    ADAKV_RETURN_IF_ERROR(get_string(j, "language", false, &r.language, at));
    if (r.dataset.empty()) r.dataset = default_dataset;
    if (r.dataset.empty()) return data_loss(at + ": no \"dataset\" field and no dataset name to fall back on");
    if (r.id.empty()) r.id = r.dataset + "/" + std::to_string(out.size());
    out.push_back(std::move(r));
    return Status::ok();
  });
  if (!st.is_ok()) return st;
  return out;
}

Expected<std::vector<LongBenchRecord>> read_longbench_jsonl(const std::string& path) {
  ADAKV_ASSIGN_OR_RETURN(std::string text, read_text_file(path));
  return parse_longbench_jsonl(text, path, std::filesystem::path(path).stem().string());
}

Expected<LongBenchDataset> longbench_dataset(std::string_view name) {
  std::string_view base = base_name(name);
  for (const LongBenchDataset& d : kDatasets) {
    if (d.name == base) return d;
  }
  return unimplemented("LongBench dataset '" + std::string(name) +
                       "' has no prompt here (only the 16 English and code sets)");
}

std::vector<std::string_view> longbench_english_datasets() {
  std::vector<std::string_view> out;
  for (const LongBenchDataset& d : kDatasets) out.push_back(d.name);
  return out;
}

Expected<std::string> format_fields(std::string_view tmpl, const std::vector<std::string_view>& fields,
                                    const std::vector<std::string_view>& values, std::vector<size_t>* field_end) {
  std::string out;
  if (field_end != nullptr) field_end->assign(fields.size(), std::string::npos);
  for (size_t i = 0; i < tmpl.size(); ++i) {
    const char c = tmpl[i];
    if ((c == '{' || c == '}') && i + 1 < tmpl.size() && tmpl[i + 1] == c) {
      out += c;
      ++i;
      continue;
    }
    if (c == '}') return invalid_argument("template: single '}' at byte " + std::to_string(i));
    if (c != '{') {
      out += c;
      continue;
    }
    size_t close = tmpl.find('}', i);
    if (close == std::string_view::npos) return invalid_argument("template: unclosed '{' at byte " + std::to_string(i));
    std::string_view name = tmpl.substr(i + 1, close - i - 1);
    size_t k = 0;
    while (k < fields.size() && fields[k] != name) ++k;
    if (k == fields.size()) return invalid_argument("template: unknown field {" + std::string(name) + "}");
    out.append(values[k]);
    if (field_end != nullptr && (*field_end)[k] == std::string::npos) (*field_end)[k] = out.size();
    i = close;
  }
  return out;
}

Expected<Sample> longbench_sample(const LongBenchRecord& record, const PromptFormat& format) {
  ADAKV_ASSIGN_OR_RETURN(LongBenchDataset d, longbench_dataset(record.dataset));
  ADAKV_ASSIGN_OR_RETURN(Metric metric, longbench_metric(record.dataset));
  std::vector<size_t> ends;
  ADAKV_ASSIGN_OR_RETURN(std::string body, format_fields(d.prompt, {"context", "input"}, {record.context, record.input}, &ends));
  Sample s;
  s.task = "longbench/" + std::string(d.name);
  s.id = record.id;
  s.dataset = std::string(base_name(record.dataset));
  s.context = record.context;
  s.question = record.input;
  const bool chat = format.chat && d.chat_template;
  s.prompt = chat ? format.user_prefix + body + format.assistant_prefix : body;
  s.question_offset = ends[0] + (chat ? format.user_prefix.size() : 0);
  s.answers = record.answers;
  s.all_classes = record.all_classes;
  s.metric = metric;
  s.max_new_tokens = d.max_new_tokens;
  s.stop_at_newline = d.name == "samsum";
  return s;
}

Expected<std::vector<KvpressRecord>> parse_kvpress_jsonl(std::string_view text, const std::string& source) {
  std::vector<KvpressRecord> out;
  Status st = for_each_json_line(text, source, [&](const json& j, size_t line) -> Status {
    const std::string at = where(source, line);
    KvpressRecord r;
    ADAKV_RETURN_IF_ERROR(get_string(j, "context", true, &r.context, at));
    ADAKV_RETURN_IF_ERROR(get_string(j, "question", true, &r.question, at));
    const char* answer_key = j.contains("answer") ? "answer" : "answers";
    ADAKV_RETURN_IF_ERROR(get_strings(j, answer_key, true, true, &r.answers, at));
    ADAKV_RETURN_IF_ERROR(get_string(j, "answer_prefix", false, &r.answer_prefix, at));
    ADAKV_RETURN_IF_ERROR(get_string(j, "task", false, &r.task, at));
    for (const char* key : {"id", "_id"}) {
      auto it = j.find(key);
      if (it == j.end() || !r.id.empty()) continue;
      if (it->is_string()) r.id = it->get<std::string>();
      if (it->is_number_integer()) r.id = std::to_string(it->get<int64_t>());
    }
    if (r.id.empty()) r.id = at;
    int64_t max_new = 0;
    ADAKV_RETURN_IF_ERROR(get_int(j, "max_new_tokens", &max_new, at));
    if (max_new < 0 || max_new > (1 << 20)) return data_loss(at + ": field \"max_new_tokens\" out of range");
    r.max_new_tokens = static_cast<int>(max_new);
    out.push_back(std::move(r));
    return Status::ok();
  });
  if (!st.is_ok()) return st;
  return out;
}

Expected<std::vector<KvpressRecord>> read_kvpress_jsonl(const std::string& path) {
  ADAKV_ASSIGN_OR_RETURN(std::string text, read_text_file(path));
  return parse_kvpress_jsonl(text, path);
}

Sample kvpress_sample(const KvpressRecord& record, const PromptFormat& format, int default_max_new_tokens) {
  Sample s;
  s.task = record.task.empty() ? "kvpress" : "kvpress/" + record.task;
  s.id = record.id;
  s.context = record.context;
  s.question = record.question;
  s.answer_prefix = record.answer_prefix;
  if (format.chat) {
    s.prompt = format.user_prefix + record.context;
    s.question_offset = s.prompt.size();
    s.prompt += record.question + format.assistant_prefix + record.answer_prefix;
  } else {
    s.prompt = record.context;
    s.question_offset = s.prompt.size();
    s.prompt += record.question + "\n" + record.answer_prefix;
  }
  s.answers = record.answers;
  s.metric = record.task.rfind("qa", 0) == 0 ? Metric::kStringMatchPart : Metric::kStringMatchAll;
  s.max_new_tokens = record.max_new_tokens > 0 ? record.max_new_tokens : default_max_new_tokens;
  return s;
}

}  // namespace adakv::eval
