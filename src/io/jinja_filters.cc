// jinja2's filters and tests (the subset chat templates use), with transformers' tojson.
// Filters that return generators in jinja2 (select, reject, selectattr, rejectattr, map, unique,
// items, reverse of a sequence) return generator values, which behave as Python's do.
#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "io/jinja_builtins.h"
#include "io/jinja_interp.h"
#include "io/jinja_pystr.h"

namespace adakv::jinja {
namespace {

using FilterEntry = std::pair<std::string_view, FilterFn>;
using TestEntry = std::pair<std::string_view, TestFn>;

#define ADAKV_BIND(args, name, ...)           \
  BoundArgs b(args, name, {__VA_ARGS__});     \
  ADAKV_RETURN_IF_ERROR(b.status())

Expected<std::string> soft_str(const Value& v) { return to_str(v); }

// environment.getitem along a dotted attribute path ("a.b", "0"), as jinja2's make_attrgetter.
Expected<Value> attribute_path(const Value& item, const std::string& path) {
  Value cur = item;
  size_t start = 0;
  while (true) {
    size_t dot = path.find('.', start);
    std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
    Value key = numeric ? Value::integer(std::strtoll(part.c_str(), nullptr, 10)) : Value::string(part);
    ADAKV_ASSIGN_OR_RETURN(cur, get_item(cur, key));
    if (dot == std::string::npos) return cur;
    start = dot + 1;
  }
}

// Sort key with jinja2's case folding for strings (case_sensitive=False).
Value fold(const Value& v, bool case_sensitive) {
  return (!case_sensitive && v.is_string()) ? Value::string(pystr::lower(v.str())) : v;
}

Status sort_values(ValueList& items, const std::vector<Value>& keys, bool reverse) {
  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  Status err;
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
    if (!err.is_ok()) return false;
    auto c = reverse ? compare(keys[y], keys[x]) : compare(keys[x], keys[y]);
    if (!c.has_value()) {
      err = c.status();
      return false;
    }
    return *c < 0;
  });
  ADAKV_RETURN_IF_ERROR(err);
  ValueList sorted;
  sorted.reserve(items.size());
  for (size_t i : order) sorted.push_back(std::move(items[i]));
  items = std::move(sorted);
  return Status::ok();
}

// --- string filters -------------------------------------------------------------------------

Expected<Value> f_trim(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "trim", "chars");
  ADAKV_ASSIGN_OR_RETURN(auto chars, b.get_opt_str(0));
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  return Value::string(pystr::strip(s, chars, true, true));
}

template <std::string (*Fn)(std::string_view)>
Expected<Value> f_case(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "case filter");
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  return Value::string(Fn(s));
}

// jinja2's title filter (not str.title): upper-cases the first character of each chunk that
// follows a run of '-', whitespace, '(', '{', '[' or '<', and lower-cases the rest of the chunk.
Expected<Value> f_title(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "title");
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  std::u32string u = pystr::decode(s);
  auto is_sep = [](char32_t c) { return c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || pystr::is_space(c); };
  std::string out;
  size_t i = 0;
  while (i < u.size()) {
    size_t j = i;
    bool sep = is_sep(u[i]);
    while (j < u.size() && is_sep(u[j]) == sep) ++j;
    std::string chunk = pystr::encode(std::u32string_view(u).substr(i, j - i));
    if (sep) {
      out += chunk;
    } else {
      std::string first = pystr::encode(std::u32string_view(u).substr(i, 1));
      out += pystr::upper(first) + pystr::lower(pystr::encode(std::u32string_view(u).substr(i + 1, j - i - 1)));
    }
    i = j;
  }
  return Value::string(std::move(out));
}

Expected<Value> f_string(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "string");
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  return Value::string(std::move(s));
}

