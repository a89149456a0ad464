// CudaModel (cuda_model.h): weights, KV pool, workspace and the batched step.
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

namespace {

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

std::string mib(int64_t bytes) { return std::to_string((bytes + (1 << 19)) >> 20) + " MiB"; }

// H2O and KV-Compress keep a per-slot metric (accumulated attention).
bool metric_policy(KvPolicy p) { return p == KvPolicy::kH2o || p == KvPolicy::kKvCompress; }
// Prompt compression runs per layer on the scorer's workspace (window scores, H2O accumulation,
// KV-Compress metric, random scores) and the keep selector.
bool scorer_policy(KvPolicy p) { return policy_uses_window_scores(p) || metric_policy(p) || p == KvPolicy::kRandom; }
// Chunked prompts keep their trailing window queries in the ring for the last chunk (H2O instead
// adds each chunk's attention to the metric as it goes; random needs no queries).
bool ring_policy(KvPolicy p) { return policy_uses_window_scores(p) || p == KvPolicy::kKvCompress; }
// metric_decode_add's mode: 0 mean over the group, 1 max (H2O), 2 sum of p^2 (KV-Compress).
int32_t metric_mode(const CompressConfig& c) {
  if (c.policy == KvPolicy::kKvCompress) return 2;
  return c.gqa == GqaReduce::kMax ? 1 : 0;
}

}  // namespace

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
  std::vector<DevLayer> layers;

  // KV pool and the page-table mirror.
  int64_t num_pages = 0;
  int32_t max_pages_per_row = 0;
  int32_t rows_per_seq = 0;
  DeviceKvPool pool;
  int32_t* page_table = nullptr;       // [max_seqs * rows_per_seq][max_pages_per_row]
  int32_t* row_offsets_all = nullptr;  // [max_seqs * rows_per_seq] = row * max_pages_per_row
  std::vector<int32_t> shadow;         // host copy of page_table
  std::vector<int32_t> shadow_count;   // [rows] pages mirrored
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
  std::vector<std::unique_ptr<DecodeAttention>> decode;  // [layers]
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
    decode.clear();
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
      return resource_exhausted("CUDA out of memory allocating " + what + " (" + mib(static_cast<int64_t>(bytes)) +
                                "); " + mib(static_cast<int64_t>(free_b)) + " free of " +
                                mib(static_cast<int64_t>(total_b)) + " (weights " + mib(weight_bytes) +
                                ", workspace " + mib(workspace_bytes) + ", KV pool " + mib(pool_bytes) + ")");
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

Status compression_supported(const CompressConfig& c) {
  const KvPolicy p = c.policy;
  if (!policy_compresses(p) || scorer_policy(p) || p == KvPolicy::kStreamingLlm) return Status::ok();
  return unimplemented(std::string("cuda: kv policy ") + kv_policy_name(p) +
                       " is not on the device yet (full, snapkv, pyramidkv, ada-snapkv, ada-pyramidkv, criticalkv, "
                       "ada-criticalkv, h2o, kvcompress, streamingllm and random are); use --device cpu");
}

Status cuda_device_available() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return unimplemented(std::string("no usable CUDA device: ") + cudaGetErrorString(err));
  }
  if (count == 0) return unimplemented("no CUDA device");
  return Status::ok();
}

std::string cuda_device_name() {
  int dev = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
    cudaGetLastError();
    return "no device";
  }
  return prop.name;
}

Status CudaModel::Impl::allocate_weights() {
  const int64_t hidden = cfg.hidden_size, inter = cfg.intermediate_size, d = cfg.head_dim;
  ADAKV_RETURN_IF_ERROR(alloc(&embed, cfg.vocab_size * hidden, "embed_tokens", &weight_bytes));
  if (cfg.tie_word_embeddings) {
    lm_head = embed;
  } else {
    ADAKV_RETURN_IF_ERROR(alloc(&lm_head, cfg.vocab_size * hidden, "lm_head", &weight_bytes));
  }
  ADAKV_RETURN_IF_ERROR(alloc(&final_norm, hidden, "norm", &weight_bytes));
  ADAKV_RETURN_IF_ERROR(alloc(&inv_freq, d / 2, "rope inv_freq", &weight_bytes));
  layers.resize(static_cast<size_t>(cfg.num_layers));
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    DevLayer& L = layers[static_cast<size_t>(l)];
    const std::string p = "layer " + std::to_string(l) + " ";
    ADAKV_RETURN_IF_ERROR(alloc(&L.qkv, qkv_dim() * hidden, p + "qkv_proj", &weight_bytes));
    ADAKV_RETURN_IF_ERROR(alloc(&L.o, hidden * q_dim(), p + "o_proj", &weight_bytes));
    ADAKV_RETURN_IF_ERROR(alloc(&L.gate_up, 2 * inter * hidden, p + "gate_up_proj", &weight_bytes));
    ADAKV_RETURN_IF_ERROR(alloc(&L.down, hidden * inter, p + "down_proj", &weight_bytes));
    ADAKV_RETURN_IF_ERROR(alloc(&L.input_norm, hidden, p + "input_layernorm", &weight_bytes));
    ADAKV_RETURN_IF_ERROR(alloc(&L.post_norm, hidden, p + "post_attention_layernorm", &weight_bytes));
    if (cfg.qkv_bias) ADAKV_RETURN_IF_ERROR(alloc(&L.qkv_bias, qkv_dim(), p + "qkv bias", &weight_bytes));
    if (cfg.qk_norm) {
      ADAKV_RETURN_IF_ERROR(alloc(&L.q_norm, d, p + "q_norm", &weight_bytes));
      ADAKV_RETURN_IF_ERROR(alloc(&L.k_norm, d, p + "k_norm", &weight_bytes));
    }
    if (cfg.o_bias) ADAKV_RETURN_IF_ERROR(alloc(&L.o_bias, hidden, p + "o_proj bias", &weight_bytes));
  }
  const std::vector<float> inv = rope_inv_freq(cfg);
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq, inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice));
  return Status::ok();
}

namespace {

// Copies a checkpoint tensor (any float dtype) to the device as bf16 or fp32, at `dst`.
Status upload_tensor(const Checkpoint& ckpt, const std::string& name, const std::vector<int64_t>& shape, void* dst,
                     bool as_f32) {
  if (ckpt.find(name) == nullptr) return not_found(ckpt.dir() + ": checkpoint has no tensor '" + name + "'");
  ADAKV_ASSIGN_OR_RETURN(const TensorInfo* t, ckpt.get(name, shape));
  if (t->dtype != DType::kF32 && t->dtype != DType::kF16 && t->dtype != DType::kBF16)
    return unimplemented(ckpt.dir() + ": tensor '" + name + "' has dtype " + dtype_name(t->dtype) +
                         "; only F32, F16 and BF16 weights are supported");
  const size_t n = static_cast<size_t>(t->numel());
  std::vector<float> f(n);
  convert_to_f32(t->dtype, t->data, f.data(), n);
  if (as_f32) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, f.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  } else {
    std::vector<uint16_t> b(n);
    for (size_t i = 0; i < n; ++i) b[i] = f32_to_bf16(f[i]);
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, b.data(), n * sizeof(uint16_t), cudaMemcpyHostToDevice));
  }
  return Status::ok();
}

}  // namespace

Status CudaModel::Impl::upload(const Checkpoint& ck) {
  const int64_t hidden = cfg.hidden_size, inter = cfg.intermediate_size, d = cfg.head_dim;
  const int64_t qd = q_dim(), kd = kv_dim();
  ADAKV_RETURN_IF_ERROR(upload_tensor(ck, "model.embed_tokens.weight", {cfg.vocab_size, hidden}, embed, false));
  if (!cfg.tie_word_embeddings)
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, "lm_head.weight", {cfg.vocab_size, hidden}, lm_head, false));
  ADAKV_RETURN_IF_ERROR(upload_tensor(ck, "model.norm.weight", {hidden}, final_norm, true));
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    DevLayer& L = layers[static_cast<size_t>(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::string a = p + "self_attn.";
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, p + "input_layernorm.weight", {hidden}, L.input_norm, true));
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, p + "post_attention_layernorm.weight", {hidden}, L.post_norm, true));
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "q_proj.weight", {qd, hidden}, L.qkv, false));
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "k_proj.weight", {kd, hidden}, L.qkv + qd * hidden, false));
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "v_proj.weight", {kd, hidden}, L.qkv + (qd + kd) * hidden, false));
    if (cfg.qkv_bias) {
      ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "q_proj.bias", {qd}, L.qkv_bias, true));
      ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "k_proj.bias", {kd}, L.qkv_bias + qd, true));
      ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "v_proj.bias", {kd}, L.qkv_bias + qd + kd, true));
    }
    if (cfg.qk_norm) {
      ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "q_norm.weight", {d}, L.q_norm, true));
      ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "k_norm.weight", {d}, L.k_norm, true));
    }
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "o_proj.weight", {hidden, qd}, L.o, false));
    if (cfg.o_bias) ADAKV_RETURN_IF_ERROR(upload_tensor(ck, a + "o_proj.bias", {hidden}, L.o_bias, true));
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, p + "mlp.gate_proj.weight", {inter, hidden}, L.gate_up, false));
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, p + "mlp.up_proj.weight", {inter, hidden}, L.gate_up + inter * hidden, false));
    ADAKV_RETURN_IF_ERROR(upload_tensor(ck, p + "mlp.down_proj.weight", {hidden, inter}, L.down, false));
  }
  return Status::ok();
}

Status CudaModel::Impl::randomize(uint64_t seed) {
  const int64_t hidden = cfg.hidden_size, inter = cfg.intermediate_size, d = cfg.head_dim;
  // uniform(-a, a) with a = sqrt(3 / fan_in): unit-variance outputs from unit-variance inputs, so
  // activations stay in range through any number of layers without trained norms.
  auto lin = [&](bf16* w, int64_t rows, int64_t fan_in, uint64_t s) {
    return random_fill_bf16(w, rows * fan_in, s, std::sqrt(3.0f / static_cast<float>(fan_in)), 0.f, stream);
  };
  uint64_t s = seed * 1000003ull;
  ADAKV_RETURN_IF_ERROR(random_fill_bf16(embed, cfg.vocab_size * hidden, ++s, 1.0f, 0.f, stream));
  if (!cfg.tie_word_embeddings) ADAKV_RETURN_IF_ERROR(lin(lm_head, cfg.vocab_size, hidden, ++s));
  ADAKV_RETURN_IF_ERROR(random_fill_f32(final_norm, hidden, ++s, 0.1f, 1.0f, stream));
  for (DevLayer& L : layers) {
    ADAKV_RETURN_IF_ERROR(lin(L.qkv, qkv_dim(), hidden, ++s));
    ADAKV_RETURN_IF_ERROR(lin(L.o, hidden, q_dim(), ++s));
    ADAKV_RETURN_IF_ERROR(lin(L.gate_up, 2 * inter, hidden, ++s));
    ADAKV_RETURN_IF_ERROR(lin(L.down, hidden, inter, ++s));
    ADAKV_RETURN_IF_ERROR(random_fill_f32(L.input_norm, hidden, ++s, 0.1f, 1.0f, stream));
    ADAKV_RETURN_IF_ERROR(random_fill_f32(L.post_norm, hidden, ++s, 0.1f, 1.0f, stream));
    if (L.qkv_bias) ADAKV_RETURN_IF_ERROR(random_fill_f32(L.qkv_bias, qkv_dim(), ++s, 0.1f, 0.f, stream));
    if (L.q_norm) ADAKV_RETURN_IF_ERROR(random_fill_f32(L.q_norm, d, ++s, 0.1f, 1.0f, stream));
    if (L.k_norm) ADAKV_RETURN_IF_ERROR(random_fill_f32(L.k_norm, d, ++s, 0.1f, 1.0f, stream));
    if (L.o_bias) ADAKV_RETURN_IF_ERROR(random_fill_f32(L.o_bias, hidden, ++s, 0.1f, 0.f, stream));
  }
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return Status::ok();
}

