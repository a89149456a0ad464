#include "server/server_metrics.h"

#include <cstdio>

namespace adakv::server {
namespace {

void metric(std::string& out, const char* name, const char* type, const char* help, double value) {
  out += "# HELP ";
  out += name;
  out += ' ';
  out += help;
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
  out += name;
  char buf[64];
  std::snprintf(buf, sizeof buf, " %.17g\n", value);
  out += buf;
}

void metric(std::string& out, const char* name, const char* type, const char* help, int64_t value) {
  metric(out, name, type, help, static_cast<double>(value));
}

}  // namespace

void ServerCounters::count_response(const std::string& route, int status) {
  std::lock_guard lock(mu_);
  ++responses_[{route, status}];
}

std::map<std::pair<std::string, int>, int64_t> ServerCounters::responses() const {
  std::lock_guard lock(mu_);
  return responses_;
}

std::string metrics_text(const std::optional<EngineStats>& stats, const ServerCounters& c, bool ready) {
  std::string out;
  metric(out, "adakv_ready", "gauge", "1 once the model is loaded and requests are served.", int64_t{ready ? 1 : 0});

  out += "# HELP adakv_http_responses_total HTTP responses by route and status code.\n";
  out += "# TYPE adakv_http_responses_total counter\n";
  for (const auto& [key, n] : c.responses()) {
    out += "adakv_http_responses_total{route=\"" + key.first + "\",code=\"" + std::to_string(key.second) + "\"} " +
           std::to_string(n) + "\n";
  }
  out += "# HELP adakv_requests_cancelled_total Generation requests the server cancelled, by reason.\n";
  out += "# TYPE adakv_requests_cancelled_total counter\n";
  out += "adakv_requests_cancelled_total{reason=\"disconnect\"} " + std::to_string(c.cancelled_by_disconnect.load()) + "\n";
  out += "adakv_requests_cancelled_total{reason=\"shutdown\"} " + std::to_string(c.cancelled_by_shutdown.load()) + "\n";
  out += "adakv_requests_cancelled_total{reason=\"stop_string\"} " + std::to_string(c.stopped_by_stop_string.load()) + "\n";
  metric(out, "adakv_http_generations_active", "gauge", "Generation requests the HTTP server is answering now.",
         c.generations_active.load());

  if (!stats) return out;
  const EngineStats& s = *stats;
  metric(out, "adakv_requests_total", "counter", "Requests the engine accepted.", s.requests_total);
  metric(out, "adakv_requests_finished_total", "counter", "Requests the engine finished (any reason).",
         s.requests_finished);
  metric(out, "adakv_requests_running", "gauge", "Sequences being prefilled or decoded.", s.requests_running);
  metric(out, "adakv_requests_waiting", "gauge", "Requests queued for admission (queue length).", s.requests_waiting);
  metric(out, "adakv_requests_running_peak", "gauge", "Most sequences running at once so far.", s.peak_running);
  metric(out, "adakv_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", s.prompt_tokens_total);
  metric(out, "adakv_generated_tokens_total", "counter", "Tokens generated.", s.generated_tokens_total);
  metric(out, "adakv_generation_tokens_per_second", "gauge", "Generated tokens per second over the last few seconds.",
         s.tokens_per_second);
  metric(out, "adakv_preemptions_total", "counter", "Sequences preempted (recomputed later) for lack of pages.",
         s.preemptions_total);
  metric(out, "adakv_kv_pages_total", "gauge", "Pages in the KV pool.", s.kv_pages_total);
  metric(out, "adakv_kv_pages_used", "gauge", "KV pages holding entries now.", s.kv_pages_used);
  metric(out, "adakv_kv_pages_free", "gauge", "KV pages free now.", s.kv_pages_total - s.kv_pages_used);
  metric(out, "adakv_kv_pages_used_peak", "gauge", "Most KV pages used at once so far.", s.peak_kv_pages_used);
  metric(out, "adakv_kv_tokens_kept_total", "counter", "KV entries kept after compression, over finished prefills.",
         s.kv_entries_kept_total);
  metric(out, "adakv_kv_tokens_evicted_total", "counter", "KV entries evicted by compression, over finished prefills.",
         s.kv_entries_evicted_total);
  const double ratio = s.kv_entries_kept_total > 0
                           ? static_cast<double>(s.kv_entries_kept_total + s.kv_entries_evicted_total) /
                                 static_cast<double>(s.kv_entries_kept_total)
                           : 1.0;
  metric(out, "adakv_kv_compression_ratio", "gauge", "(kept + evicted) / kept KV entries over finished prefills.", ratio);
  return out;
}

}  // namespace adakv::server
