// Status and Expected<T>: the error channel for everything that can legitimately fail
// (bad files, bad requests, out of memory). Broken invariants use ADAKV_CHECK instead.
#pragma once

#include <cassert>
#include <string>
#include <utility>
#include <variant>

namespace adakv {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // bad user input (flags, requests, budgets)
  kNotFound,         // missing file or tensor
  kDataLoss,         // malformed or truncated file
  kUnimplemented,    // unsupported model or feature
  kOutOfRange,       // e.g. prompt longer than the context
  kResourceExhausted,
  kInternal,
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return {}; }
  bool is_ok() const { return code_ == StatusCode::kOk; }
  explicit operator bool() const { return is_ok(); }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // Prefixes context, e.g. the file name: "model.safetensors: header truncated".
  Status with_context(const std::string& context) const {
    if (is_ok()) return *this;
    return Status(code_, context + ": " + message_);
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status data_loss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status out_of_range(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status resource_exhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

// A value or a non-ok Status (C++23's std::expected is not available under C++20).
template <typename T>
class [[nodiscard]] Expected {
 public:
  Expected(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Expected(Status status) : v_(std::move(status)) { assert(!std::get<Status>(v_).is_ok()); }  // NOLINT

  bool has_value() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return has_value(); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  const Status& status() const {
    static const Status kOkStatus;
    return has_value() ? kOkStatus : std::get<Status>(v_);
  }

 private:
  std::variant<T, Status> v_;
};

}  // namespace adakv

// Propagates a non-ok Status from an expression returning Status.
#define ADAKV_RETURN_IF_ERROR(expr)            \
  do {                                         \
    ::adakv::Status adakv_status_ = (expr);    \
    if (!adakv_status_.is_ok()) return adakv_status_; \
  } while (0)

#define ADAKV_CONCAT_INNER(a, b) a##b
#define ADAKV_CONCAT(a, b) ADAKV_CONCAT_INNER(a, b)
// Assigns the value of an Expected<T> expression to `lhs`, or returns its Status.
#define ADAKV_ASSIGN_OR_RETURN(lhs, expr) \
  ADAKV_ASSIGN_OR_RETURN_IMPL(ADAKV_CONCAT(adakv_expected_, __LINE__), lhs, expr)
#define ADAKV_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.has_value()) return tmp.status();        \
  lhs = std::move(tmp).value()