Expected<Value> f_replace(Interpreter& in, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "replace", "old", "new", "count");
  if (!b.has(0) || !b.has(1)) return invalid_argument("replace() needs 'old' and 'new'");
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  ADAKV_ASSIGN_OR_RETURN(std::string old_text, soft_str(*b.get(0)));
  ADAKV_ASSIGN_OR_RETURN(std::string new_text, soft_str(*b.get(1)));
  ADAKV_ASSIGN_OR_RETURN(int64_t count, b.get_int(2, -1));
  std::string out = pystr::replace(s, old_text, new_text, count);
  ADAKV_RETURN_IF_ERROR(in.check_size(out.size()));
  return Value::string(std::move(out));
}

Expected<Value> f_escape(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "escape");
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out.push_back(c);
    }
  }
  return Value::string(std::move(out));
}

Expected<Value> f_indent(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "indent", "width", "first", "blank");
  std::string indention = "    ";
  if (const Value* w = b.get(0)) {
    if (w->is_string()) {
      indention = w->str();
    } else {
      ADAKV_ASSIGN_OR_RETURN(int64_t n, b.get_int(0, 4));
      indention.assign(static_cast<size_t>(std::clamp<int64_t>(n, 0, 1024)), ' ');
    }
  }
  ADAKV_ASSIGN_OR_RETURN(bool first, b.get_bool(1, false));
  ADAKV_ASSIGN_OR_RETURN(bool blank, b.get_bool(2, false));
  if (v.is_undefined()) return undefined_error(v);
  if (!v.is_string()) return invalid_argument("unsupported operand type(s) for +=: '" + v.type_name() + "' and 'str'");
  const std::string& s = v.str();
  std::vector<std::string> lines = pystr::splitlines(s + "\n");
  std::string rv;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i > 0) rv += "\n";
    if (i > 0 && (blank || !lines[i].empty())) rv += indention;
    rv += lines[i];
  }
  return Value::string(first ? indention + rv : rv);
}

// --- sequence filters -----------------------------------------------------------------------

Expected<Value> f_length(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "length");
  ADAKV_ASSIGN_OR_RETURN(int64_t n, length_of(v));
  return Value::integer(n);
}

Expected<Value> f_first(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "first");
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  if (items.empty()) return Value::undefined("No first item, sequence was empty.");
  return items.front();
}

Expected<Value> f_last(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "last");
  if (v.is_generator()) return invalid_argument("'generator' object is not reversible");
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  if (items.empty()) return Value::undefined("No last item, sequence was empty.");
  return items.back();
}

Expected<Value> f_list(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "list");
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  return Value::list(std::move(items));
}

Expected<Value> f_reverse(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "reverse");
  if (v.is_string()) {
    std::u32string u = pystr::decode(v.str());
    std::reverse(u.begin(), u.end());
    return Value::string(pystr::encode(u));
  }
  // reversed() gives an iterator for sequences and dicts; anything else is listed and reversed.
  bool reversible = v.is_sequence() || v.is_dict() || v.is_undefined();
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  std::reverse(items.begin(), items.end());
  return reversible ? Value::generator(std::move(items)) : Value::list(std::move(items));
}

Expected<Value> f_items(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "items");
  if (v.is_undefined()) return Value::generator({});
  if (!v.is_dict()) return Value::failed_generator(invalid_argument("Can only get item pairs from a mapping."));
  ValueList out;
  for (const auto& [k, val] : v.dict().entries) out.push_back(Value::tuple({k, val}));
  return Value::generator(std::move(out));
}

Expected<Value> f_join(Interpreter& in, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "join", "d", "attribute");
  std::string sep;
  if (b.has(0)) {
    ADAKV_ASSIGN_OR_RETURN(sep, soft_str(*b.get(0)));
  }
  ADAKV_ASSIGN_OR_RETURN(auto attribute, b.get_opt_str(1));
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    Value item = items[i];
    if (attribute) {
      ADAKV_ASSIGN_OR_RETURN(item, attribute_path(item, *attribute));
    }
    ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(item));
    if (i > 0) out += sep;
    out += s;
    ADAKV_RETURN_IF_ERROR(in.check_size(out.size()));
  }
  return Value::string(std::move(out));
}

