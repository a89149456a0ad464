// The built-ins a chat template can reach: jinja2's filters and tests (the ones chat templates
// use), Python's str/dict/list methods, the globals transformers defines (raise_exception,
// strftime_now, namespace, dict) plus jinja2's range, and attribute/item access with jinja2's
// sandboxed getattr/getitem rules.
//
// The parser resolves filter and test names and checks method and function names at compile
// time, so a template that needs something missing here fails when it is loaded.
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "io/jinja_ast.h"
#include "io/jinja_value.h"

namespace adakv::jinja {

FilterFn find_filter(std::string_view name);
TestFn find_test(std::string_view name);
// A method of str, dict or list this renderer implements, or a known method-like attribute
// (loop.cycle); list/dict mutators are not (transformers' sandbox refuses them).
bool is_method_name(std::string_view name);
// A global function: range, dict, namespace, raise_exception, strftime_now.
bool is_global_function(std::string_view name);
// The value of a global name (functions above), or Undefined.
Value global_value(std::string_view name);

// obj.name: Python attribute first (methods of str/dict/list), then obj[name]; Undefined when
// neither exists. Using an Undefined object is an error ("'x' is undefined").
Expected<Value> get_attr(const Value& obj, const std::string& name);
// obj[key]: item first, then the attribute of that name for a string key.
Expected<Value> get_item(const Value& obj, const Value& key);
// obj[start:stop:step] on str (by code point), list or tuple; missing bounds are None.
Expected<Value> get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step);

// Iteration as a for loop sees it: list/tuple items, dict keys, str code points, nothing for
// Undefined, a generator's items (once); an error for anything else.
Expected<ValueList> iterate(const Value& v);
// len(v) as the length filter computes it (Undefined -> 0).
Expected<int64_t> length_of(const Value& v);

// The message of an error raised by using an Undefined value.
Status undefined_error(const Value& v);

// Binds call arguments to Python-style parameters (each positional or keyword), for the
// implementations of built-ins. Too many arguments or an unknown keyword is an error.
class BoundArgs {
 public:
  BoundArgs(const CallArgs& args, std::string_view function, std::initializer_list<std::string_view> params);
  const Status& status() const { return status_; }
  // The argument for parameter i, or nullptr when not given.
  const Value* get(size_t i) const { return slots_[i]; }
  bool has(size_t i) const { return slots_[i] != nullptr; }
  // Typed accessors with defaults; errors name the function and parameter.
  Expected<int64_t> get_int(size_t i, int64_t fallback) const;
  Expected<bool> get_bool(size_t i, bool fallback) const;  // any value, by truthiness
  // nullopt when absent or None.
  Expected<std::optional<std::string>> get_opt_str(size_t i) const;

 private:
  std::string function_;
  std::vector<std::string_view> params_;
  std::vector<const Value*> slots_;
  Status status_;
};

}  // namespace adakv::jinja
