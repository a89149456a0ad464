// CudaModel's compression on the device (cuda_model_impl.h): per-sequence configs, prompt scoring
// and selection per layer, and the continual policies (H2O, KV-Compress, StreamingLLM).
#include "backends/cuda/cuda_model_impl.h"

namespace adakv::cuda {

using namespace cuda_model_detail;

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
  impl_->mirrored_serial[static_cast<size_t>(seq)] = 0;
  impl_->mirrored_shrinks[static_cast<size_t>(seq)] = 0;
}

// Brings the device mirror of seq's rows up to the manager's page lists. While a sequence's rows
// only grow (commit appends pages), each row's mirrored prefix stays valid and a row without a new
// page costs two reads of dense arrays. After the manager reports a shrink (keep_entries /
// evict_entries free pages from a row's end) a row may have regrown with other pages, so each
// row's mirrored prefix is compared with the manager's and re-sent from the first difference. A
// sequence id that the manager gave to a new sequence (its serial changed: released without
// on_release, or another manager) starts over.
Status CudaModel::Impl::mirror_rows(SeqId seq, const KvCacheManager& m, int64_t* n_updates) {
  const int32_t Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  const int64_t base = int64_t{seq} * rows_per_seq;
  const size_t s = static_cast<size_t>(seq);
  const uint64_t serial = m.sequence_serial(seq), shrinks = m.sequence_shrinks(seq);
  const bool fresh = mirrored_serial[s] != serial;
  if (fresh) std::fill_n(shadow_count.begin() + static_cast<std::ptrdiff_t>(base), rows_per_seq, 0);
  const bool shrunk = !fresh && mirrored_shrinks[s] != shrinks;
  mirrored_serial[s] = serial;
  mirrored_shrinks[s] = shrinks;
  for (int32_t l = 0; l < cfg.num_layers; ++l)
    for (int32_t kh = 0; kh < Hkv; ++kh) {
      const int64_t row = base + int64_t{l} * Hkv + kh;
      const std::span<const int32_t> pages = m.pages(seq, l, kh);
      const int32_t cnt = static_cast<int32_t>(pages.size());
      int32_t& sc = shadow_count[static_cast<size_t>(row)];
      int32_t* sh = shadow.data() + row * max_pages_per_row;
      if (shrunk) {
        int32_t same = 0;
        const int32_t upto = std::min(sc, cnt);
        while (same < upto && sh[same] == pages[static_cast<size_t>(same)]) ++same;
        sc = same;
      } else if (cnt <= sc) {
        continue;  // only grown rows change while nothing shrank
      }
      if (cnt > max_pages_per_row)
        return out_of_range("cuda: a row of " + std::to_string(cnt) + " pages exceeds the mirror's " +
                            std::to_string(max_pages_per_row) + " (max_context " + std::to_string(max_context) + ")");
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
