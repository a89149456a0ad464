#include "model/model_weights.h"

#include <cstring>

#include "core/dtype.h"
#include "core/parallel.h"

namespace adakv {
namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Converts a tensor into `dst` (numel floats), in parallel chunks for the big ones.
void convert_into(const TensorInfo& t, float* dst) {
  const int64_t n = t.numel();
  const size_t elem = dtype_size(t.dtype);
  parallel_for(n, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    convert_to_f32(t.dtype, t.data + static_cast<size_t>(begin) * elem, dst + begin, static_cast<size_t>(end - begin));
  });
}

class Loader {
 public:
  Loader(const Checkpoint& ckpt, std::vector<std::vector<float>>* owned) : ckpt_(ckpt), owned_(owned) {}

  // The tensor `name`, required to exist with exactly `shape` and a float dtype.
  Expected<const TensorInfo*> tensor(const std::string& name, const std::vector<int64_t>& shape) const {
    if (ckpt_.find(name) == nullptr) {
      return not_found(ckpt_.dir() + ": checkpoint has no tensor '" + name + "' (expected shape " +
                       shape_string(shape) + ")");
    }
    ADAKV_ASSIGN_OR_RETURN(const TensorInfo* t, ckpt_.get(name, shape));
    if (t->dtype != DType::kF32 && t->dtype != DType::kF16 && t->dtype != DType::kBF16) {
      return unimplemented(ckpt_.dir() + ": tensor '" + name + "' has dtype " + dtype_name(t->dtype) +
                           "; only F32, F16 and BF16 weights are supported");
    }
    return t;
  }

  // An fp32 view: in place when the mapping already holds aligned fp32, else a converted copy.
  Expected<const float*> f32(const std::string& name, const std::vector<int64_t>& shape) {
    ADAKV_ASSIGN_OR_RETURN(const TensorInfo* t, tensor(name, shape));
    return view(*t);
  }

  const float* view(const TensorInfo& t) {
    if (t.dtype == DType::kF32 && reinterpret_cast<uintptr_t>(t.data) % alignof(float) == 0) {
      return reinterpret_cast<const float*>(t.data);
    }
    std::vector<float>& buf = owned_->emplace_back(static_cast<size_t>(t.numel()));
    convert_into(t, buf.data());
    return buf.data();
  }

  // Rows of several [rows_i][cols] tensors stacked into one owned [sum rows_i][cols] matrix
  // (or [sum rows_i] for 1-D biases).
  Expected<const float*> fused(const std::vector<std::string>& names, const std::vector<int64_t>& rows,
                               int64_t cols) {
    std::vector<const TensorInfo*> parts;
    int64_t total = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      std::vector<int64_t> shape = {rows[i]};
      if (cols > 0) shape.push_back(cols);
      ADAKV_ASSIGN_OR_RETURN(const TensorInfo* t, tensor(names[i], shape));
      parts.push_back(t);
      total += t->numel();
    }
    std::vector<float>& buf = owned_->emplace_back(static_cast<size_t>(total));
    float* dst = buf.data();
    for (const TensorInfo* t : parts) {
      convert_into(*t, dst);
      dst += t->numel();
    }
    return buf.data();
  }

 private:
  const Checkpoint& ckpt_;
  std::vector<std::vector<float>>* owned_;
};

}  // namespace

Expected<ModelWeights> ModelWeights::load(const Checkpoint& checkpoint, const ModelConfig& c) {
  ModelWeights w;
  w.hidden_ = c.hidden_size;
  Loader ld(checkpoint, &w.owned_);
  const int64_t hidden = c.hidden_size;
  const int64_t q_dim = c.q_dim();
  const int64_t kv_dim = c.kv_dim();
  const int64_t inter = c.intermediate_size;

  ADAKV_ASSIGN_OR_RETURN(w.embed_, ld.tensor("model.embed_tokens.weight", {c.vocab_size, hidden}));
  if (c.tie_word_embeddings) {
    w.lm_head_ = ld.view(*w.embed_);
    w.embed_f32_ = w.lm_head_;
  } else {
    ADAKV_ASSIGN_OR_RETURN(w.lm_head_, ld.f32("lm_head.weight", {c.vocab_size, hidden}));
    if (w.embed_->dtype == DType::kF32 && reinterpret_cast<uintptr_t>(w.embed_->data) % alignof(float) == 0) {
      w.embed_f32_ = reinterpret_cast<const float*>(w.embed_->data);
    }
  }
  ADAKV_ASSIGN_OR_RETURN(w.final_norm_, ld.f32("model.norm.weight", {hidden}));

  w.layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& L = w.layers_[static_cast<size_t>(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const std::string a = p + "self_attn.";
    ADAKV_ASSIGN_OR_RETURN(L.input_norm, ld.f32(p + "input_layernorm.weight", {hidden}));
    ADAKV_ASSIGN_OR_RETURN(L.post_norm, ld.f32(p + "post_attention_layernorm.weight", {hidden}));
    ADAKV_ASSIGN_OR_RETURN(L.qkv, ld.fused({a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"},
                                           {q_dim, kv_dim, kv_dim}, hidden));
    if (c.qkv_bias) {
      ADAKV_ASSIGN_OR_RETURN(L.qkv_bias, ld.fused({a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"},
                                                  {q_dim, kv_dim, kv_dim}, 0));
    }
    if (c.qk_norm) {
      ADAKV_ASSIGN_OR_RETURN(L.q_norm, ld.f32(a + "q_norm.weight", {c.head_dim}));
      ADAKV_ASSIGN_OR_RETURN(L.k_norm, ld.f32(a + "k_norm.weight", {c.head_dim}));
    }
    ADAKV_ASSIGN_OR_RETURN(L.o, ld.f32(a + "o_proj.weight", {hidden, q_dim}));
    if (c.o_bias) {
      ADAKV_ASSIGN_OR_RETURN(L.o_bias, ld.f32(a + "o_proj.bias", {hidden}));
    }
    ADAKV_ASSIGN_OR_RETURN(L.gate_up, ld.fused({p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"},
                                               {inter, inter}, hidden));
    ADAKV_ASSIGN_OR_RETURN(L.down, ld.f32(p + "mlp.down_proj.weight", {hidden, inter}));
  }
  return w;
}

void ModelWeights::embed(int32_t token, float* out) const {
  const size_t offset = static_cast<size_t>(token) * static_cast<size_t>(hidden_);
  if (embed_f32_ != nullptr) {
    std::memcpy(out, embed_f32_ + offset, static_cast<size_t>(hidden_) * sizeof(float));
  } else {
    convert_to_f32(embed_->dtype, embed_->data + offset * dtype_size(embed_->dtype), out, static_cast<size_t>(hidden_));
  }
}

int64_t ModelWeights::owned_bytes() const {
  int64_t total = 0;
  for (const auto& b : owned_) total += static_cast<int64_t>(b.size() * sizeof(float));
  return total;
}

}  // namespace adakv