Status CudaModel::Impl::allocate_runtime() {
  const int64_t hidden = cfg.hidden_size, inter = cfg.intermediate_size, d = cfg.head_dim;
  const int64_t T = opt.max_step_tokens, R = max_logit_rows, S = opt.max_seqs;
  const int32_t H = static_cast<int32_t>(cfg.num_heads), Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  const int32_t L = static_cast<int32_t>(cfg.num_layers);
  rows_per_seq = L * Hkv;
  max_pages_per_row = static_cast<int32_t>((max_context + kPageSize - 1) / kPageSize);
  const int64_t table_entries = S * rows_per_seq * int64_t{max_pages_per_row};
  if (table_entries >= (int64_t{1} << 31))
    return invalid_argument("the page-table mirror of " + std::to_string(S) + " sequences x " +
                            std::to_string(rows_per_seq) + " rows x " + std::to_string(max_pages_per_row) +
                            " pages exceeds 2^31 entries: lower max_seqs or the context");

  int64_t* ws = &workspace_bytes;
  ADAKV_RETURN_IF_ERROR(alloc(&x, T * hidden, "residual stream", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&h, T * hidden, "normed activations", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&qkv, T * qkv_dim(), "qkv activations", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&attn, T * q_dim(), "attention output", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&gu, T * 2 * inter, "gate/up activations", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&act, T * inter, "SwiGLU output", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&delta, T * hidden, "block output", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&cos_sin, T * (d / 2), "RoPE table", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&hsel, R * hidden, "final-norm rows", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&logits, R * cfg.vocab_size, "logits", ws));
  // Per-step metadata: tokens, positions, token_seq, token_index [T]; sel rows [R]; seq ids,
  // ntok [S]; row lengths [S][L][Hkv]; decode offsets and lengths [L][S * Hkv].
  meta_cap = 4 * T + R + 2 * S + 3 * S * rows_per_seq + 64;
  ADAKV_RETURN_IF_ERROR(alloc(&meta_dev, meta_cap, "step metadata", ws));
  ADAKV_RETURN_IF_ERROR(alloc_host(&meta_host, meta_cap, "step metadata"));
  ADAKV_RETURN_IF_ERROR(alloc(&samp_dev, R, "sampling parameters", ws));
  ADAKV_RETURN_IF_ERROR(alloc_host(&samp_host, R, "sampling parameters"));
  ADAKV_RETURN_IF_ERROR(alloc(&sampled_dev, R, "sampled ids", ws));
  ADAKV_RETURN_IF_ERROR(alloc_host(&sampled_host, R, "sampled ids"));
  ADAKV_RETURN_IF_ERROR(alloc_host(&logits_host, R * cfg.vocab_size, "logits"));
  pt_cap = (T / kPageSize + 2 * S) * rows_per_seq;
  ADAKV_RETURN_IF_ERROR(alloc(&pt_dev, pt_cap, "page-table updates", ws));
  ADAKV_RETURN_IF_ERROR(alloc_host(&pt_host, pt_cap, "page-table updates"));
  ADAKV_RETURN_IF_ERROR(alloc(&page_table, table_entries, "page-table mirror", ws));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemset(page_table, 0, static_cast<size_t>(table_entries) * sizeof(int32_t)));
  ADAKV_RETURN_IF_ERROR(alloc(&row_offsets_all, S * rows_per_seq, "row offsets", ws));
  {
    std::vector<int32_t> off(static_cast<size_t>(S * rows_per_seq));
    for (size_t i = 0; i < off.size(); ++i) off[i] = static_cast<int32_t>(i) * max_pages_per_row;
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(row_offsets_all, off.data(), off.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  }
  shadow.assign(static_cast<size_t>(table_entries), -1);
  shadow_count.assign(static_cast<size_t>(S * rows_per_seq), 0);

  ADAKV_ASSIGN_OR_RETURN(gemm, GemmLt::create());
  fast_prefill = d == 64 || d == 128;
  fast_decode = fast_prefill && H / Hkv <= 8;
  if (fast_decode) {
    for (int32_t l = 0; l < L; ++l) {
      DecodeAttentionOptions o;
      o.num_qo_heads = H;
      o.num_kv_heads = Hkv;
      o.head_dim = static_cast<int32_t>(d);
      o.max_rows = static_cast<int32_t>(S * Hkv);
      // The kernel before it on the stream is kv_append (or a memcpy, which keeps the full
      // dependency): it writes K/V only, never the plan or the page table, so the attention kernel
      // may load those and request its first pages in L2 while kv_append finishes.
      o.overlap_prologue = overlap_decode_prologue;
      o.prefetch_pages = 2;
      ADAKV_ASSIGN_OR_RETURN(auto da, DecodeAttention::create(o));
      decode.push_back(std::move(da));
    }
  }
  if (fast_prefill) {
    ADAKV_RETURN_IF_ERROR(alloc(&gather_k, Hkv * max_context * d, "prefill gather K", ws));
    ADAKV_RETURN_IF_ERROR(alloc(&gather_v, Hkv * max_context * d, "prefill gather V", ws));
  }
  // Compression: window policies (the default config's, or per-sequence ones up to max_window)
  // score prompts up to the context (a chunked prefill scores the whole prompt at its last chunk).
  if (max_window > 0) {
    const int32_t max_len = static_cast<int32_t>(std::max<int64_t>(T, max_context));
    WindowScorerOptions so;
    so.num_heads = H;
    so.num_kv_heads = Hkv;
    so.head_dim = static_cast<int32_t>(d);
    so.max_length = max_len;
    so.max_window = max_window;
    Expected<std::unique_ptr<WindowScorer>> sc = WindowScorer::create(so);
    if (!sc.has_value()) {
      // Only the default config needs it at creation; per-sequence configs are refused later.
      if (has_comp && scorer_policy(comp.policy)) return sc.status();
      window_status = sc.status();
    } else {
      scorer = std::move(sc).value();
      KeepSelectorOptions ko;
      ko.num_kv_heads = Hkv;
      ko.max_length = max_len;
      ADAKV_ASSIGN_OR_RETURN(selector, KeepSelector::create(ko));
      ADAKV_RETURN_IF_ERROR(alloc(&scores, Hkv * int64_t{max_len}, "compression scores", ws));
      ADAKV_RETURN_IF_ERROR(alloc(&crit, Hkv * int64_t{max_len}, "criticalkv scores", ws));
      ADAKV_RETURN_IF_ERROR(regrow(&keep_dev, &keep_host, &keep_cap, rows_per_seq * T, "keep lists"));
      ADAKV_RETURN_IF_ERROR(alloc(&win_ring, S * L * int64_t{max_window} * q_dim(), "window query ring", ws));
      ADAKV_RETURN_IF_ERROR(alloc(&win_buf, int64_t{max_window} * q_dim(), "window queries", ws));
      ADAKV_RETURN_IF_ERROR(alloc(&lse_buf, int64_t{T} * H, "h2o log-sum-exp", ws));
      // (head dims 64 / 128 only, so fast_prefill holds and the gather buffers exist: chunked
      // prompts read their keys back through them)
    }
  }
  ADAKV_RETURN_IF_ERROR(alloc(&counts_dev, S * rows_per_seq, "keep counts", ws));
  ADAKV_RETURN_IF_ERROR(alloc_host(&counts_host, S * rows_per_seq, "keep counts"));
  ADAKV_RETURN_IF_ERROR(alloc(&stream_counts_dev, rows_per_seq, "streamingllm keep counts", ws));
  ADAKV_RETURN_IF_ERROR(alloc(&h2o_len_dev, rows_per_seq, "h2o row lengths", ws));
  ADAKV_RETURN_IF_ERROR(alloc_host(&h2o_counts_host, rows_per_seq, "h2o keep counts"));
  ADAKV_RETURN_IF_ERROR(alloc(&rows_off_dev, rows_per_seq, "keep list offsets", ws));
  if (has_comp && comp.policy == KvPolicy::kStreamingLlm)
    ADAKV_RETURN_IF_ERROR(regrow(&stream_keep_dev, &stream_keep_host, &stream_cap, rows_per_seq * int64_t{comp.budget},
                                 "streamingllm keep lists"));

  // The KV pool: what is left, times the fraction (or exactly num_pages).
  const int64_t page_elems = int64_t{kPageSize} * d;
  const int64_t page_bytes = 2 * page_elems * 2 + kPageSize * 8;  // K + V bf16, positions, metric
  if (opt.num_pages > 0) {
    num_pages = opt.num_pages;
  } else {
    size_t free_b = 0, total_b = 0;
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b));
    const int64_t reserve = int64_t{256} << 20;  // CUDA context growth, cuBLASLt internals
    const int64_t usable = static_cast<int64_t>(opt.gpu_memory_fraction * static_cast<double>(free_b)) - reserve;
    num_pages = usable / page_bytes;
  }
  if (num_pages < rows_per_seq)
    return resource_exhausted("KV pool: room for " + std::to_string(num_pages) + " pages of " + mib(page_bytes) +
                              " after weights (" + mib(weight_bytes) + ") and workspace (" + mib(workspace_bytes) +
                              "); one sequence needs at least " + std::to_string(rows_per_seq));
  pool.page_stride = page_elems;
  pool.max_pages_per_row = max_pages_per_row;
  pool.page_table = page_table;
  ADAKV_RETURN_IF_ERROR(alloc(&pool.k_pool, num_pages * page_elems, "KV pool K", &pool_bytes));
  ADAKV_RETURN_IF_ERROR(alloc(&pool.v_pool, num_pages * page_elems, "KV pool V", &pool_bytes));
  ADAKV_RETURN_IF_ERROR(alloc(&pool.positions, num_pages * kPageSize, "KV pool positions", &pool_bytes));
  ADAKV_RETURN_IF_ERROR(alloc(&metric, num_pages * kPageSize, "KV pool metric", &pool_bytes));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemset(metric, 0, static_cast<size_t>(num_pages) * kPageSize * sizeof(float)));
  // Random contents rather than whatever the allocator held: an unwritten entry read by mistake
  // shows up as a wrong value, never as a NaN that could pass for a masked one.
  ADAKV_RETURN_IF_ERROR(random_fill_bf16(pool.k_pool, num_pages * page_elems, 11, 1.f, 0.f, stream));
  ADAKV_RETURN_IF_ERROR(random_fill_bf16(pool.v_pool, num_pages * page_elems, 12, 1.f, 0.f, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return Status::ok();
}

namespace {

Expected<std::unique_ptr<CudaModel::Impl>> make_impl(const ModelConfig& cfg, const CudaModelOptions& options) {
  ADAKV_RETURN_IF_ERROR(cuda_device_available());
  auto impl = std::make_unique<CudaModel::Impl>();
  impl->cfg = cfg;
  impl->opt = options;
  if (cfg.head_dim <= 0 || cfg.head_dim % 8 != 0 || cfg.head_dim > 256)
    return unimplemented("cuda: head_dim " + std::to_string(cfg.head_dim) + " (supported: multiples of 8 up to 256)");
  if (cfg.num_kv_heads <= 0 || cfg.num_heads % cfg.num_kv_heads != 0)
    return unimplemented("cuda: query heads must be a multiple of kv heads");
  if (cfg.hidden_size % 8 != 0 || cfg.intermediate_size % 8 != 0)
    return unimplemented("cuda: hidden and intermediate sizes must be multiples of 8 (16-byte rows)");
  if (options.max_seqs < 1 || options.max_step_tokens < 1)
    return invalid_argument("cuda: max_seqs and max_step_tokens must be positive");
  if (options.compress != nullptr && policy_compresses(options.compress->policy)) {
    ADAKV_RETURN_IF_ERROR(validate_compress_config(*options.compress));
    ADAKV_RETURN_IF_ERROR(compression_supported(*options.compress));
    impl->comp = *options.compress;
    impl->has_comp = true;
  }
  impl->opt.compress = nullptr;
  if (options.max_window < 0) return invalid_argument("cuda: max_window must be >= 0");
  // (H2O's and random's scoring do not use the window capacity: no window ring)
  int32_t need_window = 0;
  if (impl->has_comp && scorer_policy(impl->comp.policy))
    need_window = ring_policy(impl->comp.policy) ? impl->comp.window : 1;
  impl->max_window = std::max(options.max_window, need_window);
  const size_t S = static_cast<size_t>(options.max_seqs);
  impl->seq_comp.resize(S);
  impl->seq_has_comp.assign(S, 0);
  impl->seq_compressed.assign(S, 0);
  impl->ring_end.assign(S, 0);
  if (const char* e = std::getenv("ADAKV_CUDA_GRAPHS"); e != nullptr && std::string(e) == "0") impl->graphs_enabled = false;
  if (const char* e = std::getenv("ADAKV_PROFILE_OPS"); e != nullptr && std::string(e) == "1")
    ADAKV_RETURN_IF_ERROR(impl->ops.enable(16 * static_cast<int>(cfg.num_layers) + 16));
  impl->overlap_decode_prologue = options.decode_overlap;
  if (const char* e = std::getenv("ADAKV_DECODE_OVERLAP"); e != nullptr && (std::string(e) == "0" || std::string(e) == "1"))
    impl->overlap_decode_prologue = std::string(e) == "1";
  int64_t ctx = cfg.max_position_embeddings;
  if (cfg.sliding_window > 0) ctx = std::min(ctx, cfg.sliding_window);
  impl->max_context = options.max_context > 0 ? std::min(options.max_context, ctx) : ctx;
  impl->max_logit_rows = options.max_logit_rows > 0 ? options.max_logit_rows : std::max(options.max_seqs, 1);
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->ev_start));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->ev_end));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->ev_copied));
  return impl;
}

}  // namespace

