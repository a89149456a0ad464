// The engine's inbox: what callers hand the scheduler thread (new requests, cancellations, a
// stop order), under one mutex. The scheduler thread drains it between steps, so callers never
// wait for a step and never touch scheduler state.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "engine/engine_request.h"

namespace adakv {

class RequestQueue {
 public:
  enum class Stop { kNone, kDrain, kCancel };

  struct Batch {
    std::vector<std::unique_ptr<EngineRequest>> submitted;
    std::vector<RequestId> cancelled;
    Stop stop = Stop::kNone;
  };

  void push(std::unique_ptr<EngineRequest> r) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch_.submitted.push_back(std::move(r));
    }
    cv_.notify_one();
  }
  void cancel(RequestId id) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch_.cancelled.push_back(id);
    }
    cv_.notify_one();
  }
  // A cancelling stop overrides a draining one, never the reverse.
  void stop(Stop s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (s == Stop::kCancel || batch_.stop == Stop::kNone) batch_.stop = s;
      stopping_ = batch_.stop;
    }
    cv_.notify_one();
  }

  // Everything queued so far; waits for something first when `wait` (the scheduler is idle).
  Batch take(bool wait) {
    std::unique_lock<std::mutex> lock(mu_);
    if (wait) {
      cv_.wait(lock, [&] {
        return !batch_.submitted.empty() || !batch_.cancelled.empty() || batch_.stop != Stop::kNone;
      });
    }
    Batch out = std::move(batch_);
    batch_ = Batch{};
    batch_.stop = stopping_;  // a stop order stays in force
    return out;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  Batch batch_;
  Stop stopping_ = Stop::kNone;
};

}  // namespace adakv
