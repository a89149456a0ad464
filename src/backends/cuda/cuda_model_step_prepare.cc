// CudaModel::step's host phases before the forward (cuda_model_step.cc runs them): the checks,
// the KV reservation, the step's metadata, which sequences compress and how, the device
// sampling rows.
#include "backends/cuda/cuda_model_impl.h"

namespace adakv::cuda {

using namespace cuda_model_detail;

Status CudaModel::Impl::prepare_step(std::span<const SeqStep> steps, KvCacheManager& mgr, StepPlan* sp) {
  const ModelConfig& c = cfg;
  const int32_t L = static_cast<int32_t>(c.num_layers), Hkv = static_cast<int32_t>(c.num_kv_heads);
  const int32_t B = static_cast<int32_t>(steps.size());
  if (B == 0) return invalid_argument("cuda step: no sequences");
  if (B > opt.max_seqs) return invalid_argument("cuda step: more sequences than max_seqs");

  // --- checks and order: one-token steps first (one decode launch covers them) -------------------
  std::vector<int32_t> order(static_cast<size_t>(B));
  std::iota(order.begin(), order.end(), 0);
  std::stable_partition(order.begin(), order.end(), [&](int32_t i) { return steps[static_cast<size_t>(i)].tokens.size() == 1; });
  int64_t n_tok = 0, n_rows = 0;
  int32_t n_dec = 0;
  std::vector<uint8_t> seen(static_cast<size_t>(opt.max_seqs), 0);
  for (const SeqStep& s : steps) {
    if (s.seq < 0 || s.seq >= opt.max_seqs || !mgr.has_sequence(s.seq))
      return invalid_argument("cuda step: sequence " + std::to_string(s.seq) + " is not a sequence below max_seqs " +
                              std::to_string(opt.max_seqs));
    if (seen[static_cast<size_t>(s.seq)]++) return invalid_argument("cuda step: a sequence appears twice");
    if (s.tokens.empty()) return invalid_argument("cuda step: no tokens");
    for (int32_t id : s.tokens)
      if (id < 0 || id >= c.vocab_size)
        return invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary of " +
                                std::to_string(c.vocab_size));
    const int64_t pos0 = mgr.logical_length(s.seq);
    if (pos0 + static_cast<int64_t>(s.tokens.size()) > max_context)
      return out_of_range("a sequence of " + std::to_string(pos0 + s.tokens.size()) +
                          " tokens exceeds the context of " + std::to_string(max_context));
    n_tok += static_cast<int64_t>(s.tokens.size());
    n_rows += s.all_logits ? static_cast<int64_t>(s.tokens.size()) : 1;
    if (s.tokens.size() == 1) ++n_dec;
  }
  if (n_tok > opt.max_step_tokens)
    return invalid_argument("cuda step: " + std::to_string(n_tok) + " tokens, more than max_step_tokens " +
                            std::to_string(opt.max_step_tokens));
  if (n_rows > max_logit_rows)
    return invalid_argument("cuda step: " + std::to_string(n_rows) + " logit rows, more than " +
                            std::to_string(max_logit_rows));

  // --- reserve and commit ------------------------------------------------------------------------
  std::vector<KvGrowth> growths;
  for (const SeqStep& s : steps) growths.push_back({s.seq, static_cast<int32_t>(s.tokens.size())});
  KvReservation reservation;
  const Admission adm = mgr.reserve(growths, &reservation);
  if (adm != Admission::kOk)
    return resource_exhausted("KV cache: " + std::to_string(reservation.pages_needed) + " pages needed for " +
                              std::to_string(n_tok) + " tokens, " + std::to_string(mgr.free_pages()) + " free of " +
                              std::to_string(mgr.num_pages()) + " (" + admission_name(adm) + ")");
  sp->B = B;
  sp->T = static_cast<int32_t>(n_tok);
  sp->R = static_cast<int32_t>(n_rows);
  sp->n_dec = n_dec;
  sp->seqs.assign(static_cast<size_t>(B), StepSeq{});
  for (int32_t b = 0; b < B; ++b) {
    StepSeq& q = sp->seqs[static_cast<size_t>(b)];
    q.caller = order[static_cast<size_t>(b)];
    q.in = &steps[static_cast<size_t>(q.caller)];
    q.seq = q.in->seq;
    q.pos0 = mgr.logical_length(q.seq);
    q.ntok = static_cast<int32_t>(q.in->tokens.size());
  }
  mgr.commit(reservation);