Expected<std::unique_ptr<CudaModel>> CudaModel::load(const std::string& model_dir, const CudaModelOptions& options) {
  ADAKV_ASSIGN_OR_RETURN(ModelConfig cfg, load_model_config(model_dir));
  ADAKV_ASSIGN_OR_RETURN(auto impl, make_impl(cfg, options));
  ADAKV_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::open(model_dir));
  ADAKV_RETURN_IF_ERROR(impl->allocate_weights());
  ADAKV_RETURN_IF_ERROR(impl->upload(ckpt));
  ADAKV_RETURN_IF_ERROR(impl->allocate_runtime());
  std::unique_ptr<CudaModel> m(new CudaModel());
  m->impl_ = std::move(impl);
  return m;
}

Expected<std::unique_ptr<CudaModel>> CudaModel::random(const ModelConfig& config, uint64_t seed,
                                                       const CudaModelOptions& options) {
  ADAKV_ASSIGN_OR_RETURN(auto impl, make_impl(config, options));
  ADAKV_RETURN_IF_ERROR(impl->allocate_weights());
  ADAKV_RETURN_IF_ERROR(impl->randomize(seed));
  ADAKV_RETURN_IF_ERROR(impl->allocate_runtime());
  std::unique_ptr<CudaModel> m(new CudaModel());
  m->impl_ = std::move(impl);
  return m;
}

CudaModel::~CudaModel() = default;

const ModelConfig& CudaModel::config() const { return impl_->cfg; }
KvLayout CudaModel::kv_layout() const {
  KvLayout k;
  k.num_layers = static_cast<int32_t>(impl_->cfg.num_layers);
  k.num_kv_heads = static_cast<int32_t>(impl_->cfg.num_kv_heads);
  k.head_dim = static_cast<int32_t>(impl_->cfg.head_dim);
  k.page_size = kPageSize;
  return k;
}
int64_t CudaModel::num_pages() const { return impl_->num_pages; }
int64_t CudaModel::context_length() const { return impl_->max_context; }
int64_t CudaModel::weight_bytes() const { return impl_->weight_bytes; }
int64_t CudaModel::kv_pool_bytes() const { return impl_->pool_bytes; }
std::string CudaModel::memory_summary() const {
  return "weights " + mib(impl_->weight_bytes) + ", workspace " + mib(impl_->workspace_bytes) + ", KV pool " +
         mib(impl_->pool_bytes) + " (" + std::to_string(impl_->num_pages) + " pages of 16 entries)";
}
const std::vector<CompressionAuditLayer>& CudaModel::compression_audit() const { return impl_->audit; }
float CudaModel::last_step_ms() const { return impl_->last_ms; }
const CudaModel::StepTiming& CudaModel::last_step_timing() const { return impl_->timing; }

std::string CudaModel::op_profile() const { return impl_->ops.report(); }
void CudaModel::reset_op_profile() { impl_->ops.reset(); }
int64_t CudaModel::num_graphs() const { return static_cast<int64_t>(impl_->graphs.size()); }

namespace {
using HostClock = std::chrono::steady_clock;
double host_ms(HostClock::time_point a, HostClock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
}  // namespace

Status CudaModel::read_row(const KvCacheManager& m, SeqId seq, int32_t layer, int32_t kv_head, std::vector<float>* metric,
                           std::vector<int32_t>* positions) const {
  const Impl& I = *impl_;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(I.stream));
  const int32_t n = m.length(seq, layer, kv_head);
  const std::span<const int32_t> pages = m.pages(seq, layer, kv_head);
  if (metric != nullptr) metric->resize(static_cast<size_t>(n));
  if (positions != nullptr) positions->resize(static_cast<size_t>(n));
  for (int32_t p = 0; p * kPageSize < n; ++p) {
    const int64_t slot0 = int64_t{pages[static_cast<size_t>(p)]} * kPageSize;
    const size_t cnt = static_cast<size_t>(std::min(kPageSize, n - p * kPageSize));
    if (metric != nullptr)
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(metric->data() + p * kPageSize, I.metric + slot0, cnt * sizeof(float),
                                            cudaMemcpyDeviceToHost));
    if (positions != nullptr)
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(positions->data() + p * kPageSize, I.pool.positions + slot0,
                                            cnt * sizeof(int32_t), cudaMemcpyDeviceToHost));
  }
  return Status::ok();
}

Status CudaModel::set_compression(SeqId seq, const CompressConfig& c) {
  Impl& I = *impl_;
  if (seq < 0 || seq >= I.opt.max_seqs)
    return invalid_argument("cuda: sequence " + std::to_string(seq) + " is not below max_seqs " +
                            std::to_string(I.opt.max_seqs));
  ADAKV_RETURN_IF_ERROR(validate_compress_config(c));
  ADAKV_RETURN_IF_ERROR(compression_supported(c));
  if (scorer_policy(c.policy)) {
    if (I.scorer == nullptr)
      return unimplemented(std::string("cuda: kv policy ") + kv_policy_name(c.policy) + " needs the window scorer, " +
                           (I.max_window == 0 ? std::string("which this model was created without (max_window 0)")
                                              : "which this model cannot run: " + I.window_status.message()));
    if (ring_policy(c.policy) && c.window > I.max_window)
      return invalid_argument("cuda: kv window " + std::to_string(c.window) + " exceeds the largest window " +
                              std::to_string(I.max_window) + " the device was sized for");
  }
  const size_t i = static_cast<size_t>(seq);
  I.seq_comp[i] = c;
  I.seq_has_comp[i] = 1;
  I.seq_compressed[i] = 0;
  I.ring_end[i] = 0;
  return Status::ok();
}

void CudaModel::on_release(SeqId seq) {
  if (seq < 0 || seq >= impl_->opt.max_seqs) return;
  impl_->seq_has_comp[static_cast<size_t>(seq)] = 0;
  impl_->seq_compressed[static_cast<size_t>(seq)] = 0;
  impl_->ring_end[static_cast<size_t>(seq)] = 0;
  const size_t base = static_cast<size_t>(seq) * static_cast<size_t>(impl_->rows_per_seq);
  std::fill_n(impl_->shadow_count.begin() + static_cast<std::ptrdiff_t>(base), impl_->rows_per_seq, 0);
}

// Brings the device mirror of seq's rows up to the manager's page lists. Rows only grow at the
// end or shrink from the end (commit / keep_entries / evict_entries), so the mirrored prefix
// stays valid; a mismatch at its last page (a reused sequence id not reported through
// on_release) re-sends the whole row.
Status CudaModel::Impl::mirror_rows(SeqId seq, const KvCacheManager& m, int64_t* n_updates) {
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  for (int32_t l = 0; l < cfg.num_layers; ++l)
    for (int32_t kh = 0; kh < Hkv; ++kh) {
      const int64_t row = int64_t{seq} * rows_per_seq + int64_t{l} * Hkv + kh;
      const std::span<const int32_t> pages = m.pages(seq, l, kh);
      const int32_t cnt = static_cast<int32_t>(pages.size());
      if (cnt > max_pages_per_row)
        return out_of_range("cuda: a row of " + std::to_string(cnt) + " pages exceeds the mirror's " +
                            std::to_string(max_pages_per_row) + " (max_context " + std::to_string(max_context) + ")");
      int32_t& sc = shadow_count[static_cast<size_t>(row)];
      int32_t* sh = shadow.data() + row * max_pages_per_row;
      sc = std::min(sc, cnt);
      if (sc > 0 && sh[sc - 1] != pages[static_cast<size_t>(sc - 1)]) sc = 0;
      for (int32_t i = sc; i < cnt; ++i) {
        if (*n_updates >= pt_cap) ADAKV_RETURN_IF_ERROR(flush_page_updates(n_updates));
        sh[i] = pages[static_cast<size_t>(i)];
        pt_host[*n_updates] = make_int2(static_cast<int32_t>(row * max_pages_per_row + i), sh[i]);
        ++*n_updates;
      }
      sc = cnt;
    }
  return Status::ok();
}

Status CudaModel::Impl::h2o_accumulate_chunk(SeqId seq, const CompressConfig& comp, int32_t tok0, int32_t n,
                                             int32_t total, const int32_t* row_len_dev, int32_t layer) {
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads), L = static_cast<int32_t>(cfg.num_layers);
  const int64_t qd = q_dim();
  WindowScoreInputs in;
  in.queries = qkv + int64_t{tok0} * qkv_dim();
  in.q_token_stride = qkv_dim();
  in.length = total;
  in.window = n;
  const float* lse = h2o_lse(tok0);  // [H][n], written by this layer's prefill attention
  if (n == total) {  // the first chunk: its keys are the step's
    in.keys = in.queries + qd;
    in.k_token_stride = qkv_dim();
    ADAKV_RETURN_IF_ERROR(scorer->h2o(in, comp.gqa, scores, total, stream, lse));
  } else {
    ADAKV_ASSIGN_OR_RETURN(const WindowScoreInputs gathered_in, gather_keys(seq, layer, row_len_dev, total, in));
    ADAKV_RETURN_IF_ERROR(scorer->h2o(gathered_in, comp.gqa, scores, total, stream, lse));
  }
  const MetricRows mrows{page_table, row_offsets_all + (int64_t{seq} * L + layer) * Hkv, Hkv};
  ADAKV_RETURN_IF_ERROR(metric_add_rows(mrows, scores, total, total, metric, stream));
  if (opt.audit_compression) {  // the test's host reference needs every prompt query
    std::vector<uint16_t>& q = audit_prompt_queries[{seq, layer}];
    if (n == total) q.clear();
    const size_t at = q.size();
    q.resize(at + static_cast<size_t>(int64_t{n} * qd));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(q.data() + at, qd * 2, in.queries, qkv_dim() * 2, qd * 2, n,
                                                 cudaMemcpyDeviceToHost, stream));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  }
  return Status::ok();
}

