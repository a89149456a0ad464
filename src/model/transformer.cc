#include "model/transformer.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backends/cpu/cpu_attention.h"
#include "backends/cpu/cpu_ops.h"
#include "core/check.h"
#include "core/parallel.h"
#include "model/rope.h"

namespace adakv {

Expected<std::unique_ptr<Transformer>> Transformer::load(const std::string& model_dir) {
  std::unique_ptr<Transformer> t(new Transformer());
  t->dir_ = model_dir;
  ADAKV_ASSIGN_OR_RETURN(t->config_, load_model_config(model_dir));
  const ModelConfig& c = t->config_;
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) {
    return unimplemented(model_dir + "/config.json: head_dim " + std::to_string(c.head_dim) +
                         " is not a positive even number; rotary embedding needs pairs");
  }
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0) {
    return unimplemented(model_dir + "/config.json: num_attention_heads " + std::to_string(c.num_heads) +
                         " is not a multiple of num_key_value_heads " + std::to_string(c.num_kv_heads));
  }
  ADAKV_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::open(model_dir));
  t->checkpoint_.emplace(std::move(ckpt));
  ADAKV_ASSIGN_OR_RETURN(ModelWeights w, ModelWeights::load(*t->checkpoint_, c));
  t->weights_.emplace(std::move(w));
  t->inv_freq_ = adakv::rope_inv_freq(c);
  // OpenBLAS runs its threads only inside a product, and our pool only outside one: give both
  // the same count so neither oversubscribes the cores.
  openblas_set_num_threads(ThreadPool::global().num_threads());
  return t;
}

int64_t Transformer::context_length() const {
  int64_t ctx = config_.max_position_embeddings;
  if (config_.sliding_window > 0) ctx = std::min(ctx, config_.sliding_window);
  return ctx;
}

KvLayout Transformer::kv_layout(int32_t page_size) const {
  KvLayout layout;
  layout.num_layers = static_cast<int32_t>(config_.num_layers);
  layout.num_kv_heads = static_cast<int32_t>(config_.num_kv_heads);
  layout.head_dim = static_cast<int32_t>(config_.head_dim);
  layout.page_size = page_size;
  return layout;
}

