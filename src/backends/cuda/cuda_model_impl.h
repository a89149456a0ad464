// CudaModel's internals (cuda_model.h), shared by its source files only: the device state of one
// model (weights, KV pool and page-table mirror, step workspace, compression buffers, graphs) and
// the helpers they use. Split by concern:
//   cuda_model.cc           creation, options, accessors
//   cuda_model_memory.cc    weights (upload, random) and the runtime allocations
//   cuda_model_step.cc      the batched step: its phases, results, the host side of compression
//   cuda_model_step_prepare.cc  the step's checks, KV reservation, metadata, compression plan
//   cuda_model_forward.cc   the forward it enqueues (per layer: projections, attention, compression)
//   cuda_model_compress.cc  compression: prompt scoring and selection, continual policies
#pragma once

#include "backends/cuda/cuda_model.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <string>

#include "backends/cuda/compact_kv.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/cuda_model_step_plan.h"
#include "backends/cuda/decode_attention.h"
#include "backends/cuda/gemm_lt.h"
#include "backends/cuda/metric_kv.h"
#include "backends/cuda/model_ops.h"
#include "backends/cuda/op_timer.h"
#include "backends/cuda/paged_kv_view.h"
#include "backends/cuda/prefill_attention.h"
#include "backends/cuda/sampling.h"
#include "backends/cuda/score_critical.h"
#include "backends/cuda/score_random.h"
#include "backends/cuda/score_window.h"
#include "backends/cuda/select_keep.h"
#include "compress/policy.h"
#include "core/dtype.h"
#include "io/safetensors.h"
#include "model/rope.h"

namespace adakv::cuda {

using bf16 = __nv_bfloat16;

namespace cuda_model_detail {

struct DevLayer {
  bf16* qkv = nullptr;        // [q_dim + 2 kv_dim][hidden]
  bf16* o = nullptr;          // [hidden][q_dim]
  bf16* gate_up = nullptr;    // [2 inter][hidden]
  bf16* down = nullptr;       // [hidden][inter]
  float* input_norm = nullptr;  // [hidden]
  float* post_norm = nullptr;   // [hidden]
  float* qkv_bias = nullptr;    // [q_dim + 2 kv_dim] or null
  float* q_norm = nullptr;      // [head_dim] or null
  float* k_norm = nullptr;      // [head_dim] or null
  float* o_bias = nullptr;      // [hidden] or null
};

inline std::string mib(int64_t bytes) { return std::to_string((bytes + (1 << 19)) >> 20) + " MiB"; }

// H2O and KV-Compress keep a per-slot metric (accumulated attention).
inline bool metric_policy(KvPolicy p) { return p == KvPolicy::kH2o || p == KvPolicy::kKvCompress; }
// Prompt compression runs per layer on the scorer's workspace (window scores, H2O accumulation,
// KV-Compress metric, random scores) and the keep selector.
inline bool scorer_policy(KvPolicy p) { return policy_uses_window_scores(p) || metric_policy(p) || p == KvPolicy::kRandom; }
// Chunked prompts keep their trailing window queries in the ring for the last chunk (H2O instead
// adds each chunk's attention to the metric as it goes; random needs no queries).
inline bool ring_policy(KvPolicy p) { return policy_uses_window_scores(p) || p == KvPolicy::kKvCompress; }
// metric_decode_add's mode: 0 mean over the group, 1 max (H2O), 2 sum of p^2 (KV-Compress).
inline int32_t metric_mode(const CompressConfig& c) {
  if (c.policy == KvPolicy::kKvCompress) return 2;
  return c.gqa == GqaReduce::kMax ? 1 : 0;
}

}  // namespace cuda_model_detail

struct CudaModel::Impl {
  ModelConfig cfg;
  CudaModelOptions opt;
  CompressConfig comp;   // the default config (options.compress)
  bool has_comp = false;
  // Per-sequence configs (set_compression), [max_seqs] each.
  std::vector<CompressConfig> seq_comp;
  std::vector<uint8_t> seq_has_comp;    // 1: seq_comp applies, else the default
  std::vector<uint8_t> seq_compressed;  // the prompt was compressed (never twice)
  // Chunked prompts: tokens whose trailing window queries the ring holds (window policies,
  // KV-Compress), or whose attention the metric holds (H2O).
  std::vector<int64_t> ring_end;
  int32_t max_window = 0;               // window capacity (scorer, ring); 0: no window policies
  Status window_status;                 // why window policies cannot run (max_window > 0, no scorer)
  // The config compressing `s`, or null (full cache).
  const CompressConfig* comp_of(SeqId s) const {
    const CompressConfig* c = seq_has_comp[static_cast<size_t>(s)] ? &seq_comp[static_cast<size_t>(s)] : (has_comp ? &comp : nullptr);
    return c != nullptr && policy_compresses(c->policy) ? c : nullptr;
  }
  int64_t max_context = 0;
  int32_t max_logit_rows = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t ev_start = nullptr, ev_end = nullptr, ev_copied = nullptr;
  float last_ms = 0.f;
  CudaModel::StepTiming timing;
  std::vector<void*> device_allocs;
  std::vector<void*> host_allocs;
  int64_t weight_bytes = 0, pool_bytes = 0, workspace_bytes = 0;

