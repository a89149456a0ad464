#include "io/jinja_interp.h"

#include <cmath>
#include <limits>

#include "io/jinja_builtins.h"

namespace adakv::jinja {
namespace {

bool has_line_prefix(const Status& s) { return s.message().rfind("line ", 0) == 0; }

Status type_error(const std::string& op, const Value& a, const Value& b) {
  return invalid_argument("unsupported operand type(s) for " + op + ": '" + a.type_name() + "' and '" +
                          b.type_name() + "'");
}

int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

double py_fmod(double a, double b) {
  double m = std::fmod(a, b);
  if (m != 0.0 && ((m < 0) != (b < 0))) m += b;
  return m;
}

// jinja2's LoopContext for iteration i of `items`, as a dict (templates only read it).
Value loop_object(const ValueList& items, int64_t i) {
  static const Value kKeys[] = {Value::string("index"),    Value::string("index0"),   Value::string("revindex"),
                                Value::string("revindex0"), Value::string("first"),    Value::string("last"),
                                Value::string("length"),   Value::string("depth"),    Value::string("depth0"),
                                Value::string("previtem"), Value::string("nextitem"), Value::string("cycle")};
  const int64_t n = static_cast<int64_t>(items.size());
  Value::Dict loop;
  loop.entries.reserve(12);
  Value values[] = {
      Value::integer(i + 1),
      Value::integer(i),
      Value::integer(n - i),
      Value::integer(n - i - 1),
      Value::boolean(i == 0),
      Value::boolean(i == n - 1),
      Value::integer(n),
      Value::integer(1),
      Value::integer(0),
      i > 0 ? items[static_cast<size_t>(i - 1)] : Value::undefined("there is no previous item"),
      i + 1 < n ? items[static_cast<size_t>(i + 1)] : Value::undefined("there is no next item"),
      Value::function("cycle", [i](Interpreter&, const CallArgs& args) -> Expected<Value> {
        if (args.positional.empty()) return invalid_argument("no items for cycling given");
        return args.positional[static_cast<size_t>(i) % args.positional.size()];
      }),
  };
  for (size_t k = 0; k < 12; ++k) loop.entries.emplace_back(kKeys[k], std::move(values[k]));
  return Value::dict(std::move(loop));
}

}  // namespace

const Value* Frame::find(const std::string& name) const {
  for (const auto& [k, v] : vars) {
    if (k == name) return &v;
  }
  return nullptr;
}

void Frame::set(const std::string& name, Value value) {
  for (auto& [k, v] : vars) {
    if (k == name) {
      v = std::move(value);
      return;
    }
  }
  vars.emplace_back(name, std::move(value));
}

Interpreter::Interpreter(const Program& program, const Value::Dict& context, const RenderLimits& limits,
                         std::optional<std::tm> now)
    : program_(program), context_(context), limits_(limits), now_(now), frame_(std::make_shared<Frame>()) {}

Interpreter::~Interpreter() {
  frame_.reset();
  for (auto& weak : namespaces_) {
    if (auto ns = weak.lock()) ns->attrs.entries.clear();
  }
}

std::shared_ptr<Value::Namespace> Interpreter::new_namespace() {
  auto ns = std::make_shared<Value::Namespace>();
  namespaces_.push_back(ns);
  return ns;
}

Expected<std::string> Interpreter::render() {
  std::string out;
  out_ = &out;
  auto flow = exec_body(program_.body);
  out_ = nullptr;
  if (!flow.has_value()) return flow.status();
  return out;
}

Status Interpreter::charge(int64_t units) {
  steps_ += units;
  if (steps_ > limits_.max_steps) {
    return resource_exhausted("rendering exceeded " + std::to_string(limits_.max_steps) + " evaluation steps");
  }
  return Status::ok();
}

Status Interpreter::check_size(size_t size) const {
  if (size > limits_.max_output_bytes) {
    return resource_exhausted("rendering exceeded the output limit of " + std::to_string(limits_.max_output_bytes) +
                              " bytes");
  }
  return Status::ok();
}

std::tm Interpreter::now() const {
  if (now_) return *now_;
  std::time_t t = std::time(nullptr);
  std::tm local{};
  localtime_r(&t, &local);
  return local;
}

Status Interpreter::fail(int line, const std::string& msg) const {
  return invalid_argument("line " + std::to_string(line) + ": " + msg);
}

Status Interpreter::at_line(const Status& s, int line) const {
  if (s.is_ok() || has_line_prefix(s)) return s;
  return Status(s.code(), "line " + std::to_string(line) + ": " + s.message());
}

Status Interpreter::emit(std::string_view text, int line) {
  out_->append(text);
  return at_line(check_size(out_->size()), line);
}

Value Interpreter::lookup(const std::string& name) const {
  for (const Frame* f = frame_.get(); f != nullptr; f = f->parent.get()) {
    if (const Value* v = f->find(name)) return *v;
  }
  if (const Value* v = context_.find(name)) return *v;
  Value g = global_value(name);
  if (!g.is_undefined()) return g;
  return Value::undefined("'" + name + "' is undefined");
}

// --- statements ---------------------------------------------------------------------------

Expected<Interpreter::Flow> Interpreter::exec_body(const Body& body) {
  for (const auto& s : body) {
    ADAKV_ASSIGN_OR_RETURN(Flow flow, exec(*s));
    if (flow != Flow::kNormal) return flow;
  }
  return Flow::kNormal;
}

Expected<std::string> Interpreter::capture(const Body& body, bool scoped) {
  std::string buffer;
  std::string* saved_out = out_;
  std::shared_ptr<Frame> saved_frame = frame_;
  out_ = &buffer;
  if (scoped) {
    auto child = std::make_shared<Frame>();
    child->parent = frame_;
    frame_ = child;
  }
  auto flow = exec_body(body);
  out_ = saved_out;
  frame_ = saved_frame;
  if (!flow.has_value()) return flow.status();
  return buffer;
}

Expected<Interpreter::Flow> Interpreter::exec(const Stmt& s) {
  ADAKV_RETURN_IF_ERROR(at_line(charge(1), s.line));
  switch (s.kind) {
    case StmtKind::kData:
      ADAKV_RETURN_IF_ERROR(emit(s.text, s.line));
      return Flow::kNormal;
    case StmtKind::kOutput: {
      ADAKV_ASSIGN_OR_RETURN(Value v, eval(*s.expr));
      if (v.is_string()) {
        ADAKV_RETURN_IF_ERROR(emit(v.str(), s.line));
      } else {
        auto text = to_str(v);
        if (!text.has_value()) return at_line(text.status(), s.line);
        ADAKV_RETURN_IF_ERROR(emit(*text, s.line));
      }
      return Flow::kNormal;
    }
    case StmtKind::kIf:
      for (const auto& [cond, body] : s.branches) {
        bool take = true;
        if (cond) {
          ADAKV_ASSIGN_OR_RETURN(Value c, eval(*cond));
          take = truthy(c);
        }
        if (take) return exec_body(body);
      }
      return Flow::kNormal;
    case StmtKind::kFor: return exec_for(s);
    case StmtKind::kSet:
    case StmtKind::kSetBlock:
      ADAKV_RETURN_IF_ERROR(exec_set(s));
      return Flow::kNormal;
    case StmtKind::kMacro: {
      // The closure holds its scope weakly: the scope holds the macro, and a strong reference
      // back would be a cycle that outlives the render.
      const Stmt* macro = &s;
      std::weak_ptr<Frame> weak = frame_;
      frame_->set(s.name, Value::function(s.name, [macro, weak](Interpreter& in, const CallArgs& args) -> Expected<Value> {
                    std::shared_ptr<Frame> closure = weak.lock();
                    if (!closure) return invalid_argument("macro '" + macro->name + "' called outside the scope that defined it");
                    return in.call_macro(*macro, closure, args);
                  }));
      return Flow::kNormal;
    }
    case StmtKind::kFilterBlock: {
      ADAKV_ASSIGN_OR_RETURN(std::string body, capture(s.body, false));
      Value input = Value::string(std::move(body));
      ADAKV_ASSIGN_OR_RETURN(Value v, eval_filter(*s.expr, &input));
      auto text = to_str(v);
      if (!text.has_value()) return at_line(text.status(), s.line);
      ADAKV_RETURN_IF_ERROR(emit(*text, s.line));
      return Flow::kNormal;
    }
    case StmtKind::kWith: {
      std::vector<Value> values;
      for (const auto& v : s.values) {
        ADAKV_ASSIGN_OR_RETURN(Value x, eval(*v));
        values.push_back(std::move(x));
      }
      auto child = std::make_shared<Frame>();
      child->parent = frame_;
      std::shared_ptr<Frame> saved = frame_;
      frame_ = child;
      Status st;
      for (size_t i = 0; i < values.size() && st.is_ok(); ++i) st = assign(s.targets[i], values[i]);
      auto flow = st.is_ok() ? exec_body(s.body) : Expected<Flow>(st);
      frame_ = saved;
      return flow;
    }
    case StmtKind::kScope: {
      ADAKV_ASSIGN_OR_RETURN(std::string body, capture(s.body, true));
      ADAKV_RETURN_IF_ERROR(emit(body, s.line));
      return Flow::kNormal;
    }
    case StmtKind::kBreak: return Flow::kBreak;
    case StmtKind::kContinue: return Flow::kContinue;
  }
  return Flow::kNormal;
}

Expected<Interpreter::Flow> Interpreter::exec_for(const Stmt& s) {
  ADAKV_ASSIGN_OR_RETURN(Value seq, eval(*s.expr));
  auto listed = iterate(seq);
  if (!listed.has_value()) return at_line(listed.status(), s.line);
  ValueList items = std::move(listed).value();
  std::shared_ptr<Frame> outer = frame_;
  auto enter = [&]() {
    auto child = std::make_shared<Frame>();
    child->parent = outer;
    frame_ = child;
  };
  if (s.cond) {  // `for x in xs if cond`: filtered before the loop, so loop.length counts survivors
    ValueList kept;
    for (auto& item : items) {
      enter();
      Status st = assign(s.target, item);
      auto c = st.is_ok() ? eval(*s.cond) : Expected<Value>(st);
      frame_ = outer;
      if (!c.has_value()) return c.status();
      if (truthy(*c)) kept.push_back(std::move(item));
    }
    items = std::move(kept);
  }
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) {
    enter();
    auto flow = exec_body(s.else_body);
    frame_ = outer;
    if (!flow.has_value()) return flow.status();
    return Flow::kNormal;
  }
  for (int64_t i = 0; i < n; ++i) {
    ADAKV_RETURN_IF_ERROR(at_line(charge(1), s.line));
    enter();
    Status st = assign(s.target, items[i]);
    if (st.is_ok() && s.uses_loop) frame_->set("loop", loop_object(items, i));
    auto flow = st.is_ok() ? exec_body(s.body) : Expected<Flow>(st);
    frame_ = outer;
    if (!flow.has_value()) return flow.status();
    if (*flow == Flow::kBreak) break;
  }
  return Flow::kNormal;
}

