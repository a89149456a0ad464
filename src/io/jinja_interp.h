// Renders a parsed chat template (jinja_ast.h) against a context of variables, with jinja2's
// semantics as transformers runs it: for loops and macros open scopes (a `set` inside a loop body
// does not leak out, which is why templates use namespace()), `if` does not, and names resolve
// through the scopes, then the render context, then the globals.
//
// Rendering is bounded: output size, a budget of evaluation steps (nested loops over range()
// cannot spin forever), macro recursion depth; the parser already bounds syntax nesting.
#pragma once

#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/jinja_ast.h"
#include "io/jinja_value.h"

namespace adakv::jinja {

struct RenderLimits {
  size_t max_output_bytes = size_t{32} << 20;  // also caps every string and list a template builds
  int64_t max_steps = 20'000'000;              // statements + expression nodes + loop iterations
  int max_call_depth = 32;                     // macro recursion
  int64_t max_range = 100'000;                 // range() length (jinja2's sandbox uses the same)
};

// One scope of variables; the parent chain ends at the template's top-level scope.
struct Frame {
  std::vector<std::pair<std::string, Value>> vars;
  std::shared_ptr<Frame> parent;
  const Value* find(const std::string& name) const;
  void set(const std::string& name, Value value);
};

class Interpreter {
 public:
  // `context`: the render variables (messages, add_generation_prompt, bos_token, ...).
  // `now`: the time strftime_now() formats; nullopt reads the local clock.
  Interpreter(const Program& program, const Value::Dict& context, const RenderLimits& limits,
              std::optional<std::tm> now);
  ~Interpreter();
  Interpreter(const Interpreter&) = delete;
  Interpreter& operator=(const Interpreter&) = delete;

  // Errors carry "line N: ..." (the caller adds the source name).
  Expected<std::string> render();

  // --- services for built-ins -----------------------------------------------------------------
  // Spends `units` of the step budget (built-ins charge for the elements they copy).
  Status charge(int64_t units);
  // Fails when a string or list of `size` bytes/elements would exceed the output limit.
  Status check_size(size_t size) const;
  const RenderLimits& limits() const { return limits_; }
  std::tm now() const;
  // Calls a function value (a built-in or a macro).
  Expected<Value> call(const Value& fn, const CallArgs& args);
  // Runs a macro body: used by the closures that {% macro %} creates.
  Expected<Value> call_macro(const Stmt& macro, const std::shared_ptr<Frame>& closure, const CallArgs& args);
  // A new namespace() object. The interpreter empties every namespace when it is destroyed:
  // `{% set ns.me = ns %}` makes a reference cycle that would otherwise leak.
  std::shared_ptr<Value::Namespace> new_namespace();

 private:
  enum class Flow { kNormal, kBreak, kContinue };

  Expected<Flow> exec_body(const Body& body);
  Expected<Flow> exec(const Stmt& s);
  Expected<Flow> exec_for(const Stmt& s);
  Status exec_set(const Stmt& s);
  Status assign(const Target& t, const Value& v);
  Status emit(std::string_view text, int line);
  // Runs `body` with output captured into a string, in a child scope when `scoped`.
  Expected<std::string> capture(const Body& body, bool scoped);

  Expected<Value> eval(const Expr& e);
  Expected<Value> eval_filter(const Expr& e, const Value* block_input);
  Expected<Value> eval_binary(const Expr& e, const Value& a, const Value& b);
  Expected<Value> eval_compare(const Expr& e);
  Expected<CallArgs> eval_args(const Expr& e, size_t first_positional);
  Value lookup(const std::string& name) const;

  Status fail(int line, const std::string& msg) const;
  // Adds the line to an error from a built-in (errors that already name a line pass through).
  Status at_line(const Status& s, int line) const;

  const Program& program_;
  const Value::Dict& context_;
  RenderLimits limits_;
  std::optional<std::tm> now_;
  std::shared_ptr<Frame> frame_;
  std::string* out_ = nullptr;
  int64_t steps_ = 0;
  int call_depth_ = 0;
  std::vector<std::weak_ptr<Value::Namespace>> namespaces_;
};

}  // namespace adakv::jinja
