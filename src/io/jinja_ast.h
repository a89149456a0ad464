// Syntax tree of a compiled chat template. Built once by the parser (jinja_parser.h), then only
// read by the interpreter, so one compiled template may render on many threads at once.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "io/jinja_value.h"

namespace adakv::jinja {

// A filter or test implementation: input value, call arguments -> result.
using FilterFn = Expected<Value> (*)(Interpreter&, const Value&, const CallArgs&);
using TestFn = Expected<bool> (*)(Interpreter&, const Value&, const CallArgs&);

enum class ExprKind : uint8_t {
  kConst,     // value
  kName,      // name
  kList,      // children: items
  kTuple,     // children: items
  kDict,      // children: key0, value0, key1, value1, ...
  kGetAttr,   // children: [object]; name: attribute
  kGetItem,   // children: [object, index]
  kSlice,     // children: [object, start, stop, step] (null where omitted)
  kCall,      // children: [callee, positional...]; kwargs
  kFilter,    // children: [input, positional...]; kwargs; name; filter
  kTest,      // children: [input, positional...]; kwargs; name; test
  kNeg,       // children: [operand]
  kPos,
  kNot,
  kAnd,       // children: [left, right]
  kOr,
  kBinary,    // children: [left, right]; name: + - * / // % **
  kConcat,    // children: operands of ~
  kCompare,   // children: [first, operand...]; ops[i] applies to children[i + 1]
  kCondExpr,  // children: [test, then, else] (else may be null)
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  ExprKind kind = ExprKind::kConst;
  int line = 0;
  int depth = 1;  // height of this subtree; the parser bounds it so evaluation cannot overflow the stack
  std::string name;
  Value value;
  std::vector<ExprPtr> children;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;  // ==, !=, <, <=, >, >=, in, notin
  FilterFn filter = nullptr;
  TestFn test = nullptr;
};

// Left side of set/for/with: a name, a tuple of names, or namespace.attr.
struct Target {
  enum class Kind : uint8_t { kName, kTuple, kNamespaceAttr } kind = Kind::kName;
  std::vector<std::string> names;  // kName: one; kTuple: several; kNamespaceAttr: the namespace
  std::string attr;
  int line = 0;
};

enum class StmtKind : uint8_t {
  kData,         // text
  kOutput,       // {{ expr }}
  kIf,           // branches (condition null for else)
  kFor,          // target, expr (iterable), cond (loop filter), body, else_body
  kSet,          // target = expr
  kSetBlock,     // {% set target [| filter] %}body{% endset %}; expr: filter (input null) or null
  kMacro,        // name, params, defaults (for the last defaults.size() params), body
  kFilterBlock,  // expr: filter chain (input null); body
  kWith,         // targets = values; body
  kScope,        // body in a child scope ({% generation %} of transformers' AssistantTracker)
  kBreak,
  kContinue,
};

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;

struct Stmt {
  StmtKind kind = StmtKind::kData;
  int line = 0;
  std::string text;
  ExprPtr expr;
  ExprPtr cond;
  Target target;
  Body body;
  Body else_body;
  std::vector<std::pair<ExprPtr, Body>> branches;
  std::string name;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;
  std::vector<Target> targets;
  std::vector<ExprPtr> values;
  bool uses_loop = false;  // kFor: the body mentions `loop`, so the loop object is built
};

struct Program {
  std::string source;  // where the template came from, for error messages
  Body body;
};

}  // namespace adakv::jinja