  // --- host metadata, in internal order ----------------------------------------------------------
  const int32_t T = sp->T, R = sp->R;
  int64_t off = 0;
  auto field = [&](int64_t count) {
    const int64_t o = off;
    off += (count + 3) & ~int64_t{3};  // 16-byte aligned fields
    return o;
  };
  StepMetaLayout& f = sp->meta;
  f.tokens = field(T);
  f.pos = field(T);
  f.tseq = field(T);
  f.tidx = field(T);
  f.sel = field(R);
  f.seq = field(B);
  f.ntok = field(B);
  f.rowlen = field(int64_t{B} * L * Hkv);
  f.doff = field(int64_t{L} * n_dec * Hkv);
  f.dlen = field(int64_t{L} * n_dec * Hkv);
  f.size = off;
  if (off > meta_cap) return internal_error("cuda step: metadata exceeds its buffer");
  int32_t* mh = meta_host;
  int32_t t = 0, r = 0;
  for (int32_t b = 0; b < B; ++b) {
    StepSeq& q = sp->seqs[static_cast<size_t>(b)];
    const int32_t n = q.ntok;
    q.tok0 = t;
    mh[f.seq + b] = q.seq;
    mh[f.ntok + b] = n;
    bool is_fresh = true, is_complete = true;
    for (int32_t l = 0; l < L; ++l)
      for (int32_t kh = 0; kh < Hkv; ++kh) {
        const int32_t len = mgr.length(q.seq, l, kh);
        mh[f.rowlen + (int64_t{b} * L + l) * Hkv + kh] = len;
        is_fresh = is_fresh && len == n;
        is_complete = is_complete && len == q.pos0 + n;
        if (b < n_dec) {
          const int64_t i = (int64_t{l} * n_dec + b) * Hkv + kh;
          mh[f.doff + i] = static_cast<int32_t>((int64_t{q.seq} * rows_per_seq + int64_t{l} * Hkv + kh) * max_pages_per_row);
          mh[f.dlen + i] = len;
        }
      }
    q.fresh = is_fresh;
    q.complete = is_complete;
    for (int32_t i = 0; i < n; ++i, ++t) {
      mh[f.tokens + t] = q.in->tokens[static_cast<size_t>(i)];
      mh[f.pos + t] = static_cast<int32_t>(q.pos0 + i);
      mh[f.tseq + t] = b;
      mh[f.tidx + t] = i;
    }
    q.row_first = r;
    const int32_t rows_b = q.in->all_logits ? n : 1;
    for (int32_t i = 0; i < rows_b; ++i) mh[f.sel + r++] = q.tok0 + n - rows_b + i;
  }
  return Status::ok();
}

