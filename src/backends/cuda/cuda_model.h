// The whole forward pass of a Llama-family model (Llama 2/3, Mistral, Qwen2, Qwen3: the CPU
// forward's families, src/model/transformer.h) on one CUDA device, over the per-head paged KV
// cache, for a batch of sequences per step.
//
// Memory, all allocated by create(): bf16 weights (fp32/fp16 checkpoints converted at upload;
// norms, biases and RoPE frequencies in fp32), a workspace for max_step_tokens tokens, and one KV
// pool of bf16 K/V pages (16 entries of one (sequence, layer, kv head) row each) sized by
// gpu_memory_fraction of the memory left free. A step allocates nothing.
//
// The KvCacheManager stays the host-side source of truth: the caller creates it with
// kv_layout() and num_pages(); step() reserves and commits the step's entries there, mirrors the
// rows' page lists into a dense device table ([max_seqs * layers * Hkv][max_pages_per_row], the
// manager's row ids), and for compression downloads the device's keep lists, calls
// keep_entries (or evict_entries for KV-Compress), and applies the same moves on the device
// (compact_kv_rows; K, V, positions and the per-slot metric move together).
//
// Compression on the device: the window policies, CriticalKV / ada-CriticalKV (window scores +
// value norms through o_proj, two-stage selection) and H2O (prompt accumulation, heavy hitters +
// recent) compress each layer right after its prefill attention; KV-Compress scores each layer
// and selects blocks across layers after the prefill's last layer; H2O and KV-Compress keep a
// per-slot fp32 metric next to the pool (new entries start at zero, every later step adds the
// last query's attention after each layer); continual policies compress through compress_now.
//
// A step: embed -> per layer [fused add+RMSNorm -> qkv GEMM -> bias/q-k norm/RoPE -> K/V append
// into pages -> attention -> (compression scores + selection + compaction, once after a fresh
// prefill) -> o GEMM -> fused add+RMSNorm -> gate/up GEMM -> SwiGLU -> down GEMM] -> final norm of
// the rows that need logits -> lm_head GEMM (fp32 logits) -> optional device sampling.
// Attention: one-token steps through decode_attention over pages (all such sequences in one
// launch); longer steps through prefill_attention on the step's contiguous K/V, or on a gather of
// the rows when they already held entries; head dims other than 64/128 (the fixtures) through
// attention_generic. Decode attention's per-layer plans for the next decode step are made while
// the device runs this one (CudaModelOptions::plan_ahead).
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

