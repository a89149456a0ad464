#include "io/jinja_value.h"

#include <algorithm>
#include <cmath>

#include "io/jinja_pystr.h"

namespace adakv::jinja {
namespace {

Status too_deep() { return invalid_argument("value nested deeper than " + std::to_string(kMaxValueDepth) + " levels"); }

// Python compares numbers by value; for ints beyond 2^53 against floats this is approximate.
int compare_numbers(const Value& a, const Value& b) {
  if (a.is_int() && b.is_int()) return a.as_int() < b.as_int() ? -1 : (a.as_int() > b.as_int() ? 1 : 0);
  double x = a.as_double(), y = b.as_double();
  return x < y ? -1 : (x > y ? 1 : 0);
}

Status json_type_error(const Value& v) {
  return invalid_argument("Object of type " + (v.is_undefined() ? std::string("Undefined") : v.type_name()) +
                          " is not JSON serializable");
}

Expected<std::string> json_key(const Value& k) {
  switch (k.kind()) {
    case Value::Kind::kString: return k.str();
    case Value::Kind::kInt: return std::to_string(k.as_int());
    case Value::Kind::kBool: return std::string(k.as_bool() ? "true" : "false");
    case Value::Kind::kNone: return std::string("null");
    case Value::Kind::kFloat: return pystr::float_repr(k.as_double());
    default:
      return invalid_argument("keys must be str, int, float, bool or None, not " + k.type_name());
  }
}

Status to_json_into(const Value& v, const JsonOptions& o, int level, std::string& out) {
  if (level > kMaxValueDepth) return too_deep();
  switch (v.kind()) {
    case Value::Kind::kNone: out += "null"; return Status::ok();
    case Value::Kind::kBool: out += v.as_bool() ? "true" : "false"; return Status::ok();
    case Value::Kind::kInt: out += std::to_string(v.as_int()); return Status::ok();
    case Value::Kind::kFloat: {
      double f = v.as_double();
      if (std::isnan(f)) {
        out += "NaN";
      } else if (std::isinf(f)) {
        out += f < 0 ? "-Infinity" : "Infinity";
      } else {
        out += pystr::float_repr(f);
      }
      return Status::ok();
    }
    case Value::Kind::kString: out += pystr::json_quote(v.str(), o.ensure_ascii); return Status::ok();
    default: break;
  }
  // Containers: json.dumps's layout, with the default separators depending on indent.
  std::string item_sep = o.separators ? o.separators->first : (o.indent ? "," : ", ");
  std::string key_sep = o.separators ? o.separators->second : ": ";
  auto newline_indent = [&](int lvl) {
    out.push_back('\n');
    for (int i = 0; i < lvl; ++i) out += *o.indent;
  };
  if (v.is_sequence()) {
    const ValueList& items = v.items();
    if (items.empty()) {
      out += "[]";
      return Status::ok();
    }
    out.push_back('[');
    for (size_t i = 0; i < items.size(); ++i) {
      if (i > 0) out += item_sep;
      if (o.indent) newline_indent(level + 1);
      ADAKV_RETURN_IF_ERROR(to_json_into(items[i], o, level + 1, out));
    }
    if (o.indent) newline_indent(level);
    out.push_back(']');
    return Status::ok();
  }
  if (v.is_dict()) {
    const auto& entries = v.dict().entries;
    if (entries.empty()) {
      out += "{}";
      return Status::ok();
    }
    std::vector<std::pair<std::string, const Value*>> rows;
    rows.reserve(entries.size());
    for (const auto& [k, val] : entries) {
      ADAKV_ASSIGN_OR_RETURN(std::string key, json_key(k));
      rows.emplace_back(std::move(key), &val);
    }
    if (o.sort_keys) {
      std::stable_sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    }
    out.push_back('{');
    for (size_t i = 0; i < rows.size(); ++i) {
      if (i > 0) out += item_sep;
      if (o.indent) newline_indent(level + 1);
      out += pystr::json_quote(rows[i].first, o.ensure_ascii);
      out += key_sep;
      ADAKV_RETURN_IF_ERROR(to_json_into(*rows[i].second, o, level + 1, out));
    }
    if (o.indent) newline_indent(level);
    out.push_back('}');
    return Status::ok();
  }
  return json_type_error(v);
}

}  // namespace

Value Value::undefined(std::string hint) {
  Value v;
  v.ptr_ = std::make_shared<const std::string>(std::move(hint));
  return v;
}
Value Value::none() {
  Value v;
  v.kind_ = Kind::kNone;
  return v;
}
Value Value::boolean(bool b) {
  Value v;
  v.kind_ = Kind::kBool;
  v.int_ = b ? 1 : 0;
  return v;
}
Value Value::integer(int64_t i) {
  Value v;
  v.kind_ = Kind::kInt;
  v.int_ = i;
  return v;
}
Value Value::number(double f) {
  Value v;
  v.kind_ = Kind::kFloat;
  v.float_ = f;
  return v;
}
Value Value::string(std::string s) {
  Value v;
  v.kind_ = Kind::kString;
  v.ptr_ = std::make_shared<const std::string>(std::move(s));
  return v;
}
Value Value::list(ValueList items) {
  Value v;
  v.kind_ = Kind::kList;
  v.ptr_ = std::make_shared<const ValueList>(std::move(items));
  return v;
}
Value Value::tuple(ValueList items) {
  Value v = list(std::move(items));
  v.kind_ = Kind::kTuple;
  return v;
}
Value Value::dict(Dict d) {
  Value v;
  v.kind_ = Kind::kDict;
  v.ptr_ = std::make_shared<const Dict>(std::move(d));
  return v;
}
Value Value::ns(std::shared_ptr<Namespace> n) {
  Value v;
  v.kind_ = Kind::kNamespace;
  v.ptr_ = std::move(n);
  return v;
}
Value Value::function(std::string name, decltype(Function::call) fn) {
  Value v;
  v.kind_ = Kind::kFunction;
  v.ptr_ = std::make_shared<const Function>(Function{std::move(name), std::move(fn)});
  return v;
}

Value Value::generator(ValueList items) {
  Value v;
  v.kind_ = Kind::kGenerator;
  auto g = std::make_shared<Generator>();
  g->items = std::move(items);
  v.ptr_ = std::move(g);
  return v;
}

Value Value::failed_generator(Status error) {
  Value v = generator({});
  v.generator().error = std::move(error);
  return v;
}

const std::string& Value::undefined_hint() const {
  static const std::string kEmpty;
  const auto* p = std::get_if<std::shared_ptr<const std::string>>(&ptr_);
  return (kind_ == Kind::kUndefined && p != nullptr && *p) ? **p : kEmpty;
}

const void* Value::identity() const {
  return std::visit(
      [](const auto& p) -> const void* {
        if constexpr (std::is_same_v<std::decay_t<decltype(p)>, std::monostate>) {
          return nullptr;
        } else {
          return p.get();
        }
      },
      ptr_);
}

std::string Value::type_name() const {
  switch (kind_) {
    case Kind::kUndefined: return "Undefined";
    case Kind::kNone: return "NoneType";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kFloat: return "float";
    case Kind::kString: return "str";
    case Kind::kList: return "list";
    case Kind::kTuple: return "tuple";
    case Kind::kDict: return "dict";
    case Kind::kNamespace: return "Namespace";
    case Kind::kFunction: return "function";
    case Kind::kGenerator: return "generator";
  }
  return "object";
}

const Value* Value::Dict::find(const Value& key) const {
  for (const auto& [k, v] : entries) {
    auto eq = equals(k, key);
    if (eq.has_value() && *eq) return &v;
  }
  return nullptr;
}

const Value* Value::Dict::find(std::string_view key) const {
  for (const auto& [k, v] : entries) {
    if (k.is_string() && k.str() == key) return &v;
  }
  return nullptr;
}

void Value::Dict::set(Value key, Value value) {
  for (auto& [k, v] : entries) {
    auto eq = equals(k, key);
    if (eq.has_value() && *eq) {
      v = std::move(value);
      return;
    }
  }
  entries.emplace_back(std::move(key), std::move(value));
}

bool truthy(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone: return false;
    case Value::Kind::kBool:
    case Value::Kind::kInt: return v.as_int() != 0;
    case Value::Kind::kFloat: return v.as_double() != 0.0;
    case Value::Kind::kString: return !v.str().empty();
    case Value::Kind::kList:
    case Value::Kind::kTuple: return !v.items().empty();
    case Value::Kind::kDict: return !v.dict().entries.empty();
    case Value::Kind::kNamespace:
    case Value::Kind::kFunction:
    case Value::Kind::kGenerator: return true;
  }
  return false;
}

