// One request inside the engine: what the caller asked for and where it stands. Owned by the
// scheduler thread (no locking); the only way out is the request's callback.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include "adakv/engine.h"
#include "engine/sampler.h"
#include "kv/kv_layout.h"

namespace adakv {

using EngineClock = std::chrono::steady_clock;

struct EngineRequest {
  EngineRequest(RequestId id_, RequestParams params_, TokenCallback on_event_)
      : id(id_), params(std::move(params_)), on_event(std::move(on_event_)), sampler(params.sampling) {}

  RequestId id;              // increasing in submission order: lower = older = higher priority
  RequestParams params;
  TokenCallback on_event;
  std::vector<int32_t> stop_ids;  // the effective end tokens (empty with ignore_eos)
  Sampler sampler;                // survives preemption, so a seeded draw continues where it was

  // Prompt followed by every emitted token. The cache holds the first `fed`; the rest is fed by
  // the coming steps (after a preemption: the prompt again, then the generated tokens).
  std::vector<int32_t> tokens;
  int64_t prompt_length = 0;
  int64_t generated = 0;
  int64_t fed = 0;
  SeqId seq = -1;                 // -1 while waiting
  bool prefilled_once = false;    // a first prefill finished (its kept/evicted counts were taken)

  int32_t preemptions = 0;
  EngineClock::time_point submitted;
  bool scheduled = false;          // admitted at least once
  double queue_seconds = 0.0;
  double first_token_seconds = 0.0;
};

}  // namespace adakv