Status Interpreter::assign(const Target& t, const Value& v) {
  switch (t.kind) {
    case Target::Kind::kName:
      frame_->set(t.names[0], v);
      return Status::ok();
    case Target::Kind::kTuple: {
      auto items = iterate(v);
      if (!items.has_value()) return at_line(items.status(), t.line);
      if (items->size() != t.names.size()) {
        return fail(t.line, items->size() > t.names.size()
                                ? "too many values to unpack (expected " + std::to_string(t.names.size()) + ")"
                                : "not enough values to unpack (expected " + std::to_string(t.names.size()) +
                                      ", got " + std::to_string(items->size()) + ")");
      }
      for (size_t i = 0; i < t.names.size(); ++i) frame_->set(t.names[i], (*items)[i]);
      return Status::ok();
    }
    case Target::Kind::kNamespaceAttr: {
      Value ns = lookup(t.names[0]);
      if (!ns.is_namespace()) return fail(t.line, "cannot assign attribute on non-namespace object");
      if (!t.attr.empty() && t.attr[0] == '_') {
        return fail(t.line, "Chat templates cannot store underscore-prefixed attributes on a namespace, but got '" +
                                t.attr + "'");
      }
      ns.ns().attrs.set(Value::string(t.attr), v);
      return Status::ok();
    }
  }
  return Status::ok();
}

