// CudaModel::step's forward: everything from the embedding to the sampled ids, enqueued on the
// model's stream from the step's plan (cuda_model_step_plan.h). A decode-only step replays it as
// a CUDA graph, so it reads per-step data only from device buffers (metadata, plans, sampling
// rows) and its launches depend on the batch shape alone.
#include "backends/cuda/cuda_model_impl.h"

namespace adakv::cuda {

using namespace cuda_model_detail;

namespace {

// The step's tokens as the KV kernels see them, or `count` of them from token `first` on.
StepBatchView batch_view(const StepPlan& sp, const int32_t* md, int32_t num_layers, int32_t num_kv_heads,
                         int32_t first = 0, int32_t count = -1) {
  StepBatchView v;
  v.seq_ids = md + sp.meta.seq;
  v.seq_ntok = md + sp.meta.ntok;
  v.row_len = md + sp.meta.rowlen;
  v.token_seq = md + sp.meta.tseq + first;
  v.token_index = md + sp.meta.tidx + first;
  v.positions = md + sp.meta.pos + first;
  v.num_tokens = count < 0 ? sp.T : count;
  v.num_layers = num_layers;
  v.num_kv_heads = num_kv_heads;
  return v;
}

}  // namespace

Status CudaModel::Impl::enqueue_forward(const StepPlan& sp) {
  const int32_t L = static_cast<int32_t>(cfg.num_layers), d = static_cast<int32_t>(cfg.head_dim);
  const int64_t hidden = cfg.hidden_size;
  const int32_t* md = meta_dev;
  ops.begin(stream);
  ADAKV_RETURN_IF_ERROR(rope_cos_sin(inv_freq, md + sp.meta.pos, sp.T, d / 2, cos_sin, stream));
  ADAKV_RETURN_IF_ERROR(embed_gather(embed, hidden, md + sp.meta.tokens, sp.T, x, stream));
  ops.mark("embedding + rope tables", stream);
  for (int32_t l = 0; l < L; ++l) ADAKV_RETURN_IF_ERROR(enqueue_layer(sp, l));
  RmsNormArgs fin;
  fin.x = x;
  fin.delta = delta;
  fin.weight = final_norm;
  fin.out = hsel;
  fin.row_index = md + sp.meta.sel;
  fin.out_rows = sp.R;
  fin.dim = static_cast<int32_t>(hidden);
  fin.eps = static_cast<float>(cfg.rms_norm_eps);
  ADAKV_RETURN_IF_ERROR(rms_norm_residual(fin, stream));
  ops.mark("residual + rmsnorm", stream);
  ADAKV_RETURN_IF_ERROR(gemm->linear(hsel, lm_head, logits, DType::kF32, sp.R, cfg.vocab_size, hidden, stream));
  ops.mark("lm_head", stream);
  if (sp.n_samp > 0)
    ADAKV_RETURN_IF_ERROR(sample_rows(logits, cfg.vocab_size, sp.n_samp, static_cast<int32_t>(cfg.vocab_size), samp_dev,
                                      sampled_dev, stream));
  ops.mark("sampling", stream);
  return Status::ok();
}

Status CudaModel::Impl::enqueue_layer(const StepPlan& sp, int32_t l) {
  const ModelConfig& c = cfg;
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size, qkvd = qkv_dim();
  const int32_t T = sp.T;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const DevLayer& W = layers[static_cast<size_t>(l)];
  const auto mark = [&](const char* op) { ops.mark(op, stream); };
  RmsNormArgs nrm;
  nrm.x = x;
  nrm.delta = l == 0 ? nullptr : delta;
  nrm.weight = W.input_norm;
  nrm.out = h;
  nrm.rows = T;
  nrm.dim = static_cast<int32_t>(hidden);
  nrm.eps = eps;
  ADAKV_RETURN_IF_ERROR(rms_norm_residual(nrm, stream));
  mark("residual + rmsnorm");
  ADAKV_RETURN_IF_ERROR(gemm->linear(h, W.qkv, qkv, DType::kBF16, T, qkvd, hidden, stream));
  mark("qkv projection");
  QkvRopeArgs qr;
  qr.qkv = qkv;
  qr.row_stride = qkvd;
  qr.n = T;
  qr.num_heads = static_cast<int32_t>(c.num_heads);
  qr.num_kv_heads = static_cast<int32_t>(c.num_kv_heads);
  qr.head_dim = static_cast<int32_t>(c.head_dim);
  qr.bias = W.qkv_bias;
  qr.q_norm = W.q_norm;
  qr.k_norm = W.k_norm;
  qr.eps = eps;
  qr.cos_sin = cos_sin;
  // K and V go into the pool in the same launch (the K/V append).
  qr.pool = pool;
  qr.batch = batch_view(sp, meta_dev, static_cast<int32_t>(c.num_layers), static_cast<int32_t>(c.num_kv_heads));
  qr.layer = l;
  ADAKV_RETURN_IF_ERROR(qkv_rope(qr, stream));
  mark("bias + q/k norm + rope + kv append");
  ADAKV_RETURN_IF_ERROR(save_window_queries(sp, l));
  ADAKV_RETURN_IF_ERROR(enqueue_attention(sp, l));
  ADAKV_RETURN_IF_ERROR(enqueue_layer_compression(sp, l));
  mark("compression (scores, selection, metric)");
  ADAKV_RETURN_IF_ERROR(gemm->linear(attn, W.o, delta, DType::kBF16, T, hidden, q_dim(), stream));
  mark("o projection");
  nrm.delta = delta;
  nrm.delta_bias = W.o_bias;
  nrm.weight = W.post_norm;
  ADAKV_RETURN_IF_ERROR(rms_norm_residual(nrm, stream));
  mark("residual + rmsnorm");
  ADAKV_RETURN_IF_ERROR(gemm->linear(h, W.gate_up, gu, DType::kBF16, T, 2 * inter, hidden, stream));
  mark("gate_up projection");
  // SwiGLU inside the down projection where its GEMV takes it (a decode step of 1-2 tokens).
  ADAKV_RETURN_IF_ERROR(gemm->linear_swiglu(gu, act, W.down, delta, DType::kBF16, T, hidden, inter, stream));
  mark("swiglu + down projection");
  return Status::ok();
}

Status CudaModel::Impl::save_window_queries(const StepPlan& sp, int32_t l) {
  // Chunked prefill: the chunk's trailing window queries into the ring (position p at row p % w).
  const int32_t L = static_cast<int32_t>(cfg.num_layers);
  const int64_t qd = q_dim(), qkvd = qkv_dim();
  for (const StepSeq& q : sp.seqs) {
    if (!q.ring_save) continue;
    const int32_t w = comp_of(q.seq)->window, n = q.ntok;
    const int32_t first = std::max(0, n - w), cnt = n - first;
    const int32_t r0 = static_cast<int32_t>((q.pos0 + first) % w), seg1 = std::min(cnt, w - r0);
    bf16* ring = win_ring + (int64_t{q.seq} * L + l) * max_window * qd;
    const bf16* src = qkv + int64_t(q.tok0 + first) * qkvd;
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(ring + int64_t{r0} * qd, qd * sizeof(bf16), src, qkvd * sizeof(bf16),
                                                 qd * sizeof(bf16), seg1, cudaMemcpyDeviceToDevice, stream));
    if (cnt > seg1)
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(ring, qd * sizeof(bf16), src + int64_t{seg1} * qkvd,
                                                   qkvd * sizeof(bf16), qd * sizeof(bf16), cnt - seg1,
                                                   cudaMemcpyDeviceToDevice, stream));
  }
  return Status::ok();
}

