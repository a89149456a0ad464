// CudaModel::step (cuda_model.h): one batched forward over prefill chunks and decode tokens, with
// decode-only steps replayed as CUDA graphs, then sampling and the prompts' compression. The
// phases: prepare_step and plan_step_compression (cuda_model_step_prepare.cc) describe the step in
// a StepPlan, enqueue_forward (cuda_model_forward.cc) runs it, and the results and the host side
// of compression follow here.
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
  cudaStream_t st = I.stream;
  const HostClock::time_point t_begin = HostClock::now();
  I.timing = StepTiming{};
  StepPlan sp;
  ADAKV_RETURN_IF_ERROR(I.prepare_step(steps, mgr, &sp));
  const HostClock::time_point t_meta = HostClock::now();
  for (const StepSeq& q : sp.seqs) ADAKV_RETURN_IF_ERROR(I.mirror_rows(q.seq, mgr, &sp.page_updates));
  const HostClock::time_point t_mirror = HostClock::now();

  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(I.ev_start, st));
  ADAKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(I.meta_dev, I.meta_host, static_cast<size_t>(sp.meta.size) * 4, cudaMemcpyHostToDevice, st));
  if (sp.page_updates > 0) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.pt_dev, I.pt_host, static_cast<size_t>(sp.page_updates) * sizeof(int2),
                                               cudaMemcpyHostToDevice, st));
    ADAKV_RETURN_IF_ERROR(page_table_scatter(I.pt_dev, static_cast<int32_t>(sp.page_updates), I.page_table, st));
  }
  const HostClock::time_point t_plan0 = HostClock::now();
  ADAKV_RETURN_IF_ERROR(I.plan_decode_attention(sp));
  const HostClock::time_point t_plan1 = HostClock::now();
  ADAKV_RETURN_IF_ERROR(I.plan_step_compression(mgr, &sp));
  ADAKV_RETURN_IF_ERROR(I.upload_step_sampling(&sp));

  // A decode-only step without compression replays its forward as a CUDA graph.
  bool graph_ok = I.opt.cuda_graphs && I.graphs_enabled && sp.n_dec == sp.B && sp.T == sp.B && sp.R == sp.B &&
                  I.fast_decode && sp.n_comp == 0 && !sp.any_obs && !I.opt.audit_compression && !I.ops.enabled();
  for (const StepSeq& q : sp.seqs) graph_ok = graph_ok && !q.ring_save && !q.h2o_part && !q.metric_zero;
  I.timing.graph = graph_ok;
  if (graph_ok) {
    ADAKV_RETURN_IF_ERROR(I.run_graph(sp.B, sp.n_samp, [&] { return I.enqueue_forward(sp); }));
  } else {
    ADAKV_RETURN_IF_ERROR(I.enqueue_forward(sp));
  }

  // --- downloads, then wait ----------------------------------------------------------------------
  const int64_t V = I.cfg.vocab_size;
  if (sp.n_samp > 0)
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.sampled_host, I.sampled_dev, sizeof(int32_t) * sp.n_samp,
                                               cudaMemcpyDeviceToHost, st));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(I.ev_end, st));
  if (want_logits)
    ADAKV_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(I.logits_host, I.logits, sizeof(float) * sp.R * V, cudaMemcpyDeviceToHost, st));
  if (sp.n_comp > 0 && sp.window_comp) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.counts_host, I.counts_dev, sizeof(int32_t) * sp.n_comp * I.rows_per_seq,
                                               cudaMemcpyDeviceToHost, st));
    if (sp.keep_used > 0)
      ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(I.keep_host, I.keep_dev, sizeof(int32_t) * sp.keep_used,
                                                 cudaMemcpyDeviceToHost, st));
  }
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(I.ev_copied, st));
  const HostClock::time_point t_enqueued = HostClock::now();
  ADAKV_RETURN_IF_ERROR(I.plan_next_decode(sp));
  const HostClock::time_point t_planned_ahead = HostClock::now();
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
  I.timing.plan_ahead_ms = host_ms(t_enqueued, t_planned_ahead);
  I.timing.wait_ms = host_ms(t_planned_ahead, t_synced);
  I.timing.device_ms = I.last_ms;
  I.timing.download_ms = copy_ms;
  I.timing.logit_bytes = want_logits ? int64_t{sp.R} * V * static_cast<int64_t>(sizeof(float)) : 0;

  if (result != nullptr) {
    // Back to the caller's order.
    result->sampled.assign(static_cast<size_t>(sp.B), -1);
    result->logits.clear();
    if (want_logits) result->logits.resize(static_cast<size_t>(sp.R) * V);
    std::vector<const StepSeq*> by_caller(static_cast<size_t>(sp.B));
    for (const StepSeq& q : sp.seqs) by_caller[static_cast<size_t>(q.caller)] = &q;
    int64_t out_row = 0;
    for (int32_t i = 0; i < sp.B; ++i) {
      const StepSeq& q = *by_caller[static_cast<size_t>(i)];
      const int32_t rows = q.in->all_logits ? q.ntok : 1;
      if (want_logits)
        std::memcpy(result->logits.data() + out_row * V, I.logits_host + int64_t{q.row_first} * V,
                    sizeof(float) * rows * V);
      out_row += rows;
      if (q.samp >= 0) result->sampled[static_cast<size_t>(i)] = I.sampled_host[q.samp];
    }
  }

  const HostClock::time_point t_results = HostClock::now();
  I.timing.results_ms = host_ms(t_synced, t_results);
  ADAKV_RETURN_IF_ERROR(I.finish_step(sp, mgr));
  I.timing.compress_ms = host_ms(t_results, HostClock::now());
  return Status::ok();
}