Status Interpreter::exec_set(const Stmt& s) {
  if (s.kind == StmtKind::kSet) {
    ADAKV_ASSIGN_OR_RETURN(Value v, eval(*s.expr));
    return assign(s.target, v);
  }
  ADAKV_ASSIGN_OR_RETURN(std::string body, capture(s.body, false));
  Value v = Value::string(std::move(body));
  if (s.expr) {
    ADAKV_ASSIGN_OR_RETURN(v, eval_filter(*s.expr, &v));
  }
  return assign(s.target, v);
}

Expected<Value> Interpreter::call(const Value& fn, const CallArgs& args) {
  if (fn.is_undefined()) return undefined_error(fn);
  if (!fn.is_function()) {
    std::string msg = "'";
    msg += fn.type_name();
    return invalid_argument(msg + "' object is not callable");
  }
  return fn.function().call(*this, args);
}

Expected<Value> Interpreter::call_macro(const Stmt& m, const std::shared_ptr<Frame>& closure, const CallArgs& args) {
  if (call_depth_ >= limits_.max_call_depth) {
    return fail(m.line, "macro '" + m.name + "' nested deeper than " + std::to_string(limits_.max_call_depth) + " calls");
  }
  if (args.positional.size() > m.params.size()) {
    return fail(m.line, "macro '" + m.name + "' takes not more than " + std::to_string(m.params.size()) + " argument(s)");
  }
  auto frame = std::make_shared<Frame>();
  frame->parent = closure;
  std::vector<bool> bound(m.params.size(), false);
  for (size_t i = 0; i < args.positional.size(); ++i) {
    frame->set(m.params[i], args.positional[i]);
    bound[i] = true;
  }
  for (const auto& [key, value] : args.keyword) {
    size_t i = 0;
    while (i < m.params.size() && m.params[i] != key) ++i;
    if (i == m.params.size()) return fail(m.line, "macro '" + m.name + "' takes no keyword argument '" + key + "'");
    if (bound[i]) return fail(m.line, "macro '" + m.name + "' got multiple values for argument '" + key + "'");
    frame->set(key, value);
    bound[i] = true;
  }
  std::shared_ptr<Frame> saved_frame = frame_;
  frame_ = frame;
  ++call_depth_;
  const size_t first_default = m.params.size() - m.defaults.size();
  Status st;
  for (size_t i = 0; i < m.params.size() && st.is_ok(); ++i) {
    if (bound[i]) continue;
    if (i >= first_default) {
      auto d = eval(*m.defaults[i - first_default]);  // defaults see the earlier parameters
      if (d.has_value()) {
        frame->set(m.params[i], std::move(d).value());
      } else {
        st = d.status();
      }
    } else {
      frame->set(m.params[i], Value::undefined("parameter '" + m.params[i] + "' was not provided"));
    }
  }
  auto body = st.is_ok() ? capture(m.body, false) : Expected<std::string>(st);
  --call_depth_;
  frame_ = saved_frame;
  if (!body.has_value()) return body.status();
  return Value::string(std::move(body).value());
}

