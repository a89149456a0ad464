// The keep sets of one compressed layer (CudaModel's compression audit) against the host policy
// run on the same bf16 inputs: compute_layer_scores + plan_layer of compress/policy.h. Used by the
// window-policy tests of test_cuda_model.cc and test_cuda_runner.cc.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <vector>

#include "backends/cuda/cuda_model.h"
#include "compress/policy.h"
#include "core/dtype.h"
#include "core/status.h"

namespace adakv {

struct KeepSetComparison {
  int64_t kept = 0;      // entries the host policy keeps
  int64_t differ = 0;    // entries in one keep set and not the other
  int64_t near_tie = 0;  // of those, entries whose host score is within 1e-4 relative of the head's threshold
};

// Adds the layer's counts to *acc. Queries are the window's ([w][H][d]), keys [L][Hkv][d].
inline Status compare_with_host_policy(const CompressConfig& cc, const cuda::CompressionAuditLayer& a,
                                       int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                                       KeepSetComparison* acc) {
  const int32_t Hkv = num_kv_heads, d = head_dim, n = a.length - cc.window;
  std::vector<float> q(a.queries.size()), k(a.keys.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = bf16_to_f32(a.queries[i]);
  for (size_t i = 0; i < k.size(); ++i) k[i] = bf16_to_f32(a.keys[i]);
  LayerTensors t;
  t.num_heads = num_heads;
  t.num_kv_heads = Hkv;
  t.head_dim = d;
  t.queries = q.data();
  t.num_queries = cc.window;
  t.lengths.assign(size_t(Hkv), a.length);
  for (int32_t h = 0; h < Hkv; ++h) t.keys.push_back(k.data() + size_t(h) * d);
  t.kv_stride = int64_t{Hkv} * d;
  Expected<LayerScores> hs = compute_layer_scores(cc, a.layer, t);
  if (!hs.has_value()) return hs.status();
  const LayerPlan hplan = plan_layer(cc, a.layer, a.selection_budget, *hs);
  for (int32_t h = 0; h < Hkv; ++h) {
    const std::vector<int32_t>& gk = a.keep[size_t(h)];
    const std::vector<int32_t>& hk = hplan.keep[size_t(h)];
    acc->kept += int64_t(hk.size());
    std::vector<int32_t> sym;
    std::set_symmetric_difference(gk.begin(), gk.end(), hk.begin(), hk.end(), std::back_inserter(sym));
    acc->differ += int64_t(sym.size());
    if (sym.empty()) continue;
    const std::vector<float>& sc = (*hs).scores[size_t(h)];
    float thr = INFINITY;
    for (int32_t j : hk)
      if (j < n) thr = std::min(thr, sc[size_t(j)]);
    for (int32_t j : sym) acc->near_tie += std::abs(sc[size_t(j)] - thr) <= 1e-4f * std::max(std::abs(thr), 1e-12f);
  }
  return Status::ok();
}

}  // namespace adakv