Expected<Value> f_default(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "default", "default_value", "boolean");
  ADAKV_ASSIGN_OR_RETURN(bool boolean, b.get_bool(1, false));
  if (v.is_undefined() || (boolean && !truthy(v))) return b.has(0) ? *b.get(0) : Value::string("");
  return v;
}

Expected<Value> f_tojson(Interpreter& in, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "tojson", "ensure_ascii", "indent", "separators", "sort_keys");
  JsonOptions o;
  ADAKV_ASSIGN_OR_RETURN(o.ensure_ascii, b.get_bool(0, false));
  if (const Value* indent = b.get(1); indent != nullptr && !indent->is_none()) {
    if (indent->is_string()) {
      o.indent = indent->str();
    } else if (indent->is_int()) {
      o.indent = std::string(static_cast<size_t>(std::clamp<int64_t>(indent->as_int(), 0, 1024)), ' ');
    } else {
      return invalid_argument("tojson indent must be an int, a str or None");
    }
  }
  if (const Value* sep = b.get(2); sep != nullptr && !sep->is_none()) {
    if (!sep->is_sequence() || sep->items().size() != 2 || !sep->items()[0].is_string() || !sep->items()[1].is_string()) {
      return invalid_argument("tojson separators must be a (item, key) pair of strings");
    }
    o.separators = std::make_pair(sep->items()[0].str(), sep->items()[1].str());
  }
  ADAKV_ASSIGN_OR_RETURN(o.sort_keys, b.get_bool(3, false));
  ADAKV_ASSIGN_OR_RETURN(std::string json, to_json(v, o));
  ADAKV_RETURN_IF_ERROR(in.check_size(json.size()));
  return Value::string(std::move(json));
}

// select/reject/selectattr/rejectattr: args are (test name, test args...) after the attribute.
Expected<Value> select_impl(Interpreter& in, const Value& v, const CallArgs& a, bool by_attr, bool keep) {
  if (!a.keyword.empty()) return invalid_argument("select filters take no keyword arguments");
  size_t next = 0;
  std::string attribute;
  if (by_attr) {
    if (a.positional.empty() || !a.positional[0].is_string()) return invalid_argument("missing attribute name");
    attribute = a.positional[0].str();
    next = 1;
  }
  TestFn test = nullptr;
  CallArgs test_args;
  if (next < a.positional.size()) {
    if (!a.positional[next].is_string()) return invalid_argument("test name must be a string");
    test = find_test(a.positional[next].str());
    if (test == nullptr) return invalid_argument("No test named '" + a.positional[next].str() + "'.");
    test_args.positional.assign(a.positional.begin() + static_cast<long>(next) + 1, a.positional.end());
  }
  if (!truthy(v)) return Value::generator({});  // jinja2 checks `if seq:` before iterating
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  ValueList out;
  for (const auto& item : items) {
    Value probe = item;
    if (by_attr) {
      ADAKV_ASSIGN_OR_RETURN(probe, attribute_path(item, attribute));
    }
    bool pass = false;
    if (test != nullptr) {
      ADAKV_ASSIGN_OR_RETURN(pass, test(in, probe, test_args));
    } else {
      pass = truthy(probe);
    }
    if (pass == keep) out.push_back(item);
  }
  return Value::generator(std::move(out));
}

// jinja2's generator filters run when iterated: their errors surface then, not when the filter
// is applied (`{{ x | map('upper') }}` prints a generator whatever x is).
Value lazy(Expected<Value> r) { return r.has_value() ? std::move(r).value() : Value::failed_generator(r.status()); }

