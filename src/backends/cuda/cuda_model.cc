// CudaModel (cuda_model.h): weights, KV pool, workspace and the batched step.
#include "backends/cuda/cuda_model.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "backends/cuda/compact_kv.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/decode_attention.h"
#include "backends/cuda/gemm_lt.h"
#include "backends/cuda/model_ops.h"
#include "backends/cuda/paged_kv_view.h"
#include "backends/cuda/prefill_attention.h"
#include "backends/cuda/sampling.h"
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

bool window_policy(KvPolicy p) { return policy_uses_window_scores(p) && !policy_is_two_stage(p); }

}  // namespace

struct CudaModel::Impl {
  ModelConfig cfg;
  CudaModelOptions opt;
  CompressConfig comp;
  bool has_comp = false;
  int64_t max_context = 0;
  int32_t max_logit_rows = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t ev_start = nullptr, ev_end = nullptr;
  float last_ms = 0.f;
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
  float* scores = nullptr;     // [Hkv][T]
  int32_t* keep_dev = nullptr;  // [layers * Hkv * T] keep lists of the compressing sequences
  int32_t* keep_host = nullptr;
  int32_t* counts_dev = nullptr;  // [max_seqs][layers][Hkv]
  int32_t* counts_host = nullptr;
  int32_t* stream_keep_dev = nullptr;  // streamingllm: [rows_per_seq][budget]
  int32_t* stream_keep_host = nullptr;
  int32_t* stream_counts_dev = nullptr;
  std::vector<CompressionAuditLayer> audit;

  ~Impl() {
    decode.clear();
    scorer.reset();
    selector.reset();
    gemm.reset();
    for (void* p : device_allocs) cudaFree(p);
    for (void* p : host_allocs) cudaFreeHost(p);
    if (ev_start) cudaEventDestroy(ev_start);
    if (ev_end) cudaEventDestroy(ev_end);
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
  Status run_compression_window(SeqId seq, int32_t b, int32_t tok0, int32_t n, int32_t layer, int64_t keep_base,
                                int32_t slot);
};

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
      ADAKV_ASSIGN_OR_RETURN(auto da, DecodeAttention::create(o));
      decode.push_back(std::move(da));
    }
  }
  if (fast_prefill) {
    ADAKV_RETURN_IF_ERROR(alloc(&gather_k, Hkv * max_context * d, "prefill gather K", ws));
    ADAKV_RETURN_IF_ERROR(alloc(&gather_v, Hkv * max_context * d, "prefill gather V", ws));
  }
  if (has_comp && window_policy(comp.policy)) {
    WindowScorerOptions so;
    so.num_heads = H;
    so.num_kv_heads = Hkv;
    so.head_dim = static_cast<int32_t>(d);
    so.max_length = static_cast<int32_t>(T);
    so.max_window = comp.window;
    ADAKV_ASSIGN_OR_RETURN(scorer, WindowScorer::create(so));
    KeepSelectorOptions ko;
    ko.num_kv_heads = Hkv;
    ko.max_length = static_cast<int32_t>(T);
    ADAKV_ASSIGN_OR_RETURN(selector, KeepSelector::create(ko));
    ADAKV_RETURN_IF_ERROR(alloc(&scores, Hkv * T, "compression scores", ws));
    ADAKV_RETURN_IF_ERROR(alloc(&keep_dev, rows_per_seq * T, "keep lists", ws));
    ADAKV_RETURN_IF_ERROR(alloc_host(&keep_host, rows_per_seq * T, "keep lists"));
  }
  if (has_comp) {
    ADAKV_RETURN_IF_ERROR(alloc(&counts_dev, S * rows_per_seq, "keep counts", ws));
    ADAKV_RETURN_IF_ERROR(alloc_host(&counts_host, S * rows_per_seq, "keep counts"));
  }
  if (has_comp && comp.policy == KvPolicy::kStreamingLlm) {
    ADAKV_RETURN_IF_ERROR(alloc(&stream_keep_dev, rows_per_seq * int64_t{comp.budget}, "streamingllm keep lists", ws));
    ADAKV_RETURN_IF_ERROR(alloc_host(&stream_keep_host, rows_per_seq * int64_t{comp.budget}, "streamingllm keep lists"));
    ADAKV_RETURN_IF_ERROR(alloc(&stream_counts_dev, rows_per_seq, "streamingllm keep counts", ws));
  }

  // The KV pool: what is left, times the fraction (or exactly num_pages).
  const int64_t page_elems = int64_t{kPageSize} * d;
  const int64_t page_bytes = 2 * page_elems * 2 + kPageSize * 4;  // K + V bf16, positions
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
    const KvPolicy p = options.compress->policy;
    if (!window_policy(p) && p != KvPolicy::kStreamingLlm)
      return unimplemented(std::string("cuda: --kv-policy ") + kv_policy_name(p) +
                           " is not on the device yet (snapkv, pyramidkv, ada-snapkv, ada-pyramidkv, streamingllm "
                           "are); use --device cpu");
    impl->comp = *options.compress;
    impl->has_comp = true;
  }
  impl->opt.compress = nullptr;
  int64_t ctx = cfg.max_position_embeddings;
  if (cfg.sliding_window > 0) ctx = std::min(ctx, cfg.sliding_window);
  impl->max_context = options.max_context > 0 ? std::min(options.max_context, ctx) : ctx;
  impl->max_logit_rows = options.max_logit_rows > 0 ? options.max_logit_rows : std::max(options.max_seqs, 1);
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->ev_start));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->ev_end));
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

