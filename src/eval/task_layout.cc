#include "eval/task_layout.h"

namespace adakv::eval {
namespace {
constexpr int kMaxFits = 8;
}  // namespace

PromptLayout layout_prompt(const PromptFormat& format, std::string_view context, std::string_view question,
                           std::string_view lead) {
  PromptLayout out;
  if (format.chat) out.prompt = format.user_prefix;
  out.prompt.append(context);
  out.question_offset = out.prompt.size();
  out.prompt += "\n\n";
  out.prompt.append(question);
  if (format.chat) {
    out.prompt += format.assistant_prefix;
  } else if (!lead.empty()) {
    out.prompt += ' ';
    out.prompt.append(lead);
  }
  return out;
}

int count_occurrences(std::string_view text, std::string_view needle) {
  if (needle.empty()) return 0;
  int n = 0;
  for (size_t pos = text.find(needle); pos != std::string_view::npos; pos = text.find(needle, pos + needle.size())) ++n;
  return n;
}

Expected<std::optional<Sample>> make_needle_sample(const Haystack& haystack, const NeedleSpec& spec,
                                                   const TaskOptions& options, Rng& rng) {
  const TokenCounter& counter = haystack.counter();
  const int target = options.target_tokens;
  const int fixed = counter.encode_count(layout_prompt(options.format, "", spec.question, spec.lead).prompt);
  int budget = target - fixed;
  if (budget <= 0) {
    return out_of_range("target of " + std::to_string(target) + " tokens leaves no room for a context (" +
                        std::to_string(fixed) + " tokens of prompt around it)");
  }
  // Each try rebuilds from the same random state, so a shrunk context starts where the first did.
  const Rng start = rng;
  Context ctx;
  PromptLayout lay;
  int prompt_tokens = 0;
  bool fits = false;
  for (int fit = 0; fit < kMaxFits && !fits; ++fit) {
    rng = start;
    ADAKV_ASSIGN_OR_RETURN(ctx, haystack.build(budget, spec.needles, rng));
    lay = layout_prompt(options.format, ctx.text, spec.question, spec.lead);
    prompt_tokens = counter.encode_count(lay.prompt);
    if (prompt_tokens <= target) {
      fits = true;
    } else {
      budget -= prompt_tokens - target;
    }
  }
  if (!fits) return internal_error("prompt stays longer than " + std::to_string(target) + " tokens");

  for (const std::string& u : spec.unique) {
    int in_needles = 0;
    for (const Needle& nd : spec.needles) in_needles += count_occurrences(nd.text, u);
    if (count_occurrences(ctx.text, u) != in_needles) return std::optional<Sample>();
  }

  Sample s;
  s.context = std::move(ctx.text);
  s.question = spec.question;
  s.answer_prefix = spec.lead;
  s.prompt = std::move(lay.prompt);
  s.question_offset = lay.question_offset;
  s.answers = spec.answers;
  s.metric = spec.metric;
  s.max_new_tokens = spec.max_new_tokens;
  s.target_tokens = target;
  s.prompt_tokens = prompt_tokens;
  const int prefix = counter.encode_count(options.format.chat ? std::string_view(options.format.user_prefix) : "");
  for (size_t i = 0; i < spec.needles.size(); ++i) {
    s.depths.push_back(spec.needles[i].depth);
    s.needle_depths.push_back(ctx.needle_depths[i]);
    s.needle_positions.push_back(prefix + ctx.needle_token_offsets[i]);
  }
  return std::optional<Sample>(std::move(s));
}

}  // namespace adakv::eval