Status CudaModel::Impl::enqueue_attention(const StepPlan& sp, int32_t l) {
  const int32_t L = static_cast<int32_t>(cfg.num_layers), H = static_cast<int32_t>(cfg.num_heads);
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads), d = static_cast<int32_t>(cfg.head_dim);
  const int32_t g = H / Hkv, B = sp.B, n_dec = sp.n_dec, T = sp.T;
  const int64_t qd = q_dim(), qkvd = qkv_dim();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const int32_t* md = meta_dev;
  const int32_t* mh = meta_host;
  const StepMetaLayout& f = sp.meta;
  // Decode tokens [0, n_dec) in one launch, then each longer sequence.
  if (n_dec > 0) {
    if (fast_decode) {
      PagedKvView v;
      v.k_pool = pool.k_pool;
      v.v_pool = pool.v_pool;
      v.row_page_offsets = md + f.doff + int64_t{l} * n_dec * Hkv;
      v.page_ids = page_table;
      v.row_lengths = md + f.dlen + int64_t{l} * n_dec * Hkv;
      v.num_rows = n_dec * Hkv;
      v.num_kv_heads = Hkv;
      v.head_dim = d;
      v.page_stride = pool.page_stride;
      ADAKV_RETURN_IF_ERROR(decode->layer(l).run(v, qkv, qkvd, attn, qd, sp.dec_lse, scale, stream));
    } else {
      ADAKV_RETURN_IF_ERROR(attention_generic(pool, batch_view(sp, md, L, Hkv, 0, n_dec), l, H, d, qkv, qkvd, attn, qd,
                                              scale, stream));
    }
    ops.mark("decode attention", stream);
  }
  if (n_dec == B) return Status::ok();
  if (!fast_prefill) {
    const int32_t first = sp.seqs[static_cast<size_t>(n_dec)].tok0;
    ADAKV_RETURN_IF_ERROR(attention_generic(pool, batch_view(sp, md, L, Hkv, first, T - first), l, H, d,
                                            qkv + first * qkvd, qkvd, attn + first * qd, qd, scale, stream));
  }
  for (int32_t b = n_dec; b < B && fast_prefill; ++b) {
    const StepSeq& q = sp.seqs[static_cast<size_t>(b)];
    const int32_t t0 = q.tok0, n = q.ntok;
    float* lse = q.want_lse ? const_cast<float*>(h2o_lse(t0)) : nullptr;
    PrefillAttentionArgs pa;
    pa.num_q = n;
    pa.head_dim = d;
    pa.softmax_scale = scale;
    pa.causal = true;
    pa.q_row_stride = qkvd;
    pa.out_row_stride = qd;
    if (q.fresh) {
      pa.q = qkv + int64_t{t0} * qkvd;
      pa.k = pa.q + qd;
      pa.v = pa.q + qd + kv_dim();
      pa.out = attn + int64_t{t0} * qd;
      pa.num_k = n;
      pa.num_qo_heads = H;
      pa.num_kv_heads = Hkv;
      pa.k_row_stride = qkvd;
      pa.v_row_stride = qkvd;
      pa.lse = lse;
      ADAKV_RETURN_IF_ERROR(prefill_attention(pa, stream));
    } else {
      // Rows that held entries before this step: gather each kv head's row (its own length).
      const int32_t* lens_host = mh + f.rowlen + (int64_t{b} * L + l) * Hkv;
      const int32_t max_len = *std::max_element(lens_host, lens_host + Hkv);
      const int64_t hs = max_context * d;
      ADAKV_RETURN_IF_ERROR(kv_gather_rows(pool, q.seq, l, L, Hkv, d, md + f.rowlen + (int64_t{b} * L + l) * Hkv,
                                           max_len, gather_k, gather_v, hs, stream));
      for (int32_t kh = 0; kh < Hkv; ++kh) {
        pa.q = qkv + int64_t{t0} * qkvd + int64_t{kh} * g * d;
        pa.k = gather_k + kh * hs;
        pa.v = gather_v + kh * hs;
        pa.out = attn + int64_t{t0} * qd + int64_t{kh} * g * d;
        pa.num_k = lens_host[kh];
        pa.num_qo_heads = g;
        pa.num_kv_heads = 1;
        pa.k_row_stride = d;
        pa.v_row_stride = d;
        pa.lse = lse == nullptr ? nullptr : lse + int64_t{kh} * g * n;
        ADAKV_RETURN_IF_ERROR(prefill_attention(pa, stream));
      }
    }
  }
  ops.mark("prefill attention", stream);
  return Status::ok();
}