void CudaModel::on_release(SeqId seq) {
  if (seq < 0 || seq >= impl_->opt.max_seqs) return;
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

Status CudaModel::Impl::run_compression_window(SeqId seq, int32_t b, int32_t tok0, int32_t n, int32_t layer,
                                               int64_t keep_base, int32_t slot) {
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  const int32_t w = std::min(comp.window, n);
  int32_t* counts = counts_dev + (int64_t{slot} * cfg.num_layers + layer) * Hkv;
  int32_t* keep = keep_dev + keep_base + int64_t{layer} * Hkv * n;
  const int32_t bs = layer_selection_budget(comp, static_cast<int32_t>(cfg.num_layers), layer, n);
  WindowScoreInputs in;
  in.queries = qkv + int64_t(tok0 + n - w) * qkv_dim();
  in.q_token_stride = qkv_dim();
  in.keys = qkv + int64_t{tok0} * qkv_dim() + q_dim();
  in.k_token_stride = qkv_dim();
  in.length = n;
  in.window = w;
  if (n > comp.window) {
    ADAKV_RETURN_IF_ERROR(scorer->snapkv(in, comp.gqa, comp.pool, comp.pool_kernel, scores, n, stream));
  }
  SelectInputs si;
  si.scores = scores;
  si.scores_stride = n;
  si.length = n;
  si.window = comp.window;
  si.selection_budget = bs;
  si.adaptive = policy_is_adaptive(comp.policy);
  si.alpha = comp.alpha;
  SelectOutputs so;
  so.keep = keep;
  so.keep_stride = n;
  so.keep_counts = counts;
  ADAKV_RETURN_IF_ERROR(selector->select(si, so, stream));
  KvCompactParams cp;
  cp.k_pool = pool.k_pool;
  cp.v_pool = pool.v_pool;
  cp.page_stride = pool.page_stride;
  cp.head_dim = static_cast<int32_t>(cfg.head_dim);
  cp.positions = pool.positions;
  cp.row_page_offsets = row_offsets_all + (int64_t{seq} * cfg.num_layers + layer) * Hkv;
  cp.page_ids = page_table;
  cp.num_rows = Hkv;
  cp.keep = keep;
  cp.keep_stride = n;
  cp.keep_counts = counts;
  ADAKV_RETURN_IF_ERROR(compact_kv_rows(cp, stream));
  if (opt.audit_compression) {
    CompressionAuditLayer a;
    a.seq = seq;
    a.layer = layer;
    a.length = n;
    a.selection_budget = bs;
    const int64_t cand = std::max(0, n - comp.window);
    const int64_t d = cfg.head_dim;
    a.scores.resize(static_cast<size_t>(Hkv * cand));
    if (cand > 0)  // [Hkv][n] on the device (row pitch n), [Hkv][cand] here
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.scores.data(), cand * 4, scores, int64_t{n} * 4, cand * 4, Hkv,
                                                   cudaMemcpyDeviceToHost, stream));
    a.queries.resize(static_cast<size_t>(w * cfg.num_heads * d));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.queries.data(), cfg.num_heads * d * 2, in.queries, qkv_dim() * 2,
                                                 cfg.num_heads * d * 2, w, cudaMemcpyDeviceToHost, stream));
    a.keys.resize(static_cast<size_t>(int64_t{n} * Hkv * d));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(a.keys.data(), Hkv * d * 2, in.keys, qkv_dim() * 2, Hkv * d * 2, n,
                                                 cudaMemcpyDeviceToHost, stream));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    audit.push_back(std::move(a));
  }
  (void)b;
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
  int32_t t = 0, r = 0;
  for (int32_t b = 0; b < B; ++b) {
    const SeqStep& s = steps[static_cast<size_t>(order[static_cast<size_t>(b)])];
    const int32_t n = static_cast<int32_t>(s.tokens.size());
    const int64_t p0 = pos0[static_cast<size_t>(order[static_cast<size_t>(b)])];
    tok0[static_cast<size_t>(b)] = t;
    ntok[static_cast<size_t>(b)] = n;
    mh[f_seq + b] = s.seq;
    mh[f_ntok + b] = n;
    bool is_fresh = true;
    for (int32_t l = 0; l < L; ++l)
      for (int32_t kh = 0; kh < Hkv; ++kh) {
        const int32_t len = mgr.length(s.seq, l, kh);
        mh[f_rowlen + (int64_t{b} * L + l) * Hkv + kh] = len;
        is_fresh = is_fresh && len == n;
        if (b < n_dec) {
          const int64_t i = (int64_t{l} * n_dec + b) * Hkv + kh;
          mh[f_doff + i] = static_cast<int32_t>((int64_t{s.seq} * I.rows_per_seq + int64_t{l} * Hkv + kh) * I.max_pages_per_row);
          mh[f_dlen + i] = len;
        }
      }
    fresh[static_cast<size_t>(b)] = is_fresh;
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
  int64_t n_updates = 0;
  for (int32_t b = 0; b < B; ++b)
    ADAKV_RETURN_IF_ERROR(I.mirror_rows(steps[static_cast<size_t>(order[static_cast<size_t>(b)])].seq, mgr, &n_updates));

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
  if (I.fast_decode && n_dec > 0) {
    std::vector<int32_t> lens(static_cast<size_t>(n_dec) * Hkv);
    for (int32_t l = 0; l < L; ++l) {
      std::copy_n(mh + f_dlen + int64_t{l} * n_dec * Hkv, lens.size(), lens.begin());
      ADAKV_RETURN_IF_ERROR(I.decode[static_cast<size_t>(l)]->plan(lens, st));
    }
  }

  // --- compression bookkeeping ------------------------------------------------------------------------
  const bool window_comp = I.has_comp && window_policy(I.comp.policy);
  std::vector<int32_t> comp_slot(static_cast<size_t>(B), -1);  // index into counts / keep regions
  std::vector<int64_t> keep_base(static_cast<size_t>(B), 0);
  int64_t keep_used = 0;
  int32_t n_comp = 0;
  for (int32_t b = 0; b < B; ++b) {
    const SeqStep& s = steps[static_cast<size_t>(order[static_cast<size_t>(b)])];
    if (!s.compress || !I.has_comp || !fresh[static_cast<size_t>(b)] || pos0[static_cast<size_t>(order[static_cast<size_t>(b)])] != 0)
      continue;
    if (window_comp && ntok[static_cast<size_t>(b)] > I.comp.window) {
      comp_slot[static_cast<size_t>(b)] = n_comp++;
      keep_base[static_cast<size_t>(b)] = keep_used;
      keep_used += int64_t{I.rows_per_seq} * ntok[static_cast<size_t>(b)];
    } else if (I.comp.policy == KvPolicy::kStreamingLlm) {
      comp_slot[static_cast<size_t>(b)] = n_comp++;  // handled after the forward
    }
  }
  if (I.opt.audit_compression) I.audit.clear();

  // --- the forward ---------------------------------------------------------------------------------------
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const float eps = static_cast<float>(c.rms_norm_eps);
  ADAKV_RETURN_IF_ERROR(rope_cos_sin(I.inv_freq, md + f_pos, T, d / 2, I.cos_sin, st));
  ADAKV_RETURN_IF_ERROR(embed_gather(I.embed, hidden, md + f_tokens, T, I.x, st));
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
    ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.h, W.qkv, I.qkv, DType::kBF16, T, qkvd, hidden, st));
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
    ADAKV_RETURN_IF_ERROR(kv_append(I.pool, bv, l, I.qkv, qkvd, static_cast<int32_t>(qd),
                                    static_cast<int32_t>(qd + I.kv_dim()), d, st));
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
        ADAKV_RETURN_IF_ERROR(I.decode[static_cast<size_t>(l)]->run(v, I.qkv, qkvd, I.attn, qd, nullptr, scale, st));
      } else {
        ADAKV_RETURN_IF_ERROR(attention_generic(I.pool, sub_view(0, n_dec), l, H, d, I.qkv, qkvd, I.attn, qd, scale, st));
      }
    }
    if (n_dec < B && !I.fast_prefill) {
      const int32_t first = tok0[static_cast<size_t>(n_dec)];
      ADAKV_RETURN_IF_ERROR(attention_generic(I.pool, sub_view(first, T - first), l, H, d, I.qkv + first * qkvd, qkvd,
                                              I.attn + first * qd, qd, scale, st));
    }
    for (int32_t b = n_dec; b < B && I.fast_prefill; ++b) {
      const int32_t t0 = tok0[static_cast<size_t>(b)], n = ntok[static_cast<size_t>(b)];
      const SeqId seq = mh[f_seq + b];
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
          ADAKV_RETURN_IF_ERROR(prefill_attention(pa, st));
        }
      }
    }
    for (int32_t b = 0; b < B; ++b) {
      if (comp_slot[static_cast<size_t>(b)] < 0 || !window_comp) continue;
      ADAKV_RETURN_IF_ERROR(I.run_compression_window(mh[f_seq + b], b, tok0[static_cast<size_t>(b)],
                                                     ntok[static_cast<size_t>(b)], l, keep_base[static_cast<size_t>(b)],
                                                     comp_slot[static_cast<size_t>(b)]));
    }
    ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.attn, W.o, I.delta, DType::kBF16, T, hidden, qd, st));
    nrm.delta = I.delta;
    nrm.delta_bias = W.o_bias;
    nrm.weight = W.post_norm;
    ADAKV_RETURN_IF_ERROR(rms_norm_residual(nrm, st));
    ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.h, W.gate_up, I.gu, DType::kBF16, T, 2 * inter, hidden, st));
    ADAKV_RETURN_IF_ERROR(swiglu(I.gu, I.act, T, static_cast<int32_t>(inter), st));
    ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.act, W.down, I.delta, DType::kBF16, T, hidden, inter, st));
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
  ADAKV_RETURN_IF_ERROR(I.gemm->linear(I.hsel, I.lm_head, I.logits, DType::kF32, R, c.vocab_size, hidden, st));

  // --- sampling and results ---------------------------------------------------------------------------------
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
  if (n_samp > 0) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.samp_dev, I.samp_host, sizeof(DeviceSamplingRow) * n_samp,
                                               cudaMemcpyHostToDevice, st));
    ADAKV_RETURN_IF_ERROR(sample_rows(I.logits, c.vocab_size, n_samp, static_cast<int32_t>(c.vocab_size), I.samp_dev,
                                      I.sampled_dev, st));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.sampled_host, I.sampled_dev, sizeof(int32_t) * n_samp,
                                               cudaMemcpyDeviceToHost, st));
  }
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
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&I.last_ms, I.ev_start, I.ev_end));

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

  // --- the host side of compression: the manager learns the device's keep lists -----------------------------
  for (int32_t b = 0; b < B; ++b) {
    const int32_t slot = comp_slot[static_cast<size_t>(b)];
    if (slot < 0 || !window_comp) continue;
    const SeqId seq = mh[f_seq + b];
    const int32_t n = ntok[static_cast<size_t>(b)];
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
    if (comp_slot[static_cast<size_t>(b)] >= 0 && I.comp.policy == KvPolicy::kStreamingLlm)
      ADAKV_RETURN_IF_ERROR(compress_streaming(mh[f_seq + b], mgr));
  return Status::ok();
}

