// Helpers of the model-level GPU tests (tests/gpu/test_cuda_model.cc, test_cuda_runner.cc,
// test_model_ops.cc): whether a CUDA device is usable, and feeding a prompt to a CudaModel the
// way the engine does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>

#include <cuda_runtime.h>

#include "backends/cuda/cuda_model.h"
#include "core/status.h"
#include "kv/kv_cache_manager.h"

namespace adakv {

inline bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// Chunks of `chunk` tokens (0: the whole prompt in one step), every chunk but the last marked
// prefill_part, the last one compress. The last step asks for logits when want_logits and samples
// on the device with *sampling when it is given (the caller sets its uniform first).
inline Status step_prompt(cuda::CudaModel& m, KvCacheManager& mgr, SeqId seq, std::span<const int32_t> prompt,
                          size_t chunk, bool want_logits, const cuda::StepSampling* sampling, cuda::StepResult* out) {
  const size_t step_len = chunk > 0 ? chunk : prompt.size();
  for (size_t p = 0; p < prompt.size(); p += step_len) {
    const size_t e = std::min(prompt.size(), p + step_len);
    cuda::SeqStep s;
    s.seq = seq;
    s.tokens = prompt.subspan(p, e - p);
    s.compress = e == prompt.size();
    s.prefill_part = !s.compress;
    if (s.compress) s.sampling = sampling;
    const Status st = m.step({&s, 1}, mgr, s.compress && want_logits, out);
    if (!st.is_ok()) return st.with_context("prompt chunk at " + std::to_string(p));
  }
  return Status::ok();
}

}  // namespace adakv
