// OpTimer (op_timer.h).
#include "backends/cuda/op_timer.h"

#include <algorithm>
#include <cstdio>

#include "backends/cuda/cuda_check.h"

namespace adakv::cuda {

OpTimer::~OpTimer() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

Status OpTimer::enable(int capacity) {
  if (enabled()) return Status::ok();
  events_.resize(static_cast<size_t>(capacity), nullptr);
  for (cudaEvent_t& e : events_) ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
  labels_.assign(events_.size(), nullptr);
  return Status::ok();
}

void OpTimer::begin(cudaStream_t stream) {
  used_ = 0;
  if (!enabled()) return;
  if (cudaEventRecord(events_[0], stream) == cudaSuccess) used_ = 1;
}

void OpTimer::mark(const char* label, cudaStream_t stream) {
  if (used_ == 0) return;
  if (used_ >= events_.size()) {
    ++dropped_;
    return;
  }
  if (cudaEventRecord(events_[used_], stream) != cudaSuccess) return;
  labels_[used_++] = label;
}

Status OpTimer::collect() {
  if (used_ < 2) return Status::ok();
  for (size_t i = 1; i < used_; ++i) {
    float ms = 0.f;
    ADAKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, events_[i - 1], events_[i]));
    Total& t = totals_[labels_[i]];
    t.ms += ms;
    ++t.calls;
  }
  ++forwards_;
  used_ = 0;
  return Status::ok();
}

std::string OpTimer::report() const {
  if (forwards_ == 0) return "";
  double sum = 0;
  for (const auto& [label, t] : totals_) sum += t.ms;
  std::vector<std::pair<std::string, Total>> rows(totals_.begin(), totals_.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  std::string out = "| op | ms per forward | calls per forward | µs per call | share |\n|---|---|---|---|---|\n";
  char line[256];
  for (const auto& [label, t] : rows) {
    const double per = t.ms / static_cast<double>(forwards_);
    std::snprintf(line, sizeof line, "| %s | %.3f | %.1f | %.1f | %.1f %% |\n", label.c_str(), per,
                  static_cast<double>(t.calls) / static_cast<double>(forwards_), 1e3 * t.ms / static_cast<double>(t.calls),
                  100.0 * t.ms / sum);
    out += line;
  }
  std::snprintf(line, sizeof line, "| total | %.3f | | | (%lld forwards%s) |\n", sum / static_cast<double>(forwards_),
                static_cast<long long>(forwards_), dropped_ > 0 ? ", marks dropped: capacity too small" : "");
  out += line;
  return out;
}

void OpTimer::reset() {
  totals_.clear();
  forwards_ = 0;
  dropped_ = 0;
  used_ = 0;
}

}  // namespace adakv::cuda