Expected<Value> f_select(Interpreter& in, const Value& v, const CallArgs& a) { return lazy(select_impl(in, v, a, false, true)); }
Expected<Value> f_reject(Interpreter& in, const Value& v, const CallArgs& a) { return lazy(select_impl(in, v, a, false, false)); }
Expected<Value> f_selectattr(Interpreter& in, const Value& v, const CallArgs& a) { return lazy(select_impl(in, v, a, true, true)); }
Expected<Value> f_rejectattr(Interpreter& in, const Value& v, const CallArgs& a) { return lazy(select_impl(in, v, a, true, false)); }

Expected<Value> map_impl(Interpreter& in, const Value& v, const CallArgs& a) {
  if (!truthy(v)) return Value::generator({});  // `if value:` before iterating, as jinja2
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  ValueList out;
  const Value* attribute = nullptr;
  const Value* fallback = nullptr;
  for (const auto& [k, val] : a.keyword) {
    if (k == "attribute") {
      attribute = &val;
    } else if (k == "default") {
      fallback = &val;
    } else {
      return invalid_argument("map() got an unexpected keyword argument '" + k + "'");
    }
  }
  if (attribute != nullptr) {
    if (!a.positional.empty()) return invalid_argument("map() with attribute= takes no positional arguments");
    ADAKV_ASSIGN_OR_RETURN(std::string path, soft_str(*attribute));
    for (const auto& item : items) {
      ADAKV_ASSIGN_OR_RETURN(Value x, attribute_path(item, path));
      out.push_back((x.is_undefined() && fallback != nullptr) ? *fallback : x);
    }
    return Value::generator(std::move(out));
  }
  if (a.positional.empty() || !a.positional[0].is_string()) return invalid_argument("map() needs a filter name or attribute=");
  FilterFn f = find_filter(a.positional[0].str());
  if (f == nullptr) return invalid_argument("No filter named '" + a.positional[0].str() + "'.");
  CallArgs fargs;
  fargs.positional.assign(a.positional.begin() + 1, a.positional.end());
  for (const auto& item : items) {
    ADAKV_ASSIGN_OR_RETURN(Value x, f(in, item, fargs));
    out.push_back(std::move(x));
  }
  return Value::generator(std::move(out));
}

Expected<Value> f_map(Interpreter& in, const Value& v, const CallArgs& a) { return lazy(map_impl(in, v, a)); }

// Keys for sort/unique/min/max: the attribute (if any), case-folded unless case_sensitive.
Expected<std::vector<Value>> keys_of(const ValueList& items, const std::optional<std::string>& attribute, bool case_sensitive) {
  std::vector<Value> keys;
  keys.reserve(items.size());
  for (const auto& item : items) {
    Value k = item;
    if (attribute) {
      ADAKV_ASSIGN_OR_RETURN(k, attribute_path(item, *attribute));
    }
    keys.push_back(fold(k, case_sensitive));
  }
  return keys;
}

Expected<Value> f_sort(Interpreter& in, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "sort", "reverse", "case_sensitive", "attribute");
  ADAKV_ASSIGN_OR_RETURN(bool reverse, b.get_bool(0, false));
  ADAKV_ASSIGN_OR_RETURN(bool case_sensitive, b.get_bool(1, false));
  ADAKV_ASSIGN_OR_RETURN(auto attribute, b.get_opt_str(2));
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  ADAKV_RETURN_IF_ERROR(in.charge(static_cast<int64_t>(items.size()) * 8));
  ADAKV_ASSIGN_OR_RETURN(auto keys, keys_of(items, attribute, case_sensitive));
  ADAKV_RETURN_IF_ERROR(sort_values(items, keys, reverse));
  return Value::list(std::move(items));
}

