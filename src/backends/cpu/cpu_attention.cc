#include "backends/cpu/cpu_attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/check.h"
#include "core/parallel.h"

namespace adakv::cpu {

namespace {

// Decode and short appends: one work item per (token, kv head) walking the row's pages in place.
void attention_by_token(const float* q, const int32_t* q_positions, int64_t n, int64_t num_heads,
                        const PagedKvRows& rows, float scale, float* out) {
  const int64_t num_kv_heads = rows.num_kv_heads();
  const int64_t d = rows.storage->head_dim();
  const int64_t group = num_heads / num_kv_heads;
  const int32_t ps = rows.page_size;

  // One work item per (token, kv head): the group's query heads share every key and value read.
  parallel_for(n * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;         // [group][visible]
    std::vector<const float*> values;  // [visible] -> value vector of each visible entry
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / num_kv_heads;
      const int64_t kvh = item % num_kv_heads;
      const int32_t len = rows.lengths[kvh];
      const std::span<const int32_t> pages = rows.pages[kvh];
      ADAKV_CHECK(static_cast<int64_t>(pages.size()) * ps >= len, "paged_attention: row shorter than its length");
      const int32_t qpos = q_positions[t];
      const float* qg = q + (t * num_heads + kvh * group) * d;  // [group][d]
      float* og = out + (t * num_heads + kvh * group) * d;      // [group][d]

      values.clear();
      scores.resize(static_cast<size_t>(group) * len);
      int64_t visible = 0;
      for (int32_t first = 0; first < len; first += ps) {
        const KvSlot base = static_cast<KvSlot>(pages[first / ps]) * ps;
        const int32_t count = std::min(ps, len - first);
        const float* keys = rows.storage->key(base);      // [count][d], contiguous within a page
        const float* vals = rows.storage->value(base);
        for (int32_t o = 0; o < count; ++o) {
          if (rows.storage->position(base + o) > qpos) continue;
          const float* k = keys + o * d;
          for (int64_t g = 0; g < group; ++g) {
            const float* qh = qg + g * d;
            float dot = 0.0f;
            for (int64_t i = 0; i < d; ++i) dot += qh[i] * k[i];
            scores[g * len + visible] = dot * scale;
          }
          values.push_back(vals + o * d);
          ++visible;
        }
      }

      for (int64_t g = 0; g < group; ++g) {
        float* oh = og + g * d;
        std::fill_n(oh, d, 0.0f);
        if (visible == 0) continue;
        float* s = scores.data() + g * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, s[j]);
        float sum = 0.0f;
        for (int64_t j = 0; j < visible; ++j) {
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < visible; ++j) {
          const float p = s[j] * inv;
          const float* v = values[j];
          for (int64_t i = 0; i < d; ++i) oh[i] += p * v[i];
        }
      }
    }
  });
}