// Compresses one layer of `seq` whose rows hold its whole prompt of `total` tokens, the last `n`
// of them this step's (tokens tok0 .. tok0 + n - 1 of the workspace). A fresh prompt (n == total)
// is scored from the step's contiguous queries, keys and values; after a chunked prefill the
// window's queries come from the chunk and the ring (earlier chunks), the keys and values from
// the pages, and H2O adds the last chunk's share to what the earlier chunks left in the metric.
Status CudaModel::Impl::run_compression_window(SeqId seq, const CompressConfig& comp, int32_t tok0, int32_t n,
                                               int32_t total, const int32_t* row_len_dev, int32_t layer,
                                               int64_t keep_base, int32_t slot) {
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads), L = static_cast<int32_t>(cfg.num_layers);
  const int32_t d = static_cast<int32_t>(cfg.head_dim);
  const int32_t P = total;
  const KvPolicy pol = comp.policy;
  const bool h2o = pol == KvPolicy::kH2o, kvc = pol == KvPolicy::kKvCompress, two = policy_is_two_stage(pol);
  const bool rnd = pol == KvPolicy::kRandom;
  const int32_t w = h2o ? n : std::min(comp.window, P);  // H2O: every query of the step
  const bool fresh = n == P;
  bool gathered = false;  // gather_k / gather_v hold this layer's rows (chunked prompts)
  int32_t* counts = counts_dev + (int64_t{slot} * L + layer) * Hkv;
  int32_t* keep = keep_dev + keep_base + int64_t{layer} * Hkv * P;
  const int32_t bs = layer_selection_budget(comp, L, layer, P);
  const int64_t qd = q_dim(), hs = max_context * d;
  WindowScoreInputs in;
  in.length = P;
  in.window = w;
  if (rnd) {
    // scored without queries or keys (its window may exceed the ring's)
  } else if (fresh) {
    in.queries = qkv + int64_t(tok0 + n - w) * qkv_dim();
    in.q_token_stride = qkv_dim();
    in.keys = qkv + int64_t{tok0} * qkv_dim() + qd;
    in.k_token_stride = qkv_dim();
  } else if (n >= w) {
    in.queries = qkv + int64_t(tok0 + n - w) * qkv_dim();
    in.q_token_stride = qkv_dim();
  } else {
    // Positions P - w .. P - n - 1 from the ring (row p % w), then the chunk's n.
    const bf16* ring = win_ring + (int64_t{seq} * L + layer) * max_window * qd;
    const int32_t c = w - n, r0 = (P - w) % w, seg1 = std::min(c, w - r0);
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(win_buf, ring + int64_t{r0} * qd, sizeof(bf16) * qd * seg1,
                                               cudaMemcpyDeviceToDevice, stream));
    if (c > seg1)
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(win_buf + int64_t{seg1} * qd, ring, sizeof(bf16) * qd * (c - seg1),
                                                 cudaMemcpyDeviceToDevice, stream));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(win_buf + int64_t{c} * qd, qd * sizeof(bf16),
                                                 qkv + int64_t{tok0} * qkv_dim(), qkv_dim() * sizeof(bf16),
                                                 qd * sizeof(bf16), n, cudaMemcpyDeviceToDevice, stream));
    in.queries = win_buf;
    in.q_token_stride = qd;
  }
  const MetricRows mrows{page_table, row_offsets_all + (int64_t{seq} * L + layer) * Hkv, Hkv};
  if (h2o) {
    // The prompt's accumulated attention of every entry: the candidates' scores and the metric.
    if (fresh) {
      ADAKV_RETURN_IF_ERROR(scorer->h2o(in, comp.gqa, scores, P, stream, h2o_lse(tok0)));
      ADAKV_RETURN_IF_ERROR(metric_scatter_rows(mrows, scores, P, P, metric, stream));
    } else {
      ADAKV_RETURN_IF_ERROR(h2o_accumulate_chunk(seq, comp, tok0, n, P, row_len_dev, layer));
      ADAKV_RETURN_IF_ERROR(metric_gather_rows(mrows, metric, P, scores, P, stream));
      gathered = true;
    }
  } else if (rnd) {
    if (P > comp.window) ADAKV_RETURN_IF_ERROR(random_scores_rows(comp.seed, layer, Hkv, P - comp.window, scores, P, stream));
  } else if (kvc) {
    if (fresh) {
      ADAKV_RETURN_IF_ERROR(scorer->kvcompress_metric(in, comp.pool, comp.pool_kernel, scores, P, stream));
    } else {
      ADAKV_ASSIGN_OR_RETURN(const WindowScoreInputs gathered_in, gather_keys(seq, layer, row_len_dev, P, in));
      ADAKV_RETURN_IF_ERROR(scorer->kvcompress_metric(gathered_in, comp.pool, comp.pool_kernel, scores, P, stream));
      gathered = true;
    }
    ADAKV_RETURN_IF_ERROR(metric_scatter_rows(mrows, scores, P, P, metric, stream));
  } else if (P > comp.window) {
    if (fresh) {
      ADAKV_RETURN_IF_ERROR(scorer->snapkv(in, comp.gqa, comp.pool, comp.pool_kernel, scores, P, stream));
    } else {
      ADAKV_ASSIGN_OR_RETURN(const WindowScoreInputs gathered_in, gather_keys(seq, layer, row_len_dev, P, in));
      ADAKV_RETURN_IF_ERROR(scorer->snapkv(gathered_in, comp.gqa, comp.pool, comp.pool_kernel, scores, P, stream));
      gathered = true;
    }
  }
  // Two-stage: the values, token-major in the step (fresh) or one row per kv head (gathered).
  const bf16* values = fresh ? qkv + int64_t{tok0} * qkv_dim() + qd + kv_dim() : gather_v;
  const int64_t v_token_stride = fresh ? qkv_dim() : d, v_head_stride = fresh ? d : hs;
  if (two && P > comp.window) {
    CriticalInputs ci;
    ci.values = values;
    ci.v_token_stride = v_token_stride;
    ci.v_head_stride = v_head_stride;
    ci.o_proj = layers[static_cast<size_t>(layer)].o;
    ci.hidden_size = static_cast<int32_t>(cfg.hidden_size);
    ci.num_heads = static_cast<int32_t>(cfg.num_heads);
    ci.num_kv_heads = Hkv;
    ci.head_dim = d;
    ci.count = P - comp.window;
    ci.scores = scores;
    ci.scores_stride = P;
    ADAKV_RETURN_IF_ERROR(critical_scores(ci, crit, P, nullptr, 0, stream));
  }
  if (!kvc) {  // KV-Compress selects across layers after the step (compress_kvcompress)
  SelectInputs si;
  si.scores = scores;
  si.scores_stride = P;
  si.crit = two ? crit : nullptr;
  si.crit_stride = P;
  si.two_stage = two;
  si.length = P;
  si.window = comp.window;
  si.selection_budget = bs;
  si.adaptive = policy_is_adaptive(comp.policy);
  si.alpha = comp.alpha;
  SelectOutputs so;
  so.keep = keep;
  so.keep_stride = P;
  so.keep_counts = counts;
  ADAKV_RETURN_IF_ERROR(selector->select(si, so, stream));
  const KvCompactParams cp = compaction(row_offsets_all + (int64_t{seq} * L + layer) * Hkv, Hkv, keep, P, counts);
  ADAKV_RETURN_IF_ERROR(compact_kv_rows(cp, stream));
  }
  if (opt.audit_compression) {
    CompressionAuditLayer a;
    a.seq = seq;
    a.layer = layer;
    a.length = P;
    a.selection_budget = bs;
    const int64_t cand = std::max(0, P - comp.window);
    a.scores.resize(static_cast<size_t>(Hkv * cand));
    if (cand > 0)  // [Hkv][P] on the device (row pitch P), [Hkv][cand] here
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.scores.data(), cand * 4, scores, int64_t{P} * 4, cand * 4, Hkv,
                                                   cudaMemcpyDeviceToHost, stream));
    if (h2o && !fresh) {  // every prompt query: the earlier chunks' and this one's
      a.queries = audit_prompt_queries[{seq, layer}];
    } else if (!rnd) {
      a.queries.resize(static_cast<size_t>(w * cfg.num_heads * d));
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.queries.data(), cfg.num_heads * d * 2, in.queries,
                                                   in.q_token_stride * 2, cfg.num_heads * d * 2, w,
                                                   cudaMemcpyDeviceToHost, stream));
    }
    a.keys.resize(rnd ? 0 : static_cast<size_t>(int64_t{P} * Hkv * d));
    if (rnd) {
      // random scores read no keys
    } else if (fresh) {
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.keys.data(), Hkv * d * 2, in.keys, qkv_dim() * 2, Hkv * d * 2, P,
                                                   cudaMemcpyDeviceToHost, stream));
    } else if (gathered) {  // the gathered rows, [Hkv][P][d] -> [P][Hkv][d]
      for (int32_t kh = 0; kh < Hkv; ++kh)
        ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.keys.data() + int64_t{kh} * d, Hkv * d * 2, gather_k + kh * hs,
                                                     int64_t{d} * 2, int64_t{d} * 2, P, cudaMemcpyDeviceToHost, stream));
    }
    if (h2o || kvc) {  // the metric as scored (before any compaction moved it)
      a.metric.resize(static_cast<size_t>(int64_t{Hkv} * P));
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(a.metric.data(), scores, sizeof(float) * Hkv * P,
                                                 cudaMemcpyDeviceToHost, stream));
    }
    if (two && cand > 0) {
      a.crit.resize(static_cast<size_t>(Hkv * cand));
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.crit.data(), cand * 4, crit, int64_t{P} * 4, cand * 4, Hkv,
                                                   cudaMemcpyDeviceToHost, stream));
      a.values.resize(static_cast<size_t>(int64_t{P} * Hkv * d));
      for (int32_t kh = 0; kh < Hkv; ++kh)  // [P][Hkv][d]
        ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.values.data() + int64_t{kh} * d, Hkv * d * 2,
                                                     values + kh * v_head_stride, v_token_stride * 2, int64_t{d} * 2, P,
                                                     cudaMemcpyDeviceToHost, stream));
    }
    ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    audit.push_back(std::move(a));
  }
  return Status::ok();
}