// --- expressions --------------------------------------------------------------------------

Expected<CallArgs> Interpreter::eval_args(const Expr& e, size_t first_positional) {
  CallArgs args;
  for (size_t i = first_positional; i < e.children.size(); ++i) {
    ADAKV_ASSIGN_OR_RETURN(Value v, eval(*e.children[i]));
    args.positional.push_back(std::move(v));
  }
  for (const auto& [key, expr] : e.kwargs) {
    ADAKV_ASSIGN_OR_RETURN(Value v, eval(*expr));
    args.keyword.emplace_back(key, std::move(v));
  }
  return args;
}

Expected<Value> Interpreter::eval_filter(const Expr& e, const Value* block_input) {
  Value input;
  if (e.children[0]) {
    ADAKV_ASSIGN_OR_RETURN(input, e.children[0]->kind == ExprKind::kFilter
                                      ? eval_filter(*e.children[0], block_input)
                                      : eval(*e.children[0]));
  } else if (block_input != nullptr) {
    input = *block_input;
  }
  ADAKV_ASSIGN_OR_RETURN(CallArgs args, eval_args(e, 1));
  auto r = e.filter(*this, input, args);
  if (!r.has_value()) return at_line(r.status(), e.line);
  return r;
}

Expected<Value> Interpreter::eval(const Expr& e) {
  ADAKV_RETURN_IF_ERROR(at_line(charge(1), e.line));
  auto wrap = [&](Expected<Value> r) -> Expected<Value> {
    if (!r.has_value()) return at_line(r.status(), e.line);
    return r;
  };
  switch (e.kind) {
    case ExprKind::kConst: return e.value;
    case ExprKind::kName: return lookup(e.name);
    case ExprKind::kList:
    case ExprKind::kTuple: {
      ValueList items;
      items.reserve(e.children.size());
      for (const auto& c : e.children) {
        ADAKV_ASSIGN_OR_RETURN(Value v, eval(*c));
        items.push_back(std::move(v));
      }
      return e.kind == ExprKind::kList ? Value::list(std::move(items)) : Value::tuple(std::move(items));
    }
    case ExprKind::kDict: {
      Value::Dict d;
      for (size_t i = 0; i + 1 < e.children.size(); i += 2) {
        ADAKV_ASSIGN_OR_RETURN(Value k, eval(*e.children[i]));
        ADAKV_ASSIGN_OR_RETURN(Value v, eval(*e.children[i + 1]));
        if (k.is_sequence() && !k.is_tuple()) return fail(e.line, "unhashable type: 'list'");
        if (k.is_dict()) return fail(e.line, "unhashable type: 'dict'");
        d.set(std::move(k), std::move(v));
      }
      return Value::dict(std::move(d));
    }
    case ExprKind::kGetAttr: {
      ADAKV_ASSIGN_OR_RETURN(Value obj, eval(*e.children[0]));
      return wrap(get_attr(obj, e.name));
    }
    case ExprKind::kGetItem: {
      ADAKV_ASSIGN_OR_RETURN(Value obj, eval(*e.children[0]));
      ADAKV_ASSIGN_OR_RETURN(Value key, eval(*e.children[1]));
      return wrap(get_item(obj, key));
    }
    case ExprKind::kSlice: {
      ADAKV_ASSIGN_OR_RETURN(Value obj, eval(*e.children[0]));
      Value bounds[3] = {Value::none(), Value::none(), Value::none()};
      for (int i = 0; i < 3; ++i) {
        if (e.children[i + 1]) {
          ADAKV_ASSIGN_OR_RETURN(bounds[i], eval(*e.children[i + 1]));
        }
      }
      auto r = get_slice(obj, bounds[0], bounds[1], bounds[2]);
      if (r.has_value() && r->is_sequence()) {
        ADAKV_RETURN_IF_ERROR(at_line(charge(static_cast<int64_t>(r->items().size())), e.line));
      }
      return wrap(std::move(r));
    }
    case ExprKind::kCall: {
      ADAKV_ASSIGN_OR_RETURN(Value fn, eval(*e.children[0]));
      ADAKV_ASSIGN_OR_RETURN(CallArgs args, eval_args(e, 1));
      return wrap(call(fn, args));
    }
    case ExprKind::kFilter: return eval_filter(e, nullptr);
    case ExprKind::kTest: {
      ADAKV_ASSIGN_OR_RETURN(Value input, eval(*e.children[0]));
      ADAKV_ASSIGN_OR_RETURN(CallArgs args, eval_args(e, 1));
      auto r = e.test(*this, input, args);
      if (!r.has_value()) return at_line(r.status(), e.line);
      return Value::boolean(*r);
    }
    case ExprKind::kNeg:
    case ExprKind::kPos: {
      ADAKV_ASSIGN_OR_RETURN(Value v, eval(*e.children[0]));
      if (v.is_undefined()) return at_line(undefined_error(v), e.line);
      bool neg = e.kind == ExprKind::kNeg;
      if (v.is_int()) {
        if (neg && v.as_int() == std::numeric_limits<int64_t>::min()) return fail(e.line, "integer overflow");
        return Value::integer(neg ? -v.as_int() : v.as_int());
      }
      if (v.is_float()) return Value::number(neg ? -v.as_double() : v.as_double());
      return fail(e.line, std::string("bad operand type for unary ") + (neg ? "-" : "+") + ": '" + v.type_name() + "'");
    }
    case ExprKind::kNot: {
      ADAKV_ASSIGN_OR_RETURN(Value v, eval(*e.children[0]));
      return Value::boolean(!truthy(v));
    }
    case ExprKind::kAnd:
    case ExprKind::kOr: {
      ADAKV_ASSIGN_OR_RETURN(Value left, eval(*e.children[0]));
      bool t = truthy(left);
      if ((e.kind == ExprKind::kAnd) != t) return left;  // Python returns the deciding operand
      return eval(*e.children[1]);
    }
    case ExprKind::kBinary: {
      ADAKV_ASSIGN_OR_RETURN(Value a, eval(*e.children[0]));
      ADAKV_ASSIGN_OR_RETURN(Value b, eval(*e.children[1]));
      return wrap(eval_binary(e, a, b));
    }
    case ExprKind::kConcat: {
      std::string out;
      for (const auto& c : e.children) {
        ADAKV_ASSIGN_OR_RETURN(Value v, eval(*c));
        auto s = to_str(v);
        if (!s.has_value()) return at_line(s.status(), e.line);
        out += *s;
        ADAKV_RETURN_IF_ERROR(at_line(check_size(out.size()), e.line));
      }
      return Value::string(std::move(out));
    }
    case ExprKind::kCompare: return eval_compare(e);
    case ExprKind::kCondExpr: {
      ADAKV_ASSIGN_OR_RETURN(Value c, eval(*e.children[0]));
      if (truthy(c)) return eval(*e.children[1]);
      if (e.children[2]) return eval(*e.children[2]);
      return Value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                              " evaluated to false and no else section was defined");
    }
  }
  return fail(e.line, "unknown expression");
}