namespace adakv::cuda {

struct CudaModelOptions {
  int32_t max_seqs = 8;             // sequence ids 0 .. max_seqs-1 may be used with the manager
  int32_t max_step_tokens = 4096;   // tokens of one step, summed over its sequences
  int32_t max_logit_rows = 0;       // logit rows one step may return; 0 = max(max_seqs, 1)
  int64_t max_context = 0;          // longest sequence; 0 = the config's context length
  double gpu_memory_fraction = 0.9; // of the free memory after weights and workspace, for the pool
  int64_t num_pages = 0;            // > 0: exactly this many pages instead of the fraction
  // Compression after a prefill (any policy compression_supported accepts); null or full: none.
  // The default of every sequence that set_compression() has not given its own config.
  const CompressConfig* compress = nullptr;
  // Largest observation window a per-sequence config (set_compression) may use: sizes the
  // window scorer and the chunked-prefill query ring ([max_seqs][layers][max_window][q_dim] bf16).
  // 0: window policies only through `compress`.
  int32_t max_window = 0;
  // Keep each compressed layer's GPU scores and inputs on the host for tests (compression_audit()).
  bool audit_compression = false;
  // Decode-only steps (every sequence one token, no compression or metric to update) replay a
  // CUDA graph of the forward captured at the first step of each batch size: one launch instead
  // of ~13 per layer. ADAKV_CUDA_GRAPHS=0 in the environment turns it off too.
  bool cuda_graphs = true;
  // Decode attention overlaps its prologue (plan and page-id loads, first K/V pages requested in
  // L2) with the kernel before it (programmatic dependent launch, sm_90); ADAKV_DECODE_OVERLAP=1
  // or 0 in the environment overrides this. Results are identical either way. The kernel before
  // it is the K/V append, itself a dependent launch that lets the attention's blocks in as soon as
  // it has waited (dependent_launch.h); with both, whole decode steps at batch 1 and 8 gained
  // 0.4-1 % over the plain attention launch (H200, 2026-11-28, docs/benchmarks.md). Before the
  // model ops launched as dependents (session 9) the overlap gained nothing and was off.
  bool decode_overlap = true;
  // After launching a decode step, plan the next one's decode attention while the device runs,
  // guessing the same sequences one token further; a wrong guess is planned again at the next
  // step. Results are identical either way; off only to compare.
  bool plan_ahead = true;
};

// Sampling of one sequence's next token on the device (engine/sampler.h's semantics).
struct StepSampling {
  float temperature = 0.f;  // 0: greedy
  int32_t top_k = 0;
  float top_p = 1.f;
  double u = 0.0;           // uniform [0, 1) for the draw (see sampling.h)
};

struct SeqStep {
  SeqId seq = -1;
  std::span<const int32_t> tokens;  // >= 1 new tokens
  bool all_logits = false;          // logits of every token, else of the last one
  // This step ends the prompt (the whole prompt, or its last chunk): compress the sequence's rows
  // with its policy, once, when they still hold every token (nothing compressed before). After a
  // chunked prefill the window queries are the prompt's last w (earlier chunks' from the ring that
  // prefill_part keeps) and the keys are read back from the pages.
  bool compress = false;
  // A prompt chunk before the last: keep its trailing window queries for the last chunk.
  bool prefill_part = false;
  const StepSampling* sampling = nullptr;  // sample the next token on the device, or null
};

struct StepResult {
  std::vector<float> logits;      // [rows][vocab], rows in the order of the steps (when asked)
  std::vector<int32_t> sampled;   // [steps] next token of each step with sampling, else -1
};

// What the compression of one (sequence, layer) saw and decided (audit_compression).
struct CompressionAuditLayer {
  SeqId seq = -1;
  int32_t layer = 0;
  int32_t length = 0;                 // L of every row
  int32_t selection_budget = 0;
  std::vector<float> scores;          // [Hkv][L - w] GPU scores
  std::vector<uint16_t> queries;      // [w][H][d] bf16 bits: the window's post-RoPE queries
  std::vector<uint16_t> keys;         // [L][Hkv][d] bf16 bits: the layer's keys
  std::vector<std::vector<int32_t>> keep;  // [Hkv] the GPU's keep lists (empty rows for kvcompress)
  // H2O: queries holds all L queries [L][H][d]; metric [Hkv][L] the prompt accumulation.
  // KV-Compress: metric [Hkv][L] the prefill metric (selection is cross-layer, after the step).
  std::vector<float> metric;
  std::vector<float> crit;            // CriticalKV: [Hkv][L - w] second-stage scores
  std::vector<uint16_t> values;       // CriticalKV: [L][Hkv][d] bf16 bits: the layer's values
};

class CudaModel {
 public:
  // From a checkpoint folder (config.json + safetensors).
  static Expected<std::unique_ptr<CudaModel>> load(const std::string& model_dir, const CudaModelOptions& options);
  // Random bf16 weights generated on the device for `config` (benchmarks: no file).
  static Expected<std::unique_ptr<CudaModel>> random(const ModelConfig& config, uint64_t seed,
                                                     const CudaModelOptions& options);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const ModelConfig& config() const;
  KvLayout kv_layout() const;        // page size 16
  int64_t num_pages() const;         // size the KvCacheManager with this
  int64_t context_length() const;    // as Transformer::context_length
  int64_t weight_bytes() const;
  int64_t kv_pool_bytes() const;
  std::string memory_summary() const;