  // Weights.
  bf16* embed = nullptr;    // [vocab][hidden]
  bf16* lm_head = nullptr;  // [vocab][hidden] (== embed when tied)
  float* final_norm = nullptr;
  float* inv_freq = nullptr;  // [d / 2]
  std::vector<cuda_model_detail::DevLayer> layers;

  // KV pool and the page-table mirror.
  int64_t num_pages = 0;
  int32_t max_pages_per_row = 0;
  int32_t rows_per_seq = 0;
  DeviceKvPool pool;
  int32_t* page_table = nullptr;       // [max_seqs * rows_per_seq][max_pages_per_row]
  int32_t* row_offsets_all = nullptr;  // [max_seqs * rows_per_seq] = row * max_pages_per_row
  std::vector<int32_t> shadow;            // host copy of page_table
  std::vector<int32_t> shadow_count;      // [rows] pages of the row mirrored
  std::vector<uint64_t> mirrored_serial;  // [max_seqs] KvCacheManager::sequence_serial mirrored (0: none)
  std::vector<uint64_t> mirrored_shrinks;  // [max_seqs] KvCacheManager::sequence_shrinks at that mirror
  int2* pt_dev = nullptr;
  int2* pt_host = nullptr;
  int64_t pt_cap = 0;

  // Workspace for max_step_tokens tokens.
  float* x = nullptr;       // [T][hidden] fp32 residual
  bf16* h = nullptr;        // [T][hidden]
  bf16* qkv = nullptr;      // [T][q_dim + 2 kv_dim]
  bf16* attn = nullptr;     // [T][q_dim]
  bf16* gu = nullptr;       // [T][2 inter]
  bf16* act = nullptr;      // [T][inter]
  bf16* delta = nullptr;    // [T][hidden]
  float2* cos_sin = nullptr;  // [T][d / 2]
  bf16* hsel = nullptr;     // [R][hidden]
  float* logits = nullptr;  // [R][vocab]
  int32_t* meta_dev = nullptr;  // per-step int32 metadata (layout built per step)
  int32_t* meta_host = nullptr;
  int64_t meta_cap = 0;
  DeviceSamplingRow* samp_dev = nullptr;
  DeviceSamplingRow* samp_host = nullptr;
  int32_t* sampled_dev = nullptr;
  int32_t* sampled_host = nullptr;
  float* logits_host = nullptr;  // pinned [R][vocab]

  std::unique_ptr<GemmLt> gemm;
  std::unique_ptr<DecodeAttentionLayers> decode;  // one per layer, plans uploaded together
  bool fast_decode = false, fast_prefill = false;
  bf16* gather_k = nullptr;  // [Hkv][max_context][d]
  bf16* gather_v = nullptr;

