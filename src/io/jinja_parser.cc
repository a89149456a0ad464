#include "io/jinja_parser.h"

#include <algorithm>
#include <initializer_list>
#include <set>
#include <string_view>

#include "io/jinja_builtins.h"

namespace adakv::jinja {
namespace {

using Names = std::initializer_list<std::string_view>;

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  Expected<Body> run() {
    ADAKV_ASSIGN_OR_RETURN(Body body, subparse({}));
    if (cur().kind != TokenKind::kEof) return syntax(cur().line, "unexpected " + describe(cur()));
    // Calls of plain names must reach a global function or a macro of this template.
    for (const auto& [name, line] : called_names_) {
      if (!is_global_function(name) && macro_names_.count(name) == 0) {
        return unsupported(line, "call of unknown function '" + name + "'");
      }
    }
    return body;
  }

 private:
  // --- token stream -------------------------------------------------------------------------
  const Token& cur() const { return t_[pos_]; }
  const Token& look() const { return t_[std::min(pos_ + 1, t_.size() - 1)]; }
  void next() {
    if (pos_ + 1 < t_.size()) ++pos_;
  }
  bool is_name(std::string_view v) const { return cur().kind == TokenKind::kName && cur().text == v; }
  bool is_name_in(Names names) const {
    return cur().kind == TokenKind::kName &&
           std::find(names.begin(), names.end(), std::string_view(cur().text)) != names.end();
  }
  bool is_op(std::string_view v) const { return cur().kind == TokenKind::kOperator && cur().text == v; }
  bool skip_op(std::string_view v) {
    if (!is_op(v)) return false;
    next();
    return true;
  }
  bool skip_name(std::string_view v) {
    if (!is_name(v)) return false;
    next();
    return true;
  }

  static std::string describe(const Token& t) {
    switch (t.kind) {
      case TokenKind::kData: return "template data";
      case TokenKind::kVariableBegin: return "'{{'";
      case TokenKind::kVariableEnd: return "'}}'";
      case TokenKind::kBlockBegin: return "'{%'";
      case TokenKind::kBlockEnd: return "end of statement block";
      case TokenKind::kName: return "'" + t.text + "'";
      case TokenKind::kString: return "string";
      case TokenKind::kInteger: return "integer";
      case TokenKind::kFloat: return "float";
      case TokenKind::kOperator: return "'" + t.text + "'";
      case TokenKind::kEof: return "end of template";
    }
    return "token";
  }
  static Status syntax(int line, const std::string& msg) {
    return data_loss("line " + std::to_string(line) + ": syntax error: " + msg);
  }
  static Status unsupported(int line, const std::string& msg) {
    return unimplemented("line " + std::to_string(line) + ": unsupported: " + msg);
  }
  Status expect_op(std::string_view v) {
    if (!skip_op(v)) return syntax(cur().line, "expected '" + std::string(v) + "', got " + describe(cur()));
    return Status::ok();
  }
  Status expect_kind(TokenKind k, const char* what) {
    if (cur().kind != k) return syntax(cur().line, std::string("expected ") + what + ", got " + describe(cur()));
    next();
    return Status::ok();
  }
  Expected<std::string> expect_name() {
    if (cur().kind != TokenKind::kName) return syntax(cur().line, "expected a name, got " + describe(cur()));
    std::string n = cur().text;
    next();
    return n;
  }
  Status expect_name_value(std::string_view v) {
    if (!skip_name(v)) return syntax(cur().line, "expected '" + std::string(v) + "', got " + describe(cur()));
    return Status::ok();
  }

  // --- node construction --------------------------------------------------------------------
  Expected<ExprPtr> make(ExprKind kind, int line, std::vector<ExprPtr> children = {}) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    e->children = std::move(children);
    ADAKV_RETURN_IF_ERROR(finish(*e));
    return e;
  }
  Status finish(Expr& e) {
    int d = 0;
    for (const auto& c : e.children) d = std::max(d, c ? c->depth : 0);
    for (const auto& kv : e.kwargs) d = std::max(d, kv.second->depth);
    e.depth = d + 1;
    if (e.depth > kMaxExprDepth) {
      return unsupported(e.line, "expression nested deeper than " + std::to_string(kMaxExprDepth) + " levels");
    }
    return Status::ok();
  }
  ExprPtr constant(Value v, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = ExprKind::kConst;
    e->line = line;
    e->value = std::move(v);
    return e;
  }

