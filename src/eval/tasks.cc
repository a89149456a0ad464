#include "eval/tasks.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <optional>

#include "eval/task_layout.h"

namespace adakv::eval {
namespace {

// The same word list as tools/train/synthetic.py (multi-value needles).
constexpr std::string_view kWords[] = {
    "river",   "lantern", "orchard", "falcon",  "harbor", "meadow", "copper", "violet",  "summit",
    "thistle", "anchor",  "ember",   "glacier", "saffron", "willow", "quarry", "marble",  "beacon",
    "cedar",   "dune",    "fjord",   "garnet",  "hollow", "island", "juniper", "kestrel", "lagoon",
    "mantle",  "nectar",  "oasis",   "pebble",  "quill",  "raven",  "sparrow", "timber",  "umber",
    "valley",  "walnut",  "yonder",  "zephyr",  "bramble", "cobalt", "dapple", "fennel",  "grotto"};
constexpr int kNumWords = static_cast<int>(std::size(kWords));

// Draws of a spec whose values collide with the haystack text are retried this often.
constexpr int kMaxAttempts = 64;

struct NamedTask {
  std::string_view name;
  Task task;
};
constexpr NamedTask kTaskNames[] = {
    {"niah", Task::kNiah},
    {"single", Task::kSingle},
    {"multikey", Task::kMultiKey},
    {"multikey_block", Task::kMultiKeyBlock},
    {"multivalue", Task::kMultiValue},
    {"multiquery", Task::kMultiQuery},
    {"vt", Task::kVariableTracking},
    {"cwe", Task::kCommonWords},
    {"fwe", Task::kFrequentWords},
};

std::string number(Rng& rng, int digits) {
  int64_t lo = 1;
  for (int i = 1; i < digits; ++i) lo *= 10;
  return std::to_string(rng.uniform_int(lo, lo * 10 - 1));
}

std::string hex_key(Rng& rng) {
  char buf[16];
  unsigned a = static_cast<unsigned>(rng.uniform_int(0, 0xFFFF)), b = static_cast<unsigned>(rng.uniform_int(0, 0xFFFF));
  std::snprintf(buf, sizeof(buf), "%04x-%04x", a, b);
  return buf;
}

std::string var_name(Rng& rng) {
  std::string s;
  for (int i = 0; i < 5; ++i) s.push_back(static_cast<char>('A' + rng.uniform_int(0, 25)));
  return s;
}

template <typename Make>
std::vector<std::string> distinct(Rng& rng, Make make, int n) {
  std::vector<std::string> out;
  while (static_cast<int>(out.size()) < n) {
    std::string x = make(rng);
    if (std::find(out.begin(), out.end(), x) == out.end()) out.push_back(std::move(x));
  }
  return out;
}

std::vector<double> random_depths(Rng& rng, int n) {
  std::vector<double> d(static_cast<size_t>(n));
  for (double& x : d) x = rng.uniform(0.02, 0.98);
  std::sort(d.begin(), d.end());
  return d;
}

double depth_or_random(Rng& rng, double depth) { return depth >= 0 ? std::min(depth, 1.0) : rng.uniform(0.02, 0.98); }

// "a", "a and b", "a, b and c".
std::string join_and(const std::vector<std::string>& xs) {
  std::string out;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (i > 0) out += i + 1 == xs.size() ? " and " : ", ";
    out += xs[i];
  }
  return out;
}

std::vector<std::string> pick_words(Rng& rng, int n) {
  std::vector<int> idx(kNumWords);
  std::iota(idx.begin(), idx.end(), 0);
  rng.shuffle(idx);
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) out.emplace_back(kWords[idx[static_cast<size_t>(i)]]);
  return out;
}

NeedleSpec gen_niah(Rng& rng, const TaskOptions& o) {
  const std::string k = number(rng, o.passkey_digits);
  NeedleSpec s;
  s.needles = {{"The pass key is " + k + ". Remember it. " + k + " is the pass key.", depth_or_random(rng, o.depth)}};
  s.question = "What is the pass key?";
  s.lead = "The pass key is";
  s.answers = {k};
  s.unique = {k};
  s.metric = Metric::kPasskey;
  return s;
}