  // Compression.
  std::unique_ptr<WindowScorer> scorer;
  std::unique_ptr<KeepSelector> selector;
  float* scores = nullptr;     // [Hkv][max(T, max_context)]
  int32_t* keep_dev = nullptr;  // [keep_cap] keep lists of the compressing sequences ([rows][P] each)
  int32_t* keep_host = nullptr;
  int64_t keep_cap = 0;
  bf16* win_ring = nullptr;  // [max_seqs][layers][max_window][q_dim]: token p's queries at row p % w
  bf16* win_buf = nullptr;   // [max_window][q_dim] the window of a chunked prompt, assembled
  // H2O: the step's prefill attention also writes each query's log-sum-exp, [H][n] per sequence at
  // lse_buf + H * tok0, so that the H2O scorer skips its statistics pass.
  float* lse_buf = nullptr;  // [max_step_tokens][H]
  const float* h2o_lse(int32_t tok0) const {
    return fast_prefill && lse_buf != nullptr ? lse_buf + int64_t{tok0} * cfg.num_heads : nullptr;
  }
  int64_t stream_cap = 0;    // entries of stream_keep_dev / host
  int32_t* counts_dev = nullptr;  // [max_seqs][layers][Hkv]
  int32_t* counts_host = nullptr;
  int32_t* stream_keep_dev = nullptr;  // streamingllm: [rows_per_seq][budget]
  int32_t* stream_keep_host = nullptr;
  int32_t* stream_counts_dev = nullptr;
  int32_t* h2o_len_dev = nullptr;      // [rows_per_seq] H2O's continual plan: the row lengths
  int32_t* h2o_counts_host = nullptr;  // [rows_per_seq] pinned: its kept counts
  std::vector<CompressionAuditLayer> audit;
  // audit_compression, chunked H2O: the queries of the prompt's earlier chunks per (seq, layer).
  std::map<std::pair<SeqId, int32_t>, std::vector<uint16_t>> audit_prompt_queries;
  // Per-slot metric (H2O, KV-Compress) and the pieces that use it.
  float* metric = nullptr;     // [num_pages * kPageSize] fp32, moved with K/V by compaction
  float* crit = nullptr;       // [Hkv][max_len] CriticalKV second-stage scores
  int2* zero_dev = nullptr;    // (slot, 0) pairs: the step's new entries of metric sequences
  int2* zero_host = nullptr;
  int64_t zero_cap = 0;
  int32_t* rows_off_dev = nullptr;  // [rows_per_seq] offsets of ragged keep lists (apply_row_keeps)
  float* gath = nullptr;       // [rows_per_seq][longest row] metric gathered for H2O's continual selection
  int64_t gath_cap = 0;
  std::unique_ptr<KvcSelector> kvc;
  int64_t kvc_cap = 0;

