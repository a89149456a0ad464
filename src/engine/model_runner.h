// The model behind the scheduler: one batched step over many sequences, plus the KV pool the
// step reads and appends to and the compression that runs inside it. The scheduler
// (engine/scheduler.h) decides what each sequence feeds and whether the pages fit; the runner
// only executes. This is the seam between the scheduler and a backend: the CPU runner
// (cpu_model_runner.h) wraps Transformer::forward per sequence; a CUDA runner implements the same
// calls with one batched forward and device-side K/V, compression and sampling inputs.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "compress/compress_config.h"
#include "core/status.h"
#include "kv/kv_cache_manager.h"
#include "model/model_config.h"

namespace adakv {

// What one item of a step does to its sequence's cache (compression semantics as in
// engine/compression_observer.h).
enum class StepPhase : uint8_t {
  kPrefillPart,  // a prompt chunk that is not the last: rows stay complete, nothing compressed
  kPrefillLast,  // the prompt's last chunk (or the whole prompt): each layer is compressed right
                 // after its attention, then sequence-level compression (KV-Compress)
  kAppend,       // tokens appended to an already prefilled cache, not compressed (recompute of
                 // the generated tokens of a preempted request)
  kDecode,       // one token; continual policies observe it and compress every `interval` steps
};
const char* step_phase_name(StepPhase p);

// The next token of an item chosen by the runner (ModelRunner::samples_on_device), with
// engine/sampler.h's semantics: temperature 0 is greedy (argmax, lowest id on ties); otherwise
// `u` is the request Sampler's own uniform draw (Sampler::next_uniform), so a seed reproduces the
// host's choice.
struct ItemSampling {
  float temperature = 0.f;
  int32_t top_k = 0;
  float top_p = 1.f;
  double u = 0.0;
};

struct StepItem {
  SeqId seq = -1;
  std::span<const int32_t> tokens;  // appended at the sequence's logical length
  StepPhase phase = StepPhase::kDecode;
  bool need_logits = false;         // the logits of the item's last token are wanted
  // With need_logits on a runner that samples on the device: sample there and return the token
  // (StepResult::sampled) instead of the logits row. Null: the logits row comes back.
  const ItemSampling* sampling = nullptr;
};

// Host-side time of one step inside the runner, milliseconds (ADAKV_PROFILE; zero where a
// runner does not measure). device_ms is the device's own time of the forward (events).
struct StepTimings {
  double prep_ms = 0;      // checks, reserve/commit, per-step metadata (host)
  double mirror_ms = 0;    // page-table mirror: rows compared, updates staged (host)
  double plan_ms = 0;      // decode-attention plans (host)
  double enqueue_ms = 0;   // launching the forward (host)
  double wait_ms = 0;      // while the device runs: the next step's plans (CUDA) and the synchronize
  double results_ms = 0;   // logits / tokens copied into the result (host)
  double compress_ms = 0;  // host side of compression (keep lists to the manager, continual)
  double device_ms = 0;    // forward + device sampling (CUDA events)
  double download_ms = 0;  // device->host copies after the forward (CUDA events)
  int64_t logit_bytes = 0; // bytes of logits copied to the host
};

struct StepResult {
  std::vector<float> logits;        // [rows][vocab]: one row per item with need_logits, in item order
  std::vector<int32_t> logits_row;  // [items] the item's row in `logits`, -1 when none
  std::vector<int32_t> sampled;     // [items] token sampled by the runner (item.sampling), else -1
  std::vector<Status> status;       // [items] ok, or why this item failed (others are unaffected)
  StepTimings timings;
};

class ModelRunner {
 public:
  virtual ~ModelRunner() = default;

  virtual const ModelConfig& config() const = 0;
  virtual const std::string& model_dir() const = 0;
  // Longest sequence (prompt + generated) the model may see.
  virtual int64_t context_length() const = 0;
  // Bytes of K/V one page holds on this backend (for sizing a pool from a memory limit).
  virtual int64_t kv_bytes_per_page() const = 0;

  // The pool's host metadata. The scheduler reads it and reserves against it; only the runner
  // mutates it (commit inside step(), compaction, release).
  virtual const KvCacheManager& kv() const = 0;

  // A new empty sequence whose cache is compressed with `compress` (validated by the caller).
  // Fails only when the policy needs model data that cannot be loaded (CriticalKV's o_proj).
  virtual Expected<SeqId> add_sequence(const CompressConfig& compress) = 0;
  // Frees every page and all per-sequence state; the id may be reused.
  virtual void release_sequence(SeqId seq) = 0;

  // Runs one step. Items belong to distinct live sequences; the scheduler has checked with
  // kv().reserve() that all their growths fit the free pages together. Each item's tokens are
  // committed, written and attended; an item that fails leaves the other items' results valid
  // (its own sequence should be released by the caller).
  virtual void step(std::span<const StepItem> items, StepResult* out) = 0;

  // Continual policies (H2O, StreamingLLM, KV-Compress) of `seq` compress now, off their
  // interval, to free pages before the scheduler preempts anyone. Returns pages freed (0 for
  // policies that only compress after the prefill).
  virtual int64_t compress_now(SeqId seq) = 0;

  // Whether step() honours StepItem::sampling (the next token chosen where the logits are, only
  // the token coming back). The scheduler then samples on the host only for requests that need
  // the whole distribution.
  virtual bool samples_on_device() const { return false; }
};

struct CpuRunnerOptions {
  int32_t page_size = 16;
  int64_t kv_pages = 0;          // pool size; 0: from kv_memory_bytes
  int64_t kv_memory_bytes = 0;   // 0: 1 GiB
};

// Loads the checkpoint of `model_dir` and a CPU K/V pool (fp32) sized from `options`.
Expected<std::unique_ptr<ModelRunner>> create_cpu_model_runner(const std::string& model_dir,
                                                               const CpuRunnerOptions& options);

}  // namespace adakv
