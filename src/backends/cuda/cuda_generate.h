// Single-sequence generation on the device: engine/generator.h's generate() with the forward pass,
// the compression and the sampling on a CudaModel. Same options, results and errors; the pool is
// the model's (sized by --gpu-memory-fraction) rather than one sized for the request, so a request
// that does not fit fails with the pages needed and free.
#pragma once

#include <functional>
#include <span>

#include "backends/cuda/cuda_model.h"
#include "engine/generator.h"

namespace adakv::cuda {

// options.compress must be the config the model was created with (or null / full when it was
// created without one); options.observer is not supported on the device (the CPU forward's
// per-layer taps) and must be null.
Expected<GenerateResult> generate(CudaModel& model, std::span<const int32_t> prompt, const GenerateOptions& options,
                                  const std::function<void(int32_t)>& on_token);

}  // namespace adakv::cuda
