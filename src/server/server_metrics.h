// /metrics: the engine's counters (adakv/engine.h EngineStats) and the server's own, in the
// Prometheus text exposition format (version 0.0.4).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "adakv/engine.h"

namespace adakv::server {

class ServerCounters {
 public:
  // One answered HTTP request; `route` is one of the server's routes or "other".
  void count_response(const std::string& route, int status);
  std::map<std::pair<std::string, int>, int64_t> responses() const;

  std::atomic<int64_t> cancelled_by_disconnect{0};  // client went away mid-request
  std::atomic<int64_t> cancelled_by_shutdown{0};
  std::atomic<int64_t> stopped_by_stop_string{0};
  std::atomic<int64_t> generations_active{0};       // requests the server is waiting on now

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, int64_t> responses_;  // (route, status) -> count
};

// The exposition text; `stats` is null while the model loads.
std::string metrics_text(const std::optional<EngineStats>& stats, const ServerCounters& counters, bool ready);

}  // namespace adakv::server