Status CudaModel::Impl::enqueue_layer_compression(const StepPlan& sp, int32_t l) {
  const int32_t L = static_cast<int32_t>(cfg.num_layers), H = static_cast<int32_t>(cfg.num_heads);
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads), d = static_cast<int32_t>(cfg.head_dim);
  const int32_t B = sp.B, n_dec = sp.n_dec;
  const int64_t qkvd = qkv_dim();
  const int32_t* md = meta_dev;
  const int32_t* mh = meta_host;
  const StepMetaLayout& f = sp.meta;
  const auto row_len = [&](int32_t b) { return md + f.rowlen + (int64_t{b} * L + l) * Hkv; };
  for (int32_t b = 0; b < B; ++b) {  // H2O chunks before the last: their share of the metric
    const StepSeq& q = sp.seqs[static_cast<size_t>(b)];
    if (q.h2o_part) ADAKV_RETURN_IF_ERROR(h2o_accumulate_chunk(q.seq, *comp_of(q.seq), q.tok0, q.ntok, q.total(), row_len(b), l));
  }
  for (int32_t b = 0; b < B; ++b) {
    const StepSeq& q = sp.seqs[static_cast<size_t>(b)];
    if (q.comp_window)
      ADAKV_RETURN_IF_ERROR(
          run_compression_window(q.seq, *q.comp, q.tok0, q.ntok, q.total(), row_len(b), l, q.keep_base, q.comp_slot));
  }
  // H2O / KV-Compress: the step's last query's attention of every entry into the metric
  // (KvCompressor::add_attention): decode tokens in runs of one mode, then longer appends.
  for (int32_t b = 0; sp.any_obs && b < B;) {
    const StepSeq& q = sp.seqs[static_cast<size_t>(b)];
    if (!q.metric_obs) {
      ++b;
      continue;
    }
    MetricDecodeParams mp;
    mp.k_pool = pool.k_pool;
    mp.page_stride = pool.page_stride;
    mp.head_dim = d;
    mp.num_kv_heads = Hkv;
    mp.group = H / Hkv;
    mp.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    mp.mode = q.metric_mode;
    mp.metric = metric;
    mp.q_token_stride = qkvd;
    int32_t e = b + 1;
    if (b < n_dec) {
      while (e < n_dec && sp.seqs[static_cast<size_t>(e)].metric_obs && sp.seqs[static_cast<size_t>(e)].metric_mode == mp.mode)
        ++e;
      const int64_t r0 = (int64_t{l} * n_dec + b) * Hkv;
      mp.rows = {page_table, md + f.doff + r0, (e - b) * Hkv};
      mp.row_lengths = md + f.dlen + r0;
      mp.queries = qkv + int64_t{b} * qkvd;  // decode token b is token b of the step
      if (sp.dec_lse != nullptr) {
        mp.lse = sp.dec_lse + int64_t{b} * H;
        mp.lse_token_stride = H;
        mp.max_length = *std::max_element(mh + f.dlen + r0, mh + f.dlen + r0 + int64_t{e - b} * Hkv);
      }
    } else {
      mp.rows = {page_table, row_offsets_all + (int64_t{q.seq} * L + l) * Hkv, Hkv};
      mp.row_lengths = row_len(b);
      mp.queries = qkv + int64_t(q.tok0 + q.ntok - 1) * qkvd;
    }
    ADAKV_RETURN_IF_ERROR(metric_decode_add(mp, stream));
    b = e;
  }
  return Status::ok();
}

}  // namespace adakv::cuda
