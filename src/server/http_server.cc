#include "server/http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace adakv::http {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kReadChunk = 64 * 1024;
// After an error answer the server half-closes and reads (and drops) what the client still
// sends for a while, so that the client sees the answer instead of a reset.
constexpr auto kDrainTime = std::chrono::milliseconds(2000);
constexpr size_t kDrainMaxBytes = 16 * 1024 * 1024;

// Best effort for answers the I/O thread sends itself: they are small and the socket buffer is
// empty then, so one non-blocking send nearly always takes all of it.
void send_nonblocking(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      return;
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
}

struct Connection {
  int fd = -1;
  std::string in;           // bytes received and not yet used
  bool continue_sent = false;
  bool draining = false;    // answered an error; dropping input until kDrainTime
  size_t drained = 0;
  Clock::time_point last_active;
  Clock::time_point request_started;  // first byte of the request in `in`
  ~Connection() {
    if (fd >= 0) ::close(fd);
  }
};

struct Task {
  std::unique_ptr<Connection> conn;
  HttpRequest request;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
ResponseWriter::ResponseWriter(int fd, bool keep_alive, int version_minor, int write_timeout_ms)
    : fd_(fd), keep_alive_(keep_alive), chunked_(version_minor >= 1), write_timeout_ms_(write_timeout_ms) {}

bool ResponseWriter::write_all(std::string_view data) {
  if (failed_) return false;
  auto deadline = Clock::now() + std::chrono::milliseconds(write_timeout_ms_);
  while (!data.empty()) {
    ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      deadline = Clock::now() + std::chrono::milliseconds(write_timeout_ms_);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) break;
      pollfd p{fd_, POLLOUT, 0};
      int r = ::poll(&p, 1, static_cast<int>(left));
      if (r < 0 && errno != EINTR) break;
      if (r > 0 && (p.revents & (POLLERR | POLLHUP | POLLNVAL))) break;
      continue;
    }
    break;  // EPIPE, ECONNRESET, ...
  }
  if (!data.empty()) failed_ = true;
  return !failed_;
}

bool ResponseWriter::send(const HttpResponse& response) {
  if (responded_) return false;
  responded_ = true;
  return write_all(serialize_response(response, keep_alive_));
}

bool ResponseWriter::start_stream(int status, std::string_view content_type,
                                  const std::vector<std::pair<std::string, std::string>>& headers) {
  if (responded_) return false;
  responded_ = true;
  streaming_open_ = true;
  if (!chunked_) keep_alive_ = false;  // HTTP/1.0: the end of the body is the end of the connection
  return write_all(serialize_stream_head(status, content_type, headers, chunked_, keep_alive_));
}

bool ResponseWriter::write(std::string_view data) {
  if (!streaming_open_ || data.empty()) return !failed_;
  return chunked_ ? write_all(encode_chunk(data)) : write_all(data);
}

bool ResponseWriter::finish() {
  if (!streaming_open_) return !failed_;
  streaming_open_ = false;
  return chunked_ ? write_all(kLastChunk) : !failed_;
}

bool ResponseWriter::client_gone() {
  if (failed_) return true;
  pollfd p{fd_, static_cast<short>(POLLIN | POLLRDHUP), 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLERR | POLLHUP | POLLRDHUP | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    char c;
    ssize_t n = ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return true;  // orderly close
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return true;
  }
  return false;  // pipelined bytes of a next request are not a disconnect
}

// ---------------------------------------------------------------------------------------------
struct HttpServer::Impl {
  HttpServerOptions options;
  HttpHandler handler;
  HttpErrorFormatter format_error;

  int listen_fd = -1;
  int epoll_fd = -1;
  int wake_fd = -1;  // eventfd: returned connections, stop requests
  int port = 0;

  std::thread io_thread;
  std::vector<std::thread> workers;

  // Owned by the I/O thread only.
  std::unordered_map<int, std::unique_ptr<Connection>> conns;

  std::mutex mu;
  std::condition_variable task_cv;   // workers wait for tasks
  std::condition_variable idle_cv;   // stop() waits for in_flight == 0
  std::deque<Task> tasks;
  std::vector<std::unique_ptr<Connection>> returned;  // keep-alive connections back from workers
  size_t in_flight = 0;
  bool workers_exit = false;

  std::atomic<bool> accepting{true};
  std::atomic<bool> io_exit{false};
  bool stopped = false;

  ~Impl() {
    if (listen_fd >= 0) ::close(listen_fd);
    if (epoll_fd >= 0) ::close(epoll_fd);
    if (wake_fd >= 0) ::close(wake_fd);
  }