  // --- statements ---------------------------------------------------------------------------
  struct DepthGuard {
    int& d;
    explicit DepthGuard(int& depth) : d(depth) { ++d; }
    ~DepthGuard() { --d; }
  };

  // Statements until a block tag whose name is in `end` (left as the current token) or EOF.
  Expected<Body> subparse(Names end) {
    DepthGuard guard(block_depth_);
    if (block_depth_ > kMaxBlockDepth) {
      return unsupported(cur().line, "blocks nested deeper than " + std::to_string(kMaxBlockDepth) + " levels");
    }
    Body body;
    while (cur().kind != TokenKind::kEof) {
      const Token& tok = cur();
      if (tok.kind == TokenKind::kData) {
        auto s = std::make_unique<Stmt>();
        s->kind = StmtKind::kData;
        s->line = tok.line;
        s->text = tok.text;
        body.push_back(std::move(s));
        next();
      } else if (tok.kind == TokenKind::kVariableBegin) {
        next();
        auto s = std::make_unique<Stmt>();
        s->kind = StmtKind::kOutput;
        s->line = tok.line;
        ADAKV_ASSIGN_OR_RETURN(s->expr, parse_tuple(false, true, {}, false));
        ADAKV_RETURN_IF_ERROR(expect_kind(TokenKind::kVariableEnd, "'}}'"));
        body.push_back(std::move(s));
      } else if (tok.kind == TokenKind::kBlockBegin) {
        next();
        if (end.size() > 0 && is_name_in(end)) return body;
        ADAKV_RETURN_IF_ERROR(parse_statement(body));
        ADAKV_RETURN_IF_ERROR(expect_kind(TokenKind::kBlockEnd, "'%}'"));
      } else {
        return syntax(tok.line, "unexpected " + describe(tok));
      }
    }
    return body;
  }

  // The body of a block statement: '%}' then statements up to one of `end` (left current).
  Expected<Body> parse_statements(Names end, bool drop_needle, std::string_view opener, int open_line) {
    skip_op(":");
    ADAKV_RETURN_IF_ERROR(expect_kind(TokenKind::kBlockEnd, "'%}'"));
    ADAKV_ASSIGN_OR_RETURN(Body body, subparse(end));
    if (cur().kind == TokenKind::kEof) {
      std::string want;
      for (std::string_view e : end) want += (want.empty() ? "'" : " or '") + std::string(e) + "'";
      return syntax(open_line, "'{% " + std::string(opener) + " %}' is never closed (expected " + want + ")");
    }
    if (drop_needle) next();
    return body;
  }

  Status parse_statement(Body& out) {
    const Token& tok = cur();
    int line = tok.line;
    if (tok.kind != TokenKind::kName) return syntax(line, "tag name expected");
    const std::string name = tok.text;
    auto s = std::make_unique<Stmt>();
    s->line = line;
    if (name == "if") {
      ADAKV_RETURN_IF_ERROR(parse_if(*s));
    } else if (name == "for") {
      ADAKV_RETURN_IF_ERROR(parse_for(*s));
    } else if (name == "set") {
      ADAKV_RETURN_IF_ERROR(parse_set(*s));
    } else if (name == "macro") {
      ADAKV_RETURN_IF_ERROR(parse_macro(*s));
    } else if (name == "filter") {
      next();
      s->kind = StmtKind::kFilterBlock;
      ADAKV_ASSIGN_OR_RETURN(s->expr, parse_filter(nullptr, true));
      ADAKV_ASSIGN_OR_RETURN(s->body, parse_statements({"endfilter"}, true, "filter", line));
    } else if (name == "with") {
      ADAKV_RETURN_IF_ERROR(parse_with(*s));
    } else if (name == "generation") {
      next();
      s->kind = StmtKind::kScope;
      ADAKV_ASSIGN_OR_RETURN(s->body, parse_statements({"endgeneration"}, true, "generation", line));
    } else if (name == "print") {
      next();
      for (bool first = true; cur().kind != TokenKind::kBlockEnd; first = false) {
        if (!first) ADAKV_RETURN_IF_ERROR(expect_op(","));
        auto o = std::make_unique<Stmt>();
        o->kind = StmtKind::kOutput;
        o->line = line;
        ADAKV_ASSIGN_OR_RETURN(o->expr, parse_expression(true));
        out.push_back(std::move(o));
      }
      return Status::ok();
    } else if (name == "break" || name == "continue") {
      next();
      if (loop_depth_ == 0) return syntax(line, "'" + name + "' outside loop");
      s->kind = name == "break" ? StmtKind::kBreak : StmtKind::kContinue;
    } else if (name == "block" || name == "extends" || name == "include" || name == "import" ||
               name == "from" || name == "call" || name == "autoescape") {
      return unsupported(line, "'{% " + name + " %}'");
    } else {
      return syntax(line, "unknown tag '" + name + "'");
    }
    out.push_back(std::move(s));
    return Status::ok();
  }