  // Decode-only forwards as CUDA graphs, by (batch, sampled rows); graphs_enabled: not turned off
  // by ADAKV_CUDA_GRAPHS=0, and no capture has failed.
  std::map<std::pair<int32_t, int32_t>, cudaGraphExec_t> graphs;
  bool graphs_enabled = true;
  // CudaModelOptions::decode_overlap unless ADAKV_DECODE_OVERLAP says 0 or 1.
  bool overlap_decode_prologue = false;
  int32_t decode_merge_warps = 0;  // ADAKV_DECODE_MERGE_WARPS (diagnostics; 0: from each plan)
  // Who merges the pieces of split rows: the fused merge where no row has more than 16 (batch 8
  // and up), the merge kernel for the many pieces of a small batch. H200, 2026-11-28: the fused
  // merge gained 3-4.5 points of copy bandwidth at batch 8 / 4K and lost none from batch 8 on.
  // ADAKV_DECODE_MERGE=kernel|fused overrides it (diagnostics). A captured graph keeps the merge
  // of its capture; either merges any plan correctly.
  DecodeMerge decode_merge = DecodeMerge::kAuto;
  // ADAKV_PROFILE_OPS=1: device time per op of every forward (op_timer.h; no graphs then).
  OpTimer ops;
  // Launches the graph of `forward` for this shape on `stream`, capturing it first if new. A
  // capture that fails turns graphs off and runs `forward` directly (the step is not lost).
  template <typename F>
  Status run_graph(int32_t batch, int32_t sampled, F&& forward) {
    const auto key = std::make_pair(batch, sampled);
    auto it = graphs.find(key);
    if (it == graphs.end()) {
      ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      const Status fs = forward();
      cudaGraph_t g = nullptr;
      const cudaError_t ce = cudaStreamEndCapture(stream, &g);
      cudaGraphExec_t exec = nullptr;
      cudaError_t ie = cudaErrorUnknown;
      if (fs.is_ok() && ce == cudaSuccess && g != nullptr) ie = cudaGraphInstantiate(&exec, g, 0);
      if (g != nullptr) cudaGraphDestroy(g);
      if (!fs.is_ok()) return fs;
      if (ce != cudaSuccess || ie != cudaSuccess) {
        cudaGetLastError();  // clear the capture's error; run without graphs from now on
        graphs_enabled = false;
        return forward();
      }
      it = graphs.emplace(key, exec).first;
    }
    ADAKV_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second, stream));
    return Status::ok();
  }

  ~Impl() {
    for (auto& [key, exec] : graphs) cudaGraphExecDestroy(exec);
    decode.reset();
    kvc.reset();
    scorer.reset();
    selector.reset();
    gemm.reset();
    for (void* p : device_allocs) cudaFree(p);
    for (void* p : host_allocs) cudaFreeHost(p);
    if (ev_start) cudaEventDestroy(ev_start);
    if (ev_end) cudaEventDestroy(ev_end);
    if (ev_copied) cudaEventDestroy(ev_copied);
    if (stream) cudaStreamDestroy(stream);
  }

  template <typename T>
  Status alloc(T** p, int64_t count, const std::string& what, int64_t* account) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
    void* raw = nullptr;
    const cudaError_t err = cudaMalloc(&raw, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      return resource_exhausted("CUDA out of memory allocating " + what + " (" + cuda_model_detail::mib(static_cast<int64_t>(bytes)) +
                                "); " + cuda_model_detail::mib(static_cast<int64_t>(free_b)) + " free of " +
                                cuda_model_detail::mib(static_cast<int64_t>(total_b)) + " (weights " +
                                cuda_model_detail::mib(weight_bytes) + ", workspace " +
                                cuda_model_detail::mib(workspace_bytes) + ", KV pool " +
                                cuda_model_detail::mib(pool_bytes) + ")");
    }
    device_allocs.push_back(raw);
    if (account != nullptr) *account += static_cast<int64_t>(bytes);
    *p = static_cast<T*>(raw);
    return Status::ok();
  }
  template <typename T>
  Status alloc_host(T** p, int64_t count, const std::string& what) {
    void* raw = nullptr;
    const cudaError_t err = cudaMallocHost(&raw, static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T));
    if (err != cudaSuccess) {
      cudaGetLastError();
      return resource_exhausted("pinned host memory for " + what + ": " + cudaGetErrorString(err));
    }
    host_allocs.push_back(raw);
    *p = static_cast<T*>(raw);
    return Status::ok();
  }

  int64_t q_dim() const { return cfg.q_dim(); }
  int64_t kv_dim() const { return cfg.kv_dim(); }
  int64_t qkv_dim() const { return cfg.q_dim() + 2 * cfg.kv_dim(); }

  Status allocate_weights();
  Status upload(const Checkpoint& ckpt);
  Status randomize(uint64_t seed);
  Status allocate_runtime();
  Status mirror_rows(SeqId seq, const KvCacheManager& m, int64_t* n_updates);

  // The phases of CudaModel::step, in order (StepPlan: cuda_model_step_plan.h).
  // Checks, order, KV reservation and commit, the step's host metadata.
  Status prepare_step(std::span<const SeqStep> steps, KvCacheManager& mgr, cuda_model_detail::StepPlan* sp);
  // Each layer's decode-attention plan (host work and upload; nothing while rows keep their pages).
  Status plan_decode_attention(const cuda_model_detail::StepPlan& sp);
  // The next decode step's plans, guessed from this one's rows (one entry longer), planned and
  // uploaded while the device runs this step (cuda_model_step.cc).
  Status plan_next_decode(const cuda_model_detail::StepPlan& sp);
  std::vector<int32_t> next_lengths;  // plan_next_decode's row lengths of one layer
  // Which sequences compress and how; zeroes the metric of their new entries (enqueued).
  Status plan_step_compression(KvCacheManager& mgr, cuda_model_detail::StepPlan* sp);
  Status upload_step_sampling(cuda_model_detail::StepPlan* sp);
  // The forward from the embedding to the sampled ids, enqueued on `stream` (graph-capturable for
  // decode-only steps); per layer, its attention and its compression work.
  Status enqueue_forward(const cuda_model_detail::StepPlan& sp);
  Status enqueue_layer(const cuda_model_detail::StepPlan& sp, int32_t layer);
  Status save_window_queries(const cuda_model_detail::StepPlan& sp, int32_t layer);
  Status enqueue_attention(const cuda_model_detail::StepPlan& sp, int32_t layer);
  Status enqueue_layer_compression(const cuda_model_detail::StepPlan& sp, int32_t layer);
  // After the forward: keep lists into the manager, logical lengths, continual compressions.
  Status finish_step(const cuda_model_detail::StepPlan& sp, KvCacheManager& mgr);
  // Applies the staged page-table updates now (rows committed outside step() can outgrow the
  // staging buffer, which is sized for one step's growth) and empties the buffer.
  Status flush_page_updates(int64_t* n_updates) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(pt_dev, pt_host, static_cast<size_t>(*n_updates) * sizeof(int2),
                                               cudaMemcpyHostToDevice, stream));
    ADAKV_RETURN_IF_ERROR(page_table_scatter(pt_dev, static_cast<int32_t>(*n_updates), page_table, stream));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    *n_updates = 0;
    return Status::ok();
  }
  Status run_compression_window(SeqId seq, const CompressConfig& comp, int32_t tok0, int32_t n, int32_t total,
                                const int32_t* row_len_dev, int32_t layer, int64_t keep_base, int32_t slot);
  // A chunked prompt's later chunks: every row of seq's `layer` holds its `total` entries. Gathers
  // them into gather_k / gather_v ([Hkv][max_context][d]; the attention's gather may have been
  // another sequence's) and returns `in` with its keys pointing at the gathered rows.
  Expected<WindowScoreInputs> gather_keys(SeqId seq, int32_t layer, const int32_t* row_len_dev, int32_t total,
                                          WindowScoreInputs in) {
    const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads), L = static_cast<int32_t>(cfg.num_layers);
    const int32_t d = static_cast<int32_t>(cfg.head_dim);
    const int64_t hs = max_context * d;
    ADAKV_RETURN_IF_ERROR(kv_gather_rows(pool, seq, layer, L, Hkv, d, row_len_dev, total, gather_k, gather_v, hs, stream));
    in.keys = gather_k;
    in.k_token_stride = d;
    in.k_head_stride = hs;
    return in;
  }
  // H2O over one chunk of a chunked prompt (tokens tok0 .. tok0 + n - 1 of the workspace, prompt
  // positions total - n .. total - 1): the chunk's queries' attention of every entry before them,
  // added to the metric (new entries were zeroed). The chunks' sums make the whole prompt's.
  // Leaves the chunk's [Hkv][total] share in `scores`; the keys gathered in gather_k (total > n).
  Status h2o_accumulate_chunk(SeqId seq, const CompressConfig& comp, int32_t tok0, int32_t n, int32_t total,
                              const int32_t* row_len_dev, int32_t layer);
  // Moves entries of seq's rows on the device (K, V, positions, metric): keeps[r] (r = layer * Hkv
  // + kv head) gives for each i < keeps[r].size() the entry that moves to i (i itself when it
  // stays); an empty list leaves the row alone. Synchronises. The manager is told separately.
  Status apply_row_keeps(SeqId seq, const std::vector<std::vector<int32_t>>& keeps);
  // Compaction of `rows` rows whose page-table offsets start at row_offsets: entry keep[r][i]
  // moves to i for i < counts[r] (K, V, positions and the metric together).
  KvCompactParams compaction(const int32_t* row_offsets, int32_t rows, const int32_t* keep, int64_t keep_stride,
                             const int32_t* counts) const {
    KvCompactParams cp;
    cp.k_pool = pool.k_pool;
    cp.v_pool = pool.v_pool;
    cp.page_stride = pool.page_stride;
    cp.head_dim = static_cast<int32_t>(cfg.head_dim);
    cp.positions = pool.positions;
    cp.metric = metric;
    cp.row_page_offsets = row_offsets;
    cp.page_ids = page_table;
    cp.num_rows = rows;
    cp.keep = keep;
    cp.keep_stride = keep_stride;
    cp.keep_counts = counts;
    return cp;
  }
  // Continual compressions (and KV-Compress after the prefill): device state + manager.
  Status compress_kvcompress(SeqId seq, const CompressConfig& cc, KvCacheManager& m);
  Status compress_h2o(SeqId seq, const CompressConfig& cc, KvCacheManager& m);
  Status compress_streamingllm(SeqId seq, const CompressConfig& cc, KvCacheManager& m);
  // Grows a buffer that per-sequence configs size (rare: the largest prompt / budget so far).
  template <typename T>
  Status regrow(T** dev, T** host, int64_t* cap, int64_t need, const std::string& what) {
    if (need <= *cap) return Status::ok();
    ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    for (auto* list : {&device_allocs, &host_allocs}) {
      void* old = list == &device_allocs ? static_cast<void*>(*dev) : static_cast<void*>(host ? *host : nullptr);
      auto it = std::find(list->begin(), list->end(), old);
      if (old == nullptr || it == list->end()) continue;
      list->erase(it);
      if (list == &device_allocs) cudaFree(old); else cudaFreeHost(old);
    }
    const int64_t n = std::max(need, *cap + *cap / 2);
    if (*cap > 0) workspace_bytes -= *cap * static_cast<int64_t>(sizeof(T));
    ADAKV_RETURN_IF_ERROR(alloc(dev, n, what, &workspace_bytes));
    if (host != nullptr) ADAKV_RETURN_IF_ERROR(alloc_host(host, n, what));
    *cap = n;
    return Status::ok();
  }
};

}  // namespace adakv::cuda