Expected<bool> equals(const Value& a, const Value& b, int depth) {
  if (depth > kMaxValueDepth) return too_deep();
  if (a.is_number() && b.is_number()) return compare_numbers(a, b) == 0;
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone: return true;
    case Value::Kind::kString: return a.str() == b.str();
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      const ValueList& x = a.items();
      const ValueList& y = b.items();
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i) {
        ADAKV_ASSIGN_OR_RETURN(bool eq, equals(x[i], y[i], depth + 1));
        if (!eq) return false;
      }
      return true;
    }
    case Value::Kind::kDict: {
      const auto& x = a.dict().entries;
      const auto& y = b.dict();
      if (x.size() != y.entries.size()) return false;
      for (const auto& [k, v] : x) {
        const Value* other = y.find(k);
        if (other == nullptr) return false;
        ADAKV_ASSIGN_OR_RETURN(bool eq, equals(v, *other, depth + 1));
        if (!eq) return false;
      }
      return true;
    }
    default: return a.identity() == b.identity();
  }
}

Expected<int> compare(const Value& a, const Value& b, int depth) {
  if (depth > kMaxValueDepth) return too_deep();
  if (a.is_number() && b.is_number()) return compare_numbers(a, b);
  if (a.is_string() && b.is_string()) {
    int c = a.str().compare(b.str());  // UTF-8 byte order is code point order
    return c < 0 ? -1 : (c > 0 ? 1 : 0);
  }
  if (a.kind() == b.kind() && a.is_sequence()) {
    const ValueList& x = a.items();
    const ValueList& y = b.items();
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      ADAKV_ASSIGN_OR_RETURN(bool eq, equals(x[i], y[i], depth + 1));
      if (!eq) return compare(x[i], y[i], depth + 1);
    }
    return x.size() < y.size() ? -1 : (x.size() > y.size() ? 1 : 0);
  }
  return invalid_argument("'<' not supported between instances of '" + a.type_name() + "' and '" +
                          b.type_name() + "'");
}