Expected<Value> f_dictsort(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "dictsort", "case_sensitive", "by", "reverse");
  ADAKV_ASSIGN_OR_RETURN(bool case_sensitive, b.get_bool(0, false));
  ADAKV_ASSIGN_OR_RETURN(auto by, b.get_opt_str(1));
  ADAKV_ASSIGN_OR_RETURN(bool reverse, b.get_bool(2, false));
  if (!v.is_dict()) return invalid_argument("dictsort needs a mapping");
  bool by_value = by && *by == "value";
  if (by && !by_value && *by != "key") return invalid_argument("You can only sort by either \"key\" or \"value\"");
  ValueList items;
  std::vector<Value> keys;
  for (const auto& [k, val] : v.dict().entries) {
    items.push_back(Value::tuple({k, val}));
    keys.push_back(fold(by_value ? val : k, case_sensitive));
  }
  ADAKV_RETURN_IF_ERROR(sort_values(items, keys, reverse));
  return Value::list(std::move(items));
}

Expected<Value> unique_impl(Interpreter& in, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "unique", "case_sensitive", "attribute");
  ADAKV_ASSIGN_OR_RETURN(bool case_sensitive, b.get_bool(0, false));
  ADAKV_ASSIGN_OR_RETURN(auto attribute, b.get_opt_str(1));
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  ADAKV_RETURN_IF_ERROR(in.charge(static_cast<int64_t>(items.size() * items.size() / 16)));
  ADAKV_ASSIGN_OR_RETURN(auto keys, keys_of(items, attribute, case_sensitive));
  ValueList out;
  std::vector<Value> seen;
  for (size_t i = 0; i < items.size(); ++i) {
    bool dup = false;
    for (const auto& s : seen) {
      ADAKV_ASSIGN_OR_RETURN(dup, equals(s, keys[i]));
      if (dup) break;
    }
    if (dup) continue;
    seen.push_back(keys[i]);
    out.push_back(items[i]);
  }
  return Value::generator(std::move(out));
}

Expected<Value> f_unique(Interpreter& in, const Value& v, const CallArgs& a) { return lazy(unique_impl(in, v, a)); }

template <bool kMax>
Expected<Value> f_minmax(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, kMax ? "max" : "min", "case_sensitive", "attribute");
  ADAKV_ASSIGN_OR_RETURN(bool case_sensitive, b.get_bool(0, false));
  ADAKV_ASSIGN_OR_RETURN(auto attribute, b.get_opt_str(1));
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  if (items.empty()) return Value::undefined(std::string("No aggregated item, sequence was empty."));
  ADAKV_ASSIGN_OR_RETURN(auto keys, keys_of(items, attribute, case_sensitive));
  size_t best = 0;
  for (size_t i = 1; i < items.size(); ++i) {
    ADAKV_ASSIGN_OR_RETURN(int c, compare(keys[i], keys[best]));
    if (kMax ? c > 0 : c < 0) best = i;
  }
  return items[best];
}

Expected<Value> f_sum(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "sum", "attribute", "start");
  ADAKV_ASSIGN_OR_RETURN(auto attribute, b.get_opt_str(0));
  Value total = b.has(1) ? *b.get(1) : Value::integer(0);
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(v));
  for (const auto& item : items) {
    Value x = item;
    if (attribute) {
      ADAKV_ASSIGN_OR_RETURN(x, attribute_path(item, *attribute));
    }
    if (!total.is_number() || !x.is_number()) {
      return invalid_argument("unsupported operand type(s) for +: '" + total.type_name() + "' and '" + x.type_name() + "'");
    }
    if (total.is_int() && x.is_int()) {
      int64_t r = 0;
      if (__builtin_add_overflow(total.as_int(), x.as_int(), &r)) return invalid_argument("integer overflow");
      total = Value::integer(r);
    } else {
      total = Value::number(total.as_double() + x.as_double());
    }
  }
  return total;
}

// --- numeric filters ------------------------------------------------------------------------

