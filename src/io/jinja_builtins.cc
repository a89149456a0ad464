// Attribute and item access, iteration, Python methods and the global functions. Filters and
// tests are in jinja_filters.cc.
#include "io/jinja_builtins.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <ctime>

#include "io/jinja_interp.h"
#include "io/jinja_pystr.h"

namespace adakv::jinja {
namespace {

constexpr std::array<std::string_view, 14> kStrMethods = {
    "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith",
    "endswith", "upper", "lower", "title", "capitalize", "replace", "join"};
constexpr std::array<std::string_view, 3> kStrSearchMethods = {"find", "rfind", "count"};
constexpr std::array<std::string_view, 5> kDictMethods = {"keys", "values", "items", "get", "copy"};
constexpr std::array<std::string_view, 2> kListMethods = {"index", "count"};
// Mutators that jinja2's ImmutableSandboxedEnvironment refuses.
constexpr std::array<std::string_view, 5> kDictMutators = {"clear", "pop", "popitem", "setdefault", "update"};
constexpr std::array<std::string_view, 8> kListMutators = {"append", "extend", "insert", "pop",
                                                           "remove", "reverse", "sort", "clear"};

template <size_t N>
bool contains(const std::array<std::string_view, N>& names, std::string_view name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

Value no_attribute(const Value& obj, const std::string& name) {
  std::string hint = "'";
  hint += obj.type_name();
  return Value::undefined(hint + " object' has no attribute '" + name + "'");
}

Value unsafe(const Value& obj, const std::string& name) {
  return Value::undefined("access to attribute '" + name + "' of '" + obj.type_name() + "' object is unsafe");
}

Expected<std::string> require_str(const Value* v, const std::string& what) {
  if (v == nullptr || !v->is_string()) {
    return invalid_argument(what + " must be str, not " + (v ? v->type_name() : std::string("nothing")));
  }
  return v->str();
}

Value str_list(std::vector<std::string> parts) {
  ValueList items;
  items.reserve(parts.size());
  for (auto& p : parts) items.push_back(Value::string(std::move(p)));
  return Value::list(std::move(items));
}

Expected<Value> call_str_method(const std::string& self, const std::string& name, const CallArgs& a) {
  const std::string fn = "str." + name;
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    BoundArgs b(a, fn, {"chars"});
    ADAKV_RETURN_IF_ERROR(b.status());
    ADAKV_ASSIGN_OR_RETURN(auto chars, b.get_opt_str(0));
    return Value::string(pystr::strip(self, chars, name != "rstrip", name != "lstrip"));
  }
  if (name == "split" || name == "rsplit") {
    BoundArgs b(a, fn, {"sep", "maxsplit"});
    ADAKV_RETURN_IF_ERROR(b.status());
    ADAKV_ASSIGN_OR_RETURN(auto sep, b.get_opt_str(0));
    ADAKV_ASSIGN_OR_RETURN(int64_t maxsplit, b.get_int(1, -1));
    if (sep && sep->empty()) return invalid_argument("empty separator");
    return str_list(name == "split" ? pystr::split(self, sep, maxsplit) : pystr::rsplit(self, sep, maxsplit));
  }
  if (name == "splitlines") {
    BoundArgs b(a, fn, {});
    ADAKV_RETURN_IF_ERROR(b.status());
    return str_list(pystr::splitlines(self));
  }
  if (name == "startswith" || name == "endswith") {
    BoundArgs b(a, fn, {"prefix"});
    ADAKV_RETURN_IF_ERROR(b.status());
    const Value* p = b.get(0);
    if (p == nullptr) return invalid_argument(fn + "() takes at least 1 argument (0 given)");
    std::vector<std::string> options;
    if (p->is_tuple()) {
      for (const auto& item : p->items()) {
        ADAKV_ASSIGN_OR_RETURN(std::string s, require_str(&item, fn + " tuple item"));
        options.push_back(std::move(s));
      }
    } else {
      ADAKV_ASSIGN_OR_RETURN(std::string s, require_str(p, fn + " first arg"));
      options.push_back(std::move(s));
    }
    bool hit = std::any_of(options.begin(), options.end(), [&](const std::string& o) {
      return o.size() <= self.size() &&
             (name == "startswith" ? self.compare(0, o.size(), o) == 0 : self.compare(self.size() - o.size(), o.size(), o) == 0);
    });
    return Value::boolean(hit);
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
    BoundArgs b(a, fn, {});
    ADAKV_RETURN_IF_ERROR(b.status());
    if (name == "upper") return Value::string(pystr::upper(self));
    if (name == "lower") return Value::string(pystr::lower(self));
    if (name == "title") return Value::string(pystr::title(self));
    return Value::string(pystr::capitalize(self));
  }
  if (name == "replace") {
    BoundArgs b(a, fn, {"old", "new", "count"});
    ADAKV_RETURN_IF_ERROR(b.status());
    ADAKV_ASSIGN_OR_RETURN(std::string old_text, require_str(b.get(0), "replace() argument 1"));
    ADAKV_ASSIGN_OR_RETURN(std::string new_text, require_str(b.get(1), "replace() argument 2"));
    ADAKV_ASSIGN_OR_RETURN(int64_t count, b.get_int(2, -1));
    return Value::string(pystr::replace(self, old_text, new_text, count));
  }
  if (name == "find" || name == "rfind" || name == "count") {
    BoundArgs b(a, fn, {"sub"});
    ADAKV_RETURN_IF_ERROR(b.status());
    ADAKV_ASSIGN_OR_RETURN(std::string sub, require_str(b.get(0), fn + "() argument"));
    if (name == "count") return Value::integer(pystr::count(self, sub));
    return Value::integer(pystr::find(self, sub, name == "rfind"));
  }
  if (name == "join") {
    BoundArgs b(a, fn, {"iterable"});
    ADAKV_RETURN_IF_ERROR(b.status());
    if (!b.has(0)) return invalid_argument("str.join() takes exactly one argument (0 given)");
    ADAKV_ASSIGN_OR_RETURN(ValueList items, iterate(*b.get(0)));
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
      if (!items[i].is_string()) {
        return invalid_argument("sequence item " + std::to_string(i) + ": expected str instance, " +
                                items[i].type_name() + " found");
      }
      if (i > 0) out += self;
      out += items[i].str();
    }
    return Value::string(std::move(out));
  }
  return invalid_argument("str has no method '" + name + "'");
}

Expected<Value> call_dict_method(const Value& self, const std::string& name, const CallArgs& a) {
  const auto& entries = self.dict().entries;
  if (name == "get") {
    BoundArgs b(a, "dict.get", {"key", "default"});
    ADAKV_RETURN_IF_ERROR(b.status());
    if (!b.has(0)) return invalid_argument("get expected at least 1 argument, got 0");
    const Value* v = self.dict().find(*b.get(0));
    if (v != nullptr) return *v;
    return b.has(1) ? *b.get(1) : Value::none();
  }
  BoundArgs b(a, "dict." + name, {});
  ADAKV_RETURN_IF_ERROR(b.status());
  if (name == "copy") return self;
  ValueList out;
  out.reserve(entries.size());
  for (const auto& [k, v] : entries) {
    if (name == "keys") {
      out.push_back(k);
    } else if (name == "values") {
      out.push_back(v);
    } else {
      out.push_back(Value::tuple({k, v}));
    }
  }
  return Value::list(std::move(out));
}

Expected<Value> call_list_method(const Value& self, const std::string& name, const CallArgs& a) {
  BoundArgs b(a, self.type_name() + "." + name, {"value"});
  ADAKV_RETURN_IF_ERROR(b.status());
  if (!b.has(0)) return invalid_argument(name + "() takes exactly one argument (0 given)");
  int64_t n = 0;
  const ValueList& items = self.items();
  for (size_t i = 0; i < items.size(); ++i) {
    ADAKV_ASSIGN_OR_RETURN(bool eq, equals(items[i], *b.get(0)));
    if (!eq) continue;
    if (name == "index") return Value::integer(static_cast<int64_t>(i));
    ++n;
  }
  if (name == "index") return invalid_argument("value is not in " + self.type_name());
  return Value::integer(n);
}

Value bound_method(const Value& self, const std::string& name) {
  return Value::function(name, [self, name](Interpreter&, const CallArgs& args) -> Expected<Value> {
    if (self.is_string()) return call_str_method(self.str(), name, args);
    if (self.is_dict()) return call_dict_method(self, name, args);
    return call_list_method(self, name, args);
  });
}

// Python's PySlice_AdjustIndices for a sequence of length n.
Expected<std::vector<size_t>> slice_indices(int64_t n, const Value& start, const Value& stop, const Value& step) {
  for (const Value* v : {&start, &stop, &step}) {
    if (!v->is_none() && !v->is_int()) return invalid_argument("slice indices must be integers or None");
  }
  int64_t st = step.is_none() ? 1 : step.as_int();
  if (st == 0) return invalid_argument("slice step cannot be zero");
  auto adjust = [&](const Value& v, int64_t fallback) -> int64_t {
    if (v.is_none()) return fallback;
    int64_t i = v.as_int();
    if (i < 0) {
      i += n;
      if (i < 0) i = st < 0 ? -1 : 0;
    } else if (i >= n) {
      i = st < 0 ? n - 1 : n;
    }
    return i;
  };
  int64_t b = adjust(start, st < 0 ? n - 1 : 0);
  int64_t e = adjust(stop, st < 0 ? -1 : n);
  std::vector<size_t> out;
  for (int64_t i = b; st > 0 ? i < e : i > e; i += st) out.push_back(static_cast<size_t>(i));
  return out;
}

Expected<Value> make_dict(const CallArgs& args, const char* fn) {
  if (args.positional.size() > 1) return invalid_argument(std::string(fn) + " expected at most 1 positional argument");
  Value::Dict d;
  if (!args.positional.empty()) {
    const Value& src = args.positional[0];
    if (src.is_dict()) {
      d = src.dict();
    } else if (src.is_namespace()) {
      return invalid_argument("'Namespace' object is not iterable");
    } else {
      ADAKV_ASSIGN_OR_RETURN(ValueList pairs, iterate(src));
      for (const auto& p : pairs) {
        ADAKV_ASSIGN_OR_RETURN(ValueList kv, iterate(p));
        if (kv.size() != 2) return invalid_argument("dictionary update sequence element has length " + std::to_string(kv.size()) + "; 2 is required");
        d.set(kv[0], kv[1]);
      }
    }
  }
  for (const auto& [k, v] : args.keyword) d.set(Value::string(k), v);
  return Value::dict(std::move(d));
}

Expected<Value> global_range(Interpreter& in, const CallArgs& args) {
  if (!args.keyword.empty()) return invalid_argument("range() takes no keyword arguments");
  const auto& p = args.positional;
  if (p.empty() || p.size() > 3) return invalid_argument("range expected 1 to 3 arguments, got " + std::to_string(p.size()));
  for (const auto& v : p) {
    if (!v.is_int()) return invalid_argument("'" + v.type_name() + "' object cannot be interpreted as an integer");
  }
  int64_t start = p.size() == 1 ? 0 : p[0].as_int();
  int64_t stop = p.size() == 1 ? p[0].as_int() : p[1].as_int();
  int64_t step = p.size() == 3 ? p[2].as_int() : 1;
  if (step == 0) return invalid_argument("range() arg 3 must not be zero");
  // Length without overflow: count in unsigned arithmetic.
  uint64_t n = 0;
  if (step > 0 && start < stop) n = (static_cast<uint64_t>(stop) - static_cast<uint64_t>(start) - 1) / static_cast<uint64_t>(step) + 1;
  if (step < 0 && start > stop) n = (static_cast<uint64_t>(start) - static_cast<uint64_t>(stop) - 1) / (0 - static_cast<uint64_t>(step)) + 1;
  if (n > static_cast<uint64_t>(in.limits().max_range)) {
    return invalid_argument("Range too big. The sandbox blocks ranges larger than MAX_RANGE (" +
                            std::to_string(in.limits().max_range) + ").");
  }
  ADAKV_RETURN_IF_ERROR(in.charge(static_cast<int64_t>(n)));
  ValueList out;
  out.reserve(n);
  for (uint64_t i = 0; i < n; ++i) out.push_back(Value::integer(start + static_cast<int64_t>(i) * step));
  return Value::list(std::move(out));
}

Expected<Value> global_namespace(Interpreter& in, const CallArgs& args) {
  ADAKV_ASSIGN_OR_RETURN(Value d, make_dict(args, "namespace"));
  auto ns = in.new_namespace();
  for (const auto& [k, v] : d.dict().entries) {
    if (k.is_string() && !k.str().empty() && k.str()[0] == '_') {
      return invalid_argument("Chat templates cannot store underscore-prefixed attributes on a namespace, but got '" +
                              k.str() + "'");
    }
    ns->attrs.set(k, v);
  }
  return Value::ns(std::move(ns));
}

Expected<Value> global_raise_exception(Interpreter&, const CallArgs& args) {
  BoundArgs b(args, "raise_exception", {"message"});
  ADAKV_RETURN_IF_ERROR(b.status());
  std::string msg;
  if (b.has(0)) {
    ADAKV_ASSIGN_OR_RETURN(msg, to_str(*b.get(0)));
  }
  return invalid_argument("raise_exception: " + msg);
}

// datetime.now().strftime(format): Python handles %f, %z and %Z itself (a naive datetime has no
// zone) and passes the rest to the C library.
Expected<Value> global_strftime_now(Interpreter& in, const CallArgs& args) {
  BoundArgs b(args, "strftime_now", {"format"});
  ADAKV_RETURN_IF_ERROR(b.status());
  ADAKV_ASSIGN_OR_RETURN(std::string format, require_str(b.get(0), "strftime_now() argument"));
  std::string fmt;
  for (size_t i = 0; i < format.size(); ++i) {
    if (format[i] == '%' && i + 1 < format.size()) {
      char c = format[i + 1];
      if (c == 'f') {
        fmt += "000000";
        ++i;
        continue;
      }
      if (c == 'z' || c == 'Z') {
        ++i;
        continue;
      }
      fmt += format.substr(i, 2);
      ++i;
      continue;
    }
    fmt.push_back(format[i]);
  }
  std::tm t = in.now();
  std::string out(fmt.size() * 4 + 64, '\0');
  size_t n = fmt.empty() ? 0 : std::strftime(out.data(), out.size(), fmt.c_str(), &t);
  if (n == 0 && !fmt.empty()) return invalid_argument("strftime_now: format produced no output or is too long");
  out.resize(n);
  return Value::string(std::move(out));
}

}  // namespace