  void wake() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd, &one, sizeof one);
  }

  HttpResponse error_response(int status, const std::string& message) const {
    if (format_error) return format_error(status, message);
    HttpResponse r;
    r.status = status;
    r.content_type = "text/plain; charset=utf-8";
    r.body = message + "\n";
    return r;
  }

  void watch(Connection* c) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = c->fd;
    ::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c->fd, &ev);
  }

  void close_conn(int fd) {
    ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, nullptr);
    conns.erase(fd);  // the destructor closes the socket
  }

  // Answers an error itself, then drains: half-close, drop input for a while, close.
  void answer_error_and_drain(Connection* c, int status, const std::string& message) {
    send_nonblocking(c->fd, serialize_response(error_response(status, message), /*keep_alive=*/false));
    ::shutdown(c->fd, SHUT_WR);
    c->draining = true;
    c->in.clear();
    c->last_active = Clock::now();
  }

  void accept_all() {
    while (true) {
      int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        return;  // EAGAIN, or EMFILE and friends: try again on the next wake-up
      }
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      if (conns.size() >= options.max_connections || !accepting.load()) {
        send_nonblocking(fd, serialize_response(error_response(503, "server is at its connection limit"), false));
        ::close(fd);
        continue;
      }
      auto c = std::make_unique<Connection>();
      c->fd = fd;
      c->last_active = Clock::now();
      watch(c.get());
      conns.emplace(fd, std::move(c));
    }
  }

  // Parses what `c` has received; hands a complete request to the workers.
  void process(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Connection* c = it->second.get();
    if (c->draining || c->in.empty()) return;
    ParseResult r = parse_http_request(c->in, options.limits);
    if (r.state == ParseState::kError) {
      answer_error_and_drain(c, r.error_status, r.error_message);
      return;
    }
    if (r.state == ParseState::kIncomplete) {
      if (r.head_complete && r.request.expect_continue && !c->continue_sent) {
        send_nonblocking(c->fd, "HTTP/1.1 100 Continue\r\n\r\n");
        c->continue_sent = true;
      }
      return;
    }
    c->in.erase(0, r.consumed);
    c->continue_sent = false;
    std::unique_ptr<Connection> owned = std::move(it->second);
    conns.erase(it);
    ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, nullptr);
    {
      std::lock_guard lock(mu);
      if (tasks.size() < options.max_queued_requests) {
        tasks.push_back(Task{std::move(owned), std::move(r.request)});
        ++in_flight;
        task_cv.notify_one();
        return;
      }
    }
    send_nonblocking(fd, serialize_response(error_response(503, "server is overloaded: too many queued requests"), false));
    // `owned` closes the socket here.
  }

  void read_conn(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Connection* c = it->second.get();
    char buf[kReadChunk];
    // Enough for the largest request plus a read's worth of what follows it.
    const size_t cap = options.limits.max_head_bytes + options.limits.max_body_bytes + kReadChunk;
    while (true) {
      if (!c->draining && c->in.size() >= cap) break;
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0) {
        if (c->draining) {
          c->drained += static_cast<size_t>(n);
          if (c->drained > kDrainMaxBytes) return close_conn(fd);
          continue;
        }
        if (c->in.empty()) c->request_started = Clock::now();
        c->in.append(buf, static_cast<size_t>(n));
        c->last_active = Clock::now();
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      return close_conn(fd);  // closed by the client (0) or reset
    }
    process(fd);
  }

  void check_timeouts() {
    const auto now = Clock::now();
    std::vector<int> expired;
    for (auto& [fd, c] : conns) {
      if (c->draining) {
        if (now - c->last_active > kDrainTime) expired.push_back(fd);
      } else if (!c->in.empty()) {
        if (now - c->request_started > std::chrono::milliseconds(options.request_timeout_ms)) {
          answer_error_and_drain(c.get(), 408, "request not received in time");
        }
      } else if (!accepting.load() || now - c->last_active > std::chrono::milliseconds(options.keepalive_timeout_ms)) {
        expired.push_back(fd);
      }
    }
    for (int fd : expired) close_conn(fd);
  }

  void take_returned() {
    std::vector<std::unique_ptr<Connection>> back;
    {
      std::lock_guard lock(mu);
      back.swap(returned);
    }
    for (auto& c : back) {
      const int fd = c->fd;
      c->last_active = Clock::now();
      if (!c->in.empty()) c->request_started = Clock::now();
      watch(c.get());
      conns.emplace(fd, std::move(c));
      process(fd);  // a pipelined request may be waiting already
    }
  }

  void io_loop() {
    epoll_event events[128];
    auto last_scan = Clock::now();
    while (!io_exit.load()) {
      if (!accepting.load() && listen_fd >= 0) {
        ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, listen_fd, nullptr);
        ::close(listen_fd);
        listen_fd = -1;
      }
      int n = ::epoll_wait(epoll_fd, events, 128, 200);
      for (int i = 0; i < n; ++i) {
        const int fd = events[i].data.fd;
        if (fd == listen_fd) {
          accept_all();
        } else if (fd == wake_fd) {
          uint64_t v;
          [[maybe_unused]] ssize_t r = ::read(wake_fd, &v, sizeof v);
          take_returned();
        } else {
          read_conn(fd);
        }
      }
      if (Clock::now() - last_scan > std::chrono::milliseconds(200)) {
        check_timeouts();
        last_scan = Clock::now();
      }
    }
    conns.clear();
  }

  void worker_loop() {
    while (true) {
      Task task;
      {
        std::unique_lock lock(mu);
        task_cv.wait(lock, [&] { return workers_exit || !tasks.empty(); });
        if (tasks.empty()) return;
        task = std::move(tasks.front());
        tasks.pop_front();
      }
      ResponseWriter writer(task.conn->fd, task.request.keep_alive && accepting.load(), task.request.version_minor,
                            options.write_timeout_ms);
      try {
        handler(task.request, writer);
      } catch (const std::exception& e) {
        if (!writer.responded()) writer.send(error_response(500, std::string("internal error: ") + e.what()));
      } catch (...) {
        if (!writer.responded()) writer.send(error_response(500, "internal error"));
      }
      if (!writer.responded()) writer.send(error_response(500, "internal error: the handler gave no response"));
      const bool reuse = writer.reusable() && accepting.load();
      std::lock_guard lock(mu);
      if (reuse) {
        returned.push_back(std::move(task.conn));
        wake();
      }
      task.conn.reset();  // closes a connection that is not reused
      if (--in_flight == 0) idle_cv.notify_all();
    }
  }
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { stop(); }