  Status parse_if(Stmt& s) {
    int line = cur().line;
    next();
    s.kind = StmtKind::kIf;
    while (true) {
      ADAKV_ASSIGN_OR_RETURN(ExprPtr cond, parse_tuple(false, false, {}, false));
      ADAKV_ASSIGN_OR_RETURN(Body body, parse_statements({"elif", "else", "endif"}, false, "if", line));
      s.branches.emplace_back(std::move(cond), std::move(body));
      std::string tag = cur().text;
      next();
      if (tag == "elif") continue;
      if (tag == "else") {
        ADAKV_ASSIGN_OR_RETURN(Body else_body, parse_statements({"endif"}, true, "if", line));
        s.branches.emplace_back(nullptr, std::move(else_body));
      }
      return Status::ok();
    }
  }

  Status parse_for(Stmt& s) {
    int line = cur().line;
    next();
    s.kind = StmtKind::kFor;
    ADAKV_ASSIGN_OR_RETURN(s.target, parse_assign_target(true, false, {"in"}));
    ADAKV_RETURN_IF_ERROR(expect_name_value("in"));
    ADAKV_ASSIGN_OR_RETURN(s.expr, parse_tuple(false, false, {"recursive"}, false));
    if (skip_name("if")) {
      ADAKV_ASSIGN_OR_RETURN(s.cond, parse_expression(true));
    }
    if (is_name("recursive")) return unsupported(cur().line, "recursive for loops");
    ++loop_depth_;
    const int loop_refs_before = loop_refs_;
    auto body = parse_statements({"endfor", "else"}, false, "for", line);
    s.uses_loop = loop_refs_ != loop_refs_before;
    --loop_depth_;
    if (!body.has_value()) return body.status();
    s.body = std::move(body).value();
    std::string tag = cur().text;
    next();
    if (tag == "else") {
      ADAKV_ASSIGN_OR_RETURN(s.else_body, parse_statements({"endfor"}, true, "for", line));
    }
    return Status::ok();
  }

  Status parse_set(Stmt& s) {
    int line = cur().line;
    next();
    ADAKV_ASSIGN_OR_RETURN(s.target, parse_assign_target(true, true, {}));
    if (skip_op("=")) {
      s.kind = StmtKind::kSet;
      ADAKV_ASSIGN_OR_RETURN(s.expr, parse_tuple(false, true, {}, false));
      return Status::ok();
    }
    s.kind = StmtKind::kSetBlock;
    if (is_op("|")) {
      ADAKV_ASSIGN_OR_RETURN(s.expr, parse_filter(nullptr, false));
    }
    ADAKV_ASSIGN_OR_RETURN(s.body, parse_statements({"endset"}, true, "set", line));
    return Status::ok();
  }

  Status parse_macro(Stmt& s) {
    int line = cur().line;
    next();
    s.kind = StmtKind::kMacro;
    ADAKV_ASSIGN_OR_RETURN(s.name, expect_name());
    macro_names_.insert(s.name);
    ADAKV_RETURN_IF_ERROR(expect_op("("));
    while (!is_op(")")) {
      if (!s.params.empty()) ADAKV_RETURN_IF_ERROR(expect_op(","));
      ADAKV_ASSIGN_OR_RETURN(std::string param, expect_name());
      if (skip_op("=")) {
        ADAKV_ASSIGN_OR_RETURN(ExprPtr d, parse_expression(true));
        s.defaults.push_back(std::move(d));
      } else if (!s.defaults.empty()) {
        return syntax(cur().line, "non-default argument follows default argument");
      }
      s.params.push_back(std::move(param));
    }
    ADAKV_RETURN_IF_ERROR(expect_op(")"));
    int saved_loops = loop_depth_;
    loop_depth_ = 0;  // break/continue cannot cross a macro
    auto body = parse_statements({"endmacro"}, true, "macro", line);
    loop_depth_ = saved_loops;
    if (!body.has_value()) return body.status();
    s.body = std::move(body).value();
    return Status::ok();
  }