Expected<Value> Interpreter::eval_compare(const Expr& e) {
  ADAKV_ASSIGN_OR_RETURN(Value left, eval(*e.children[0]));
  for (size_t i = 0; i < e.ops.size(); ++i) {
    ADAKV_ASSIGN_OR_RETURN(Value right, eval(*e.children[i + 1]));
    const std::string& op = e.ops[i];
    bool result = false;
    if (op == "==" || op == "!=") {
      auto eq = equals(left, right);
      if (!eq.has_value()) return at_line(eq.status(), e.line);
      result = (op == "==") == *eq;
    } else if (op == "in" || op == "notin") {
      bool found = false;
      if (right.is_string()) {
        if (!left.is_string()) {
          return fail(e.line, "'in <string>' requires string as left operand, not " + left.type_name());
        }
        found = right.str().find(left.str()) != std::string::npos;
      } else if (right.is_dict()) {
        found = right.dict().find(left) != nullptr;
      } else if (right.is_sequence() || right.is_generator()) {
        ValueList consumed;
        if (right.is_generator()) {
          auto items = iterate(right);
          if (!items.has_value()) return at_line(items.status(), e.line);
          consumed = std::move(items).value();
        }
        for (const auto& item : right.is_generator() ? consumed : right.items()) {
          auto eq = equals(left, item);
          if (!eq.has_value()) return at_line(eq.status(), e.line);
          if (*eq) {
            found = true;
            break;
          }
        }
      } else if (!right.is_undefined()) {  // Undefined iterates as empty
        return fail(e.line, "argument of type '" + right.type_name() + "' is not iterable");
      }
      result = (op == "in") == found;
    } else {
      if (left.is_undefined() || right.is_undefined()) {
        return at_line(undefined_error(left.is_undefined() ? left : right), e.line);
      }
      auto c = compare(left, right);
      if (!c.has_value()) return at_line(c.status(), e.line);
      result = op == "<" ? *c < 0 : op == "<=" ? *c <= 0 : op == ">" ? *c > 0 : *c >= 0;
    }
    if (!result) return Value::boolean(false);
    left = std::move(right);
  }
  return Value::boolean(true);
}