Expected<std::unique_ptr<HttpServer>> HttpServer::start(const HttpServerOptions& options, HttpHandler handler,
                                                        HttpErrorFormatter format_error) {
  const std::string where = options.host + ":" + std::to_string(options.port);
  if (options.port < 0 || options.port > 65535) return invalid_argument("port " + std::to_string(options.port) + " is out of range: allowed [0, 65535]");
  if (options.worker_threads < 1) return invalid_argument("the HTTP server needs at least one worker thread");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->handler = std::move(handler);
  impl->format_error = std::move(format_error);

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port_str = std::to_string(options.port);
  if (int rc = ::getaddrinfo(options.host.c_str(), port_str.c_str(), &hints, &res); rc != 0)
    return invalid_argument("cannot resolve " + where + ": " + ::gai_strerror(rc));
  std::string last_error = "no address";
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) { last_error = std::strerror(errno); continue; }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 1024) == 0) {
      impl->listen_fd = fd;
      break;
    }
    last_error = std::strerror(errno);
    ::close(fd);
  }
  ::freeaddrinfo(res);
  if (impl->listen_fd < 0) return resource_exhausted("cannot listen on " + where + ": " + last_error);

  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  ::getsockname(impl->listen_fd, reinterpret_cast<sockaddr*>(&bound), &len);
  impl->port = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                 : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);

  impl->epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
  impl->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl->epoll_fd < 0 || impl->wake_fd < 0) return internal_error(std::string("epoll/eventfd: ") + std::strerror(errno));
  for (int fd : {impl->listen_fd, impl->wake_fd}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    ::epoll_ctl(impl->epoll_fd, EPOLL_CTL_ADD, fd, &ev);
  }
  Impl* raw = impl.get();
  raw->io_thread = std::thread([raw] { raw->io_loop(); });
  for (int i = 0; i < options.worker_threads; ++i) raw->workers.emplace_back([raw] { raw->worker_loop(); });
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

int HttpServer::port() const { return impl_->port; }

void HttpServer::stop_accepting() {
  // The I/O thread closes the listener (it alone touches it); until then accept_all refuses.
  if (impl_->accepting.exchange(false)) impl_->wake();
}

size_t HttpServer::in_flight() const {
  std::lock_guard lock(impl_->mu);
  return impl_->in_flight;
}

void HttpServer::stop() {
  if (!impl_ || impl_->stopped) return;
  impl_->stopped = true;
  stop_accepting();
  {
    std::unique_lock lock(impl_->mu);
    impl_->idle_cv.wait(lock, [&] { return impl_->in_flight == 0; });
    impl_->workers_exit = true;
    impl_->returned.clear();
  }
  impl_->task_cv.notify_all();
  for (auto& t : impl_->workers) t.join();
  impl_->io_exit = true;
  impl_->wake();
  impl_->io_thread.join();
}

}  // namespace adakv::http