  Status parse_with(Stmt& s) {
    int line = cur().line;
    next();
    s.kind = StmtKind::kWith;
    while (cur().kind != TokenKind::kBlockEnd) {
      if (!s.targets.empty()) ADAKV_RETURN_IF_ERROR(expect_op(","));
      ADAKV_ASSIGN_OR_RETURN(Target t, parse_assign_target(true, false, {}));
      ADAKV_RETURN_IF_ERROR(expect_op("="));
      ADAKV_ASSIGN_OR_RETURN(ExprPtr v, parse_expression(true));
      s.targets.push_back(std::move(t));
      s.values.push_back(std::move(v));
    }
    ADAKV_ASSIGN_OR_RETURN(s.body, parse_statements({"endwith"}, true, "with", line));
    return Status::ok();
  }

  Expected<Target> parse_assign_target(bool with_tuple, bool with_namespace, Names extra_end) {
    int line = cur().line;
    ExprPtr e;
    if (with_tuple) {
      ADAKV_ASSIGN_OR_RETURN(e, parse_tuple(true, true, extra_end, false, with_namespace));
    } else {
      ADAKV_ASSIGN_OR_RETURN(e, parse_primary(with_namespace));
    }
    Target t;
    t.line = line;
    if (e->kind == ExprKind::kName) {
      t.kind = Target::Kind::kName;
      t.names.push_back(e->name);
      return t;
    }
    if (e->kind == ExprKind::kGetAttr && e->children[0]->kind == ExprKind::kName) {
      t.kind = Target::Kind::kNamespaceAttr;
      t.names.push_back(e->children[0]->name);
      t.attr = e->name;
      return t;
    }
    if (e->kind == ExprKind::kTuple) {
      t.kind = Target::Kind::kTuple;
      for (const auto& c : e->children) {
        if (c->kind != ExprKind::kName) return unsupported(line, "nested or non-name assignment targets");
        t.names.push_back(c->name);
      }
      return t;
    }
    return syntax(line, "can't assign to this expression");
  }

