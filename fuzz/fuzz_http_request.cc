// libFuzzer target: arbitrary bytes as what a client sent to `adakv serve`, through the HTTP
// request parser (src/server/http_message.h) with small limits so that every refusal path is
// reachable. Checks what the I/O loop relies on: it never reads past the input, a complete
// request's body has exactly its Content-Length, every prefix of a complete request is
// incomplete or the same refusal, an error carries a status the server may send, and parsing is
// deterministic.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/check.h"
#include "server/http_message.h"

using adakv::http::HttpLimits;
using adakv::http::ParseResult;
using adakv::http::ParseState;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  HttpLimits limits;
  limits.max_head_bytes = 512;
  limits.max_headers = 8;
  limits.max_body_bytes = 256;
  // A copy of exactly `size` bytes, so that ASan sees any read past the end.
  const std::string input(reinterpret_cast<const char*>(data), size);
  const ParseResult r = adakv::http::parse_http_request(input, limits);
  switch (r.state) {
    case ParseState::kComplete: {
      ADAKV_CHECK(r.consumed > 0 && r.consumed <= size, "consumed outside the input");
      ADAKV_CHECK(r.request.body.size() == r.body_length, "body length differs from Content-Length");
      ADAKV_CHECK(r.body_length <= limits.max_body_bytes, "body over the limit accepted");
      ADAKV_CHECK(!r.request.method.empty() && !r.request.path.empty(), "complete request without method or path");
      ADAKV_CHECK(r.request.headers.size() <= limits.max_headers, "more headers than the limit");
      // The same request alone parses the same; one byte less is not complete.
      const ParseResult alone = adakv::http::parse_http_request(std::string_view(input).substr(0, r.consumed), limits);
      ADAKV_CHECK(alone.state == ParseState::kComplete && alone.consumed == r.consumed, "request not self-delimiting");
      const ParseResult shorter =
          adakv::http::parse_http_request(std::string_view(input).substr(0, r.consumed - 1), limits);
      ADAKV_CHECK(shorter.state != ParseState::kComplete, "a prefix parsed as complete");
      break;
    }
    case ParseState::kError: {
      const int s = r.error_status;
      ADAKV_CHECK(s == 400 || s == 411 || s == 413 || s == 417 || s == 431 || s == 501 || s == 505,
                  "unexpected error status");
      ADAKV_CHECK(!r.error_message.empty(), "error without a message");
      break;
    }
    case ParseState::kIncomplete:
      // Waiting is bounded: an unfinished head longer than the limit (after at most a limit's
      // worth of blank lines) must have been refused, and a pending body is within its limit.
      ADAKV_CHECK(r.head_complete || size <= 2 * limits.max_head_bytes, "head over the limit not refused");
      ADAKV_CHECK(!r.head_complete || r.body_length <= limits.max_body_bytes, "body over the limit awaited");
      break;
  }
  const ParseResult again = adakv::http::parse_http_request(input, limits);
  ADAKV_CHECK(again.state == r.state && again.consumed == r.consumed && again.error_status == r.error_status,
              "parsing is not deterministic");
  return 0;
}
