// create_model_runner (model_runner_factory.h).
#include "engine/model_runner_factory.h"

#include <algorithm>

#include "io/tokenizer.h"

#if ADAKV_HAVE_CUDA
#include "backends/cuda/cuda_model.h"
#include "backends/cuda/cuda_model_runner.h"
#endif

namespace adakv {

Expected<std::string> resolve_device(const std::string& device) {
  if (device == "cpu") return std::string("cpu");
  if (device != "cuda" && device != "auto")
    return invalid_argument("device '" + device + "' is not known: allowed cpu | cuda | auto");
#if ADAKV_HAVE_CUDA
  if (device == "auto") return std::string(cuda::cuda_device_available().is_ok() ? "cuda" : "cpu");
  return std::string("cuda");
#else
  if (device == "auto") return std::string("cpu");
  return unimplemented("device 'cuda': adakv was built without CUDA (rebuild with nvcc present, -DADAKV_CUDA=ON)");
#endif
}

std::string device_label(const std::string& device) {
  Expected<std::string> d = resolve_device(device);
  if (!d) return d.status().message();
#if ADAKV_HAVE_CUDA
  if (*d == "cuda") return "cuda (" + cuda::cuda_device_name() + ")";
#endif
  return *d;
}

Status validate_device_options(const EngineOptions& o) {
  ADAKV_ASSIGN_OR_RETURN(const std::string device, resolve_device(o.device));
  if (!(o.gpu_memory_fraction > 0.0 && o.gpu_memory_fraction <= 1.0))
    return invalid_argument("gpu_memory_fraction " + std::to_string(o.gpu_memory_fraction) +
                            " is out of range: allowed (0, 1]");
  if (!o.random_weights.empty() && device != "cuda")
    return invalid_argument("random weights (" + o.random_weights + ") are generated on the GPU: they need device cuda");
  if (device == "cuda" && o.page_size != 16)
    return invalid_argument("page_size " + std::to_string(o.page_size) + " is not supported on cuda: pages hold 16 tokens");
  return Status::ok();
}

Expected<std::unique_ptr<ModelRunner>> create_model_runner(const EngineOptions& options) {
  ADAKV_RETURN_IF_ERROR(validate_device_options(options));
  ADAKV_ASSIGN_OR_RETURN(const std::string device, resolve_device(options.device));
  if (device == "cpu") {
    CpuRunnerOptions ro;
    ro.page_size = options.page_size;
    ro.kv_pages = options.kv_pages;
    ro.kv_memory_bytes = options.kv_memory_bytes;
    return create_cpu_model_runner(options.model_dir, ro);
  }
#if ADAKV_HAVE_CUDA
  CudaRunnerOptions ro;
  ro.page_size = options.page_size;
  ro.kv_pages = options.kv_pages;
  ro.kv_memory_bytes = options.kv_memory_bytes;
  ro.gpu_memory_fraction = options.gpu_memory_fraction;
  ro.max_seqs = options.max_running;
  ro.max_step_tokens = options.max_step_tokens;
  ro.max_window = std::max<int32_t>(32, options.default_compress.window);
  ro.random_config = options.random_weights;
  ADAKV_ASSIGN_OR_RETURN(std::unique_ptr<ModelRunner> runner, create_cuda_model_runner(options.model_dir, ro));
  if (!options.random_weights.empty()) {
    // The tokenizer comes from model_dir: its ids must be valid in the random model (ids it does
    // not know decode to nothing, which a benchmark of random prompts never looks at).
    ADAKV_ASSIGN_OR_RETURN(std::shared_ptr<Tokenizer> tok, Tokenizer::load(options.model_dir));
    if (tok->vocab_size() > runner->config().vocab_size)
      return invalid_argument("the tokenizer of " + options.model_dir + " has " + std::to_string(tok->vocab_size()) +
                              " ids, more than the vocabulary of " + std::to_string(runner->config().vocab_size) +
                              " in " + options.random_weights);
  }
  return runner;
#else
  return unimplemented("device 'cuda': adakv was built without CUDA");
#endif
}

}  // namespace adakv