Status CudaModel::Impl::plan_step_compression(KvCacheManager& mgr, StepPlan* sp) {
  const int32_t L = static_cast<int32_t>(cfg.num_layers), Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  // Which sequences compress after this step: window policies during the forward (slot, keep
  // region of rows x total entries), streamingllm and kvcompress's selection after it.
  for (StepSeq& q : sp->seqs) {
    const size_t sq = static_cast<size_t>(q.seq);
    if (q.pos0 == 0) {  // a sequence starting from nothing is a new one (ids reused without on_release)
      seq_compressed[sq] = 0;
      ring_end[sq] = 0;
    }
    const CompressConfig* cc = comp_of(q.seq);
    if (cc == nullptr) continue;
    const KvPolicy pol = cc->policy;
    const int32_t total = q.total();
    const bool chunk_state = ring_policy(pol) || pol == KvPolicy::kH2o;  // earlier chunks leave state
    if (q.in->prefill_part && chunk_state && !seq_compressed[sq]) {
      if (ring_end[sq] != q.pos0)
        return invalid_argument("cuda step: a prompt chunk of sequence " + std::to_string(q.seq) + " at position " +
                                std::to_string(q.pos0) + " follows chunks not marked prefill_part");
      (pol == KvPolicy::kH2o ? q.h2o_part : q.ring_save) = true;
    }
    const bool compressing = q.in->compress && !seq_compressed[sq] && q.complete;
    q.want_lse = pol == KvPolicy::kH2o && (q.h2o_part || compressing);
    if (compressing && pol == KvPolicy::kH2o && q.pos0 > 0) {
      // The last chunk of a chunked H2O prompt adds its share to the earlier chunks': its new
      // entries start at zero like any other chunk's.
      if (ring_end[sq] != q.pos0)
        return invalid_argument("cuda step: the last chunk of sequence " + std::to_string(q.seq) +
                                " needs the attention of earlier chunks, which were not marked prefill_part");
      q.metric_zero = true;
    }
    if (metric_policy(pol) && !compressing) {
      q.metric_zero = true;
      q.metric_obs = seq_compressed[sq];  // after the prompt: decode / append steps
      q.metric_mode = metric_mode(*cc);
    }
    if (!compressing) continue;
    seq_compressed[sq] = 1;
    q.comp = cc;
    const bool layer_comp = ((policy_uses_window_scores(pol) || pol == KvPolicy::kRandom) && total > cc->window) ||
                            metric_policy(pol);
    if (layer_comp) {
      const int32_t wq = std::min(cc->window, total);
      if (ring_policy(pol) && q.pos0 > 0 && q.ntok < wq && ring_end[sq] != q.pos0)
        return invalid_argument("cuda step: the last chunk of sequence " + std::to_string(q.seq) +
                                " needs the window queries of earlier chunks, which were not marked prefill_part");
      q.comp_window = true;
      q.comp_slot = sp->n_comp++;
      if (pol == KvPolicy::kKvCompress) {
        q.kvc_after = true;
      } else {
        q.comp_keep = true;
        sp->window_comp = true;
        q.keep_base = sp->keep_used;
        sp->keep_used += int64_t{rows_per_seq} * total;
      }
    } else if (cc->policy == KvPolicy::kStreamingLlm) {
      q.comp_slot = sp->n_comp++;  // handled after the forward
    }
  }
  if (sp->keep_used > 0) ADAKV_RETURN_IF_ERROR(regrow(&keep_dev, &keep_host, &keep_cap, sp->keep_used, "keep lists"));

  // New entries of metric sequences start at zero (KvCompressor::on_append): one scatter of int32
  // zeros (+0.0f) into the slot-indexed metric before the first layer adds to them.
  int64_t n_zero = 0;
  for (const StepSeq& q : sp->seqs) {
    sp->any_obs = sp->any_obs || q.metric_obs;
    if (q.metric_zero) n_zero += int64_t{q.ntok} * rows_per_seq;
  }
  if (n_zero > 0) {
    ADAKV_RETURN_IF_ERROR(regrow(&zero_dev, &zero_host, &zero_cap, n_zero, "metric zeroing"));
    int64_t z = 0;
    for (const StepSeq& q : sp->seqs) {
      if (!q.metric_zero) continue;
      for (int32_t l = 0; l < L; ++l)
        for (int32_t kh = 0; kh < Hkv; ++kh) {
          const int32_t len = mgr.length(q.seq, l, kh);
          for (int32_t i = len - q.ntok; i < len; ++i)
            zero_host[z++] = make_int2(static_cast<int32_t>(mgr.slot(q.seq, l, kh, i)), 0);
        }
    }
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(zero_dev, zero_host, sizeof(int2) * z, cudaMemcpyHostToDevice, stream));
    ADAKV_RETURN_IF_ERROR(page_table_scatter(zero_dev, static_cast<int32_t>(z), reinterpret_cast<int32_t*>(metric), stream));
  }
  if (opt.audit_compression) audit.clear();

  // H2O / KV-Compress decode tokens: the decode attention also writes each query's lse ([n_dec][H]
  // at lse_buf), so the metric kernel reads each key once for the whole group.
  sp->dec_lse = sp->any_obs && fast_decode && lse_buf != nullptr ? lse_buf : nullptr;
  return Status::ok();
}

Status CudaModel::Impl::upload_step_sampling(StepPlan* sp) {
  // Each sampling row's parameters, uploaded before the forward (which reads them).
  for (StepSeq& q : sp->seqs) {
    if (q.in->sampling == nullptr) continue;
    DeviceSamplingRow& p = samp_host[sp->n_samp];
    p.temperature = q.in->sampling->temperature;
    p.top_k = q.in->sampling->top_k;
    p.top_p = q.in->sampling->top_p;
    p.u = q.in->sampling->u;
    p.row = q.row_first + (q.in->all_logits ? q.ntok - 1 : 0);
    q.samp = sp->n_samp++;
  }
  if (sp->n_samp > 0)
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(samp_dev, samp_host, sizeof(DeviceSamplingRow) * sp->n_samp,
                                               cudaMemcpyHostToDevice, stream));
  return Status::ok();
}

}  // namespace adakv::cuda