BoundArgs::BoundArgs(const CallArgs& args, std::string_view function, std::initializer_list<std::string_view> params)
    : function_(function), params_(params), slots_(params.size(), nullptr) {
  if (args.positional.size() > params_.size()) {
    status_ = invalid_argument(function_ + "() takes at most " + std::to_string(params_.size()) + " argument(s) (" +
                               std::to_string(args.positional.size()) + " given)");
    return;
  }
  for (size_t i = 0; i < args.positional.size(); ++i) slots_[i] = &args.positional[i];
  for (const auto& [key, value] : args.keyword) {
    auto it = std::find(params_.begin(), params_.end(), key);
    if (it == params_.end()) {
      status_ = invalid_argument(function_ + "() got an unexpected keyword argument '" + key + "'");
      return;
    }
    size_t i = static_cast<size_t>(it - params_.begin());
    if (slots_[i] != nullptr) {
      status_ = invalid_argument(function_ + "() got multiple values for argument '" + key + "'");
      return;
    }
    slots_[i] = &value;
  }
}

Expected<int64_t> BoundArgs::get_int(size_t i, int64_t fallback) const {
  const Value* v = slots_[i];
  if (v == nullptr || v->is_none()) return fallback;
  if (!v->is_int()) {
    return invalid_argument(function_ + "() argument '" + std::string(params_[i]) + "' must be int, not " + v->type_name());
  }
  return v->as_int();
}