Status CudaModel::step(std::span<const SeqStep> steps, KvCacheManager& mgr, bool want_logits, StepResult* result) {
  Impl& I = *impl_;
  const ModelConfig& c = I.cfg;
  const int32_t L = static_cast<int32_t>(c.num_layers), H = static_cast<int32_t>(c.num_heads);
  const int32_t Hkv = static_cast<int32_t>(c.num_kv_heads), d = static_cast<int32_t>(c.head_dim);
  const int32_t g = H / Hkv;
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size, qkvd = I.qkv_dim(), qd = I.q_dim();
  const int32_t B = static_cast<int32_t>(steps.size());
  if (B == 0) return invalid_argument("cuda step: no sequences");
  if (B > I.opt.max_seqs) return invalid_argument("cuda step: more sequences than max_seqs");
  cudaStream_t st = I.stream;
  const HostClock::time_point t_begin = HostClock::now();
  I.timing = StepTiming{};

  // --- checks and order: one-token steps first (one decode launch covers them) -------------------
  std::vector<int32_t> order(static_cast<size_t>(B));
  std::iota(order.begin(), order.end(), 0);
  std::stable_partition(order.begin(), order.end(), [&](int32_t i) { return steps[static_cast<size_t>(i)].tokens.size() == 1; });
  int64_t n_tok = 0, n_rows = 0;
  int32_t n_dec = 0;
  std::vector<uint8_t> seen(static_cast<size_t>(I.opt.max_seqs), 0);
  for (const SeqStep& s : steps) {
    if (s.seq < 0 || s.seq >= I.opt.max_seqs || !mgr.has_sequence(s.seq))
      return invalid_argument("cuda step: sequence " + std::to_string(s.seq) + " is not a sequence below max_seqs " +
                              std::to_string(I.opt.max_seqs));
    if (seen[static_cast<size_t>(s.seq)]++) return invalid_argument("cuda step: a sequence appears twice");
    if (s.tokens.empty()) return invalid_argument("cuda step: no tokens");
    for (int32_t id : s.tokens)
      if (id < 0 || id >= c.vocab_size)
        return invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary of " +
                                std::to_string(c.vocab_size));
    const int64_t pos0 = mgr.logical_length(s.seq);
    if (pos0 + static_cast<int64_t>(s.tokens.size()) > I.max_context)
      return out_of_range("a sequence of " + std::to_string(pos0 + s.tokens.size()) +
                          " tokens exceeds the context of " + std::to_string(I.max_context));
    n_tok += static_cast<int64_t>(s.tokens.size());
    n_rows += s.all_logits ? static_cast<int64_t>(s.tokens.size()) : 1;
    if (s.tokens.size() == 1) ++n_dec;
  }
  if (n_tok > I.opt.max_step_tokens)
    return invalid_argument("cuda step: " + std::to_string(n_tok) + " tokens, more than max_step_tokens " +
                            std::to_string(I.opt.max_step_tokens));
  if (n_rows > I.max_logit_rows)
    return invalid_argument("cuda step: " + std::to_string(n_rows) + " logit rows, more than " +
                            std::to_string(I.max_logit_rows));

  // --- reserve and commit ------------------------------------------------------------------------
  std::vector<KvGrowth> growths;
  for (const SeqStep& s : steps) growths.push_back({s.seq, static_cast<int32_t>(s.tokens.size())});
  KvReservation reservation;
  const Admission adm = mgr.reserve(growths, &reservation);
  if (adm != Admission::kOk)
    return resource_exhausted("KV cache: " + std::to_string(reservation.pages_needed) + " pages needed for " +
                              std::to_string(n_tok) + " tokens, " + std::to_string(mgr.free_pages()) + " free of " +
                              std::to_string(mgr.num_pages()) + " (" + admission_name(adm) + ")");
  std::vector<int64_t> pos0(static_cast<size_t>(B));
  for (int32_t i = 0; i < B; ++i) pos0[static_cast<size_t>(i)] = mgr.logical_length(steps[static_cast<size_t>(i)].seq);
  mgr.commit(reservation);

  // --- host metadata, in internal order b (order[b] = caller's index) -------------------------------
  const int32_t T = static_cast<int32_t>(n_tok), R = static_cast<int32_t>(n_rows);
  int64_t off = 0;
  auto field = [&](int64_t count) {
    const int64_t o = off;
    off += (count + 3) & ~int64_t{3};  // 16-byte aligned fields
    return o;
  };
  const int64_t f_tokens = field(T), f_pos = field(T), f_tseq = field(T), f_tidx = field(T), f_sel = field(R);
  const int64_t f_seq = field(B), f_ntok = field(B), f_rowlen = field(int64_t{B} * L * Hkv);
  const int64_t f_doff = field(int64_t{L} * n_dec * Hkv), f_dlen = field(int64_t{L} * n_dec * Hkv);
  if (off > I.meta_cap) return internal_error("cuda step: metadata exceeds its buffer");
  int32_t* mh = I.meta_host;
  std::vector<int32_t> tok0(static_cast<size_t>(B)), ntok(static_cast<size_t>(B));
  std::vector<int32_t> row_first(static_cast<size_t>(B));  // first logits row of internal b
  std::vector<uint8_t> fresh(static_cast<size_t>(B));
  std::vector<uint8_t> complete(static_cast<size_t>(B));  // every row holds every token (none compressed)
  int32_t t = 0, r = 0;
  for (int32_t b = 0; b < B; ++b) {
    const SeqStep& s = steps[static_cast<size_t>(order[static_cast<size_t>(b)])];
    const int32_t n = static_cast<int32_t>(s.tokens.size());
    const int64_t p0 = pos0[static_cast<size_t>(order[static_cast<size_t>(b)])];
    tok0[static_cast<size_t>(b)] = t;
    ntok[static_cast<size_t>(b)] = n;
    mh[f_seq + b] = s.seq;
    mh[f_ntok + b] = n;
    bool is_fresh = true, is_complete = true;
    for (int32_t l = 0; l < L; ++l)
      for (int32_t kh = 0; kh < Hkv; ++kh) {
        const int32_t len = mgr.length(s.seq, l, kh);
        mh[f_rowlen + (int64_t{b} * L + l) * Hkv + kh] = len;
        is_fresh = is_fresh && len == n;
        is_complete = is_complete && len == p0 + n;
        if (b < n_dec) {
          const int64_t i = (int64_t{l} * n_dec + b) * Hkv + kh;
          mh[f_doff + i] = static_cast<int32_t>((int64_t{s.seq} * I.rows_per_seq + int64_t{l} * Hkv + kh) * I.max_pages_per_row);
          mh[f_dlen + i] = len;
        }
      }
    fresh[static_cast<size_t>(b)] = is_fresh;
    complete[static_cast<size_t>(b)] = is_complete;
    for (int32_t i = 0; i < n; ++i, ++t) {
      mh[f_tokens + t] = s.tokens[static_cast<size_t>(i)];
      mh[f_pos + t] = static_cast<int32_t>(p0 + i);
      mh[f_tseq + t] = b;
      mh[f_tidx + t] = i;
    }
    row_first[static_cast<size_t>(b)] = r;
    const int32_t rows_b = s.all_logits ? n : 1;
    for (int32_t i = 0; i < rows_b; ++i) mh[f_sel + r++] = tok0[static_cast<size_t>(b)] + n - rows_b + i;
  }
  const HostClock::time_point t_meta = HostClock::now();
  int64_t n_updates = 0;
  for (int32_t b = 0; b < B; ++b)
    ADAKV_RETURN_IF_ERROR(I.mirror_rows(steps[static_cast<size_t>(order[static_cast<size_t>(b)])].seq, mgr, &n_updates));
  const HostClock::time_point t_mirror = HostClock::now();

  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(I.ev_start, st));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.meta_dev, I.meta_host, static_cast<size_t>(off) * 4, cudaMemcpyHostToDevice, st));
  if (n_updates > 0) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.pt_dev, I.pt_host, static_cast<size_t>(n_updates) * sizeof(int2),
                                               cudaMemcpyHostToDevice, st));
    ADAKV_RETURN_IF_ERROR(page_table_scatter(I.pt_dev, static_cast<int32_t>(n_updates), I.page_table, st));
  }
  const int32_t* md = I.meta_dev;
  StepBatchView bv;
  bv.seq_ids = md + f_seq;
  bv.seq_ntok = md + f_ntok;
  bv.row_len = md + f_rowlen;
  bv.token_seq = md + f_tseq;
  bv.token_index = md + f_tidx;
  bv.positions = md + f_pos;
  bv.num_tokens = T;
  bv.num_layers = L;
  bv.num_kv_heads = Hkv;
  auto sub_view = [&](int32_t first, int32_t count) {
    StepBatchView v = bv;
    v.token_seq += first;
    v.token_index += first;
    v.positions += first;
    v.num_tokens = count;
    return v;
  };
  const HostClock::time_point t_plan0 = HostClock::now();
  if (I.fast_decode && n_dec > 0) {
    std::vector<int32_t> lens(static_cast<size_t>(n_dec) * Hkv);
    for (int32_t l = 0; l < L; ++l) {
      std::copy_n(mh + f_dlen + int64_t{l} * n_dec * Hkv, lens.size(), lens.begin());
      // With the rows' page-table offsets the plan's items are absolute (one load less per item).
      const std::span<const int32_t> offs(mh + f_doff + int64_t{l} * n_dec * Hkv, lens.size());
      ADAKV_RETURN_IF_ERROR(I.decode[static_cast<size_t>(l)]->plan(lens, offs, st));
    }
  }
  const HostClock::time_point t_plan1 = HostClock::now();

  // --- compression bookkeeping ------------------------------------------------------------------------
  // Which sequences compress after this step (internal order): window policies during the
  // forward (slot, keep region of rows x P entries), streamingllm after it.
  std::vector<const CompressConfig*> comp_cfg(static_cast<size_t>(B), nullptr);
  std::vector<uint8_t> comp_window(static_cast<size_t>(B), 0);  // compresses per layer during the forward
  std::vector<uint8_t> comp_keep(static_cast<size_t>(B), 0);    // ... with keep lists (all but kvcompress)
  std::vector<uint8_t> kvc_after(static_cast<size_t>(B), 0);    // kvcompress: cross-layer selection after it
  std::vector<uint8_t> metric_zero(static_cast<size_t>(B), 0);  // metric policy: new entries start at 0
  std::vector<uint8_t> metric_obs(static_cast<size_t>(B), 0);   // ... and the last query's attention is added
  std::vector<int32_t> metric_md(static_cast<size_t>(B), 0);
  std::vector<uint8_t> ring_save(static_cast<size_t>(B), 0);  // prefill_part of a window policy
  std::vector<uint8_t> h2o_part(static_cast<size_t>(B), 0);   // prefill_part of H2O: its share into the metric
  std::vector<uint8_t> want_lse(static_cast<size_t>(B), 0);   // H2O prompt steps: prefill attention writes lse
  std::vector<int32_t> comp_slot(static_cast<size_t>(B), -1);  // index into counts / keep regions
  std::vector<int64_t> keep_base(static_cast<size_t>(B), 0);
  int64_t keep_used = 0;
  int32_t n_comp = 0;
  bool window_comp = false;
  for (int32_t b = 0; b < B; ++b) {
    const SeqStep& s = steps[static_cast<size_t>(order[static_cast<size_t>(b)])];
    const size_t sq = static_cast<size_t>(s.seq);
    const int64_t p0 = pos0[static_cast<size_t>(order[static_cast<size_t>(b)])];
    if (p0 == 0) {  // a sequence starting from nothing is a new one (ids reused without on_release)
      I.seq_compressed[sq] = 0;
      I.ring_end[sq] = 0;
    }
    const CompressConfig* cc = I.comp_of(s.seq);
    if (cc == nullptr) continue;
    const KvPolicy pol = cc->policy;
    const int32_t total = static_cast<int32_t>(p0) + ntok[static_cast<size_t>(b)];
    const bool chunk_state = ring_policy(pol) || pol == KvPolicy::kH2o;  // earlier chunks leave state
    if (s.prefill_part && chunk_state && !I.seq_compressed[sq]) {
      if (I.ring_end[sq] != p0)
        return invalid_argument("cuda step: a prompt chunk of sequence " + std::to_string(s.seq) + " at position " +
                                std::to_string(p0) + " follows chunks not marked prefill_part");
      (pol == KvPolicy::kH2o ? h2o_part : ring_save)[static_cast<size_t>(b)] = 1;
    }
    const bool compressing = s.compress && !I.seq_compressed[sq] && complete[static_cast<size_t>(b)];
    want_lse[static_cast<size_t>(b)] = pol == KvPolicy::kH2o && (h2o_part[static_cast<size_t>(b)] || compressing);
    if (compressing && pol == KvPolicy::kH2o && p0 > 0) {
      // The last chunk of a chunked H2O prompt adds its share to the earlier chunks': its new
      // entries start at zero like any other chunk's.
      if (I.ring_end[sq] != p0)
        return invalid_argument("cuda step: the last chunk of sequence " + std::to_string(s.seq) +
                                " needs the attention of earlier chunks, which were not marked prefill_part");
      metric_zero[static_cast<size_t>(b)] = 1;
    }
    if (metric_policy(pol) && !compressing) {
      metric_zero[static_cast<size_t>(b)] = 1;
      metric_obs[static_cast<size_t>(b)] = I.seq_compressed[sq];  // after the prompt: decode / append steps
      metric_md[static_cast<size_t>(b)] = metric_mode(*cc);
    }
    if (!compressing) continue;
    I.seq_compressed[sq] = 1;
    comp_cfg[static_cast<size_t>(b)] = cc;
    const bool layer_comp = ((policy_uses_window_scores(pol) || pol == KvPolicy::kRandom) && total > cc->window) ||
                            metric_policy(pol);
    if (layer_comp) {
      const int32_t wq = std::min(cc->window, total);
      if (ring_policy(pol) && p0 > 0 && ntok[static_cast<size_t>(b)] < wq && I.ring_end[sq] != p0)
        return invalid_argument("cuda step: the last chunk of sequence " + std::to_string(s.seq) +
                                " needs the window queries of earlier chunks, which were not marked prefill_part");
      comp_window[static_cast<size_t>(b)] = 1;
      comp_slot[static_cast<size_t>(b)] = n_comp++;
      if (pol == KvPolicy::kKvCompress) {
        kvc_after[static_cast<size_t>(b)] = 1;
      } else {
        comp_keep[static_cast<size_t>(b)] = 1;
        window_comp = true;
        keep_base[static_cast<size_t>(b)] = keep_used;
        keep_used += int64_t{I.rows_per_seq} * total;
      }
    } else if (cc->policy == KvPolicy::kStreamingLlm) {
      comp_slot[static_cast<size_t>(b)] = n_comp++;  // handled after the forward
    }
  }
  if (keep_used > 0) ADAKV_RETURN_IF_ERROR(I.regrow(&I.keep_dev, &I.keep_host, &I.keep_cap, keep_used, "keep lists"));
  // New entries of metric sequences start at zero (KvCompressor::on_append): one scatter of int32
  // zeros (+0.0f) into the slot-indexed metric before the first layer adds to them.
  bool any_obs = false;
  {
    int64_t n_zero = 0;
    for (int32_t b = 0; b < B; ++b) {
      any_obs = any_obs || metric_obs[static_cast<size_t>(b)];
      if (metric_zero[static_cast<size_t>(b)]) n_zero += int64_t{ntok[static_cast<size_t>(b)]} * I.rows_per_seq;
    }
    if (n_zero > 0) {
      ADAKV_RETURN_IF_ERROR(I.regrow(&I.zero_dev, &I.zero_host, &I.zero_cap, n_zero, "metric zeroing"));
      int64_t z = 0;
      for (int32_t b = 0; b < B; ++b) {
        if (!metric_zero[static_cast<size_t>(b)]) continue;
        const SeqId seq = mh[f_seq + b];
        const int32_t n = ntok[static_cast<size_t>(b)];
        for (int32_t l = 0; l < L; ++l)
          for (int32_t kh = 0; kh < Hkv; ++kh) {
            const int32_t len = mgr.length(seq, l, kh);
            for (int32_t i = len - n; i < len; ++i) I.zero_host[z++] = make_int2(static_cast<int32_t>(mgr.slot(seq, l, kh, i)), 0);
          }
      }
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.zero_dev, I.zero_host, sizeof(int2) * z, cudaMemcpyHostToDevice, st));
      ADAKV_RETURN_IF_ERROR(page_table_scatter(I.zero_dev, static_cast<int32_t>(z), reinterpret_cast<int32_t*>(I.metric), st));
    }
  }
  if (I.opt.audit_compression) I.audit.clear();

  // H2O / KV-Compress decode tokens: the decode attention also writes each query's lse ([n_dec][H]
  // at lse_buf), so the metric kernel reads each key once for the whole group.
  float* dec_lse = any_obs && I.fast_decode && I.lse_buf != nullptr ? I.lse_buf : nullptr;

  // Device sampling: each sampling row's parameters (uploaded before the forward, which reads them).
  int32_t n_samp = 0;
  std::vector<int32_t> samp_of(static_cast<size_t>(B), -1);
  for (int32_t b = 0; b < B; ++b) {
    const SeqStep& s = steps[static_cast<size_t>(order[static_cast<size_t>(b)])];
    if (s.sampling == nullptr) continue;
    DeviceSamplingRow& p = I.samp_host[n_samp];
    p.temperature = s.sampling->temperature;
    p.top_k = s.sampling->top_k;
    p.top_p = s.sampling->top_p;
    p.u = s.sampling->u;
    p.row = row_first[static_cast<size_t>(b)] + (s.all_logits ? ntok[static_cast<size_t>(b)] - 1 : 0);
    samp_of[static_cast<size_t>(b)] = n_samp++;
  }
  if (n_samp > 0)
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.samp_dev, I.samp_host, sizeof(DeviceSamplingRow) * n_samp,
                                               cudaMemcpyHostToDevice, st));

  // --- the forward ---------------------------------------------------------------------------------------
  // Everything from the embedding to the sampled ids, enqueued on `st`; a decode-only step
  // without compression replays it as a CUDA graph (its launches depend only on the batch shape:
  // the per-step data is in the metadata, plan and sampling buffers it reads).
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const float eps = static_cast<float>(c.rms_norm_eps);
  auto forward = [&]() -> Status {
  const auto mark = [&](const char* op) { I.ops.mark(op, st); };
  I.ops.begin(st);
  ADAKV_RETURN_IF_ERROR(rope_cos_sin(I.inv_freq, md + f_pos, T, d / 2, I.cos_sin, st));
  ADAKV_RETURN_IF_ERROR(embed_gather(I.embed, hidden, md + f_tokens, T, I.x, st));
  mark("embedding + rope tables");
  for (int32_t l = 0; l < L; ++l) {
    const DevLayer& W = I.layers[static_cast<size_t>(l)];
    RmsNormArgs nrm;
    nrm.x = I.x;
    nrm.delta = l == 0 ? nullptr : I.delta;
    nrm.weight = W.input_norm;
    nrm.out = I.h;
    nrm.rows = T;
    nrm.dim = static_cast<int32_t>(hidden);
    nrm.eps = eps;
    ADAKV_RETURN_IF_ERROR(rms_norm_residual(nrm, st));
    mark("residual + rmsnorm");
    ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.h, W.qkv, I.qkv, DType::kBF16, T, qkvd, hidden, st));
    mark("qkv projection");
    QkvRopeArgs qr;
    qr.qkv = I.qkv;
    qr.row_stride = qkvd;
    qr.n = T;
    qr.num_heads = H;
    qr.num_kv_heads = Hkv;
    qr.head_dim = d;
    qr.bias = W.qkv_bias;
    qr.q_norm = W.q_norm;
    qr.k_norm = W.k_norm;
    qr.eps = eps;
    qr.cos_sin = I.cos_sin;
    ADAKV_RETURN_IF_ERROR(qkv_rope(qr, st));
    mark("bias + q/k norm + rope");
    ADAKV_RETURN_IF_ERROR(kv_append(I.pool, bv, l, I.qkv, qkvd, static_cast<int32_t>(qd),
                                    static_cast<int32_t>(qd + I.kv_dim()), d, st));
    mark("kv append");
    // Chunked prefill: the chunk's trailing window queries into the ring (position p at row p % w).
    for (int32_t b = 0; b < B; ++b) {
      if (!ring_save[static_cast<size_t>(b)]) continue;
      const SeqId seq = mh[f_seq + b];
      const int32_t w = I.comp_of(seq)->window, n = ntok[static_cast<size_t>(b)];
      const int64_t p0 = pos0[static_cast<size_t>(order[static_cast<size_t>(b)])];
      const int32_t first = std::max(0, n - w), cnt = n - first;
      const int32_t r0 = static_cast<int32_t>((p0 + first) % w), seg1 = std::min(cnt, w - r0);
      bf16* ring = I.win_ring + (int64_t{seq} * L + l) * I.max_window * qd;
      const bf16* src = I.qkv + int64_t(tok0[static_cast<size_t>(b)] + first) * qkvd;
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(ring + int64_t{r0} * qd, qd * sizeof(bf16), src, qkvd * sizeof(bf16),
                                                   qd * sizeof(bf16), seg1, cudaMemcpyDeviceToDevice, st));
      if (cnt > seg1)
        ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(ring, qd * sizeof(bf16), src + int64_t{seg1} * qkvd,
                                                     qkvd * sizeof(bf16), qd * sizeof(bf16), cnt - seg1,
                                                     cudaMemcpyDeviceToDevice, st));
    }
    // Attention: decode tokens [0, n_dec), then each longer sequence.
    if (n_dec > 0) {
      if (I.fast_decode) {
        PagedKvView v;
        v.k_pool = I.pool.k_pool;
        v.v_pool = I.pool.v_pool;
        v.row_page_offsets = md + f_doff + int64_t{l} * n_dec * Hkv;
        v.page_ids = I.page_table;
        v.row_lengths = md + f_dlen + int64_t{l} * n_dec * Hkv;
        v.num_rows = n_dec * Hkv;
        v.num_kv_heads = Hkv;
        v.head_dim = d;
        v.page_stride = I.pool.page_stride;
        ADAKV_RETURN_IF_ERROR(I.decode[static_cast<size_t>(l)]->run(v, I.qkv, qkvd, I.attn, qd, dec_lse, scale, st));
      } else {
        ADAKV_RETURN_IF_ERROR(attention_generic(I.pool, sub_view(0, n_dec), l, H, d, I.qkv, qkvd, I.attn, qd, scale, st));
      }
      mark("decode attention");
    }
    if (n_dec < B && !I.fast_prefill) {
      const int32_t first = tok0[static_cast<size_t>(n_dec)];
      ADAKV_RETURN_IF_ERROR(attention_generic(I.pool, sub_view(first, T - first), l, H, d, I.qkv + first * qkvd, qkvd,
                                              I.attn + first * qd, qd, scale, st));
    }
    for (int32_t b = n_dec; b < B && I.fast_prefill; ++b) {
      const int32_t t0 = tok0[static_cast<size_t>(b)], n = ntok[static_cast<size_t>(b)];
      const SeqId seq = mh[f_seq + b];
      float* lse = want_lse[static_cast<size_t>(b)] ? const_cast<float*>(I.h2o_lse(t0)) : nullptr;
      PrefillAttentionArgs pa;
      pa.num_q = n;
      pa.head_dim = d;
      pa.softmax_scale = scale;
      pa.causal = true;
      pa.q_row_stride = qkvd;
      pa.out_row_stride = qd;
      if (fresh[static_cast<size_t>(b)]) {
        pa.q = I.qkv + int64_t{t0} * qkvd;
        pa.k = pa.q + qd;
        pa.v = pa.q + qd + I.kv_dim();
        pa.out = I.attn + int64_t{t0} * qd;
        pa.num_k = n;
        pa.num_qo_heads = H;
        pa.num_kv_heads = Hkv;
        pa.k_row_stride = qkvd;
        pa.v_row_stride = qkvd;
        pa.lse = lse;
        ADAKV_RETURN_IF_ERROR(prefill_attention(pa, st));
      } else {
        // Rows that held entries before this step: gather each kv head's row (its own length).
        const int32_t* lens_host = mh + f_rowlen + (int64_t{b} * L + l) * Hkv;
        const int32_t max_len = *std::max_element(lens_host, lens_host + Hkv);
        const int64_t hs = I.max_context * d;
        ADAKV_RETURN_IF_ERROR(kv_gather_rows(I.pool, seq, l, L, Hkv, d, md + f_rowlen + (int64_t{b} * L + l) * Hkv,
                                             max_len, I.gather_k, I.gather_v, hs, st));
        for (int32_t kh = 0; kh < Hkv; ++kh) {
          pa.q = I.qkv + int64_t{t0} * qkvd + int64_t{kh} * g * d;
          pa.k = I.gather_k + kh * hs;
          pa.v = I.gather_v + kh * hs;
          pa.out = I.attn + int64_t{t0} * qd + int64_t{kh} * g * d;
          pa.num_k = lens_host[kh];
          pa.num_qo_heads = g;
          pa.num_kv_heads = 1;
          pa.k_row_stride = d;
          pa.v_row_stride = d;
          pa.lse = lse == nullptr ? nullptr : lse + int64_t{kh} * g * n;
          ADAKV_RETURN_IF_ERROR(prefill_attention(pa, st));
        }
      }
    }
    if (n_dec < B) mark("prefill attention");
    for (int32_t b = 0; b < B; ++b) {  // H2O chunks before the last: their share of the metric
      if (!h2o_part[static_cast<size_t>(b)]) continue;
      const int32_t n = ntok[static_cast<size_t>(b)];
      const int32_t total = static_cast<int32_t>(pos0[static_cast<size_t>(order[static_cast<size_t>(b)])]) + n;
      const SeqId seq = mh[f_seq + b];
      ADAKV_RETURN_IF_ERROR(I.h2o_accumulate_chunk(seq, *I.comp_of(seq), tok0[static_cast<size_t>(b)], n, total,
                                                   md + f_rowlen + (int64_t{b} * L + l) * Hkv, l));
    }
    for (int32_t b = 0; b < B; ++b) {
      if (!comp_window[static_cast<size_t>(b)]) continue;
      const int32_t n = ntok[static_cast<size_t>(b)];
      const int32_t total = static_cast<int32_t>(pos0[static_cast<size_t>(order[static_cast<size_t>(b)])]) + n;
      ADAKV_RETURN_IF_ERROR(I.run_compression_window(mh[f_seq + b], *comp_cfg[static_cast<size_t>(b)],
                                                     tok0[static_cast<size_t>(b)], n, total,
                                                     md + f_rowlen + (int64_t{b} * L + l) * Hkv, l,
                                                     keep_base[static_cast<size_t>(b)], comp_slot[static_cast<size_t>(b)]));
    }
    // H2O / KV-Compress: the step's last query's attention of every entry into the metric
    // (KvCompressor::add_attention): decode tokens in runs of one mode, then longer appends.
    for (int32_t b = 0; any_obs && b < B;) {
      if (!metric_obs[static_cast<size_t>(b)]) {
        ++b;
        continue;
      }
      MetricDecodeParams mp;
      mp.k_pool = I.pool.k_pool;
      mp.page_stride = I.pool.page_stride;
      mp.head_dim = d;
      mp.num_kv_heads = Hkv;
      mp.group = g;
      mp.scale = scale;
      mp.mode = metric_md[static_cast<size_t>(b)];
      mp.metric = I.metric;
      mp.q_token_stride = qkvd;
      int32_t e = b + 1;
      if (b < n_dec) {
        while (e < n_dec && metric_obs[static_cast<size_t>(e)] && metric_md[static_cast<size_t>(e)] == mp.mode) ++e;
        const int64_t r0 = (int64_t{l} * n_dec + b) * Hkv;
        mp.rows = {I.page_table, md + f_doff + r0, (e - b) * Hkv};
        mp.row_lengths = md + f_dlen + r0;
        mp.queries = I.qkv + int64_t{b} * qkvd;  // decode token b is token b of the step
        if (dec_lse != nullptr) {
          mp.lse = dec_lse + int64_t{b} * H;
          mp.lse_token_stride = H;
          mp.max_length = *std::max_element(mh + f_dlen + r0, mh + f_dlen + r0 + int64_t{e - b} * Hkv);
        }
      } else {
        const SeqId seq = mh[f_seq + b];
        mp.rows = {I.page_table, I.row_offsets_all + (int64_t{seq} * L + l) * Hkv, Hkv};
        mp.row_lengths = md + f_rowlen + (int64_t{b} * L + l) * Hkv;
        mp.queries = I.qkv + int64_t(tok0[static_cast<size_t>(b)] + ntok[static_cast<size_t>(b)] - 1) * qkvd;
      }
      ADAKV_RETURN_IF_ERROR(metric_decode_add(mp, st));
      b = e;
    }
    mark("compression (scores, selection, metric)");
    ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.attn, W.o, I.delta, DType::kBF16, T, hidden, qd, st));
    mark("o projection");
    nrm.delta = I.delta;
    nrm.delta_bias = W.o_bias;
    nrm.weight = W.post_norm;
    ADAKV_RETURN_IF_ERROR(rms_norm_residual(nrm, st));
    mark("residual + rmsnorm");
    ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.h, W.gate_up, I.gu, DType::kBF16, T, 2 * inter, hidden, st));
    mark("gate_up projection");
    ADAKV_RETURN_IF_ERROR(swiglu(I.gu, I.act, T, static_cast<int32_t>(inter), st));
    mark("swiglu");
    ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.act, W.down, I.delta, DType::kBF16, T, hidden, inter, st));
    mark("down projection");
  }
  RmsNormArgs fin;
  fin.x = I.x;
  fin.delta = I.delta;
  fin.weight = I.final_norm;
  fin.out = I.hsel;
  fin.row_index = md + f_sel;
  fin.out_rows = R;
  fin.dim = static_cast<int32_t>(hidden);
  fin.eps = eps;
  ADAKV_RETURN_IF_ERROR(rms_norm_residual(fin, st));
  mark("residual + rmsnorm");
  ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.hsel, I.lm_head, I.logits, DType::kF32, R, c.vocab_size, hidden, st));
  mark("lm_head");
  if (n_samp > 0)
    ADAKV_RETURN_IF_ERROR(sample_rows(I.logits, c.vocab_size, n_samp, static_cast<int32_t>(c.vocab_size), I.samp_dev,
                                      I.sampled_dev, st));
  mark("sampling");
  return Status::ok();
  };
  bool graph_ok = I.opt.cuda_graphs && I.graphs_enabled && n_dec == B && T == B && R == B && I.fast_decode &&
                  n_comp == 0 && !any_obs && !I.opt.audit_compression && !I.ops.enabled();
  for (int32_t b = 0; graph_ok && b < B; ++b)
    graph_ok = !ring_save[static_cast<size_t>(b)] && !h2o_part[static_cast<size_t>(b)] &&
               !metric_zero[static_cast<size_t>(b)];
  I.timing.graph = graph_ok;
  if (graph_ok) {
    ADAKV_RETURN_IF_ERROR(I.run_graph(B, n_samp, forward));
  } else {
    ADAKV_RETURN_IF_ERROR(forward());
  }

  // --- sampling and results ---------------------------------------------------------------------------------
  if (n_samp > 0)
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.sampled_host, I.sampled_dev, sizeof(int32_t) * n_samp,
                                               cudaMemcpyDeviceToHost, st));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(I.ev_end, st));
  if (want_logits)
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.logits_host, I.logits, sizeof(float) * R * c.vocab_size,
                                               cudaMemcpyDeviceToHost, st));
  if (n_comp > 0 && window_comp) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.counts_host, I.counts_dev, sizeof(int32_t) * n_comp * I.rows_per_seq,
                                               cudaMemcpyDeviceToHost, st));
    if (keep_used > 0)
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.keep_host, I.keep_dev, sizeof(int32_t) * keep_used,
                                                 cudaMemcpyDeviceToHost, st));
  }
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(I.ev_copied, st));
  const HostClock::time_point t_enqueued = HostClock::now();
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st));
  const HostClock::time_point t_synced = HostClock::now();
  ADAKV_RETURN_IF_ERROR(I.ops.collect());
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&I.last_ms, I.ev_start, I.ev_end));
  float copy_ms = 0.f;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&copy_ms, I.ev_end, I.ev_copied));
  I.timing.prep_ms = host_ms(t_begin, t_meta);
  I.timing.mirror_ms = host_ms(t_meta, t_mirror);
  I.timing.plan_ms = host_ms(t_plan0, t_plan1);
  I.timing.enqueue_ms = host_ms(t_mirror, t_enqueued) - I.timing.plan_ms;
  I.timing.wait_ms = host_ms(t_enqueued, t_synced);
  I.timing.device_ms = I.last_ms;
  I.timing.download_ms = copy_ms;
  I.timing.logit_bytes = want_logits ? int64_t{R} * c.vocab_size * static_cast<int64_t>(sizeof(float)) : 0;

  if (result != nullptr) {
    result->sampled.assign(static_cast<size_t>(B), -1);
    result->logits.clear();
    if (want_logits) result->logits.resize(static_cast<size_t>(R) * c.vocab_size);
    // Back to the caller's order.
    std::vector<int32_t> b_of(static_cast<size_t>(B));
    for (int32_t b = 0; b < B; ++b) b_of[static_cast<size_t>(order[static_cast<size_t>(b)])] = b;
    int64_t out_row = 0;
    for (int32_t i = 0; i < B; ++i) {
      const int32_t b = b_of[static_cast<size_t>(i)];
      const SeqStep& s = steps[static_cast<size_t>(i)];
      const int32_t rows_b = s.all_logits ? static_cast<int32_t>(s.tokens.size()) : 1;
      if (want_logits)
        std::memcpy(result->logits.data() + out_row * c.vocab_size,
                    I.logits_host + int64_t{row_first[static_cast<size_t>(b)]} * c.vocab_size,
                    sizeof(float) * rows_b * c.vocab_size);
      out_row += rows_b;
      if (samp_of[static_cast<size_t>(b)] >= 0) result->sampled[static_cast<size_t>(i)] = I.sampled_host[samp_of[static_cast<size_t>(b)]];
    }
  }

  const HostClock::time_point t_results = HostClock::now();
  I.timing.results_ms = host_ms(t_synced, t_results);
  // --- the host side of compression: the manager learns the device's keep lists -----------------------------
  for (int32_t b = 0; b < B; ++b) {
    const int32_t slot = comp_slot[static_cast<size_t>(b)];
    if (slot < 0 || !comp_keep[static_cast<size_t>(b)]) continue;
    const SeqId seq = mh[f_seq + b];
    const int32_t n = static_cast<int32_t>(pos0[static_cast<size_t>(order[static_cast<size_t>(b)])]) +
                      ntok[static_cast<size_t>(b)];  // the whole prompt: keep lists are [rows][n]
    for (int32_t l = 0; l < L; ++l) {
      for (int32_t kh = 0; kh < Hkv; ++kh) {
        const int32_t cnt = I.counts_host[(int64_t{slot} * L + l) * Hkv + kh];
        const int32_t* keep = I.keep_host + keep_base[static_cast<size_t>(b)] + (int64_t{l} * Hkv + kh) * n;
        if (cnt < 0 || cnt > n) return internal_error("cuda compression: keep count out of range");
        if (I.opt.audit_compression)
          for (CompressionAuditLayer& a : I.audit)
            if (a.seq == seq && a.layer == l) {
              a.keep.resize(static_cast<size_t>(Hkv));
              a.keep[static_cast<size_t>(kh)].assign(keep, keep + cnt);
            }
        if (cnt == mgr.length(seq, l, kh)) continue;  // kept whole (the device moved nothing either)
        (void)mgr.keep_entries(seq, l, kh, std::span<const int32_t>(keep, static_cast<size_t>(cnt)));
      }
    }
  }
  for (int32_t i = 0; i < B; ++i) mgr.advance_logical_length(steps[static_cast<size_t>(i)].seq, static_cast<int64_t>(steps[static_cast<size_t>(i)].tokens.size()));
  for (int32_t b = 0; b < B; ++b)
    if (ring_save[static_cast<size_t>(b)] || h2o_part[static_cast<size_t>(b)])
      I.ring_end[static_cast<size_t>(mh[f_seq + b])] =
          pos0[static_cast<size_t>(order[static_cast<size_t>(b)])] + ntok[static_cast<size_t>(b)];
  for (int32_t b = 0; b < B; ++b) {
    const SeqId seq = mh[f_seq + b];
    if (comp_slot[static_cast<size_t>(b)] >= 0 && comp_cfg[static_cast<size_t>(b)]->policy == KvPolicy::kStreamingLlm)
      ADAKV_RETURN_IF_ERROR(I.compress_streamingllm(seq, *comp_cfg[static_cast<size_t>(b)], mgr));
    if (kvc_after[static_cast<size_t>(b)])  // KvCompressor::after_prefill: cross-layer eviction
      ADAKV_RETURN_IF_ERROR(I.compress_kvcompress(seq, *comp_cfg[static_cast<size_t>(b)], mgr));
  }
  I.timing.compress_ms = host_ms(t_results, HostClock::now());
  return Status::ok();
}

