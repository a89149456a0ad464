// HTTP/1.1 messages for the server: a request parser that is a pure function of the bytes
// received so far (the I/O loop calls it after every read; the fuzz target drives it directly),
// and response serialisation (fixed-length, chunked and server-sent events).
//
// Only what an API server needs: origin-form targets, Content-Length bodies (chunked request
// bodies are refused with 411, any other Transfer-Encoding with 400), HTTP/1.0 and 1.1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace adakv::http {

struct HttpLimits {
  size_t max_head_bytes = 16 * 1024;        // request line + headers; over: 431
  size_t max_headers = 100;                 // over: 431
  size_t max_body_bytes = 8 * 1024 * 1024;  // Content-Length over: 413
};

struct HttpRequest {
  std::string method;   // as sent (methods are case-sensitive)
  std::string target;   // origin-form, e.g. "/v1/models?x=1"
  std::string path;     // target before '?'
  std::string query;    // target after '?', without it
  int version_minor = 1;  // HTTP/1.<minor>
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased, values trimmed
  std::string body;
  bool keep_alive = true;       // from the version and the Connection header
  bool expect_continue = false; // "Expect: 100-continue"

  // The first header named `name` (lower-case), or nullopt.
  std::optional<std::string_view> header(std::string_view name) const;
};

enum class ParseState { kIncomplete, kComplete, kError };

struct ParseResult {
  ParseState state = ParseState::kIncomplete;
  // kComplete: bytes of `data` this request used (head + body); pipelined bytes follow.
  size_t consumed = 0;
  // kIncomplete with head_complete: the head is parsed (request without body) and the body is
  // still arriving; the caller may send "100 Continue" when request.expect_continue.
  bool head_complete = false;
  size_t body_length = 0;
  HttpRequest request;
  // kError: the status to answer with (400, 411, 413, 431, 501, 505) and why.
  int error_status = 0;
  std::string error_message;
};

// Parses the request at the start of `data`. Never reads past `data`, never throws; bare LF
// line ends are accepted as well as CRLF (RFC 9112 2.2).
ParseResult parse_http_request(std::string_view data, const HttpLimits& limits);

// Reason phrase of a status code ("Not Found"); "Unknown" for codes it does not know.
const char* status_reason(int status);

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers
  std::string body;
};

// The full response with Content-Length; `keep_alive` false adds "Connection: close".
std::string serialize_response(const HttpResponse& response, bool keep_alive);
// The head of a streamed response: chunked on HTTP/1.1, close-delimited on 1.0.
std::string serialize_stream_head(int status, std::string_view content_type,
                                  const std::vector<std::pair<std::string, std::string>>& headers, bool chunked,
                                  bool keep_alive);
// One chunk of a chunked body (empty input gives nothing: an empty chunk would end the body).
std::string encode_chunk(std::string_view data);
inline constexpr std::string_view kLastChunk = "0\r\n\r\n";
// One server-sent event carrying `data` ("data: ...\n\n"); a multi-line payload becomes one
// data line per line, as the SSE spec requires.
std::string sse_event(std::string_view data);

}  // namespace adakv::http