Expected<bool> BoundArgs::get_bool(size_t i, bool fallback) const {
  const Value* v = slots_[i];
  return v == nullptr ? fallback : truthy(*v);
}

Expected<std::optional<std::string>> BoundArgs::get_opt_str(size_t i) const {
  const Value* v = slots_[i];
  if (v == nullptr || v->is_none()) return std::optional<std::string>();
  if (!v->is_string()) {
    return invalid_argument(function_ + "() argument '" + std::string(params_[i]) + "' must be str or None, not " +
                            v->type_name());
  }
  return std::optional<std::string>(v->str());
}

Status undefined_error(const Value& v) {
  const std::string& hint = v.undefined_hint();
  return invalid_argument(hint.empty() ? "undefined value" : hint);
}

bool is_method_name(std::string_view name) {
  return contains(kStrMethods, name) || contains(kStrSearchMethods, name) || contains(kDictMethods, name) ||
         contains(kListMethods, name) || name == "cycle";
}

bool is_global_function(std::string_view name) {
  return name == "range" || name == "dict" || name == "namespace" || name == "raise_exception" ||
         name == "strftime_now";
}

Value global_value(std::string_view name) {
  if (name == "range") return Value::function("range", global_range);
  if (name == "namespace") return Value::function("namespace", global_namespace);
  if (name == "raise_exception") return Value::function("raise_exception", global_raise_exception);
  if (name == "strftime_now") return Value::function("strftime_now", global_strftime_now);
  if (name == "dict") {
    return Value::function("dict", [](Interpreter&, const CallArgs& a) { return make_dict(a, "dict"); });
  }
  return Value();
}

