// The HTTP layer of `adakv serve`: the request parser (a pure function), response and SSE
// serialisation, and the socket server itself on a loopback port with a trivial handler
// (keep-alive, pipelining, size limits, refused chunked bodies, disconnect detection).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "server/http_message.h"
#include "server/http_server.h"

namespace adakv::http {
namespace {

ParseResult parse(std::string_view s, HttpLimits limits = {}) { return parse_http_request(s, limits); }

TEST(HttpParse, CompleteGetWithHeaders) {
  const std::string req = "GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\nX-Thing:  v a l  \r\n\r\n";
  ParseResult r = parse(req);
  ASSERT_EQ(r.state, ParseState::kComplete);
  EXPECT_EQ(r.consumed, req.size());
  EXPECT_EQ(r.request.method, "GET");
  EXPECT_EQ(r.request.path, "/v1/models");
  EXPECT_EQ(r.request.query, "x=1");
  EXPECT_EQ(r.request.header("x-thing").value(), "v a l");
  EXPECT_TRUE(r.request.keep_alive);
  EXPECT_TRUE(r.request.body.empty());
}

TEST(HttpParse, EveryPrefixIsIncompleteThenComplete) {
  const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world";
  for (size_t n = 0; n < req.size(); ++n) {
    ParseResult r = parse(std::string_view(req).substr(0, n));
    ASSERT_EQ(r.state, ParseState::kIncomplete) << n;
  }
  ParseResult r = parse(req + "GET / HTTP/1.1\r\n");  // pipelined bytes follow
  ASSERT_EQ(r.state, ParseState::kComplete);
  EXPECT_EQ(r.consumed, req.size());
  EXPECT_EQ(r.request.body, "hello world");
}

TEST(HttpParse, HeadCompleteReportsBodyLengthAndExpect) {
  ParseResult r = parse("POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nab");
  EXPECT_EQ(r.state, ParseState::kIncomplete);
  EXPECT_TRUE(r.head_complete);
  EXPECT_TRUE(r.request.expect_continue);
  EXPECT_EQ(r.body_length, 5u);
}

TEST(HttpParse, BareLineFeedsAndLeadingBlankLines) {
  ParseResult r = parse("\r\n\nGET / HTTP/1.0\nConnection: keep-alive\n\n");
  ASSERT_EQ(r.state, ParseState::kComplete);
  EXPECT_EQ(r.request.version_minor, 0);
  EXPECT_TRUE(r.request.keep_alive);
  EXPECT_FALSE(parse("GET / HTTP/1.0\r\n\r\n").request.keep_alive);
  EXPECT_FALSE(parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n").request.keep_alive);
}

TEST(HttpParse, Refusals) {
  struct Case {
    std::string request;
    int status;
  };
  const Case cases[] = {
      {"GET /\r\n\r\n", 400},
      {"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
      {"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
      {"GET x HTTP/1.1\r\nHost: a\r\n\r\n", 400},
      {"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505},
      {"GET / HTTQ/1.1\r\nHost: a\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\n\r\n", 400},  // no Host
      {"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01z\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 411},
      {"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501},
      {"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 417},
      {"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400},
  };
  for (const Case& c : cases) {
    ParseResult r = parse(c.request);
    EXPECT_EQ(r.state, ParseState::kError) << c.request;
    EXPECT_EQ(r.error_status, c.status) << c.request << " -> " << r.error_message;
    EXPECT_FALSE(r.error_message.empty());
  }
}

TEST(HttpParse, Limits) {
  HttpLimits limits;
  limits.max_head_bytes = 64;
  limits.max_headers = 2;
  limits.max_body_bytes = 10;
  EXPECT_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + std::string(100, 'a'), limits).error_status, 431);
  EXPECT_EQ(parse("GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n", limits).error_status, 431);
  ParseResult r = parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", limits);
  EXPECT_EQ(r.error_status, 413);
  EXPECT_EQ(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789", limits).state,
            ParseState::kComplete);
  // Shorter than the limit and unfinished: wait for more.
  EXPECT_EQ(parse("GET / HTTP/1.1\r\nHost: a", limits).state, ParseState::kIncomplete);
}

TEST(HttpSerialize, ResponsesChunksAndEvents) {
  HttpResponse r;
  r.status = 404;
  r.body = "{}";
  r.headers.emplace_back("Allow", "GET");
  const std::string s = serialize_response(r, false);
  EXPECT_EQ(s.rfind("HTTP/1.1 404 Not Found\r\n", 0), 0u);
  EXPECT_NE(s.find("Content-Length: 2\r\n"), std::string::npos);
  EXPECT_NE(s.find("Connection: close\r\n"), std::string::npos);
  EXPECT_NE(s.find("Allow: GET\r\n"), std::string::npos);
  EXPECT_EQ(s.substr(s.size() - 6), "\r\n\r\n{}");
  EXPECT_EQ(serialize_response(r, true).find("Connection: close"), std::string::npos);

  const std::string head = serialize_stream_head(200, "text/event-stream", {}, true, true);
  EXPECT_NE(head.find("Transfer-Encoding: chunked\r\n"), std::string::npos);
  EXPECT_EQ(serialize_stream_head(200, "text/event-stream", {}, false, true).find("Transfer-Encoding"),
            std::string::npos);
  EXPECT_EQ(encode_chunk("hello world, this is 26 b."), "1a\r\nhello world, this is 26 b.\r\n");
  EXPECT_EQ(encode_chunk(""), "");
  EXPECT_EQ(sse_event("{\"a\":1}"), "data: {\"a\":1}\n\n");
  EXPECT_EQ(sse_event("x\ny"), "data: x\ndata: y\n\n");
  EXPECT_EQ(sse_event("[DONE]"), "data: [DONE]\n\n");
}

// ---- the server on a loopback port ---------------------------------------------------------

int connect_to(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  return fd;
}

void send_all(int fd, std::string_view s) {
  while (!s.empty()) {
    ssize_t n = ::send(fd, s.data(), s.size(), MSG_NOSIGNAL);
    if (n <= 0) return;
    s.remove_prefix(static_cast<size_t>(n));
  }
}

// Reads until `marker` has been seen `count` times, the peer closes, or 5 s pass.
std::string read_until(int fd, std::string_view marker, int count = 1) {
  std::string out;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  auto seen = [&] {
    int n = 0;
    for (size_t p = out.find(marker); p != std::string::npos; p = out.find(marker, p + 1)) ++n;
    return n >= count;
  };
  while (!seen() && std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    char buf[4096];
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

class HttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HttpServerOptions o;
    o.port = 0;
    o.worker_threads = 4;
    o.limits.max_body_bytes = 1000;
    o.request_timeout_ms = 500;
    server_ = HttpServer::start(
                  o,
                  [this](const HttpRequest& req, ResponseWriter& w) {
                    if (req.path == "/stream") {
                      w.start_stream(200, "text/event-stream");
                      for (int i = 0; i < 500 && !w.client_gone(); ++i) {
                        w.write(sse_event(std::to_string(i)));
                        std::this_thread::sleep_for(std::chrono::milliseconds(10));
                      }
                      gone_seen_ = w.client_gone();
                      w.finish();
                      return;
                    }
                    if (req.path == "/throw") throw std::runtime_error("boom");
                    HttpResponse r;
                    r.content_type = "text/plain";
                    r.body = req.method + " " + req.path + " " + req.body;
                    w.send(r);
                  },
                  [](int status, const std::string& message) {
                    HttpResponse r;
                    r.status = status;
                    r.body = "E:" + message;
                    return r;
                  })
                  .value();
  }
  void TearDown() override { server_->stop(); }

  std::unique_ptr<HttpServer> server_;
  std::atomic<bool> gone_seen_{false};
};

TEST_F(HttpServerTest, KeepAliveAndPipelining) {
  int fd = connect_to(server_->port());
  send_all(fd, "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: x\r\n\r\n");
  std::string out = read_until(fd, "GET /b ");
  EXPECT_NE(out.find("POST /a abc"), std::string::npos) << out;
  EXPECT_NE(out.find("GET /b "), std::string::npos) << out;
  send_all(fd, "GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  out = read_until(fd, "GET /c ");
  EXPECT_NE(out.find("Connection: close"), std::string::npos) << out;
  ::close(fd);
}

TEST_F(HttpServerTest, ErrorsAnsweredByTheHttpLayer) {
  int fd = connect_to(server_->port());
  send_all(fd, "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n");
  std::string out = read_until(fd, "E:");
  EXPECT_EQ(out.rfind("HTTP/1.1 413 ", 0), 0u) << out;
  ::close(fd);

  fd = connect_to(server_->port());
  send_all(fd, "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
  out = read_until(fd, "E:");
  EXPECT_EQ(out.rfind("HTTP/1.1 411 ", 0), 0u) << out;
  ::close(fd);

  fd = connect_to(server_->port());
  send_all(fd, "GET /throw HTTP/1.1\r\nHost: x\r\n\r\n");
  out = read_until(fd, "boom");
  EXPECT_EQ(out.rfind("HTTP/1.1 500 ", 0), 0u) << out;
  ::close(fd);
}

TEST_F(HttpServerTest, SlowClientTimesOut) {
  int fd = connect_to(server_->port());
  send_all(fd, "GET /a HTTP/1.1\r\nHost: x\r\n");  // never finishes the head
  std::string out = read_until(fd, "E:");
  EXPECT_EQ(out.rfind("HTTP/1.1 408 ", 0), 0u) << out;
  ::close(fd);
}

TEST_F(HttpServerTest, ExpectContinue) {
  int fd = connect_to(server_->port());
  send_all(fd, "POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
  std::string out = read_until(fd, "100 Continue\r\n\r\n");
  EXPECT_EQ(out, "HTTP/1.1 100 Continue\r\n\r\n");
  send_all(fd, "hi");
  out = read_until(fd, "POST /a hi");
  EXPECT_NE(out.find("200 OK"), std::string::npos) << out;
  ::close(fd);
}

TEST_F(HttpServerTest, StreamNoticesDisconnect) {
  int fd = connect_to(server_->port());
  send_all(fd, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
  std::string out = read_until(fd, "data: 3\n\n");
  EXPECT_NE(out.find("Transfer-Encoding: chunked"), std::string::npos) << out;
  ::close(fd);
  // The handler sees the close long before its 500 events are written.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (!gone_seen_ && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(gone_seen_.load());
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (server_->in_flight() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(server_->in_flight(), 0u);
}

TEST_F(HttpServerTest, StopAcceptingRefusesNewConnections) {
  server_->stop_accepting();
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(server_->port()));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_NE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ::close(fd);
}

}  // namespace
}  // namespace adakv::http
