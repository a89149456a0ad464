// CudaModel::step (cuda_model.h): one batched forward over prefill chunks and decode tokens, with
// decode-only steps replayed as CUDA graphs, then sampling and the prompts' compression.
#include "backends/cuda/cuda_model_impl.h"

namespace adakv::cuda {

using namespace cuda_model_detail;

namespace {
using HostClock = std::chrono::steady_clock;
double host_ms(HostClock::time_point a, HostClock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
}  // namespace

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

}  // namespace adakv::cuda