Expected<Value> f_abs(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "abs");
  if (v.is_int()) {
    if (v.as_int() == INT64_MIN) return invalid_argument("integer overflow");
    return Value::integer(std::llabs(v.as_int()));
  }
  if (v.is_float()) return Value::number(std::fabs(v.as_double()));
  return invalid_argument("bad operand type for abs(): '" + v.type_name() + "'");
}

// Python's float(str): surrounding whitespace allowed, the whole rest must parse.
bool parse_float(const std::string& s, double& out) {
  std::string t = pystr::strip(s, std::nullopt, true, true);
  if (t.empty()) return false;
  char* end = nullptr;
  out = std::strtod(t.c_str(), &end);
  return end == t.c_str() + t.size();
}

Expected<Value> f_int(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "int", "default", "base");
  Value fallback = b.has(0) ? *b.get(0) : Value::integer(0);
  ADAKV_ASSIGN_OR_RETURN(int64_t base, b.get_int(1, 10));
  if (v.is_undefined()) return undefined_error(v);
  if (v.is_int()) return Value::integer(v.as_int());
  if (v.is_float()) {
    double f = v.as_double();
    if (!std::isfinite(f) || std::fabs(f) >= 9.2e18) return fallback;
    return Value::integer(static_cast<int64_t>(f));
  }
  if (!v.is_string()) return fallback;
  std::string t = pystr::strip(v.str(), std::nullopt, true, true);
  std::string digits;
  for (char c : t) {
    if (c != '_') digits.push_back(c);
  }
  if (base == 16 && digits.size() > 2 && digits[0] == '0' && (digits[1] == 'x' || digits[1] == 'X')) digits.erase(0, 2);
  if (base >= 2 && base <= 36 && !digits.empty()) {
    char* end = nullptr;
    errno = 0;
    long long n = std::strtoll(digits.c_str(), &end, static_cast<int>(base));
    if (end == digits.c_str() + digits.size() && errno == 0) return Value::integer(n);
  }
  double f = 0;
  if (parse_float(v.str(), f) && std::isfinite(f) && std::fabs(f) < 9.2e18) return Value::integer(static_cast<int64_t>(f));
  return fallback;
}

Expected<Value> f_float(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "float", "default");
  Value fallback = b.has(0) ? *b.get(0) : Value::number(0.0);
  if (v.is_undefined()) return undefined_error(v);
  if (v.is_number()) return Value::number(v.as_double());
  double f = 0;
  if (v.is_string() && parse_float(v.str(), f)) return Value::number(f);
  return fallback;
}

Expected<Value> f_safe(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "safe");
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  return Value::string(std::move(s));
}

Expected<Value> f_attr(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "attr", "name");
  if (!b.has(0) || !b.get(0)->is_string()) return invalid_argument("attr() needs an attribute name");
  const std::string& name = b.get(0)->str();
  // Attribute only: dict keys are not attributes.
  if (v.is_dict() && v.dict().find(std::string_view(name)) != nullptr && !is_method_name(name)) {
    return Value::undefined("'dict object' has no attribute '" + name + "'");
  }
  return get_attr(v, name);
}

// --- tests ----------------------------------------------------------------------------------

