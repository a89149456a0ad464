// Device time per op of the forward, for diagnosis (CudaModel with ADAKV_PROFILE_OPS=1): an event
// is recorded on the stream after every op, and the time between consecutive events is charged
// to the later op's label. Ops of a forward are enqueued ahead of the device, so for all but the
// smallest kernels this is device time; for kernels shorter than a launch (a few µs) it includes
// the launch gap. Costs an event record per op: steps timed this way run without CUDA graphs.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <string>
#include <vector>

#include "core/status.h"

namespace adakv::cuda {

class OpTimer {
 public:
  OpTimer() = default;
  ~OpTimer();
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

  // Creates `capacity` events (the most marks one forward records); off until then.
  Status enable(int capacity);
  bool enabled() const { return !events_.empty(); }
  // The forward's first event, then one after each op (no-ops when disabled; marks beyond the
  // capacity are dropped and counted).
  void begin(cudaStream_t stream);
  void mark(const char* label, cudaStream_t stream);
  // After the stream has synchronised: adds this forward's op times to the totals.
  Status collect();
  // Totals per label since the last reset: ms per forward, calls per forward, share; "" if none.
  std::string report() const;
  void reset();

 private:
  struct Total {
    double ms = 0;
    int64_t calls = 0;
  };
  std::vector<cudaEvent_t> events_;
  std::vector<const char*> labels_;  // label of event i (i >= 1)
  size_t used_ = 0;
  int64_t dropped_ = 0;
  int64_t forwards_ = 0;
  std::map<std::string, Total> totals_;
};

}  // namespace adakv::cuda