  // --- expressions (jinja2's precedence, loosest first) -------------------------------------
  Expected<ExprPtr> parse_expression(bool with_condexpr) {
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  Expected<ExprPtr> parse_condexpr() {
    int line = cur().line;
    DepthGuard guard(expr_depth_);
    if (expr_depth_ > kMaxExprDepth) return unsupported(line, "expression nested too deeply");
    ADAKV_ASSIGN_OR_RETURN(ExprPtr expr1, parse_or());
    while (skip_name("if")) {
      ADAKV_ASSIGN_OR_RETURN(ExprPtr cond, parse_or());
      ExprPtr otherwise;
      if (skip_name("else")) {
        ADAKV_ASSIGN_OR_RETURN(otherwise, parse_condexpr());
      }
      std::vector<ExprPtr> kids;
      kids.push_back(std::move(cond));
      kids.push_back(std::move(expr1));
      kids.push_back(std::move(otherwise));
      ADAKV_ASSIGN_OR_RETURN(expr1, make(ExprKind::kCondExpr, line, std::move(kids)));
    }
    return expr1;
  }

  template <typename Sub>
  Expected<ExprPtr> parse_left_assoc(Sub sub, Names ops, bool names_are_keywords, ExprKind kind) {
    int line = cur().line;
    ADAKV_ASSIGN_OR_RETURN(ExprPtr left, (this->*sub)());
    while (true) {
      bool hit = names_are_keywords ? is_name_in(ops)
                                    : (cur().kind == TokenKind::kOperator &&
                                       std::find(ops.begin(), ops.end(), std::string_view(cur().text)) != ops.end());
      if (!hit) break;
      std::string op = cur().text;
      next();
      ADAKV_ASSIGN_OR_RETURN(ExprPtr right, (this->*sub)());
      std::vector<ExprPtr> kids;
      kids.push_back(std::move(left));
      kids.push_back(std::move(right));
      ADAKV_ASSIGN_OR_RETURN(left, make(kind, line, std::move(kids)));
      left->name = op;
    }
    return left;
  }

  Expected<ExprPtr> parse_or() { return parse_left_assoc(&Parser::parse_and, {"or"}, true, ExprKind::kOr); }
  Expected<ExprPtr> parse_and() { return parse_left_assoc(&Parser::parse_not, {"and"}, true, ExprKind::kAnd); }

  Expected<ExprPtr> parse_not() {
    if (is_name("not")) {
      int line = cur().line;
      next();
      DepthGuard guard(expr_depth_);
      if (expr_depth_ > kMaxExprDepth) return unsupported(line, "expression nested too deeply");
      ADAKV_ASSIGN_OR_RETURN(ExprPtr operand, parse_not());
      std::vector<ExprPtr> kids;
      kids.push_back(std::move(operand));
      return make(ExprKind::kNot, line, std::move(kids));
    }
    return parse_compare();
  }

  Expected<ExprPtr> parse_compare() {
    int line = cur().line;
    ADAKV_ASSIGN_OR_RETURN(ExprPtr first, parse_math1());
    std::vector<ExprPtr> kids;
    std::vector<std::string> ops;
    while (true) {
      std::string op;
      if (cur().kind == TokenKind::kOperator &&
          (cur().text == "==" || cur().text == "!=" || cur().text == "<" || cur().text == "<=" ||
           cur().text == ">" || cur().text == ">=")) {
        op = cur().text;
        next();
      } else if (is_name("in")) {
        op = "in";
        next();
      } else if (is_name("not") && look().kind == TokenKind::kName && look().text == "in") {
        op = "notin";
        next();
        next();
      } else {
        break;
      }
      ADAKV_ASSIGN_OR_RETURN(ExprPtr operand, parse_math1());
      kids.push_back(std::move(operand));
      ops.push_back(std::move(op));
    }
    if (ops.empty()) return first;
    kids.insert(kids.begin(), std::move(first));
    ADAKV_ASSIGN_OR_RETURN(ExprPtr cmp, make(ExprKind::kCompare, line, std::move(kids)));
    cmp->ops = std::move(ops);
    return cmp;
  }

  Expected<ExprPtr> parse_math1() {
    return parse_left_assoc(&Parser::parse_concat, {"+", "-"}, false, ExprKind::kBinary);
  }

  Expected<ExprPtr> parse_concat() {
    int line = cur().line;
    ADAKV_ASSIGN_OR_RETURN(ExprPtr first, parse_math2());
    if (!is_op("~")) return first;
    std::vector<ExprPtr> kids;
    kids.push_back(std::move(first));
    while (skip_op("~")) {
      ADAKV_ASSIGN_OR_RETURN(ExprPtr operand, parse_math2());
      kids.push_back(std::move(operand));
    }
    return make(ExprKind::kConcat, line, std::move(kids));
  }

  Expected<ExprPtr> parse_math2() {
    return parse_left_assoc(&Parser::parse_pow, {"*", "/", "//", "%"}, false, ExprKind::kBinary);
  }
  Expected<ExprPtr> parse_pow() { return parse_left_assoc(&Parser::parse_unary_filtered, {"**"}, false, ExprKind::kBinary); }
  Expected<ExprPtr> parse_unary_filtered() { return parse_unary(true); }

  Expected<ExprPtr> parse_unary(bool with_filter) {
    int line = cur().line;
    DepthGuard guard(expr_depth_);
    if (expr_depth_ > kMaxExprDepth) return unsupported(line, "expression nested too deeply");
    ExprPtr node;
    if (is_op("-") || is_op("+")) {
      ExprKind kind = is_op("-") ? ExprKind::kNeg : ExprKind::kPos;
      next();
      ADAKV_ASSIGN_OR_RETURN(ExprPtr operand, parse_unary(false));
      std::vector<ExprPtr> kids;
      kids.push_back(std::move(operand));
      ADAKV_ASSIGN_OR_RETURN(node, make(kind, line, std::move(kids)));
    } else {
      ADAKV_ASSIGN_OR_RETURN(node, parse_primary(false));
    }
    ADAKV_ASSIGN_OR_RETURN(node, parse_postfix(std::move(node)));
    if (with_filter) {
      ADAKV_ASSIGN_OR_RETURN(node, parse_filter_expr(std::move(node)));
    }
    return node;
  }

  Expected<ExprPtr> parse_primary(bool with_namespace) {
    const Token& tok = cur();
    int line = tok.line;
    if (tok.kind == TokenKind::kName) {
      std::string name = tok.text;
      next();
      if (name == "true" || name == "True" || name == "false" || name == "False") {
        return constant(Value::boolean(name == "true" || name == "True"), line);
      }
      if (name == "none" || name == "None") return constant(Value::none(), line);
      auto n = std::make_unique<Expr>();
      n->kind = ExprKind::kName;
      n->line = line;
      n->name = name;
      if (name == "loop") ++loop_refs_;
      if (with_namespace && is_op(".")) {
        next();
        ADAKV_ASSIGN_OR_RETURN(std::string attr, expect_name());
        std::vector<ExprPtr> kids;
        kids.push_back(std::move(n));
        ADAKV_ASSIGN_OR_RETURN(ExprPtr ref, make(ExprKind::kGetAttr, line, std::move(kids)));
        ref->name = attr;
        return ref;
      }
      return n;
    }
    if (tok.kind == TokenKind::kString) {
      std::string text;
      while (cur().kind == TokenKind::kString) {  // adjacent literals concatenate
        text += cur().text;
        next();
      }
      return constant(Value::string(std::move(text)), line);
    }
    if (tok.kind == TokenKind::kInteger || tok.kind == TokenKind::kFloat) {
      Value v = tok.kind == TokenKind::kInteger ? Value::integer(tok.int_value) : Value::number(tok.float_value);
      next();
      return constant(std::move(v), line);
    }
    if (is_op("(")) {
      next();
      ADAKV_ASSIGN_OR_RETURN(ExprPtr inner, parse_tuple(false, true, {}, true));
      ADAKV_RETURN_IF_ERROR(expect_op(")"));
      return inner;
    }
    if (is_op("[")) return parse_list();
    if (is_op("{")) return parse_dict();
    return syntax(line, "unexpected " + describe(tok));
  }

  bool is_tuple_end(Names extra_end) const {
    if (cur().kind == TokenKind::kVariableEnd || cur().kind == TokenKind::kBlockEnd || is_op(")")) return true;
    return extra_end.size() > 0 && is_name_in(extra_end);
  }

  Expected<ExprPtr> parse_tuple(bool simplified, bool with_condexpr, Names extra_end, bool explicit_parens,
                                bool with_namespace = false) {
    int line = cur().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) ADAKV_RETURN_IF_ERROR(expect_op(","));
      if (is_tuple_end(extra_end)) break;
      ExprPtr item;
      if (simplified) {
        ADAKV_ASSIGN_OR_RETURN(item, parse_primary(with_namespace));
      } else {
        ADAKV_ASSIGN_OR_RETURN(item, parse_expression(with_condexpr));
      }
      items.push_back(std::move(item));
      if (is_op(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens) return syntax(line, "expected an expression, got " + describe(cur()));
    }
    return make(ExprKind::kTuple, line, std::move(items));
  }

