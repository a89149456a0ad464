// Picks and builds the ModelRunner that EngineOptions::device names: the CPU runner
// (cpu_model_runner.cc) or the CUDA one (backends/cuda/cuda_model_runner.h, compiled only when
// adakv is built with CUDA, ADAKV_HAVE_CUDA).
#pragma once

#include <memory>
#include <string>

#include "adakv/engine.h"
#include "core/status.h"
#include "engine/model_runner.h"

namespace adakv {

// "cpu" | "cuda" | "auto" -> "cpu" or "cuda" ("auto": cuda when adakv was built with CUDA and a
// device is usable, else cpu). "cuda" without CUDA support: "adakv was built without CUDA".
Expected<std::string> resolve_device(const std::string& device);

// For logs: "cpu", or "cuda (<the current GPU's name>)"; the resolved name of `device`, or the
// resolution's error message.
std::string device_label(const std::string& device);

// The device-related options alone (device name, gpu_memory_fraction, random_weights), without
// touching a device: Engine::create's validation calls it.
Status validate_device_options(const EngineOptions& options);

// The runner for `options` (its model, its KV pool sized by kv_pages / kv_memory_bytes /
// gpu_memory_fraction). With random_weights (cuda only) the model is random with that config's
// shapes and model_dir must hold a tokenizer whose vocabulary fits the config's.
Expected<std::unique_ptr<ModelRunner>> create_model_runner(const EngineOptions& options);

}  // namespace adakv