Status Transformer::forward(std::span<const int32_t> tokens, const KvContext& kv, const ForwardOptions& options,
                            std::vector<float>* logits) const {
  const ModelConfig& c = config_;
  const ModelWeights& w = *weights_;
  ADAKV_CHECK(kv.manager != nullptr && kv.storage != nullptr && logits != nullptr, "forward: null argument");
  ADAKV_CHECK(kv.storage->head_dim() == c.head_dim, "forward: storage head_dim differs from the model's");
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return invalid_argument("forward: no tokens");
  for (int32_t id : tokens) {
    if (id < 0 || id >= c.vocab_size) {
      return invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary of " +
                              std::to_string(c.vocab_size));
    }
  }
  KvCacheManager& mgr = *kv.manager;
  CpuKvStorage& store = *kv.storage;
  const int64_t pos0 = mgr.logical_length(kv.seq);
  if (pos0 + n > context_length()) {
    return out_of_range("a sequence of " + std::to_string(pos0 + n) + " tokens exceeds the model's context of " +
                        std::to_string(context_length()));
  }
  const KvGrowth growth{kv.seq, static_cast<int32_t>(n)};
  KvReservation reservation;
  const Admission admission = mgr.reserve(std::span<const KvGrowth>(&growth, 1), &reservation);
  if (admission != Admission::kOk) {
    return resource_exhausted("KV cache: " + std::to_string(reservation.pages_needed) + " pages needed for " +
                              std::to_string(n) + " tokens, " + std::to_string(mgr.free_pages()) + " free (" +
                              admission_name(admission) + ")");
  }
  mgr.commit(reservation);

  const int64_t hidden = c.hidden_size;
  const int64_t H = c.num_heads;
  const int64_t Hkv = c.num_kv_heads;
  const int64_t d = c.head_dim;
  const int64_t q_dim = c.q_dim();
  const int64_t kv_dim = c.kv_dim();
  const int64_t qkv_dim = q_dim + 2 * kv_dim;
  const int64_t inter = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const int32_t page_size = mgr.layout().page_size;

  std::vector<int32_t> positions(static_cast<size_t>(n));  // [n]
  for (int64_t t = 0; t < n; ++t) positions[t] = static_cast<int32_t>(pos0 + t);
  std::vector<float> x(static_cast<size_t>(n * hidden));        // [n][hidden] residual stream
  std::vector<float> h(static_cast<size_t>(n * hidden));        // [n][hidden] normed input
  std::vector<float> tmp(static_cast<size_t>(n * hidden));      // [n][hidden] block output
  std::vector<float> qkv(static_cast<size_t>(n * qkv_dim));     // [n][q_dim + 2 kv_dim]
  std::vector<float> q(static_cast<size_t>(n * q_dim));         // [n][H][d] contiguous
  std::vector<float> attn(static_cast<size_t>(n * q_dim));      // [n][H][d]
  std::vector<float> gate_up(static_cast<size_t>(n * 2 * inter));  // [n][2 inter]
  std::vector<float> act(static_cast<size_t>(n * inter));       // [n][inter]

  for (int64_t t = 0; t < n; ++t) w.embed(tokens[t], x.data() + t * hidden);

  cpu::PagedKvRows rows;
  rows.storage = &store;
  rows.page_size = page_size;
  rows.pages.resize(static_cast<size_t>(Hkv));
  rows.lengths.resize(static_cast<size_t>(Hkv));

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = w.layer(l);
    const int32_t layer = static_cast<int32_t>(l);
    cpu::rms_norm(x.data(), L.input_norm, h.data(), n, hidden, eps);
    cpu::linear(h.data(), L.qkv, L.qkv_bias, qkv.data(), n, qkv_dim, hidden);
    if (L.q_norm != nullptr) {
      // Qwen3: RMSNorm over each head's vector, before RoPE.
      parallel_for(n, 8, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          float* row = qkv.data() + t * qkv_dim;
          cpu::rms_norm(row, L.q_norm, row, H, d, eps);
          cpu::rms_norm(row + q_dim, L.k_norm, row + q_dim, Hkv, d, eps);
        }
      });
    }
    cpu::apply_rope(qkv.data(), n, H, d, qkv_dim, inv_freq_.data(), positions.data());
    cpu::apply_rope(qkv.data() + q_dim, n, Hkv, d, qkv_dim, inv_freq_.data(), positions.data());
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(q.data() + t * q_dim, qkv.data() + t * qkv_dim, static_cast<size_t>(q_dim) * sizeof(float));
    }

    // The step's entries are the last n of every row of this layer (rows of earlier layers may
    // have been compressed by the observer; this layer's rows have not been touched since commit).
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      const int32_t head = static_cast<int32_t>(kvh);
      const int32_t len = mgr.length(kv.seq, layer, head);
      for (int64_t t = 0; t < n; ++t) {
        const KvSlot slot = mgr.slot(kv.seq, layer, head, static_cast<int32_t>(len - n + t));
        const float* row = qkv.data() + t * qkv_dim;
        std::memcpy(store.key(slot), row + q_dim + kvh * d, static_cast<size_t>(d) * sizeof(float));
        std::memcpy(store.value(slot), row + q_dim + kv_dim + kvh * d, static_cast<size_t>(d) * sizeof(float));
        store.position(slot) = positions[t];
      }
      rows.pages[kvh] = mgr.pages(kv.seq, layer, head);
      rows.lengths[kvh] = len;
    }
    cpu::paged_attention(q.data(), positions.data(), n, H, rows, scale, attn.data());

    if (options.observer != nullptr) {
      LayerQueries lq;
      lq.seq = kv.seq;
      lq.layer = layer;
      lq.n = n;
      lq.num_heads = H;
      lq.head_dim = d;
      lq.q = q;
      lq.positions = positions;
      options.observer->on_layer_queries(lq);
      LayerAttentionOutput ao;
      ao.seq = kv.seq;
      ao.layer = layer;
      ao.n = n;
      ao.out = attn;
      options.observer->on_attention_output(ao);
    }

    cpu::linear(attn.data(), L.o, L.o_bias, tmp.data(), n, hidden, q_dim);
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
    cpu::rms_norm(x.data(), L.post_norm, h.data(), n, hidden, eps);
    cpu::linear(h.data(), L.gate_up, nullptr, gate_up.data(), n, 2 * inter, hidden);
    cpu::swiglu(gate_up.data(), act.data(), n, inter);
    cpu::linear(act.data(), L.down, nullptr, tmp.data(), n, hidden, inter);
    for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
  }

  const int64_t out_rows = options.all_logits ? n : 1;
  const float* last = x.data() + (n - out_rows) * hidden;
  cpu::rms_norm(last, w.final_norm(), h.data(), out_rows, hidden, eps);
  logits->resize(static_cast<size_t>(out_rows * c.vocab_size));
  cpu::linear(h.data(), w.lm_head(), nullptr, logits->data(), out_rows, c.vocab_size, hidden);
  mgr.advance_logical_length(kv.seq, n);
  return Status::ok();
}

}  // namespace adakv