Expected<std::string> to_str(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined: return std::string();
    case Value::Kind::kString: return v.str();
    default: return to_repr(v);
  }
}

Expected<std::string> to_repr(const Value& v, int depth) {
  if (depth > kMaxValueDepth) return too_deep();
  switch (v.kind()) {
    case Value::Kind::kUndefined: return std::string("Undefined");
    case Value::Kind::kNone: return std::string("None");
    case Value::Kind::kBool: return std::string(v.as_bool() ? "True" : "False");
    case Value::Kind::kInt: return std::to_string(v.as_int());
    case Value::Kind::kFloat: return pystr::float_repr(v.as_double());
    case Value::Kind::kString: return pystr::repr(v.str());
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      bool tuple = v.is_tuple();
      std::string out = tuple ? "(" : "[";
      const ValueList& items = v.items();
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) out += ", ";
        ADAKV_ASSIGN_OR_RETURN(std::string s, to_repr(items[i], depth + 1));
        out += s;
      }
      if (tuple && items.size() == 1) out += ",";
      out += tuple ? ")" : "]";
      return out;
    }
    case Value::Kind::kDict:
    case Value::Kind::kNamespace: {
      const auto& entries = v.is_dict() ? v.dict().entries : v.ns().attrs.entries;
      std::string out = v.is_dict() ? "{" : "<Namespace {";
      for (size_t i = 0; i < entries.size(); ++i) {
        if (i > 0) out += ", ";
        ADAKV_ASSIGN_OR_RETURN(std::string k, to_repr(entries[i].first, depth + 1));
        ADAKV_ASSIGN_OR_RETURN(std::string val, to_repr(entries[i].second, depth + 1));
        out += k + ": " + val;
      }
      out += v.is_dict() ? "}" : "}>";
      return out;
    }
    case Value::Kind::kFunction: return "<built-in function " + v.function().name + ">";
    case Value::Kind::kGenerator: return std::string("<generator object>");
  }
  return std::string();
}

Expected<std::string> to_json(const Value& v, const JsonOptions& options) {
  std::string out;
  ADAKV_RETURN_IF_ERROR(to_json_into(v, options, 0, out));
  return out;
}

}  // namespace adakv::jinja
