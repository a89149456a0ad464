// Rotary embedding frequencies: default, linear scaling and Llama 3 scaling, computed in fp32 in
// the order transformers' _compute_*_parameters use, so that angles match it to the last bit or
// two (the angle of a token is float(inv_freq[i] * position), as transformers' fp32 matmul).
#pragma once

#include <cstdint>
#include <vector>

#include "model/model_config.h"

namespace adakv {

// [head_dim / 2] inverse frequencies; head_dim must be even.
std::vector<float> rope_inv_freq(int64_t head_dim, double theta, const RopeScaling& scaling);

inline std::vector<float> rope_inv_freq(const ModelConfig& config) {
  return rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling);
}

}  // namespace adakv