  Expected<ExprPtr> parse_list() {
    int line = cur().line;
    next();
    std::vector<ExprPtr> items;
    while (!is_op("]")) {
      if (!items.empty()) ADAKV_RETURN_IF_ERROR(expect_op(","));
      if (is_op("]")) break;
      ADAKV_ASSIGN_OR_RETURN(ExprPtr item, parse_expression(true));
      items.push_back(std::move(item));
    }
    ADAKV_RETURN_IF_ERROR(expect_op("]"));
    return make(ExprKind::kList, line, std::move(items));
  }

  Expected<ExprPtr> parse_dict() {
    int line = cur().line;
    next();
    std::vector<ExprPtr> items;
    while (!is_op("}")) {
      if (!items.empty()) ADAKV_RETURN_IF_ERROR(expect_op(","));
      if (is_op("}")) break;
      ADAKV_ASSIGN_OR_RETURN(ExprPtr key, parse_expression(true));
      ADAKV_RETURN_IF_ERROR(expect_op(":"));
      ADAKV_ASSIGN_OR_RETURN(ExprPtr value, parse_expression(true));
      items.push_back(std::move(key));
      items.push_back(std::move(value));
    }
    ADAKV_RETURN_IF_ERROR(expect_op("}"));
    return make(ExprKind::kDict, line, std::move(items));
  }