NeedleSpec gen_keys(Rng& rng, int n, std::vector<double> depths) {
  std::vector<std::string> keys = distinct(rng, hex_key, n);
  std::vector<std::string> vals = distinct(rng, [](Rng& r) { return number(r, 6); }, n);
  const size_t ask = static_cast<size_t>(rng.uniform_int(0, n - 1));
  NeedleSpec s;
  for (int i = 0; i < n; ++i) {
    s.needles.push_back({"The value for key " + keys[static_cast<size_t>(i)] + " is " + vals[static_cast<size_t>(i)] + ".",
                         depths[static_cast<size_t>(i)]});
  }
  s.question = "What is the value for key " + keys[ask] + "?";
  s.lead = "The value for key " + keys[ask] + " is";
  s.answers = {vals[ask]};
  s.unique = keys;
  s.unique.insert(s.unique.end(), vals.begin(), vals.end());
  return s;
}

NeedleSpec gen_block(Rng& rng, const TaskOptions& o) {
  const int n = std::max(1, o.block_lines);
  std::vector<std::string> keys = distinct(rng, hex_key, n);
  std::vector<std::string> vals = distinct(rng, [](Rng& r) { return number(r, 6); }, n);
  const size_t ask = static_cast<size_t>(rng.uniform_int(0, n - 1));
  std::string block = "Here is a list of keys and values:\n";
  for (int i = 0; i < n; ++i) block += keys[static_cast<size_t>(i)] + ": " + vals[static_cast<size_t>(i)] + "\n";
  block += "End of the list.";
  NeedleSpec s;
  s.needles = {{block, depth_or_random(rng, o.depth)}};
  s.question = "In the list of keys and values, what is the value for key " + keys[ask] + "?";
  s.lead = "The value for key " + keys[ask] + " is";
  s.answers = {vals[ask]};
  s.unique = keys;
  s.unique.insert(s.unique.end(), vals.begin(), vals.end());
  return s;
}

std::string magic_needle(const std::string& word, const std::string& value) {
  return "One of the special magic numbers for " + word + " is: " + value + ".";
}

NeedleSpec gen_multivalue(Rng& rng, const TaskOptions& o) {
  std::vector<std::string> words = pick_words(rng, 2);
  std::vector<std::string> owners(static_cast<size_t>(std::max(1, o.num_values)), words[0]);
  owners.insert(owners.end(), static_cast<size_t>(std::max(0, o.value_distractors)), words[1]);
  rng.shuffle(owners);
  std::vector<std::string> vals =
      distinct(rng, [](Rng& r) { return number(r, static_cast<int>(r.uniform_int(4, 5))); }, static_cast<int>(owners.size()));
  std::vector<double> depths = random_depths(rng, static_cast<int>(owners.size()));
  NeedleSpec s;
  for (size_t i = 0; i < owners.size(); ++i) {
    s.needles.push_back({magic_needle(owners[i], vals[i]), depths[i]});
    if (owners[i] == words[0]) s.answers.push_back(vals[i]);  // in order of appearance
  }
  s.question = "What are all the special magic numbers for " + words[0] + "?";
  s.lead = "The special magic numbers for " + words[0] + " are";
  s.unique = vals;
  s.max_new_tokens = 64;
  return s;
}

NeedleSpec gen_multiquery(Rng& rng, const TaskOptions& o) {
  const int q = std::clamp(o.num_queries, 1, kNumWords);
  std::vector<std::string> words = pick_words(rng, q);
  std::vector<std::string> vals =
      distinct(rng, [](Rng& r) { return number(r, static_cast<int>(r.uniform_int(4, 5))); }, q);
  std::vector<double> depths = random_depths(rng, q);
  NeedleSpec s;
  for (int i = 0; i < q; ++i) {
    s.needles.push_back({magic_needle(words[static_cast<size_t>(i)], vals[static_cast<size_t>(i)]),
                         depths[static_cast<size_t>(i)]});
  }
  // Asked in another order than they appear.
  std::vector<size_t> asked(static_cast<size_t>(q));
  std::iota(asked.begin(), asked.end(), 0);
  rng.shuffle(asked);
  std::vector<std::string> asked_words;
  for (size_t i : asked) {
    asked_words.push_back(words[i]);
    s.answers.push_back(vals[i]);
  }
  s.question = "What are all the special magic numbers for " + join_and(asked_words) + "?";
  s.lead = "The special magic numbers for " + join_and(asked_words) + " are";
  s.unique = vals;
  s.max_new_tokens = 64;
  return s;
}

