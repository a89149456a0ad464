// The weights of a Llama-family checkpoint in the fp32 layout the CPU forward consumes, loaded by
// their Hugging Face tensor names with every shape checked. bf16/fp16 tensors are converted to
// fp32 once at load (the mapping is the source, so this is the only copy); fp32 tensors are used
// in place from the mapping unless they are fused (q/k/v, gate/up) into one matrix.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/safetensors.h"
#include "model/model_config.h"

namespace adakv {

struct LayerWeights {
  const float* input_norm = nullptr;  // [hidden]
  const float* post_norm = nullptr;   // [hidden]
  const float* qkv = nullptr;         // [q_dim + 2 kv_dim][hidden]: q_proj, k_proj, v_proj rows
  const float* qkv_bias = nullptr;    // [q_dim + 2 kv_dim], or null without q/k/v bias
  const float* q_norm = nullptr;      // [head_dim] (Qwen3), or null
  const float* k_norm = nullptr;      // [head_dim] (Qwen3), or null
  const float* o = nullptr;           // [hidden][q_dim]
  const float* o_bias = nullptr;      // [hidden], or null
  const float* gate_up = nullptr;     // [2 inter][hidden]: gate_proj rows, then up_proj rows
  const float* down = nullptr;        // [hidden][inter]
};

class ModelWeights {
 public:
  // Reads every tensor the architecture needs from `checkpoint` (which must outlive the
  // weights: fp32 tensors point into its mapping). A missing tensor, a wrong shape or a
  // non-float dtype is an error naming the tensor and the checkpoint folder.
  static Expected<ModelWeights> load(const Checkpoint& checkpoint, const ModelConfig& config);
  ModelWeights(ModelWeights&&) = default;
  ModelWeights& operator=(ModelWeights&&) = default;
  ModelWeights(const ModelWeights&) = delete;  // the pointers refer to owned_ buffers
  ModelWeights& operator=(const ModelWeights&) = delete;

  // The embedding row of `token` as fp32: out [hidden].
  void embed(int32_t token, float* out) const;
  const LayerWeights& layer(int64_t i) const { return layers_[static_cast<size_t>(i)]; }
  const float* final_norm() const { return final_norm_; }  // [hidden]
  const float* lm_head() const { return lm_head_; }        // [vocab][hidden]
  // Bytes of fp32 copies the weights own (converted or fused tensors).
  int64_t owned_bytes() const;

 private:
  ModelWeights() = default;

  int64_t hidden_ = 0;
  const TensorInfo* embed_ = nullptr;   // [vocab][hidden] in the mapping, any float dtype
  const float* embed_f32_ = nullptr;    // [vocab][hidden] when an fp32 view exists, else null
  std::vector<LayerWeights> layers_;    // [layers]
  const float* final_norm_ = nullptr;   // [hidden]
  const float* lm_head_ = nullptr;      // [vocab][hidden]
  std::vector<std::vector<float>> owned_;  // fp32 buffers behind the pointers above
};

}  // namespace adakv