  // Runs one step for `steps` (distinct sequences of `manager`, ids < max_seqs): reserves and
  // commits their entries (kResourceExhausted naming the pages when they do not fit: nothing is
  // changed then), runs the forward, compresses, advances the logical lengths. `want_logits`
  // copies the logits to the host. Synchronises with the device before returning.
  Status step(std::span<const SeqStep> steps, KvCacheManager& manager, bool want_logits, StepResult* result);

  // Continual compression of one sequence now (streamingllm, h2o, kvcompress: every `interval`
  // decode steps, or instead of preempting it); a no-op for other policies. `pages_freed`
  // (optional) receives the pages the manager got back.
  Status compress_now(SeqId seq, KvCacheManager& manager, int64_t* pages_freed = nullptr);
  // The same (kept for callers written for streamingllm only).
  Status compress_streaming(SeqId seq, KvCacheManager& manager) { return compress_now(seq, manager); }
  // `seq`'s own compression config (per-request policies) until on_release(seq); validated, and
  // refused (kUnimplemented) for policies the device cannot run yet (see compression_supported).
  Status set_compression(SeqId seq, const CompressConfig& config);
  // Forget the device mirror of a released sequence's rows (call with manager.release(seq)).
  void on_release(SeqId seq);

  const std::vector<CompressionAuditLayer>& compression_audit() const;
  // One row's per-slot metric and token positions in entry order, read back from the device
  // (tests: continual H2O / KV-Compress against the host policy). Synchronises.
  Status read_row(const KvCacheManager& manager, SeqId seq, int32_t layer, int32_t kv_head, std::vector<float>* metric,
                  std::vector<int32_t>* positions) const;
  // Device time of the last step's forward (CUDA events), milliseconds.
  float last_step_ms() const;
  // Where the last step's time went (host clock, ms; device_ms and download_ms from CUDA events):
  // cheap, always measured; the engine's ADAKV_PROFILE reports it.
  struct StepTiming {
    double prep_ms = 0;      // checks, reserve / commit, metadata
    double mirror_ms = 0;    // page-table mirror (host side)
    double plan_ms = 0;      // decode-attention plans
    double plan_ahead_ms = 0;  // the next decode step's plans, made while the device runs this one
    int32_t plans_built = 0;   // layers whose decode plan this step had to build (not kept or guessed)
    double enqueue_ms = 0;   // the forward's launches (and compression bookkeeping)
    double wait_ms = 0;      // cudaStreamSynchronize (after plan_ahead)
    double results_ms = 0;   // logits / sampled ids into the StepResult
    double compress_ms = 0;  // host side of compression after the forward
    double device_ms = 0;    // forward + device sampling
    double download_ms = 0;  // device->host copies after the forward (logits, keep lists)
    int64_t logit_bytes = 0;
    bool graph = false;      // the forward was a CUDA graph replay (or its capture)
  };
  // CUDA graphs captured so far (one per decode batch shape).
  int64_t num_graphs() const;
  const StepTiming& last_step_timing() const;
  // With ADAKV_PROFILE_OPS=1 in the environment at load: device ms per op per forward since the
  // last reset, as a markdown table (op_timer.h); "" otherwise.
  std::string op_profile() const;
  void reset_op_profile();

  struct Impl;

 private:
  CudaModel() = default;
  std::unique_ptr<Impl> impl_;
};

// Whether a CUDA device is usable; the reason otherwise ("no CUDA device", driver errors).
Status cuda_device_available();
// The current device's name ("NVIDIA H100 80GB HBM3"), or "no device".
std::string cuda_device_name();

// Whether the device runs `config`'s policy (every policy of method.md does: full, snapkv,
// pyramidkv, ada-snapkv, ada-pyramidkv, criticalkv, ada-criticalkv, h2o, kvcompress,
// streamingllm, random); kUnimplemented naming the policy otherwise (a policy added to the host
// before the device).
Status compression_supported(const CompressConfig& config);

}  // namespace adakv::cuda