#define ADAKV_TEST_NOARGS(fn_name, expr)                                      \
  Expected<bool> fn_name(Interpreter&, const Value& v, const CallArgs& a) {   \
    ADAKV_BIND(a, #fn_name);                                                  \
    return (expr);                                                            \
  }

ADAKV_TEST_NOARGS(t_defined, !v.is_undefined())
ADAKV_TEST_NOARGS(t_undefined, v.is_undefined())
ADAKV_TEST_NOARGS(t_none, v.is_none())
ADAKV_TEST_NOARGS(t_boolean, v.is_bool())
ADAKV_TEST_NOARGS(t_false, v.is_bool() && !v.as_bool())
ADAKV_TEST_NOARGS(t_true, v.is_bool() && v.as_bool())
ADAKV_TEST_NOARGS(t_integer, v.kind() == Value::Kind::kInt)
ADAKV_TEST_NOARGS(t_float, v.is_float())
ADAKV_TEST_NOARGS(t_number, v.is_number())
ADAKV_TEST_NOARGS(t_string, v.is_string())
ADAKV_TEST_NOARGS(t_mapping, v.is_dict())
// Undefined iterates (as nothing) and has __getitem__, so jinja2 calls it iterable and a sequence.
ADAKV_TEST_NOARGS(t_iterable, v.is_undefined() || v.is_sequence() || v.is_dict() || v.is_string() || v.is_generator())
ADAKV_TEST_NOARGS(t_sequence, v.is_undefined() || v.is_sequence() || v.is_dict() || v.is_string())
ADAKV_TEST_NOARGS(t_callable, v.is_function() || v.is_undefined() || v.is_namespace())
ADAKV_TEST_NOARGS(t_escaped, false)

Expected<bool> t_lower(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "lower");
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  return pystr::is_lower(s);
}
Expected<bool> t_upper(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "upper");
  ADAKV_ASSIGN_OR_RETURN(std::string s, soft_str(v));
  return pystr::is_upper(s);
}

// value % num as the odd/even/divisibleby tests compute it (numbers only; Python's modulo).
Expected<double> py_mod(const Value& v, const Value& num, const char* test) {
  for (const Value* x : {&v, &num}) {
    if (x->is_undefined()) return undefined_error(*x);
    if (!x->is_number()) return invalid_argument(std::string("the '") + test + "' test needs numbers, got " + x->type_name());
  }
  if (v.is_int() && num.is_int()) {
    if (num.as_int() == 0) return invalid_argument("integer division or modulo by zero");
    if (num.as_int() == -1) return 0.0;
    int64_t r = v.as_int() % num.as_int();
    if (r != 0 && ((r < 0) != (num.as_int() < 0))) r += num.as_int();
    return static_cast<double>(r);
  }
  if (num.as_double() == 0.0) return invalid_argument("float modulo");
  double r = std::fmod(v.as_double(), num.as_double());
  if (r != 0.0 && ((r < 0) != (num.as_double() < 0))) r += num.as_double();
  return r;
}

Expected<bool> t_odd(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "odd");
  ADAKV_ASSIGN_OR_RETURN(double r, py_mod(v, Value::integer(2), "odd"));
  return r == 1.0;
}
Expected<bool> t_even(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "even");
  ADAKV_ASSIGN_OR_RETURN(double r, py_mod(v, Value::integer(2), "even"));
  return r == 0.0;
}
Expected<bool> t_divisibleby(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "divisibleby", "num");
  if (!b.has(0)) return invalid_argument("divisibleby needs a divisor");
  ADAKV_ASSIGN_OR_RETURN(double r, py_mod(v, *b.get(0), "divisibleby"));
  return r == 0.0;
}

Expected<bool> t_sameas(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "sameas", "other");
  if (!b.has(0)) return invalid_argument("sameas needs an argument");
  const Value& o = *b.get(0);
  if (v.kind() != o.kind()) return false;
  if (v.is_none() || v.is_bool() || v.is_int()) return v.as_int() == o.as_int();
  return v.identity() != nullptr && v.identity() == o.identity();
}

// eq, ne, lt, le, gt, ge (and their aliases), as Python's operators.
template <int kOp>
Expected<bool> t_compare(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "compare", "other");
  if (!b.has(0)) return invalid_argument("comparison test needs an argument");
  const Value& o = *b.get(0);
  if (kOp == 0 || kOp == 1) {
    ADAKV_ASSIGN_OR_RETURN(bool eq, equals(v, o));
    return kOp == 0 ? eq : !eq;
  }
  if (v.is_undefined() || o.is_undefined()) return undefined_error(v.is_undefined() ? v : o);
  ADAKV_ASSIGN_OR_RETURN(int c, compare(v, o));
  return kOp == 2 ? c < 0 : kOp == 3 ? c <= 0 : kOp == 4 ? c > 0 : c >= 0;
}