Expected<Value> get_attr(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Value::Kind::kUndefined: return undefined_error(obj);
    case Value::Kind::kDict:
      if (contains(kDictMethods, name)) return bound_method(obj, name);
      if (contains(kDictMutators, name)) return unsafe(obj, name);
      if (const Value* v = obj.dict().find(std::string_view(name))) return *v;
      return no_attribute(obj, name);
    case Value::Kind::kString:
      if (contains(kStrMethods, name) || contains(kStrSearchMethods, name)) return bound_method(obj, name);
      return no_attribute(obj, name);
    case Value::Kind::kList:
    case Value::Kind::kTuple:
      if (contains(kListMethods, name)) return bound_method(obj, name);
      if (obj.is_list() && contains(kListMutators, name)) return unsafe(obj, name);
      return no_attribute(obj, name);
    case Value::Kind::kNamespace:
      if (const Value* v = obj.ns().attrs.find(std::string_view(name))) return *v;
      return no_attribute(obj, name);
    default: return no_attribute(obj, name);
  }
}

Expected<Value> get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) return undefined_error(obj);
  if ((obj.is_sequence() || obj.is_string()) && key.is_int()) {
    int64_t n = obj.is_string() ? static_cast<int64_t>(pystr::length(obj.str())) : static_cast<int64_t>(obj.items().size());
    int64_t i = key.as_int() < 0 ? key.as_int() + n : key.as_int();
    if (i < 0 || i >= n) return Value::undefined("'" + obj.type_name() + " object' has no element " + std::to_string(key.as_int()));
    if (obj.is_sequence()) return obj.items()[static_cast<size_t>(i)];
    std::u32string u = pystr::decode(obj.str());
    return Value::string(pystr::encode(std::u32string_view(u).substr(static_cast<size_t>(i), 1)));
  }
  if (obj.is_dict()) {
    if (!key.is_sequence() || key.is_tuple()) {
      if (const Value* v = obj.dict().find(key)) return *v;
    }
  }
  if (key.is_string()) return get_attr(obj, key.str());
  ADAKV_ASSIGN_OR_RETURN(std::string k, to_repr(key));
  return Value::undefined("'" + obj.type_name() + " object' has no element " + k);
}