Expected<Value> Interpreter::eval_binary(const Expr& e, const Value& a, const Value& b) {
  const std::string& op = e.name;
  if (a.is_undefined()) return undefined_error(a);
  if (b.is_undefined()) return undefined_error(b);
  if (a.is_number() && b.is_number()) {
    bool ints = a.is_int() && b.is_int();
    int64_t x = a.as_int(), y = b.as_int(), r = 0;
    double fx = a.as_double(), fy = b.as_double();
    if (op == "+" || op == "-" || op == "*") {
      if (ints) {
        bool overflow = op == "+" ? __builtin_add_overflow(x, y, &r)
                        : op == "-" ? __builtin_sub_overflow(x, y, &r)
                                    : __builtin_mul_overflow(x, y, &r);
        if (overflow) return invalid_argument("integer overflow");
        return Value::integer(r);
      }
      return Value::number(op == "+" ? fx + fy : op == "-" ? fx - fy : fx * fy);
    }
    if (op == "/") {
      if (fy == 0.0) return invalid_argument("division by zero");
      return Value::number(fx / fy);
    }
    if (op == "//" || op == "%") {
      if (ints ? y == 0 : fy == 0.0) return invalid_argument(op == "%" ? "modulo by zero" : "integer division or modulo by zero");
      if (ints) {
        if (x == std::numeric_limits<int64_t>::min() && y == -1) return invalid_argument("integer overflow");
        int64_t q = floor_div(x, y);
        return Value::integer(op == "//" ? q : x - q * y);
      }
      return Value::number(op == "//" ? std::floor(fx / fy) : py_fmod(fx, fy));
    }
    if (op == "**") {
      if (ints && y >= 0) {
        int64_t result = 1, base = x;
        for (int64_t k = y; k > 0; k >>= 1) {
          if ((k & 1) && __builtin_mul_overflow(result, base, &result)) return invalid_argument("integer overflow");
          if (k > 1 && __builtin_mul_overflow(base, base, &base)) return invalid_argument("integer overflow");
        }
        return Value::integer(result);
      }
      if (fx == 0.0 && fy < 0) return invalid_argument("0.0 cannot be raised to a negative power");
      return Value::number(std::pow(fx, fy));
    }
  }
  if (op == "+") {
    if (a.is_string() && b.is_string()) {
      ADAKV_RETURN_IF_ERROR(check_size(a.str().size() + b.str().size()));
      ADAKV_RETURN_IF_ERROR(charge(static_cast<int64_t>((a.str().size() + b.str().size()) / 256)));
      return Value::string(a.str() + b.str());
    }
    if (a.kind() == b.kind() && a.is_sequence()) {
      ValueList items = a.items();
      items.insert(items.end(), b.items().begin(), b.items().end());
      ADAKV_RETURN_IF_ERROR(check_size(items.size()));
      ADAKV_RETURN_IF_ERROR(charge(static_cast<int64_t>(items.size())));
      return a.is_list() ? Value::list(std::move(items)) : Value::tuple(std::move(items));
    }
    if (a.is_string()) return invalid_argument("can only concatenate str (not \"" + b.type_name() + "\") to str");
    return type_error(op, a, b);
  }
  if (op == "*" && ((a.is_int() && (b.is_string() || b.is_sequence())) || (b.is_int() && (a.is_string() || a.is_sequence())))) {
    const Value& seq = a.is_int() ? b : a;
    int64_t n = std::max<int64_t>(0, a.is_int() ? a.as_int() : b.as_int());
    size_t unit = seq.is_string() ? seq.str().size() : seq.items().size();
    if (unit != 0 && static_cast<uint64_t>(n) > limits_.max_output_bytes / unit) return check_size(limits_.max_output_bytes + 1);
    ADAKV_RETURN_IF_ERROR(charge(static_cast<int64_t>(unit * static_cast<size_t>(n) / (seq.is_string() ? 256 : 1))));
    if (seq.is_string()) {
      std::string out;
      out.reserve(unit * static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) out += seq.str();
      return Value::string(std::move(out));
    }
    ValueList items;
    for (int64_t i = 0; i < n; ++i) items.insert(items.end(), seq.items().begin(), seq.items().end());
    return seq.is_list() ? Value::list(std::move(items)) : Value::tuple(std::move(items));
  }
  if (op == "%" && a.is_string()) return invalid_argument("printf-style '%' string formatting is not supported");
  return type_error(op, a, b);
}

}  // namespace adakv::jinja
