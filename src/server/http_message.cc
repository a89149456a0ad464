#include "server/http_message.h"

#include <algorithm>
#include <cstdio>

namespace adakv::http {
namespace {

// RFC 9110 5.6.2 token characters.
bool is_tchar(unsigned char c) {
  if (c >= '0' && c <= '9') return true;
  if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return true;
  return std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos;
}

bool is_token(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return is_tchar(static_cast<unsigned char>(c)); });
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>((c >= 'A' && c <= 'Z') ? c + 32 : c);
  return out;
}

std::string_view trim_ows(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Calls f(token) for each comma-separated, trimmed, non-empty element of a header value.
template <typename F>
void for_each_list_item(std::string_view value, F&& f) {
  while (!value.empty()) {
    size_t comma = value.find(',');
    std::string_view item = trim_ows(value.substr(0, comma));
    if (!item.empty()) f(item);
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
}

ParseResult fail(int status, std::string message) {
  ParseResult r;
  r.state = ParseState::kError;
  r.error_status = status;
  r.error_message = std::move(message);
  return r;
}

// Splits off one line ending in LF (a CR before it dropped); nullopt when no LF in `rest`.
std::optional<std::string_view> next_line(std::string_view& rest) {
  size_t lf = rest.find('\n');
  if (lf == std::string_view::npos) return std::nullopt;
  std::string_view line = rest.substr(0, lf);
  rest.remove_prefix(lf + 1);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  return line;
}

}  // namespace

std::optional<std::string_view> HttpRequest::header(std::string_view name) const {
  for (const auto& [k, v] : headers) {
    if (k == name) return std::string_view(v);
  }
  return std::nullopt;
}

ParseResult parse_http_request(std::string_view data, const HttpLimits& limits) {
  // Only the first max_head_bytes (plus leading blank lines) can hold the head: a client that
  // sends more without ending it is refused instead of buffered forever.
  size_t start = 0;
  while (start < data.size() && start < limits.max_head_bytes && (data[start] == '\r' || data[start] == '\n')) ++start;
  std::string_view window = data.substr(start, limits.max_head_bytes + 4);
  size_t head_end = std::string_view::npos;  // offset in window just past the blank line
  for (size_t i = window.find('\n'); i != std::string_view::npos; i = window.find('\n', i + 1)) {
    if (i + 1 < window.size() && window[i + 1] == '\n') { head_end = i + 2; break; }
    if (i + 2 < window.size() && window[i + 1] == '\r' && window[i + 2] == '\n') { head_end = i + 3; break; }
  }
  if (head_end == std::string_view::npos || head_end > limits.max_head_bytes + 4) {
    if (data.size() - start > limits.max_head_bytes)
      return fail(431, "request head exceeds " + std::to_string(limits.max_head_bytes) + " bytes");
    return {};
  }

  std::string_view rest = window.substr(0, head_end);
  ParseResult r;
  HttpRequest& req = r.request;

  // Request line: method SP request-target SP HTTP-version.
  std::string_view line = *next_line(rest);
  size_t sp1 = line.find(' ');
  size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos)
    return fail(400, "malformed request line");
  std::string_view method = line.substr(0, sp1);
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::string_view version = line.substr(sp2 + 1);
  if (!is_token(method)) return fail(400, "malformed request method");
  if (target.empty() || (target[0] != '/' && target != "*")) return fail(400, "request target must be an absolute path");
  for (char c : target) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) return fail(400, "request target contains a control character or space");
  }
  if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || version[6] != '.' || version[5] < '0' ||
      version[5] > '9' || version[7] < '0' || version[7] > '9')
    return fail(400, "malformed HTTP version");
  if (version[5] != '1') return fail(505, "only HTTP/1.0 and HTTP/1.1 are supported");
  req.method = std::string(method);
  req.target = std::string(target);
  size_t q = target.find('?');
  req.path = std::string(target.substr(0, q));
  if (q != std::string_view::npos) req.query = std::string(target.substr(q + 1));
  req.version_minor = version[7] - '0';

  while (true) {
    line = *next_line(rest);  // the head ends with a blank line, so every line has its LF
    if (line.empty()) break;
    if (line[0] == ' ' || line[0] == '\t') return fail(400, "obsolete header line folding is not accepted");
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return fail(400, "malformed header line (no colon)");
    std::string_view name = line.substr(0, colon);
    if (!is_token(name)) return fail(400, "malformed header name");
    std::string_view value = trim_ows(line.substr(colon + 1));
    for (char c : value) {
      const auto u = static_cast<unsigned char>(c);
      if ((u < 0x20 && u != '\t') || u == 0x7f) return fail(400, "header value contains a control character");
    }
    if (req.headers.size() >= limits.max_headers)
      return fail(431, "more than " + std::to_string(limits.max_headers) + " request headers");
    req.headers.emplace_back(lower(name), std::string(value));
  }

  // Message framing (RFC 9112 6): Transfer-Encoding is refused, Content-Length must agree.
  std::optional<uint64_t> content_length;
  bool has_transfer_encoding = false;
  bool chunked = false;
  bool conn_close = false, conn_keep_alive = false;
  bool has_host = false;
  for (const auto& [name, value] : req.headers) {
    if (name == "content-length") {
      if (value.empty() || value.size() > 18 ||
          !std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; }))
        return fail(400, "malformed Content-Length");
      const uint64_t n = std::stoull(value);
      if (content_length && *content_length != n) return fail(400, "conflicting Content-Length headers");
      content_length = n;
    } else if (name == "transfer-encoding") {
      has_transfer_encoding = true;
      for_each_list_item(value, [&](std::string_view item) { chunked = lower(item) == "chunked"; });
    } else if (name == "connection") {
      for_each_list_item(value, [&](std::string_view item) {
        const std::string t = lower(item);
        if (t == "close") conn_close = true;
        if (t == "keep-alive") conn_keep_alive = true;
      });
    } else if (name == "expect") {
      if (lower(value) != "100-continue") return fail(417, "unsupported expectation: " + value);
      req.expect_continue = true;
    } else if (name == "host") {
      has_host = true;
    }
  }
  if (req.version_minor >= 1 && !has_host) return fail(400, "HTTP/1.1 request without a Host header");
  if (has_transfer_encoding) {
    if (content_length) return fail(400, "both Transfer-Encoding and Content-Length");
    if (chunked) return fail(411, "chunked request bodies are not supported: send the body with a Content-Length");
    return fail(501, "unsupported Transfer-Encoding");
  }
  const uint64_t body_length = content_length.value_or(0);
  if (body_length > limits.max_body_bytes)
    return fail(413, "request body of " + std::to_string(body_length) + " bytes exceeds the limit of " +
                         std::to_string(limits.max_body_bytes) + " bytes");
  req.keep_alive = req.version_minor >= 1 ? !conn_close : (conn_keep_alive && !conn_close);

  const size_t head_bytes = start + head_end;
  r.head_complete = true;
  r.body_length = static_cast<size_t>(body_length);
  if (data.size() - head_bytes < body_length) {
    r.state = ParseState::kIncomplete;
    return r;
  }
  req.body = std::string(data.substr(head_bytes, r.body_length));
  r.state = ParseState::kComplete;
  r.consumed = head_bytes + r.body_length;
  return r;
}

