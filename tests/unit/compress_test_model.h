// A tiny random "model" for the KvCompressor tests: per-layer queries, keys, values and o_proj
// drawn from N(0, 1), and the matching cache layout. Shared so that the compressor tests and the
// score-cache tests compress exactly the same kind of data.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "kv/kv_layout.h"

namespace adakv::compress_test {

constexpr int32_t kLayers = 3, kHeads = 4, kKvHeads = 2, kDim = 8, kHidden = 12, kPage = 4;

struct Model {
  int32_t L;
  std::vector<float> q, k, v, o;  // [layers][L][H][d], [layers][L][Hkv][d] x2, [layers][hidden][H*d]
  explicit Model(int32_t length, uint32_t seed) : L(length) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    q.resize(static_cast<size_t>(kLayers) * L * kHeads * kDim);
    k.resize(static_cast<size_t>(kLayers) * L * kKvHeads * kDim);
    v.resize(k.size());
    o.resize(static_cast<size_t>(kLayers) * kHidden * kHeads * kDim);
    for (auto* a : {&q, &k, &v, &o})
      for (float& x : *a) x = nd(rng);
  }
  const float* key(int l, int i, int h) const { return k.data() + ((static_cast<size_t>(l) * L + i) * kKvHeads + h) * kDim; }
  const float* value(int l, int i, int h) const { return v.data() + ((static_cast<size_t>(l) * L + i) * kKvHeads + h) * kDim; }
  const float* queries(int l, int nq) const { return q.data() + ((static_cast<size_t>(l) * L + (L - nq)) * kHeads) * kDim; }
  const float* o_proj(int l) const { return o.data() + static_cast<size_t>(l) * kHidden * kHeads * kDim; }
};

inline KvLayout layout() {
  KvLayout l;
  l.num_layers = kLayers;
  l.num_kv_heads = kKvHeads;
  l.head_dim = kDim;
  l.page_size = kPage;
  return l;
}

}  // namespace adakv::compress_test