NeedleSpec gen_vt(Rng& rng, const TaskOptions& o) {
  const int hops = std::max(1, o.hops), chains = std::max(1, o.chains);
  std::vector<std::string> names = distinct(rng, var_name, hops * chains);
  std::vector<std::string> values = distinct(rng, [](Rng& r) { return number(r, 5); }, chains);
  std::vector<std::vector<std::string>> stmts(static_cast<size_t>(chains));  // [chain][hop]; chain 0 is asked
  for (int c = 0; c < chains; ++c) {
    const std::string* v = &names[static_cast<size_t>(c * hops)];
    stmts[static_cast<size_t>(c)].push_back("VAR " + v[0] + " = " + values[static_cast<size_t>(c)] + ".");
    for (int i = 1; i < hops; ++i) stmts[static_cast<size_t>(c)].push_back("VAR " + v[i] + " = VAR " + v[i - 1] + ".");
  }
  // Interleave the chains, each in its own order (an assignment follows its source).
  std::vector<int> order;
  for (int c = 0; c < chains; ++c) order.insert(order.end(), static_cast<size_t>(hops), c);
  rng.shuffle(order);
  std::vector<double> depths = random_depths(rng, hops * chains);
  std::vector<size_t> next(static_cast<size_t>(chains), 0);
  NeedleSpec s;
  for (size_t i = 0; i < order.size(); ++i) {
    const size_t c = static_cast<size_t>(order[i]);
    s.needles.push_back({stmts[c][next[c]++], depths[i]});
  }
  const std::string& last = names[static_cast<size_t>(hops - 1)];
  s.question = "What is the value of VAR " + last + "?";
  s.lead = "The value of VAR " + last + " is";
  s.answers = {values[0]};
  s.unique = values;
  s.unique.insert(s.unique.end(), names.begin(), names.end());
  return s;
}

}  // namespace

std::string_view task_name(Task task) {
  for (const auto& nt : kTaskNames) {
    if (nt.task == task) return nt.name;
  }
  return "?";
}

Expected<Task> parse_task(std::string_view name) {
  for (const auto& nt : kTaskNames) {
    if (nt.name == name) return nt.task;
  }
  std::string known;
  for (const auto& nt : kTaskNames) known += (known.empty() ? "" : ", ") + std::string(nt.name);
  return invalid_argument("unknown task '" + std::string(name) + "' (known: " + known + ")");
}

std::vector<Task> ruler_tasks() {
  std::vector<Task> out;
  for (const auto& nt : kTaskNames) {
    if (nt.task != Task::kNiah) out.push_back(nt.task);
  }
  return out;
}

Expected<Sample> make_task_sample(const Haystack& haystack, Task task, const TaskOptions& options, uint64_t seed,
                                  uint64_t index) {
  const std::string name(task_name(task));
  Rng rng = Rng::for_sample(seed, name, index);
  Expected<Sample> sample = [&]() -> Expected<Sample> {
    switch (task) {
      case Task::kCommonWords: return make_cwe_sample(haystack, options, rng);
      case Task::kFrequentWords: return make_fwe_sample(haystack, options, rng);
      default: break;
    }
    for (int attempt = 0; attempt < kMaxAttempts; ++attempt) {
      NeedleSpec spec;
      switch (task) {
        case Task::kNiah: spec = gen_niah(rng, options); break;
        case Task::kSingle: spec = gen_keys(rng, 1, {depth_or_random(rng, options.depth)}); break;
        case Task::kMultiKey: {
          const int n = std::max(1, options.num_keys);
          spec = gen_keys(rng, n, random_depths(rng, n));
          break;
        }
        case Task::kMultiKeyBlock: spec = gen_block(rng, options); break;
        case Task::kMultiValue: spec = gen_multivalue(rng, options); break;
        case Task::kMultiQuery: spec = gen_multiquery(rng, options); break;
        case Task::kVariableTracking: spec = gen_vt(rng, options); break;
        default: return internal_error("unhandled task " + name);
      }
      ADAKV_ASSIGN_OR_RETURN(std::optional<Sample> s, make_needle_sample(haystack, spec, options, rng));
      if (s.has_value()) return std::move(*s);
    }
    return internal_error("could not draw values that the haystack text does not already contain");
  }();
  if (!sample.has_value()) return sample.status().with_context(name + " sample " + std::to_string(index));
  sample->task = name;
  sample->id = name + "/s" + std::to_string(seed) + "/i" + std::to_string(index);
  return sample;
}

std::vector<NiahCell> niah_grid(const std::vector<int>& lengths, const std::vector<double>& depths, int trials) {
  std::vector<NiahCell> out;
  for (int len : lengths) {
    for (double d : depths) {
      for (int t = 0; t < trials; ++t) out.push_back({len, d, t});
    }
  }
  return out;
}

std::vector<double> even_depths(int n) {
  if (n <= 1) return {0.5};
  std::vector<double> out;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<double>(i) / (n - 1));
  return out;
}

}  // namespace adakv::eval
