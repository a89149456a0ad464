#include "model/rope.h"

#include <cmath>
#include <numbers>

#include "core/check.h"

namespace adakv {

std::vector<float> rope_inv_freq(int64_t head_dim, double theta, const RopeScaling& scaling) {
  ADAKV_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope_inv_freq: head_dim must be even");
  const int64_t half = head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));  // [half]
  const float base = static_cast<float>(theta);
  for (int64_t i = 0; i < half; ++i) {
    // 1 / base ** (arange(0, dim, 2).float() / dim), every step in fp32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    const float p = static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(exponent)));
    inv[i] = 1.0f / p;
  }
  switch (scaling.type) {
    case RopeScalingType::kNone:
      break;
    case RopeScalingType::kLinear: {
      const float factor = static_cast<float>(scaling.factor);
      for (float& f : inv) f /= factor;
      break;
    }
    case RopeScalingType::kLlama3: {
      // transformers' _compute_llama3_parameters, operation for operation.
      const float factor = static_cast<float>(scaling.factor);
      const float low = static_cast<float>(scaling.low_freq_factor);
      const float high = static_cast<float>(scaling.high_freq_factor);
      const float old_len = static_cast<float>(scaling.original_max_position_embeddings);
      const double low_freq_wavelen = static_cast<double>(scaling.original_max_position_embeddings) / scaling.low_freq_factor;
      const double high_freq_wavelen = static_cast<double>(scaling.original_max_position_embeddings) / scaling.high_freq_factor;
      for (float& f : inv) {
        const float wavelen = static_cast<float>(2.0 * std::numbers::pi) / f;
        // wavelen > low_freq_wavelen: divide by factor; < high_freq_wavelen: keep.
        const float scaled = wavelen > low_freq_wavelen ? f / factor : f;
        const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
        if (medium) {
          const float smooth = (old_len / wavelen - low) / (high - low);
          f = (1.0f - smooth) * scaled / factor + smooth * scaled;
        } else {
          f = scaled;
        }
      }
      break;
    }
  }
  return inv;
}

}  // namespace adakv