// Prefill and long appends: per KV head, gather the row once into contiguous K, V (one copy per
// KV head, never per query head), then blocks of queries of the whole group go through two
// sgemm calls (scores, then probabilities x values) with the mask and softmax in between.
void attention_by_gemm(const float* q, const int32_t* q_positions, int64_t n, int64_t num_heads,
                       const PagedKvRows& rows, float scale, float* out) {
  const int64_t num_kv_heads = rows.num_kv_heads();
  const int64_t d = rows.storage->head_dim();
  const int64_t group = num_heads / num_kv_heads;
  const int32_t ps = rows.page_size;
  std::vector<float> keys, values, qb, scores, ob;  // [len][d], [len][d], [B*g][d], [B*g][len], [B*g][d]
  std::vector<int32_t> positions;                   // [len]
  for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
    const int32_t len = rows.lengths[kvh];
    const std::span<const int32_t> pages = rows.pages[kvh];
    ADAKV_CHECK(static_cast<int64_t>(pages.size()) * ps >= len, "paged_attention: row shorter than its length");
    if (len == 0) {
      for (int64_t t = 0; t < n; ++t) std::fill_n(out + (t * num_heads + kvh * group) * d, group * d, 0.0f);
      continue;
    }
    keys.resize(static_cast<size_t>(len) * d);
    values.resize(static_cast<size_t>(len) * d);
    positions.resize(static_cast<size_t>(len));
    for (int32_t first = 0; first < len; first += ps) {
      const KvSlot base = static_cast<KvSlot>(pages[first / ps]) * ps;
      const int32_t count = std::min(ps, len - first);
      std::copy_n(rows.storage->key(base), count * d, keys.data() + static_cast<int64_t>(first) * d);
      std::copy_n(rows.storage->value(base), count * d, values.data() + static_cast<int64_t>(first) * d);
      for (int32_t o = 0; o < count; ++o) positions[first + o] = rows.storage->position(base + o);
    }
    // Query block: bounded so the score block stays within ~16 MB.
    const int64_t block = std::clamp<int64_t>((int64_t{4} << 20) / (group * len), 1, 128);
    for (int64_t t0 = 0; t0 < n; t0 += block) {
      const int64_t b = std::min(block, n - t0);
      const int64_t m = b * group;  // score rows: (token, head of the group)
      qb.resize(static_cast<size_t>(m * d));
      for (int64_t t = 0; t < b; ++t) {
        std::copy_n(q + ((t0 + t) * num_heads + kvh * group) * d, group * d, qb.data() + t * group * d);
      }
      scores.resize(static_cast<size_t>(m) * len);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), len, static_cast<blasint>(d),
                  scale, qb.data(), static_cast<blasint>(d), keys.data(), static_cast<blasint>(d), 0.0f,
                  scores.data(), len);
      parallel_for(m, 4, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int32_t qpos = q_positions[t0 + r / group];
          float* s = scores.data() + r * len;
          float mx = -std::numeric_limits<float>::infinity();
          for (int32_t j = 0; j < len; ++j) {
            if (positions[j] > qpos) s[j] = -std::numeric_limits<float>::infinity();
            mx = std::max(mx, s[j]);
          }
          if (mx == -std::numeric_limits<float>::infinity()) {  // sees nothing: output zeros
            std::fill_n(s, len, 0.0f);
            continue;
          }
          float sum = 0.0f;
          for (int32_t j = 0; j < len; ++j) {
            s[j] = std::exp(s[j] - mx);
            sum += s[j];
          }
          const float inv = 1.0f / sum;
          for (int32_t j = 0; j < len; ++j) s[j] *= inv;
        }
      });
      ob.resize(static_cast<size_t>(m * d));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(m), static_cast<blasint>(d), len,
                  1.0f, scores.data(), len, values.data(), static_cast<blasint>(d), 0.0f, ob.data(),
                  static_cast<blasint>(d));
      for (int64_t t = 0; t < b; ++t) {
        std::copy_n(ob.data() + t * group * d, group * d, out + ((t0 + t) * num_heads + kvh * group) * d);
      }
    }
  }
}

}  // namespace

void paged_attention(const float* q, const int32_t* q_positions, int64_t n, int64_t num_heads,
                     const PagedKvRows& rows, float scale, float* out, AttentionPath path) {
  const int64_t num_kv_heads = rows.num_kv_heads();
  ADAKV_CHECK(rows.storage != nullptr, "paged_attention: no storage");
  ADAKV_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "paged_attention: heads not a multiple of kv heads");
  ADAKV_CHECK(static_cast<int64_t>(rows.pages.size()) == num_kv_heads, "paged_attention: pages/lengths mismatch");
  if (path == AttentionPath::kAuto) path = n >= kGemmMinTokens ? AttentionPath::kGemm : AttentionPath::kByToken;
  if (path == AttentionPath::kGemm) {
    attention_by_gemm(q, q_positions, n, num_heads, rows, scale, out);
  } else {
    attention_by_token(q, q_positions, n, num_heads, rows, scale, out);
  }
}

}  // namespace adakv::cpu
