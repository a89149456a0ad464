// Parser for chat templates: jinja2's grammar (operator precedence, tests, filters, tuples,
// slices, call arguments) for the statements chat templates use: if/elif/else, for/else (with a
// loop filter), set (with namespace attributes and the block form), macro, filter, with, print,
// break/continue and transformers' {% generation %}.
//
// Everything else is rejected here, with the line: template inheritance and includes, call
// blocks, recursive loops, *args/**kwargs, and filters, tests, methods or functions that
// jinja_builtins does not implement. Nesting is bounded (see kMax* below), so hostile templates
// cannot overflow the stack while parsing or rendering.
#pragma once

#include <vector>

#include "io/jinja_ast.h"
#include "io/jinja_lexer.h"

namespace adakv::jinja {

inline constexpr int kMaxExprDepth = 128;   // height of one expression tree
inline constexpr int kMaxBlockDepth = 64;   // nesting of block statements

// Errors carry "line N: ..." (the caller adds the source name): kDataLoss for syntax errors,
// kUnimplemented for valid Jinja this renderer does not support.
Expected<Body> parse(std::vector<Token> tokens);

}  // namespace adakv::jinja
