// CudaModel's device memory (cuda_model_impl.h): weights from a checkpoint or random, the KV pool,
// the page-table mirror and the step workspace.
#include "backends/cuda/cuda_model_impl.h"

namespace adakv::cuda {

using namespace cuda_model_detail;

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
  mirrored_serial.assign(static_cast<size_t>(S), 0);
  mirrored_shrinks.assign(static_cast<size_t>(S), 0);

  ADAKV_ASSIGN_OR_RETURN(gemm, GemmLt::create());
  fast_prefill = d == 64 || d == 128;
  fast_decode = fast_prefill && H / Hkv <= 8;
  if (fast_decode) {
    DecodeAttentionOptions o;
    o.num_qo_heads = H;
    o.num_kv_heads = Hkv;
    o.head_dim = static_cast<int32_t>(d);
    o.max_rows = static_cast<int32_t>(S * Hkv);
    // The kernel before it on the stream is kv_append (or a memcpy, which keeps the full
    // dependency): it writes K/V only, never the plan or the page table, so the attention kernel
    // may load those and request its first pages in L2 while kv_append finishes.
    o.overlap_prologue = overlap_decode_prologue;
    // 2 pages per warp at both head dims: at d 64 (2 pages per iteration, 16 warps per SM) 3 was
    // level with 2 (H200, 2026-11-28: +0.5-0.8 at batch 1 / 32K, -0.4-0.8 from 268 MB).
    o.prefetch_pages = 2;
    o.merge_warps = decode_merge_warps;
    o.merge = decode_merge;
    ADAKV_ASSIGN_OR_RETURN(decode, DecodeAttentionLayers::create(o, L));
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

}  // namespace adakv::cuda
