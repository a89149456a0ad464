// Where a decode-attention layer's time goes: the global-timer stamps of DecodeAttention::
// set_trace (per attention block {start, past the wait, done}, per merge block {start, inputs
// ready, done}) of N back-to-back layers, reduced to one line of offsets per layer and averaged
// over the middle layers. Host code only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace decode_timeline {

// Microseconds relative to the layer's first attention block past its wait ("go"), averaged
// over layers 2 .. N-2 (the first layers start from an idle device, the last has no successor).
struct Summary {
  double attn_start_first = 0, attn_start_last = 0;  // blocks become resident (negative: before go)
  double go_last = 0;                                // the last block past its wait
  double done_first = 0, done_median = 0, done_last = 0;  // blocks finish their items
  double merge_start_first = 0, merge_start_last = 0;     // merge blocks resident
  double ready_first = 0, ready_last = 0;            // merge blocks' inputs complete (after their wait)
  double merge_done_last = 0;                        // the layer's last merge block done
  double next_go = 0;                                // the next layer's first go: the period
  double resolution_ns = 0;                          // smallest step seen between distinct stamps
  int layers = 0;
};

// attn: [layers][attn_blocks][3], merge: [layers][merge_blocks][3] (merge_blocks 0: none); a
// stamp of 0 was not written (a block without work, an empty row).
inline Summary summarize(const std::vector<uint64_t>& attn, int attn_blocks, const std::vector<uint64_t>& merge,
                         int merge_blocks, int layers) {
  Summary s;
  const auto stamps = [](const std::vector<uint64_t>& v, int blocks, int layer, int k) {
    std::vector<double> out;
    for (int b = 0; b < blocks; ++b) {
      const uint64_t x = v[(size_t(layer) * blocks + b) * 3 + k];
      if (x != 0) out.push_back(double(x));
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  std::vector<double> all;
  for (uint64_t x : attn)
    if (x != 0) all.push_back(double(x));
  std::sort(all.begin(), all.end());
  double res = 0;
  for (size_t i = 1; i < all.size(); ++i)
    if (all[i] > all[i - 1] && (res == 0 || all[i] - all[i - 1] < res)) res = all[i] - all[i - 1];
  s.resolution_ns = res;
  int n = 0;
  for (int l = 2; l + 1 < layers - 1; ++l) {
    const std::vector<double> st = stamps(attn, attn_blocks, l, 0), go = stamps(attn, attn_blocks, l, 1),
                              dn = stamps(attn, attn_blocks, l, 2), next = stamps(attn, attn_blocks, l + 1, 1);
    if (go.empty() || dn.empty() || next.empty() || st.empty()) continue;
    const double t0 = go.front();
    const auto us = [&](double x) { return (x - t0) * 1e-3; };
    s.attn_start_first += us(st.front());
    s.attn_start_last += us(st.back());
    s.go_last += us(go.back());
    s.done_first += us(dn.front());
    s.done_median += us(dn[dn.size() / 2]);
    s.done_last += us(dn.back());
    s.next_go += us(next.front());
    if (merge_blocks > 0) {
      const std::vector<double> ms = stamps(merge, merge_blocks, l, 0), mr = stamps(merge, merge_blocks, l, 1),
                                md = stamps(merge, merge_blocks, l, 2);
      if (!ms.empty() && !mr.empty() && !md.empty()) {
        s.merge_start_first += us(ms.front());
        s.merge_start_last += us(ms.back());
        s.ready_first += us(mr.front());
        s.ready_last += us(mr.back());
        s.merge_done_last += us(md.back());
      }
    }
    ++n;
  }
  if (n > 0) {
    for (double* x : {&s.attn_start_first, &s.attn_start_last, &s.go_last, &s.done_first, &s.done_median, &s.done_last,
                      &s.merge_start_first, &s.merge_start_last, &s.ready_first, &s.ready_last, &s.merge_done_last,
                      &s.next_go})
      *x /= n;
  }
  s.layers = n;
  return s;
}

}  // namespace decode_timeline