Status CudaModel::compress_now(SeqId seq, KvCacheManager& mgr, int64_t* pages_freed) {
  Impl& I = *impl_;
  if (pages_freed != nullptr) *pages_freed = 0;
  if (seq < 0 || seq >= I.opt.max_seqs) return invalid_argument("cuda: sequence " + std::to_string(seq) + " is not below max_seqs");
  if (!mgr.has_sequence(seq)) return invalid_argument("cuda: compress_now of an unknown sequence");
  const CompressConfig* cc = I.comp_of(seq);
  if (cc == nullptr || !policy_is_continual(cc->policy)) return Status::ok();
  const int64_t before = mgr.used_pages();
  Status s = Status::ok();
  switch (cc->policy) {
    case KvPolicy::kStreamingLlm: s = I.compress_streamingllm(seq, *cc, mgr); break;
    case KvPolicy::kH2o: s = I.compress_h2o(seq, *cc, mgr); break;
    case KvPolicy::kKvCompress: s = I.compress_kvcompress(seq, *cc, mgr); break;
    default: break;
  }
  if (pages_freed != nullptr) *pages_freed = before - mgr.used_pages();
  return s;
}

Status CudaModel::Impl::apply_row_keeps(SeqId seq, const std::vector<std::vector<int32_t>>& keeps) {
  int64_t total = 0;
  for (const auto& k : keeps) total += static_cast<int64_t>(k.size());
  if (total == 0) return Status::ok();
  if (total >= (int64_t{1} << 31)) return internal_error("cuda compaction: keep lists exceed int32 offsets");
  ADAKV_RETURN_IF_ERROR(regrow(&keep_dev, &keep_host, &keep_cap, total, "keep lists"));
  std::vector<int32_t> counts(static_cast<size_t>(rows_per_seq), 0), offs(static_cast<size_t>(rows_per_seq), 0);
  int64_t o = 0;
  for (size_t r = 0; r < keeps.size(); ++r) {
    offs[r] = static_cast<int32_t>(o);
    counts[r] = static_cast<int32_t>(keeps[r].size());
    std::copy(keeps[r].begin(), keeps[r].end(), keep_host + o);
    o += static_cast<int64_t>(keeps[r].size());
  }
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(keep_dev, keep_host, sizeof(int32_t) * total, cudaMemcpyHostToDevice, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(stream_counts_dev, counts.data(), sizeof(int32_t) * counts.size(),
                                             cudaMemcpyHostToDevice, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(rows_off_dev, offs.data(), sizeof(int32_t) * offs.size(),
                                             cudaMemcpyHostToDevice, stream));
  KvCompactParams cp = compaction(row_offsets_all + int64_t{seq} * rows_per_seq, rows_per_seq, keep_dev, 0, stream_counts_dev);
  cp.keep_offsets = rows_off_dev;
  ADAKV_RETURN_IF_ERROR(compact_kv_rows(cp, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return Status::ok();
}

// KvCompressor::compress_kvcompress on the device: every row's metric and positions through
// KvcSelector (identical evict sets to kvcompress_select), the manager's evict_entries, and the same
// moves on the device: the lowest hole gets the lowest-indexed tail survivor, and so on.
Status CudaModel::Impl::compress_kvcompress(SeqId seq, const CompressConfig& cc, KvCacheManager& m) {
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads), R = rows_per_seq;
  std::vector<int32_t> lengths(static_cast<size_t>(R));
  int64_t total = 0;
  for (int32_t r = 0; r < R; ++r) {
    lengths[static_cast<size_t>(r)] = m.length(seq, r / Hkv, r % Hkv);
    total += lengths[static_cast<size_t>(r)];
  }
  const int64_t t = cc.max_cache_tokens > 0 ? cc.max_cache_tokens : cc.budget;
  const int64_t max_entries = int64_t{R} * t;
  if (total <= max_entries) return Status::ok();
  if (kvc == nullptr || kvc_cap < total) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    kvc.reset();
    const int64_t cap = std::max(total, kvc_cap + kvc_cap / 2);
    ADAKV_ASSIGN_OR_RETURN(kvc, KvcSelector::create(cap, R));
    kvc_cap = cap;
  }
  std::vector<std::vector<int32_t>> evict;
  const MetricRows rows{page_table, row_offsets_all + int64_t{seq} * R, R};
  ADAKV_RETURN_IF_ERROR(kvc->select(rows, lengths, metric, pool.positions, max_entries, kPageSize, m.logical_length(seq),
                                    cc.protected_window, stream, &evict));
  if (evict.size() != static_cast<size_t>(R)) return internal_error("cuda kvcompress: evict lists per row expected");
  std::vector<std::vector<int32_t>> keeps(static_cast<size_t>(R));
  std::vector<int64_t> holes(static_cast<size_t>(R), 0);
  for (int32_t r = 0; r < R; ++r) {
    const std::vector<int32_t>& e = evict[static_cast<size_t>(r)];
    if (e.empty()) continue;
    const int32_t n = lengths[static_cast<size_t>(r)], kept = n - static_cast<int32_t>(e.size());
    std::vector<uint8_t> gone(static_cast<size_t>(n), 0);
    for (int32_t x : e) {
      if (x < 0 || x >= n || gone[static_cast<size_t>(x)]) return internal_error("cuda kvcompress: bad evict list");
      gone[static_cast<size_t>(x)] = 1;
    }
    int32_t last_hole = -1;
    for (int32_t i = 0; i < kept; ++i)
      if (gone[static_cast<size_t>(i)]) last_hole = i;
    if (last_hole < 0) continue;  // only tail entries go: nothing moves
    std::vector<int32_t>& k = keeps[static_cast<size_t>(r)];
    k.resize(static_cast<size_t>(last_hole) + 1);
    int32_t src = kept;
    for (int32_t i = 0; i <= last_hole; ++i) {
      if (!gone[static_cast<size_t>(i)]) {
        k[static_cast<size_t>(i)] = i;
        continue;
      }
      while (gone[static_cast<size_t>(src)]) ++src;  // the next tail survivor
      k[static_cast<size_t>(i)] = src++;
      ++holes[static_cast<size_t>(r)];
    }
  }
  ADAKV_RETURN_IF_ERROR(apply_row_keeps(seq, keeps));
  for (int32_t r = 0; r < R; ++r) {
    const std::vector<int32_t>& e = evict[static_cast<size_t>(r)];
    if (e.empty()) continue;
    const std::vector<KvMove> moves = m.evict_entries(seq, r / Hkv, r % Hkv, e);
    if (static_cast<int64_t>(moves.size()) != holes[static_cast<size_t>(r)])
      return internal_error("cuda kvcompress: the manager moved " + std::to_string(moves.size()) + " entries of row " +
                            std::to_string(r) + ", the device " + std::to_string(holes[static_cast<size_t>(r)]));
  }
  return Status::ok();
}

// KvCompressor::compress_h2o: the metric of every row to the host, plan_layer per layer (top
// B - w heavy hitters of the prefix + the w newest), the moves on the device, then the manager.
Status CudaModel::Impl::compress_h2o(SeqId seq, const CompressConfig& cc, KvCacheManager& m) {
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads), L = static_cast<int32_t>(cfg.num_layers), R = rows_per_seq;
  std::vector<int32_t> lengths(static_cast<size_t>(R));
  int32_t longest = 0;
  for (int32_t r = 0; r < R; ++r) {
    lengths[static_cast<size_t>(r)] = m.length(seq, r / Hkv, r % Hkv);
    longest = std::max(longest, lengths[static_cast<size_t>(r)]);
  }
  if (longest <= cc.budget) return Status::ok();  // nothing to evict anywhere
  if (longest <= kMetricKeepMaxRow) {
    // On the device: every row's plan in one launch (metric_keep_top == plan_layer here), the
    // compaction over the rows that lose entries, then the lists to the host for the manager.
    ADAKV_RETURN_IF_ERROR(regrow(&keep_dev, &keep_host, &keep_cap, int64_t{R} * longest, "keep lists"));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h2o_len_dev, lengths.data(), sizeof(int32_t) * R, cudaMemcpyHostToDevice, stream));
    MetricKeepParams kp;
    kp.rows = {page_table, row_offsets_all + int64_t{seq} * R, R};
    kp.row_lengths = h2o_len_dev;
    kp.metric = metric;
    kp.window = cc.window;
    kp.selection_budget = cc.budget - cc.window;
    kp.keep = keep_dev;
    kp.keep_stride = longest;
    kp.counts = stream_counts_dev;
    ADAKV_RETURN_IF_ERROR(metric_keep_top(kp, stream));
    // (counts are 0 for the rows kept whole: untouched)
    ADAKV_RETURN_IF_ERROR(
        compact_kv_rows(compaction(row_offsets_all + int64_t{seq} * R, R, keep_dev, longest, stream_counts_dev), stream));
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(h2o_counts_host, stream_counts_dev, sizeof(int32_t) * R, cudaMemcpyDeviceToHost, stream));
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(keep_host, keep_dev, sizeof(int32_t) * R * longest, cudaMemcpyDeviceToHost, stream));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    for (int32_t r = 0; r < R; ++r) {
      const int32_t cnt = h2o_counts_host[r];
      if (cnt == 0) continue;
      (void)m.keep_entries(seq, r / Hkv, r % Hkv,
                           std::span<const int32_t>(keep_host + int64_t{r} * longest, static_cast<size_t>(cnt)));
    }
    return Status::ok();
  }
  // Rows longer than the device plan takes (a compress_now long after the last compression):
  // the same plan on the host over the device's metric.
  ADAKV_RETURN_IF_ERROR(regrow(&gath, static_cast<float**>(nullptr), &gath_cap, int64_t{R} * longest, "h2o metric rows"));
  for (int32_t r = 0; r < R;) {  // runs of rows with one length: one gather each
    int32_t e = r + 1;
    while (e < R && lengths[static_cast<size_t>(e)] == lengths[static_cast<size_t>(r)]) ++e;
    if (lengths[static_cast<size_t>(r)] > 0) {
      const MetricRows rows{page_table, row_offsets_all + int64_t{seq} * R + r, e - r};
      ADAKV_RETURN_IF_ERROR(
          metric_gather_rows(rows, metric, lengths[static_cast<size_t>(r)], gath + int64_t{r} * longest, longest, stream));
    }
    r = e;
  }
  std::vector<float> host(static_cast<size_t>(R) * static_cast<size_t>(longest));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host.data(), gath, sizeof(float) * host.size(), cudaMemcpyDeviceToHost, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  std::vector<std::vector<int32_t>> keeps(static_cast<size_t>(R));
  for (int32_t l = 0; l < L; ++l) {
    LayerScores sc;
    for (int32_t kh = 0; kh < Hkv; ++kh) {
      const int32_t r = l * Hkv + kh, n = lengths[static_cast<size_t>(r)];
      sc.lengths.push_back(n);
      const float* row = host.data() + static_cast<size_t>(r) * static_cast<size_t>(longest);
      sc.scores.emplace_back(row, row + std::max(0, n - cc.window));
    }
    LayerPlan plan = plan_layer(cc, l, cc.budget - cc.window, sc);
    for (int32_t kh = 0; kh < Hkv; ++kh) {
      const int32_t r = l * Hkv + kh;
      if (static_cast<int32_t>(plan.keep[static_cast<size_t>(kh)].size()) != lengths[static_cast<size_t>(r)])
        keeps[static_cast<size_t>(r)] = std::move(plan.keep[static_cast<size_t>(kh)]);
    }
  }
  ADAKV_RETURN_IF_ERROR(apply_row_keeps(seq, keeps));
  for (int32_t r = 0; r < R; ++r)
    if (!keeps[static_cast<size_t>(r)].empty()) (void)m.keep_entries(seq, r / Hkv, r % Hkv, keeps[static_cast<size_t>(r)]);
  return Status::ok();
}

