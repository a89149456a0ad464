// The CUDA ModelRunner (engine/model_runner.h) over one CudaModel: every item of a scheduler step
// (the decode token of each running sequence, prompt chunks, re-fed tokens) runs as ONE batched
// device step; bf16 K/V in the device pool (sized from the options below) with the host
// KvCacheManager as the source of truth; each sequence's own compression config, run on the
// device (window policies, criticalkv, ada-criticalkv, h2o and random after the prompt's last
// chunk, kvcompress across layers after it; h2o, kvcompress and streamingllm again every
// `interval` decode steps and on compress_now). Every policy works with chunked prefill.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"
#include "engine/model_runner.h"

namespace adakv {

struct CudaRunnerOptions {
  int32_t page_size = 16;            // must be 16: the device pool's page
  // Pool size, first that applies: kv_pages > 0 exactly; kv_memory_bytes > 0 divided by
  // kv_bytes_per_page(); else gpu_memory_fraction of the memory left after weights and workspace.
  int64_t kv_pages = 0;
  int64_t kv_memory_bytes = 0;
  double gpu_memory_fraction = 0.9;
  int32_t max_seqs = 64;             // sequences alive at once (the engine's max_running)
  int32_t max_step_tokens = 2048;    // tokens of one step (the engine's max_step_tokens)
  int32_t max_window = 32;           // largest window a request's window policy may use
  // Non-empty: a config.json whose model is built with random bf16 weights on the device
  // (benchmarks: no checkpoint); model_dir is then not read.
  std::string random_config;
  uint64_t seed = 1;                 // of the random weights
};

// Loads the checkpoint of `model_dir` (or builds options.random_config's random model) on the
// CUDA device. Errors: no device, unsupported shapes, page size other than 16, pool too small.
Expected<std::unique_ptr<ModelRunner>> create_cuda_model_runner(const std::string& model_dir,
                                                                const CudaRunnerOptions& options);

}  // namespace adakv
