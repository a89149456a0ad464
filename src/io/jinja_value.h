// Values of the Jinja subset that chat templates use, with Python's semantics (templates are
// Jinja running on Python under transformers): None/True/False, int, float, str, list, tuple,
// dict (insertion-ordered), Jinja's Undefined, namespace() objects, callables, and the
// generators that jinja2's select/map/... filters return (always truthy, no len(), not
// subscriptable, not JSON-serialisable, exhausted after one pass).
//
// Lists, tuples, dicts and strings are immutable once built (transformers renders in Jinja's
// ImmutableSandboxedEnvironment, where list.append and dict.update are refused), so a Value copy
// shares them. Only a namespace is mutable, by `{% set ns.attr = ... %}`, and it is shared by
// reference as in Python.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "core/status.h"

namespace adakv::jinja {

class Value;
class Interpreter;
using ValueList = std::vector<Value>;

// Arguments of a call: positional, then keyword (in source order).
struct CallArgs {
  ValueList positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

// A built-in function, bound method or template macro. `call` reports errors as a plain message;
// the interpreter adds the template source and line.
struct Function {
  std::string name;
  std::function<Expected<Value>(Interpreter&, const CallArgs&)> call;
};

class Value {
 public:
  enum class Kind : uint8_t {
    kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kTuple, kDict, kNamespace, kFunction, kGenerator
  };
  struct Dict;
  struct Namespace;
  struct Generator;

  Value() = default;  // Undefined
  // `hint` names what was undefined, for the error raised when the value is used ("'x' is
  // undefined", "'dict object' has no attribute 'y'").
  static Value undefined(std::string hint);
  static Value none();
  static Value boolean(bool b);
  static Value integer(int64_t i);
  static Value number(double f);
  static Value string(std::string s);
  static Value list(ValueList items);
  static Value tuple(ValueList items);
  static Value dict(Dict d);
  static Value ns(std::shared_ptr<Namespace> n);
  static Value function(std::string name, decltype(Function::call) fn);
  static Value generator(ValueList items);
  static Value failed_generator(Status error);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  // Python's int includes bool.
  bool is_int() const { return kind_ == Kind::kInt || kind_ == Kind::kBool; }
  bool is_float() const { return kind_ == Kind::kFloat; }
  bool is_number() const { return is_int() || is_float(); }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_tuple() const { return kind_ == Kind::kTuple; }
  bool is_sequence() const { return is_list() || is_tuple(); }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_namespace() const { return kind_ == Kind::kNamespace; }
  bool is_function() const { return kind_ == Kind::kFunction; }
  bool is_generator() const { return kind_ == Kind::kGenerator; }

  bool as_bool() const { return int_ != 0; }
  int64_t as_int() const { return int_; }  // also for bool
  double as_double() const { return is_float() ? float_ : static_cast<double>(int_); }
  const std::string& str() const { return *std::get<std::shared_ptr<const std::string>>(ptr_); }
  const std::string& undefined_hint() const;
  const ValueList& items() const { return *std::get<std::shared_ptr<const ValueList>>(ptr_); }
  const Dict& dict() const { return *std::get<std::shared_ptr<const Dict>>(ptr_); }
  Namespace& ns() const { return *std::get<std::shared_ptr<Namespace>>(ptr_); }
  const Function& function() const { return *std::get<std::shared_ptr<const Function>>(ptr_); }
  Generator& generator() const { return *std::get<std::shared_ptr<Generator>>(ptr_); }
  // Identity, for namespaces and functions (Python's `is`).
  const void* identity() const;

  // Python's type name, for error messages ("str", "NoneType", "dict", ...).
  std::string type_name() const;

 private:
  Kind kind_ = Kind::kUndefined;
  int64_t int_ = 0;
  double float_ = 0.0;
  std::variant<std::monostate, std::shared_ptr<const std::string>, std::shared_ptr<const ValueList>,
               std::shared_ptr<const Dict>, std::shared_ptr<Namespace>, std::shared_ptr<const Function>,
               std::shared_ptr<Generator>>
      ptr_;
};

// A Python dict: insertion-ordered entries, keys compared with Python's == (1 == 1.0 == True).
// Lookup is linear: chat-template dicts (messages, tool schemas) have a handful of keys.
struct Value::Dict {
  std::vector<std::pair<Value, Value>> entries;
  const Value* find(const Value& key) const;
  const Value* find(std::string_view key) const;
  // Replaces the value of an existing key in place (keeping its position) or appends.
  void set(Value key, Value value);
};

// jinja2's Namespace (as transformers subclasses it: no underscore-prefixed attributes).
struct Value::Namespace {
  Value::Dict attrs;
};

// A Python generator, materialised: iterating it once takes the items, later passes see none.
// jinja2's generator filters fail lazily, so an error found while building it is kept here and
// raised when the generator is iterated (printing or testing it succeeds, as in Python).
struct Value::Generator {
  ValueList items;
  bool consumed = false;
  Status error;
};

// Deep-structure limit for recursive operations on values (repr, tojson, ==): a template can
// nest lists one level per loop iteration, so recursion is bounded explicitly.
inline constexpr int kMaxValueDepth = 512;

// Python truthiness (Undefined is falsy).
bool truthy(const Value& v);
// Python ==, with Jinja's Undefined equal only to Undefined. Fails only past kMaxValueDepth.
Expected<bool> equals(const Value& a, const Value& b, int depth = 0);
// Python's <: -1, 0 or 1 for numbers, strings (code point order) and sequences of those;
// a TypeError message for anything else.
Expected<int> compare(const Value& a, const Value& b, int depth = 0);
// str(v) as Jinja prints it: Undefined -> "", None -> "None", True -> "True", lists by repr.
Expected<std::string> to_str(const Value& v);
// repr(v): strings quoted as Python quotes them.
Expected<std::string> to_repr(const Value& v, int depth = 0);

// json.dumps(v, ensure_ascii, indent, separators, sort_keys) as transformers' tojson filter
// calls it. `indent` is nullopt for none, else the indent string (an int n becomes n spaces).
struct JsonOptions {
  bool ensure_ascii = false;
  std::optional<std::string> indent;
  std::optional<std::pair<std::string, std::string>> separators;  // (item, key)
  bool sort_keys = false;
};
Expected<std::string> to_json(const Value& v, const JsonOptions& options);

}  // namespace adakv::jinja
