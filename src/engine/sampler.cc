#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/check.h"

namespace adakv {

Status validate_sampling(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return invalid_argument("temperature must be >= 0 (0 = greedy), got " + std::to_string(p.temperature));
  }
  if (p.top_k < 0) return invalid_argument("top-k must be >= 0 (0 = off), got " + std::to_string(p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return invalid_argument("top-p must be in (0, 1] (1 = off), got " + std::to_string(p.top_p));
  }
  return Status::ok();
}

int32_t argmax(std::span<const float> logits) {
  ADAKV_CHECK(!logits.empty(), "argmax of nothing");
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

std::vector<double> Sampler::distribution(std::span<const float> logits) const {
  const size_t v = logits.size();
  ADAKV_CHECK(v > 0, "sampling from an empty vocabulary");
  // Temperature as transformers: logits / T in fp32.
  std::vector<float> scaled(v);  // [vocab]
  for (size_t i = 0; i < v; ++i) scaled[i] = logits[i] / params_.temperature;
  std::vector<bool> keep(v, true);

  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < v) {
    // Ties at the k-th value are kept, as TopKLogitsWarper (logits < kth value are removed).
    std::vector<float> sorted = scaled;
    std::nth_element(sorted.begin(), sorted.begin() + (params_.top_k - 1), sorted.end(), std::greater<float>());
    const float kth = sorted[static_cast<size_t>(params_.top_k - 1)];
    for (size_t i = 0; i < v; ++i) keep[i] = keep[i] && scaled[i] >= kth;
  }

  auto softmax = [&](std::vector<double>* probs) {
    double mx = -INFINITY;
    for (size_t i = 0; i < v; ++i) {
      if (keep[i]) mx = std::max(mx, static_cast<double>(scaled[i]));
    }
    double sum = 0.0;
    for (size_t i = 0; i < v; ++i) {
      (*probs)[i] = keep[i] ? std::exp(static_cast<double>(scaled[i]) - mx) : 0.0;
      sum += (*probs)[i];
    }
    for (double& p : *probs) p /= sum;
  };
  std::vector<double> probs(v);  // [vocab]
  softmax(&probs);

  if (params_.top_p < 1.0f) {
    // TopPLogitsWarper keeps a token when the mass of the tokens strictly more probable than it
    // (in sorted order) is below top_p, i.e. the smallest prefix reaching top_p; at least one.
    std::vector<int32_t> order(v);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return probs[a] > probs[b]; });
    double before = 0.0;
    for (size_t r = 0; r < v; ++r) {
      const int32_t id = order[r];
      if (r > 0 && before >= params_.top_p) keep[id] = false;
      before += probs[id];
    }
    softmax(&probs);
  }
  return probs;
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (params_.temperature == 0.0f) return argmax(logits);
  const std::vector<double> probs = distribution(logits);
  // A uniform double in [0, 1) from the top 53 bits: the same on every standard library
  // (std::uniform_real_distribution is not specified bit for bit).
  const double u = next_uniform();
  double cum = 0.0;
  int32_t last_kept = -1;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0.0) continue;
    cum += probs[i];
    last_kept = static_cast<int32_t>(i);
    if (u < cum) return last_kept;
  }
  return last_kept;  // rounding left cum a hair below 1
}

}  // namespace adakv
