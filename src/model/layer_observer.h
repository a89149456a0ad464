// Hooks into the forward pass for the code that must see a layer's queries or attention output
// while the step runs: compression after each layer's prefill (SnapKV-style scores need the last
// window's post-RoPE queries against that layer's cached keys), and fidelity evaluation (each
// layer's attention output before o_proj). The model never knows which method listens.
#pragma once

#include <cstdint>
#include <span>

#include "kv/kv_layout.h"

namespace adakv {

struct LayerQueries {
  SeqId seq = -1;
  int32_t layer = 0;
  int64_t n = 0;                        // tokens of this step
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  std::span<const float> q;             // [n][num_heads][head_dim], after q-norm and RoPE
  std::span<const int32_t> positions;   // [n] token positions of the step
};

struct LayerAttentionOutput {
  SeqId seq = -1;
  int32_t layer = 0;
  int64_t n = 0;
  std::span<const float> out;           // [n][num_heads * head_dim], before o_proj
};

class LayerObserver {
 public:
  virtual ~LayerObserver() = default;
  // After layer `q.layer` has written the step's K/V into the cache and computed its attention,
  // before the next layer runs. The observer may compress this layer's rows of q.seq now (the
  // forward reads a row's length afresh each step); it must apply the moves to the storage
  // before returning.
  virtual void on_layer_queries(const LayerQueries& q) {}
  // The same moment, with the layer's attention output (a tap for fidelity evaluation).
  virtual void on_attention_output(const LayerAttentionOutput& a) {}
};

}  // namespace adakv