Status CudaModel::Impl::plan_decode_attention(const StepPlan& sp) {
  // One plan per layer, from the decode rows' lengths and page-table offsets (host copies in the
  // metadata); plan() does nothing while every row keeps its page count, and the plans that
  // changed go up in one copy.
  if (!fast_decode || sp.n_dec == 0) return Status::ok();
  const int32_t L = static_cast<int32_t>(cfg.num_layers), Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  const size_t rows = static_cast<size_t>(sp.n_dec) * Hkv;
  int64_t built = 0;
  for (int32_t l = 0; l < L; ++l) {
    const int64_t at = int64_t{l} * sp.n_dec * Hkv;
    const std::span<const int32_t> lens(meta_host + sp.meta.dlen + at, rows);
    // With the rows' page-table offsets the plan's items are absolute (one load less per item).
    const std::span<const int32_t> offs(meta_host + sp.meta.doff + at, rows);
    const int64_t before = decode->layer(l).builds();
    ADAKV_RETURN_IF_ERROR(decode->layer(l).plan(lens, offs, stream));
    built += decode->layer(l).builds() - before;
  }
  timing.plans_built = static_cast<int32_t>(built);
  return decode->upload(stream);
}

Status CudaModel::Impl::plan_next_decode(const StepPlan& sp) {
  // While the device runs this step, plan the next one's decode attention on the guess that it
  // decodes the same sequences, in the same order, one token further: the usual decode step. A
  // plan depends only on the rows' page counts and page-table positions, and plan() keeps it while
  // those match, so at the next step a right guess leaves nothing to plan (the host no longer
  // plans while the device waits), and a wrong one (a sequence finished or joined, a policy that
  // evicts during decode, compression) is planned again there. The upload is ordered after this
  // step on the stream, so it cannot change a plan this step's kernels still read.
  if (!opt.plan_ahead || !fast_decode || sp.n_dec == 0 || sp.n_dec != sp.B || sp.n_comp > 0) return Status::ok();
  const int32_t L = static_cast<int32_t>(cfg.num_layers), Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  const size_t rows = static_cast<size_t>(sp.n_dec) * Hkv;
  next_lengths.resize(rows);
  for (int32_t l = 0; l < L; ++l) {
    const int64_t at = int64_t{l} * sp.n_dec * Hkv;
    const int32_t* len = meta_host + sp.meta.dlen + at;
    for (size_t i = 0; i < rows; ++i) next_lengths[i] = len[i] + 1;
    const std::span<const int32_t> offs(meta_host + sp.meta.doff + at, rows);
    ADAKV_RETURN_IF_ERROR(decode->layer(l).plan(next_lengths, offs, stream));
  }
  return decode->upload(stream);
}

Status CudaModel::Impl::finish_step(const StepPlan& sp, KvCacheManager& mgr) {
  // The host side of compression: the manager learns the device's keep lists.
  const int32_t L = static_cast<int32_t>(cfg.num_layers), Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  for (const StepSeq& q : sp.seqs) {
    if (q.comp_slot < 0 || !q.comp_keep) continue;
    const int32_t n = q.total();  // the whole prompt: keep lists are [rows][n]
    for (int32_t l = 0; l < L; ++l) {
      for (int32_t kh = 0; kh < Hkv; ++kh) {
        const int32_t cnt = counts_host[(int64_t{q.comp_slot} * L + l) * Hkv + kh];
        const int32_t* keep = keep_host + q.keep_base + (int64_t{l} * Hkv + kh) * n;
        if (cnt < 0 || cnt > n) return internal_error("cuda compression: keep count out of range");
        if (opt.audit_compression)
          for (CompressionAuditLayer& a : audit)
            if (a.seq == q.seq && a.layer == l) {
              a.keep.resize(static_cast<size_t>(Hkv));
              a.keep[static_cast<size_t>(kh)].assign(keep, keep + cnt);
            }
        if (cnt == mgr.length(q.seq, l, kh)) continue;  // kept whole (the device moved nothing either)
        (void)mgr.keep_entries(q.seq, l, kh, std::span<const int32_t>(keep, static_cast<size_t>(cnt)));
      }
    }
  }
  for (const StepSeq& q : sp.seqs) mgr.advance_logical_length(q.seq, q.ntok);
  for (const StepSeq& q : sp.seqs)
    if (q.ring_save || q.h2o_part) ring_end[static_cast<size_t>(q.seq)] = q.pos0 + q.ntok;
  for (const StepSeq& q : sp.seqs) {
    if (q.comp_slot >= 0 && q.comp->policy == KvPolicy::kStreamingLlm)
      ADAKV_RETURN_IF_ERROR(compress_streamingllm(q.seq, *q.comp, mgr));
    if (q.kvc_after)  // KvCompressor::after_prefill: cross-layer eviction
      ADAKV_RETURN_IF_ERROR(compress_kvcompress(q.seq, *q.comp, mgr));
  }
  return Status::ok();
}

}  // namespace adakv::cuda