Status CudaModel::compress_streaming(SeqId seq, KvCacheManager& mgr) {
  Impl& I = *impl_;
  if (!I.has_comp || I.comp.policy != KvPolicy::kStreamingLlm) return Status::ok();
  const int32_t L = static_cast<int32_t>(I.cfg.num_layers), Hkv = static_cast<int32_t>(I.cfg.num_kv_heads);
  const int32_t budget = I.comp.budget;
  // Plans on the host (they depend on lengths only), compaction on the device over every row of
  // the sequence in one launch, then the manager frees the trailing pages.
  std::vector<int32_t> counts(static_cast<size_t>(I.rows_per_seq));
  std::vector<std::vector<int32_t>> keeps(static_cast<size_t>(I.rows_per_seq));
  bool any = false;
  for (int32_t l = 0; l < L; ++l) {
    std::vector<int32_t> lengths;
    for (int32_t kh = 0; kh < Hkv; ++kh) lengths.push_back(mgr.length(seq, l, kh));
    const LayerPlan plan = plan_streaming(I.comp, l, lengths);
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
  KvCompactParams cp;
  cp.k_pool = I.pool.k_pool;
  cp.v_pool = I.pool.v_pool;
  cp.page_stride = I.pool.page_stride;
  cp.head_dim = static_cast<int32_t>(I.cfg.head_dim);
  cp.positions = I.pool.positions;
  cp.row_page_offsets = I.row_offsets_all + int64_t{seq} * I.rows_per_seq;
  cp.page_ids = I.page_table;
  cp.num_rows = I.rows_per_seq;
  cp.keep = I.stream_keep_dev;
  cp.keep_stride = budget;
  cp.keep_counts = I.stream_counts_dev;
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
