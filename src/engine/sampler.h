// Next-token choice from a row of logits: greedy when temperature is 0, otherwise
// transformers' sampling pipeline in its order (temperature, then top-k, then top-p) and a draw
// from the remaining distribution with a seeded std::mt19937_64, so a seed reproduces a run.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "core/status.h"

namespace adakv {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax, lowest id on ties, as torch.argmax)
  int32_t top_k = 0;         // 0: off; keeps every token whose logit >= the k-th largest
  float top_p = 1.0f;        // 1: off; keeps the smallest most-probable prefix with mass >= top_p
  uint64_t seed = 0;
};

// Refuses out-of-range values with the allowed range in the message.
Status validate_sampling(const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  int32_t sample(std::span<const float> logits);

  const SamplingParams& params() const { return params_; }
  // The uniform draw sample() makes when temperature > 0 (the top 53 bits of one mt19937_64
  // output): a runner that samples on the device draws it here, so a seed reproduces the host.
  double next_uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

  // The distribution sample() draws from (after temperature, top-k and top-p); zero outside
  // the kept set. Exposed for tests. Only meaningful when temperature > 0.
  std::vector<double> distribution(std::span<const float> logits) const;

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

int32_t argmax(std::span<const float> logits);

}  // namespace adakv