  Expected<ExprPtr> parse_postfix(ExprPtr node) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        ADAKV_ASSIGN_OR_RETURN(node, parse_subscript(std::move(node)));
      } else if (is_op("(")) {
        ADAKV_ASSIGN_OR_RETURN(node, parse_call(std::move(node)));
      } else {
        return node;
      }
    }
  }

  Expected<ExprPtr> parse_filter_expr(ExprPtr node) {
    while (true) {
      if (is_op("|")) {
        ADAKV_ASSIGN_OR_RETURN(node, parse_filter(std::move(node), false));
      } else if (is_name("is")) {
        ADAKV_ASSIGN_OR_RETURN(node, parse_test(std::move(node)));
      } else if (is_op("(")) {
        ADAKV_ASSIGN_OR_RETURN(node, parse_call(std::move(node)));
      } else {
        return node;
      }
    }
  }

  Expected<ExprPtr> parse_subscript(ExprPtr node) {
    int line = cur().line;
    bool dot = is_op(".");
    next();
    std::vector<ExprPtr> kids;
    kids.push_back(std::move(node));
    if (dot) {
      if (cur().kind == TokenKind::kName) {
        std::string attr = cur().text;
        next();
        ADAKV_ASSIGN_OR_RETURN(ExprPtr e, make(ExprKind::kGetAttr, line, std::move(kids)));
        e->name = attr;
        return e;
      }
      if (cur().kind != TokenKind::kInteger) return syntax(cur().line, "expected name or number after '.'");
      kids.push_back(constant(Value::integer(cur().int_value), cur().line));
      next();
      return make(ExprKind::kGetItem, line, std::move(kids));
    }
    std::vector<ExprPtr> args;
    bool any_slice = false;
    while (!is_op("]")) {
      if (!args.empty()) ADAKV_RETURN_IF_ERROR(expect_op(","));
      bool slice = false;
      ADAKV_ASSIGN_OR_RETURN(ExprPtr a, parse_subscribed(slice));
      any_slice = any_slice || slice;
      args.push_back(std::move(a));
    }
    ADAKV_RETURN_IF_ERROR(expect_op("]"));
    if (args.size() != 1) return unsupported(line, "subscripts with several indices");
    if (any_slice) {
      // parse_subscribed packs a slice as a tuple of its three bounds.
      for (auto& b : args[0]->children) kids.push_back(std::move(b));
      return make(ExprKind::kSlice, line, std::move(kids));
    }
    kids.push_back(std::move(args[0]));
    return make(ExprKind::kGetItem, line, std::move(kids));
  }

  // One subscript: an expression, or start:stop:step (returned as a tuple node, slice = true).
  Expected<ExprPtr> parse_subscribed(bool& slice) {
    int line = cur().line;
    std::vector<ExprPtr> bounds;
    if (is_op(":")) {
      next();
      bounds.push_back(nullptr);
    } else {
      ADAKV_ASSIGN_OR_RETURN(ExprPtr e, parse_expression(true));
      if (!is_op(":")) return e;
      next();
      bounds.push_back(std::move(e));
    }
    slice = true;
    if (is_op(":")) {
      bounds.push_back(nullptr);
    } else if (!is_op("]") && !is_op(",")) {
      ADAKV_ASSIGN_OR_RETURN(ExprPtr e, parse_expression(true));
      bounds.push_back(std::move(e));
    } else {
      bounds.push_back(nullptr);
    }
    if (is_op(":")) {
      next();
      if (!is_op("]") && !is_op(",")) {
        ADAKV_ASSIGN_OR_RETURN(ExprPtr e, parse_expression(true));
        bounds.push_back(std::move(e));
      } else {
        bounds.push_back(nullptr);
      }
    } else {
      bounds.push_back(nullptr);
    }
    return make(ExprKind::kTuple, line, std::move(bounds));
  }

  // '(' args ')' into e->children (after those already there) and e->kwargs.
  Status parse_call_args(Expr& e) {
    int line = cur().line;
    ADAKV_RETURN_IF_ERROR(expect_op("("));
    bool require_comma = false;
    while (!is_op(")")) {
      if (require_comma) {
        ADAKV_RETURN_IF_ERROR(expect_op(","));
        if (is_op(")")) break;
      }
      if (is_op("*") || is_op("**")) return unsupported(cur().line, "*args and **kwargs in calls");
      if (cur().kind == TokenKind::kName && look().kind == TokenKind::kOperator && look().text == "=") {
        std::string key = cur().text;
        next();
        next();
        ADAKV_ASSIGN_OR_RETURN(ExprPtr v, parse_expression(true));
        e.kwargs.emplace_back(std::move(key), std::move(v));
      } else {
        if (!e.kwargs.empty()) return syntax(line, "invalid syntax for function call expression");
        ADAKV_ASSIGN_OR_RETURN(ExprPtr v, parse_expression(true));
        e.children.push_back(std::move(v));
      }
      require_comma = true;
    }
    ADAKV_RETURN_IF_ERROR(expect_op(")"));
    return finish(e);
  }

  Expected<ExprPtr> parse_call(ExprPtr callee) {
    int line = cur().line;
    if (callee->kind == ExprKind::kGetAttr && !is_method_name(callee->name)) {
      return unsupported(line, "method '" + callee->name + "'");
    }
    if (callee->kind == ExprKind::kName) called_names_.emplace_back(callee->name, line);
    std::vector<ExprPtr> kids;
    kids.push_back(std::move(callee));
    ADAKV_ASSIGN_OR_RETURN(ExprPtr call, make(ExprKind::kCall, line, std::move(kids)));
    ADAKV_RETURN_IF_ERROR(parse_call_args(*call));
    return call;
  }

  Expected<ExprPtr> parse_dotted_name() {
    ADAKV_ASSIGN_OR_RETURN(std::string name, expect_name());
    while (skip_op(".")) {
      ADAKV_ASSIGN_OR_RETURN(std::string part, expect_name());
      name += "." + part;
    }
    auto e = std::make_unique<Expr>();
    e->name = std::move(name);
    return e;
  }

  // `| name(args)` chains; `input` null for {% filter %} and {% set x | f %} blocks.
  Expected<ExprPtr> parse_filter(ExprPtr input, bool start_inline) {
    while (is_op("|") || start_inline) {
      if (!start_inline) next();
      start_inline = false;
      int line = cur().line;
      ADAKV_ASSIGN_OR_RETURN(ExprPtr f, parse_dotted_name());
      f->kind = ExprKind::kFilter;
      f->line = line;
      f->filter = find_filter(f->name);
      if (f->filter == nullptr) return unsupported(line, "filter '" + f->name + "'");
      f->children.push_back(std::move(input));
      if (is_op("(")) {
        ADAKV_RETURN_IF_ERROR(parse_call_args(*f));
      } else {
        ADAKV_RETURN_IF_ERROR(finish(*f));
      }
      input = std::move(f);
    }
    return input;
  }

  Expected<ExprPtr> parse_test(ExprPtr input) {
    int line = cur().line;
    next();  // 'is'
    bool negated = skip_name("not");
    ADAKV_ASSIGN_OR_RETURN(ExprPtr t, parse_dotted_name());
    t->kind = ExprKind::kTest;
    t->line = line;
    t->test = find_test(t->name);
    if (t->test == nullptr) return unsupported(line, "test '" + t->name + "'");
    t->children.push_back(std::move(input));
    const Token& c = cur();
    bool arg_start = c.kind == TokenKind::kName || c.kind == TokenKind::kString || c.kind == TokenKind::kInteger ||
                     c.kind == TokenKind::kFloat || is_op("[") || is_op("{");
    if (is_op("(")) {
      ADAKV_RETURN_IF_ERROR(parse_call_args(*t));
    } else if (arg_start && !is_name_in({"else", "or", "and"})) {
      // jinja2 takes one primary without parentheses: `x is divisibleby 3`, `x is sameas none`.
      if (is_name("is")) return syntax(line, "you cannot chain multiple tests with is");
      ADAKV_ASSIGN_OR_RETURN(ExprPtr arg, parse_primary(false));
      ADAKV_ASSIGN_OR_RETURN(arg, parse_postfix(std::move(arg)));
      t->children.push_back(std::move(arg));
      ADAKV_RETURN_IF_ERROR(finish(*t));
    } else {
      ADAKV_RETURN_IF_ERROR(finish(*t));
    }
    if (!negated) return t;
    std::vector<ExprPtr> kids;
    kids.push_back(std::move(t));
    return make(ExprKind::kNot, line, std::move(kids));
  }

  std::vector<Token> t_;
  size_t pos_ = 0;
  int block_depth_ = 0;
  int expr_depth_ = 0;
  int loop_depth_ = 0;
  int loop_refs_ = 0;  // Name("loop") nodes built so far
  std::set<std::string> macro_names_;
  std::vector<std::pair<std::string, int>> called_names_;
};

}  // namespace

Expected<Body> parse(std::vector<Token> tokens) {
  if (tokens.empty() || tokens.back().kind != TokenKind::kEof) return internal_error("token stream without EOF");
  return Parser(std::move(tokens)).run();
}

}  // namespace adakv::jinja
