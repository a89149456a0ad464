#include "eval/haystack.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/check.h"
#include "core/mapped_file.h"

namespace adakv::eval {
namespace {

// A unit longer than this is also cut at line ends, so that needles can sit near any depth in
// text with few sentence ends (verse, tables of contents).
constexpr size_t kMaxUnitBytes = 1200;
constexpr size_t kMinFallbackUnitBytes = 200;

bool is_space_byte(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }
bool is_ascii_letter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// A period that ends an initial ("J.") or a title ("Mr.") does not end a sentence.
bool is_abbreviation(std::string_view text, size_t period) {
  size_t k = period;
  while (k > 0 && is_ascii_letter(text[k - 1])) --k;
  std::string_view word = text.substr(k, period - k);
  if (word.size() == 1 && word[0] >= 'A' && word[0] <= 'Z') return true;
  static constexpr std::string_view kTitles[] = {"Mr", "Mrs", "Dr", "St", "Mme", "Mlle", "Messrs", "Jr", "Sr", "Prof",
                                                 "Rev", "Capt", "Col", "Gen", "Lt", "Hon", "Gov", "Sgt"};
  return std::find(std::begin(kTitles), std::end(kTitles), word) != std::end(kTitles);
}

// Bytes of a closing quote or bracket at text[q] (0 when none): ASCII ones and ’ ”.
size_t closer_length(std::string_view text, size_t q) {
  if (q >= text.size()) return 0;
  char c = text[q];
  if (c == '"' || c == '\'' || c == ')' || c == ']') return 1;
  if (text.substr(q, 3) == "\xE2\x80\x9D" || text.substr(q, 3) == "\xE2\x80\x99") return 3;
  return 0;
}

std::string_view lstrip(std::string_view s) {
  size_t b = 0;
  while (b < s.size() && is_space_byte(s[b])) ++b;
  return s.substr(b);
}

std::string_view rstrip(std::string_view s) {
  size_t e = s.size();
  while (e > 0 && is_space_byte(s[e - 1])) --e;
  return s.substr(0, e);
}

// One piece of an assembled context: a view into the haystack or a needle.
struct Piece {
  std::string_view text;
  int tokens = 0;
};

}  // namespace

TokenCounter::TokenCounter(TokenizeFn tokenize) : tokenize_(std::move(tokenize)) {
  ADAKV_CHECK(tokenize_ != nullptr, "TokenCounter needs a tokenize function");
  special_tokens_ = static_cast<int>(tokenize_("").size());
}

int TokenCounter::count(std::string_view text) const {
  if (text.empty()) return 0;
  return static_cast<int>(tokenize_(text).size()) - special_tokens_;
}

int TokenCounter::encode_count(std::string_view text) const { return static_cast<int>(tokenize_(text).size()); }

Haystack::Haystack(std::string text, TokenizeFn tokenize, std::string source)
    : text_(std::move(text)), source_(std::move(source)), counter_(std::move(tokenize)) {
  cut_units();
  unit_tokens_ = std::make_unique<std::atomic<int32_t>[]>(num_units());
  for (size_t i = 0; i < num_units(); ++i) unit_tokens_[i].store(-1, std::memory_order_relaxed);
}

Expected<std::shared_ptr<const Haystack>> Haystack::load(const std::string& path, TokenizeFn tokenize) {
  ADAKV_ASSIGN_OR_RETURN(std::string text, read_text_file(path));
  return from_text(std::move(text), std::move(tokenize), path);
}

Expected<std::shared_ptr<const Haystack>> Haystack::from_text(std::string text, TokenizeFn tokenize,
                                                              const std::string& source) {
  if (tokenize == nullptr) return invalid_argument(source + ": haystack needs a tokenize function");
  if (lstrip(text).empty()) return invalid_argument(source + ": haystack text is empty");
  return std::shared_ptr<const Haystack>(new Haystack(std::move(text), std::move(tokenize), source));
}

void Haystack::cut_units() {
  const std::string_view t = text_;
  const size_t n = t.size();
  std::vector<size_t> starts{0};
  auto add = [&](size_t pos) {
    if (pos > starts.back() && pos < n) starts.push_back(pos);
  };
  for (size_t p = 0; p < n; ++p) {
    const char c = t[p];
    if (c == '.' || c == '!' || c == '?') {
      if (c == '.' && is_abbreviation(t, p)) continue;
      size_t q = p + 1;
      while (size_t len = closer_length(t, q)) q += len;
      if (q < n && t[q] == '\n') {
        while (q < n && t[q] == '\n') ++q;  // ".\n" is one pre-token: cut after the newlines
        add(q);
      } else if (q < n && t[q] == ' ') {
        add(q);  // the next unit starts with the space, which joins its first word's token
      }
    } else if (c == '\n' && p + 1 < n && t[p + 1] == '\n' && (p == 0 || t[p - 1] != '\n')) {
      size_t q = p;
      while (q < n && t[q] == '\n') ++q;  // a paragraph break ends a unit even without a period
      add(q);
    }
  }
  starts.push_back(n);
  unit_starts_.clear();
  for (size_t u = 0; u + 1 < starts.size(); ++u) {
    unit_starts_.push_back(starts[u]);
    if (starts[u + 1] - starts[u] <= kMaxUnitBytes) continue;
    size_t last = starts[u];
    for (size_t k = starts[u] + 1; k < starts[u + 1]; ++k) {
      if (t[k - 1] == '\n' && !is_space_byte(t[k]) && k - last >= kMinFallbackUnitBytes &&
          starts[u + 1] - k >= kMinFallbackUnitBytes) {
        unit_starts_.push_back(k);
        last = k;
      }
    }
  }
  unit_starts_.push_back(n);
}

std::string_view Haystack::unit(size_t i) const {
  return std::string_view(text_).substr(unit_starts_[i], unit_starts_[i + 1] - unit_starts_[i]);
}

int Haystack::unit_tokens(size_t i) const {
  int32_t cached = unit_tokens_[i].load(std::memory_order_relaxed);
  if (cached >= 0) return cached;
  int32_t n = counter_.count(unit(i));
  unit_tokens_[i].store(n, std::memory_order_relaxed);
  return n;
}

const std::vector<std::string>& Haystack::words() const {
  std::call_once(words_once_, [this] {
    const std::string_view t = text_;
    size_t i = 0;
    while (i < t.size()) {
      if (!is_ascii_letter(t[i])) {
        ++i;
        continue;
      }
      size_t b = i;
      while (i < t.size() && is_ascii_letter(t[i])) ++i;
      // Skip runs glued to non-ASCII letters ("naïve" is not "na" + "ve").
      bool clean = (b == 0 || static_cast<unsigned char>(t[b - 1]) < 0x80) &&
                   (i == t.size() || static_cast<unsigned char>(t[i]) < 0x80);
      if (clean && i - b >= 4 && i - b <= 12) {
        std::string w(t.substr(b, i - b));
        for (char& c : w) c = static_cast<char>(c | 0x20);
        words_.push_back(std::move(w));
      }
    }
    std::sort(words_.begin(), words_.end());
    words_.erase(std::unique(words_.begin(), words_.end()), words_.end());
  });
  return words_;
}

Expected<Context> Haystack::build(int tokens, const std::vector<Needle>& needles, Rng& rng) const {
  // Needles in depth order (stable), each with the tokens of its " "-joined form for budgeting.
  std::vector<size_t> order(needles.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return needles[a].depth < needles[b].depth; });
  int needle_tokens = 0;
  for (const Needle& nd : needles) {
    if (!(nd.depth >= 0.0 && nd.depth <= 1.0)) {
      return invalid_argument(source_ + ": needle depth " + std::to_string(nd.depth) + " outside [0, 1]");
    }
    needle_tokens += counter_.count(" " + nd.text);
  }
  const int budget = tokens - needle_tokens;
  if (budget < 0) {
    return out_of_range(source_ + ": a context of " + std::to_string(tokens) + " tokens cannot hold needles of " +
                        std::to_string(needle_tokens) + " tokens");
  }