Expected<bool> t_in(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "in", "seq");
  if (!b.has(0)) return invalid_argument("the 'in' test needs a container");
  const Value& seq = *b.get(0);
  if (seq.is_string()) {
    if (!v.is_string()) return invalid_argument("'in <string>' requires string as left operand");
    return seq.str().find(v.str()) != std::string::npos;
  }
  if (seq.is_dict()) return seq.dict().find(v) != nullptr;
  ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(seq));
  for (const auto& item : items) {
    ADAKV_ASSIGN_OR_RETURN(bool eq, equals(v, item));
    if (eq) return true;
  }
  return false;
}

Expected<bool> t_filter(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "filter");
  return v.is_string() && find_filter(v.str()) != nullptr;
}
Expected<bool> t_test(Interpreter&, const Value& v, const CallArgs& a) {
  ADAKV_BIND(a, "test");
  return v.is_string() && find_test(v.str()) != nullptr;
}

constexpr FilterEntry kFilters[] = {
    {"abs", f_abs},
    {"attr", f_attr},
    {"capitalize", f_case<pystr::capitalize>},
    {"count", f_length},
    {"d", f_default},
    {"default", f_default},
    {"dictsort", f_dictsort},
    {"e", f_escape},
    {"escape", f_escape},
    {"first", f_first},
    {"float", f_float},
    {"indent", f_indent},
    {"int", f_int},
    {"items", f_items},
    {"join", f_join},
    {"last", f_last},
    {"length", f_length},
    {"list", f_list},
    {"lower", f_case<pystr::lower>},
    {"map", f_map},
    {"max", f_minmax<true>},
    {"min", f_minmax<false>},
    {"reject", f_reject},
    {"rejectattr", f_rejectattr},
    {"replace", f_replace},
    {"reverse", f_reverse},
    {"safe", f_safe},
    {"select", f_select},
    {"selectattr", f_selectattr},
    {"sort", f_sort},
    {"string", f_string},
    {"sum", f_sum},
    {"title", f_title},
    {"tojson", f_tojson},
    {"trim", f_trim},
    {"unique", f_unique},
    {"upper", f_case<pystr::upper>},
};

constexpr TestEntry kTests[] = {
    {"!=", t_compare<1>},        {"<", t_compare<2>},          {"<=", t_compare<3>},
    {"==", t_compare<0>},        {">", t_compare<4>},          {">=", t_compare<5>},
    {"boolean", t_boolean},      {"callable", t_callable},     {"defined", t_defined},
    {"divisibleby", t_divisibleby}, {"eq", t_compare<0>},      {"equalto", t_compare<0>},
    {"escaped", t_escaped},      {"even", t_even},             {"false", t_false},
    {"filter", t_filter},        {"float", t_float},           {"ge", t_compare<5>},
    {"greaterthan", t_compare<4>}, {"gt", t_compare<4>},       {"in", t_in},
    {"integer", t_integer},      {"iterable", t_iterable},     {"le", t_compare<3>},
    {"lessthan", t_compare<2>},  {"lower", t_lower},           {"lt", t_compare<2>},
    {"mapping", t_mapping},      {"ne", t_compare<1>},         {"none", t_none},
    {"number", t_number},        {"odd", t_odd},               {"sameas", t_sameas},
    {"sequence", t_sequence},    {"string", t_string},         {"test", t_test},
    {"true", t_true},            {"undefined", t_undefined},   {"upper", t_upper},
};

}  // namespace

FilterFn find_filter(std::string_view name) {
  for (const auto& [n, f] : kFilters) {
    if (n == name) return f;
  }
  return nullptr;
}

TestFn find_test(std::string_view name) {
  for (const auto& [n, t] : kTests) {
    if (n == name) return t;
  }
  return nullptr;
}

}  // namespace adakv::jinja
