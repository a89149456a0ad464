// Fidelity of a compressed KV cache against the full cache on the same text: prefill a prompt of
// N tokens with both, then teacher-force the next M tokens of the text through both and compare,
// per layer, the attention output before o_proj (relative L1, ||a_c - a_f||_1 / ||a_f||_1: the
// quantity Ada-KV's error bound is about), and the next-token argmax of every forced step.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "compress/compress_config.h"
#include "core/status.h"
#include "model/transformer.h"

namespace adakv {

struct FidelityOptions {
  int64_t prompt_length = 2048;  // N
  int64_t forced_tokens = 64;    // M
  int32_t page_size = 16;
};

struct FidelityResult {
  CompressConfig config;
  std::vector<double> layer_rel_l1;  // [layers] mean over the M forced steps
  double mean_rel_l1 = 0.0;          // mean over layers
  double argmax_agreement = 0.0;     // fraction of the M forced steps whose argmax equals the full cache's
  double kept_fraction = 0.0;        // entries kept after the prefill / the full cache's
};

// Runs the full cache once on construction, then any number of compressed configurations.
class FidelityRunner {
 public:
  // `tokens` must hold at least prompt_length + forced_tokens ids.
  static Expected<FidelityRunner> create(const Transformer& model, std::span<const int32_t> tokens,
                                         const FidelityOptions& options);
  Expected<FidelityResult> run(const CompressConfig& config) const;

 private:
  struct Trace {
    std::vector<float> attention;  // [M][layers][q_dim] attention output of every forced step
    std::vector<int32_t> argmax;   // [M] next-token argmax after every forced step
    double kept_fraction = 1.0;
  };
  FidelityRunner(const Transformer& model, std::vector<int32_t> tokens, const FidelityOptions& options)
      : model_(&model), tokens_(std::move(tokens)), options_(options) {}
  Expected<Trace> trace(const CompressConfig& config) const;

  const Transformer* model_;
  std::vector<int32_t> tokens_;  // [N + M]
  FidelityOptions options_;
  Trace full_;
};

}  // namespace adakv