const char* status_reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
  }
}

namespace {

void append_head(std::string& out, int status, std::string_view content_type,
                 const std::vector<std::pair<std::string, std::string>>& headers, bool keep_alive) {
  out += "HTTP/1.1 ";
  out += std::to_string(status);
  out += ' ';
  out += status_reason(status);
  out += "\r\nServer: adakv\r\n";
  if (!content_type.empty()) {
    out += "Content-Type: ";
    out += content_type;
    out += "\r\n";
  }
  for (const auto& [k, v] : headers) {
    out += k;
    out += ": ";
    out += v;
    out += "\r\n";
  }
  if (!keep_alive) out += "Connection: close\r\n";
}

}  // namespace

std::string serialize_response(const HttpResponse& response, bool keep_alive) {
  std::string out;
  out.reserve(192 + response.body.size());
  append_head(out, response.status, response.content_type, response.headers, keep_alive);
  out += "Content-Length: ";
  out += std::to_string(response.body.size());
  out += "\r\n\r\n";
  out += response.body;
  return out;
}

std::string serialize_stream_head(int status, std::string_view content_type,
                                  const std::vector<std::pair<std::string, std::string>>& headers, bool chunked,
                                  bool keep_alive) {
  std::string out;
  append_head(out, status, content_type, headers, chunked && keep_alive);
  if (chunked) out += "Transfer-Encoding: chunked\r\n";
  out += "\r\n";
  return out;
}

std::string encode_chunk(std::string_view data) {
  if (data.empty()) return {};
  char size[24];
  const int n = std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  std::string out;
  out.reserve(static_cast<size_t>(n) + data.size() + 2);
  out.append(size, static_cast<size_t>(n));
  out += data;
  out += "\r\n";
  return out;
}

std::string sse_event(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 16);
  while (true) {
    size_t lf = data.find('\n');
    out += "data: ";
    out += data.substr(0, lf);
    out += '\n';
    if (lf == std::string_view::npos) break;
    data.remove_prefix(lf + 1);
  }
  out += '\n';
  return out;
}

}  // namespace adakv::http