Expected<Value> get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step) {
  // jinja2 compiles slices to a plain Python subscript (no sandbox getitem), so a bad object or
  // bound is a TypeError rather than Undefined.
  if (obj.is_undefined()) return undefined_error(obj);
  if (!obj.is_sequence() && !obj.is_string()) {
    if (obj.is_dict()) return invalid_argument("unhashable type: 'slice'");
    return invalid_argument("'" + obj.type_name() + "' object is not subscriptable");
  }
  if (obj.is_string()) {
    std::u32string u = pystr::decode(obj.str());
    ADAKV_ASSIGN_OR_RETURN(auto idx, slice_indices(static_cast<int64_t>(u.size()), start, stop, step));
    std::u32string out;
    out.reserve(idx.size());
    for (size_t i : idx) out.push_back(u[i]);
    return Value::string(pystr::encode(out));
  }
  const ValueList& items = obj.items();
  ADAKV_ASSIGN_OR_RETURN(auto idx, slice_indices(static_cast<int64_t>(items.size()), start, stop, step));
  ValueList out;
  out.reserve(idx.size());
  for (size_t i : idx) out.push_back(items[i]);
  return obj.is_list() ? Value::list(std::move(out)) : Value::tuple(std::move(out));
}

Expected<ValueList> iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined: return ValueList();
    case Value::Kind::kList:
    case Value::Kind::kTuple: return v.items();
    case Value::Kind::kDict: {
      ValueList keys;
      keys.reserve(v.dict().entries.size());
      for (const auto& [k, _] : v.dict().entries) keys.push_back(k);
      return keys;
    }
    case Value::Kind::kGenerator: {
      Value::Generator& g = v.generator();
      if (!g.error.is_ok()) return g.error;
      if (g.consumed) return ValueList();
      g.consumed = true;
      return std::move(g.items);
    }
    case Value::Kind::kString: {
      ValueList chars;
      for (char32_t c : pystr::decode(v.str())) chars.push_back(Value::string(pystr::encode(std::u32string(1, c))));
      return chars;
    }
    default: return invalid_argument("'" + v.type_name() + "' object is not iterable");
  }
}

Expected<int64_t> length_of(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined: return int64_t{0};
    case Value::Kind::kString: return static_cast<int64_t>(pystr::length(v.str()));
    case Value::Kind::kList:
    case Value::Kind::kTuple: return static_cast<int64_t>(v.items().size());
    case Value::Kind::kDict: return static_cast<int64_t>(v.dict().entries.size());
    default: return invalid_argument("object of type '" + v.type_name() + "' has no len()");
  }
}

}  // namespace adakv::jinja