  // Haystack pieces: whole units, then a prefix of the next one.
  std::vector<Piece> pieces;
  int used = 0;
  const size_t n_units = num_units();
  const size_t start = static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(n_units) - 1));
  bool filled = false;
  for (size_t k = 0; k < n_units && !filled; ++k) {
    const size_t u = (start + k) % n_units;
    std::string_view text = unit(u);
    int t = unit_tokens(u);
    if (pieces.empty()) {
      text = lstrip(text);
      if (text.empty()) continue;
      if (text.size() != unit(u).size()) t = counter_.count(text);
    }
    if (used + t <= budget) {
      pieces.push_back({text, t});
      used += t;
      continue;
    }
    // Fill up with the longest prefix of this unit that ends before a space and fits.
    std::vector<size_t> cuts;  // [candidates] prefix lengths, ascending
    for (size_t i = 1; i < text.size(); ++i) {
      if (is_space_byte(text[i]) && !is_space_byte(text[i - 1])) cuts.push_back(i);
    }
    size_t lo = 0, hi = cuts.size();  // the answer is cuts[lo - 1], none when lo == 0
    while (lo < hi) {
      size_t mid = (lo + hi) / 2;
      if (used + counter_.count(text.substr(0, cuts[mid])) <= budget) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    if (lo > 0) {
      std::string_view prefix = text.substr(0, cuts[lo - 1]);
      int pt = counter_.count(prefix);
      pieces.push_back({prefix, pt});
      used += pt;
    }
    filled = true;
  }
  if (!filled) {
    return out_of_range(source_ + ": the haystack holds only " + std::to_string(used) + " tokens, fewer than the " +
                        std::to_string(budget) + " asked for");
  }
  // No trailing whitespace: the prompt appends its own separator.
  if (!pieces.empty()) {
    Piece& last = pieces.back();
    std::string_view stripped = rstrip(last.text);
    if (stripped.size() != last.text.size()) {
      used -= last.tokens;
      last.text = stripped;
      last.tokens = counter_.count(stripped);
      used += last.tokens;
    }
    if (last.text.empty()) pieces.pop_back();
  }

  // Boundary b sits before pieces[b]; pos[b] = haystack tokens before it.
  std::vector<int> pos(pieces.size() + 1, 0);  // [pieces + 1]
  for (size_t i = 0; i < pieces.size(); ++i) pos[i + 1] = pos[i] + pieces[i].tokens;
  const int hay_tokens = pos.back();
  std::vector<size_t> boundary(needles.size());  // [needles] -> boundary index
  size_t min_b = 0;
  for (size_t idx : order) {
    const double target = needles[idx].depth * hay_tokens;
    size_t b = static_cast<size_t>(std::lower_bound(pos.begin() + min_b, pos.end(), target) - pos.begin());
    if (b == pos.size() || (b > min_b && target - pos[b - 1] <= pos[b] - target)) {
      b = b == pos.size() ? pos.size() - 1 : b - 1;
    }
    boundary[idx] = b;
    min_b = b;
  }

  Context ctx;
  ctx.haystack_tokens = hay_tokens;
  ctx.needle_offsets.resize(needles.size());
  ctx.needle_token_offsets.resize(needles.size());
  ctx.needle_depths.resize(needles.size());
  int running = 0;
  size_t next = 0;  // into order
  for (size_t b = 0; b <= pieces.size(); ++b) {
    const bool after_line_end = b == 0 || pieces[b - 1].text.back() == '\n';
    for (; next < order.size() && boundary[order[next]] == b; ++next) {
      const size_t idx = order[next];
      const std::string& nt = needles[idx].text;
      ctx.needle_token_offsets[idx] = running;
      ctx.needle_depths[idx] = hay_tokens > 0 ? static_cast<double>(pos[b]) / hay_tokens : 0.0;
      if (after_line_end) {
        ctx.needle_offsets[idx] = ctx.text.size();
        ctx.text += nt;
        ctx.text += '\n';
        running += counter_.count(nt + "\n");
      } else {
        ctx.needle_offsets[idx] = ctx.text.size() + 1;
        ctx.text += ' ';
        ctx.text += nt;
        running += counter_.count(" " + nt);
      }
    }
    if (b < pieces.size()) {
      ctx.text.append(pieces[b].text);
      running += pieces[b].tokens;
    }
  }
  // A needle at the very start with no haystack after it would leave a trailing newline.
  if (!ctx.text.empty() && ctx.text.back() == '\n') {
    ctx.text.pop_back();
    running = counter_.count(ctx.text);
  }
  ctx.tokens = running;
  return ctx;
}

}  // namespace adakv::eval