Status CudaModel::Impl::compress_streamingllm(SeqId seq, const CompressConfig& ccfg, KvCacheManager& mgr) {
  Impl& I = *this;
  const CompressConfig* cc = &ccfg;
  const int32_t L = static_cast<int32_t>(I.cfg.num_layers), Hkv = static_cast<int32_t>(I.cfg.num_kv_heads);
  const int32_t budget = cc->budget;
  ADAKV_RETURN_IF_ERROR(I.regrow(&I.stream_keep_dev, &I.stream_keep_host, &I.stream_cap, I.rows_per_seq * int64_t{budget},
                                 "streamingllm keep lists"));
  // Plans on the host (they depend on lengths only), compaction on the device over every row of
  // the sequence in one launch, then the manager frees the trailing pages.
  std::vector<int32_t> counts(static_cast<size_t>(I.rows_per_seq));
  std::vector<std::vector<int32_t>> keeps(static_cast<size_t>(I.rows_per_seq));
  bool any = false;
  for (int32_t l = 0; l < L; ++l) {
    std::vector<int32_t> lengths;
    for (int32_t kh = 0; kh < Hkv; ++kh) lengths.push_back(mgr.length(seq, l, kh));
    const LayerPlan plan = plan_streaming(*cc, l, lengths);
    for (int32_t kh = 0; kh < Hkv; ++kh) {
      const size_t row = static_cast<size_t>(l * Hkv + kh);
      keeps[row] = plan.keep[static_cast<size_t>(kh)];
      counts[row] = static_cast<int32_t>(keeps[row].size());
      std::copy(keeps[row].begin(), keeps[row].end(), I.stream_keep_host + static_cast<int64_t>(row) * budget);
      any = any || counts[row] != lengths[static_cast<size_t>(kh)];
    }
  }
  if (!any) return Status::ok();
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.stream_keep_dev, I.stream_keep_host,
                                             sizeof(int32_t) * I.rows_per_seq * int64_t{budget}, cudaMemcpyHostToDevice,
                                             I.stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.stream_counts_dev, counts.data(), sizeof(int32_t) * counts.size(),
                                             cudaMemcpyHostToDevice, I.stream));
  KvCompactParams cp = I.compaction(I.row_offsets_all + int64_t{seq} * I.rows_per_seq, I.rows_per_seq,
                                     I.stream_keep_dev, budget, I.stream_counts_dev);
  cp.metric = nullptr;  // streamingllm keeps no metric
  ADAKV_RETURN_IF_ERROR(compact_kv_rows(cp, I.stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(I.stream));
  for (int32_t l = 0; l < L; ++l)
    for (int32_t kh = 0; kh < Hkv; ++kh) {
      const size_t row = static_cast<size_t>(l * Hkv + kh);
      if (counts[row] != mgr.length(seq, l, kh)) (void)mgr.keep_entries(seq, l, kh, keeps[row]);
    }
  return Status::ok();
}

}  // namespace adakv::cuda
