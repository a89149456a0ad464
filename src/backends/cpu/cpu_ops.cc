#include "backends/cpu/cpu_ops.h"

#include <cblas.h>

#include <cmath>
#include <vector>

#include "core/check.h"
#include "core/parallel.h"

namespace adakv::cpu {

void linear(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k) {
  ADAKV_CHECK(m >= 0 && n > 0 && k > 0, "linear: bad sizes");
  if (m == 0) return;
  if (m == 1) {
    // Decode: a matrix-vector product; sgemv avoids sgemm's packing of a single row.
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, w,
                static_cast<blasint>(k), x, 1, 0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(n),
                static_cast<blasint>(k), 1.0f, x, static_cast<blasint>(k), w, static_cast<blasint>(k), 0.0f, y,
                static_cast<blasint>(n));
  }
  if (bias != nullptr) {
    for (int64_t r = 0; r < m; ++r) {
      float* row = y + r * n;
      for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
    }
  }
}

void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) {
  parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * dim;
      float* yr = y + r * dim;
      double sum_sq = 0.0;
      for (int64_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
      const float variance = static_cast<float>(sum_sq / static_cast<double>(dim));
      const float inv_rms = 1.0f / std::sqrt(variance + eps);
      // weight * (x * inv_rms): two fp32 roundings in transformers' order.
      for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv_rms);
    }
  });
}

void swiglu(const float* gate_up, float* out, int64_t rows, int64_t inter) {
  parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = gate_up + r * 2 * inter;
      const float* up = gate + inter;
      float* o = out + r * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float g = gate[i];
        o[i] = (g / (1.0f + std::exp(-g))) * up[i];
      }
    }
  });
}

void apply_rope(float* x, int64_t n, int64_t heads, int64_t head_dim, int64_t row_stride,
                const float* inv_freq, const int32_t* positions) {
  ADAKV_CHECK(head_dim % 2 == 0, "apply_rope: odd head_dim");
  const int64_t half = head_dim / 2;
  parallel_for(n, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> cos_t(static_cast<size_t>(half));  // [half]
    std::vector<float> sin_t(static_cast<size_t>(half));  // [half]
    for (int64_t t = begin; t < end; ++t) {
      const float pos = static_cast<float>(positions[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = inv_freq[i] * pos;  // rounded to fp32 as in transformers
        cos_t[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sin_t[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      float* row = x + t * row_stride;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = row + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i];
          const float x2 = v[i + half];
          v[i] = x1 * cos_t[i] - x2 * sin_t[i];
          v[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
        }
      }
    }
  });
}

}  // namespace adakv::cpu
