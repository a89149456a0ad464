// A small HTTP/1.1 server on POSIX sockets (Linux epoll), written for `adakv serve` because the
// GPU machines lack Debian's shared cpp-httplib and no static build of it exists.
//
// One I/O thread owns every idle or reading connection: it accepts, reads, parses
// (http_message.h), enforces the size limits and the timeouts of slow clients, answers framing
// errors itself, and hands each complete request with its connection to a bounded pool of
// worker threads. A worker runs the handler, which answers once (Content-Length) or streams
// (chunked on HTTP/1.1, close-delimited on 1.0), then gives a keep-alive connection back to the
// I/O thread. Idle keep-alive connections therefore cost no worker. A streaming handler polls
// ResponseWriter::client_gone() to notice a disconnect and cancel its work.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"
#include "server/http_message.h"

namespace adakv::http {

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                   // 0: any free port (see HttpServer::port)
  HttpLimits limits;
  int worker_threads = 128;          // requests handled at once (a stream holds one)
  size_t max_queued_requests = 1024; // complete requests waiting for a worker; over: 503
  size_t max_connections = 4096;     // over: 503 and close
  int request_timeout_ms = 30'000;   // first byte to last byte of one request; over: 408
  int keepalive_timeout_ms = 60'000; // idle connection between requests; over: closed
  int write_timeout_ms = 30'000;     // no progress writing to a client this long: dropped
};

// How a handler answers. Every method returns false once the client is gone or a write timed
// out; the handler should then stop its work (and cancel what it started).
class ResponseWriter {
 public:
  ResponseWriter(int fd, bool keep_alive, int version_minor, int write_timeout_ms);
  ResponseWriter(const ResponseWriter&) = delete;
  ResponseWriter& operator=(const ResponseWriter&) = delete;

  // The whole response, with Content-Length.
  bool send(const HttpResponse& response);
  // A streamed response: the head now, then write() pieces, then finish().
  bool start_stream(int status, std::string_view content_type,
                    const std::vector<std::pair<std::string, std::string>>& headers = {});
  bool write(std::string_view data);
  bool finish();
  // Non-blocking: has the client closed or reset the connection?
  bool client_gone();

  bool responded() const { return responded_; }
  bool failed() const { return failed_; }
  // The connection may carry another request after this response.
  bool reusable() const { return keep_alive_ && !failed_ && responded_ && !streaming_open_; }
  // Ends the connection after this response (server shutting down).
  void set_close() { keep_alive_ = false; }

 private:
  bool write_all(std::string_view data);

  int fd_;
  bool keep_alive_;
  bool chunked_;
  int write_timeout_ms_;
  bool responded_ = false;
  bool streaming_open_ = false;
  bool failed_ = false;
};

using HttpHandler = std::function<void(const HttpRequest&, ResponseWriter&)>;
// The body of an error the HTTP layer answers itself (400, 408, 411, 413, 431, 503, ...), so
// that the API can give every error its own shape.
using HttpErrorFormatter = std::function<HttpResponse(int status, const std::string& message)>;

class HttpServer {
 public:
  // Binds, listens and starts the threads; an error names the address when it cannot bind.
  static Expected<std::unique_ptr<HttpServer>> start(const HttpServerOptions& options, HttpHandler handler,
                                                     HttpErrorFormatter format_error);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const;  // the bound port
  // Closes the listener; idle connections are closed, busy ones after their response.
  void stop_accepting();
  // Requests queued or being handled.
  size_t in_flight() const;
  // stop_accepting(), waits for the handlers to return, closes every connection, joins the
  // threads. Idempotent.
  void stop();

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace adakv::http
