// CudaModel (cuda_model.h): creation, options and accessors; the rest in cuda_model_*.cc.
#include "backends/cuda/cuda_model_impl.h"

namespace adakv::cuda {

using namespace cuda_model_detail;

Status compression_supported(const CompressConfig& c) {
  const KvPolicy p = c.policy;
  if (!policy_compresses(p) || scorer_policy(p) || p == KvPolicy::kStreamingLlm) return Status::ok();
  return unimplemented(std::string("cuda: kv policy ") + kv_policy_name(p) +
                       " is not on the device yet (full, snapkv, pyramidkv, ada-snapkv, ada-pyramidkv, criticalkv, "
                       "ada-criticalkv, h2o, kvcompress, streamingllm and random are); use --device cpu");
}

Status cuda_device_available() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return unimplemented(std::string("no usable CUDA device: ") + cudaGetErrorString(err));
  }
  if (count == 0) return unimplemented("no CUDA device");
  return Status::ok();
}

std::string cuda_device_name() {
  int dev = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
    cudaGetLastError();
    return "no device";
  }
  return prop.name;
}

namespace {

Expected<std::unique_ptr<CudaModel::Impl>> make_impl(const ModelConfig& cfg, const CudaModelOptions& options) {
  ADAKV_RETURN_IF_ERROR(cuda_device_available());
  auto impl = std::make_unique<CudaModel::Impl>();
  impl->cfg = cfg;
  impl->opt = options;
  if (cfg.head_dim <= 0 || cfg.head_dim % 8 != 0 || cfg.head_dim > 256)
    return unimplemented("cuda: head_dim " + std::to_string(cfg.head_dim) + " (supported: multiples of 8 up to 256)");
  if (cfg.num_kv_heads <= 0 || cfg.num_heads % cfg.num_kv_heads != 0)
    return unimplemented("cuda: query heads must be a multiple of kv heads");
  if (cfg.hidden_size % 8 != 0 || cfg.intermediate_size % 8 != 0)
    return unimplemented("cuda: hidden and intermediate sizes must be multiples of 8 (16-byte rows)");
  if (options.max_seqs < 1 || options.max_step_tokens < 1)
    return invalid_argument("cuda: max_seqs and max_step_tokens must be positive");
  if (options.compress != nullptr && policy_compresses(options.compress->policy)) {
    ADAKV_RETURN_IF_ERROR(validate_compress_config(*options.compress));
    ADAKV_RETURN_IF_ERROR(compression_supported(*options.compress));
    impl->comp = *options.compress;
    impl->has_comp = true;
  }
  impl->opt.compress = nullptr;
  if (options.max_window < 0) return invalid_argument("cuda: max_window must be >= 0");
  // (H2O's and random's scoring do not use the window capacity: no window ring)
  int32_t need_window = 0;
  if (impl->has_comp && scorer_policy(impl->comp.policy))
    need_window = ring_policy(impl->comp.policy) ? impl->comp.window : 1;
  impl->max_window = std::max(options.max_window, need_window);
  const size_t S = static_cast<size_t>(options.max_seqs);
  impl->seq_comp.resize(S);
  impl->seq_has_comp.assign(S, 0);
  impl->seq_compressed.assign(S, 0);
  impl->ring_end.assign(S, 0);
  if (const char* e = std::getenv("ADAKV_CUDA_GRAPHS"); e != nullptr && std::string(e) == "0") impl->graphs_enabled = false;
  if (const char* e = std::getenv("ADAKV_PROFILE_OPS"); e != nullptr && std::string(e) == "1")
    ADAKV_RETURN_IF_ERROR(impl->ops.enable(16 * static_cast<int>(cfg.num_layers) + 16));
  impl->overlap_decode_prologue = options.decode_overlap;
  if (const char* e = std::getenv("ADAKV_DECODE_OVERLAP"); e != nullptr && (std::string(e) == "0" || std::string(e) == "1"))
    impl->overlap_decode_prologue = std::string(e) == "1";
  // Diagnostics: ADAKV_PLAN_AHEAD=0 or 1 overrides CudaModelOptions::plan_ahead.
  if (const char* e = std::getenv("ADAKV_PLAN_AHEAD"); e != nullptr && (std::string(e) == "0" || std::string(e) == "1"))
    impl->opt.plan_ahead = std::string(e) == "1";
  // Diagnostics: the decode merge kernel's block width (4, 8, 16, 32; unset or 0: from each plan).
  if (const char* e = std::getenv("ADAKV_DECODE_MERGE_WARPS"); e != nullptr)
    impl->decode_merge_warps = std::atoi(e);
  // Diagnostics: who merges split rows (kernel, fused or auto; default auto).
  if (const char* e = std::getenv("ADAKV_DECODE_MERGE"); e != nullptr) {
    const std::string v = e;
    if (v == "kernel") impl->decode_merge = DecodeMerge::kKernel;
    if (v == "fused") impl->decode_merge = DecodeMerge::kFused;
  }
  int64_t ctx = cfg.max_position_embeddings;
  if (cfg.sliding_window > 0) ctx = std::min(ctx, cfg.sliding_window);
  impl->max_context = options.max_context > 0 ? std::min(options.max_context, ctx) : ctx;
  impl->max_logit_rows = options.max_logit_rows > 0 ? options.max_logit_rows : std::max(options.max_seqs, 1);
  ADAKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->ev_start));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->ev_end));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&impl->ev_copied));
  return impl;
}

}  // namespace

Expected<std::unique_ptr<CudaModel>> CudaModel::load(const std::string& model_dir, const CudaModelOptions& options) {
  ADAKV_ASSIGN_OR_RETURN(ModelConfig cfg, load_model_config(model_dir));
  ADAKV_ASSIGN_OR_RETURN(auto impl, make_impl(cfg, options));
  ADAKV_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::open(model_dir));
  ADAKV_RETURN_IF_ERROR(impl->allocate_weights());
  ADAKV_RETURN_IF_ERROR(impl->upload(ckpt));
  ADAKV_RETURN_IF_ERROR(impl->allocate_runtime());
  std::unique_ptr<CudaModel> m(new CudaModel());
  m->impl_ = std::move(impl);
  return m;
}

Expected<std::unique_ptr<CudaModel>> CudaModel::random(const ModelConfig& config, uint64_t seed,
                                                       const CudaModelOptions& options) {
  ADAKV_ASSIGN_OR_RETURN(auto impl, make_impl(config, options));
  ADAKV_RETURN_IF_ERROR(impl->allocate_weights());
  ADAKV_RETURN_IF_ERROR(impl->randomize(seed));
  ADAKV_RETURN_IF_ERROR(impl->allocate_runtime());
  std::unique_ptr<CudaModel> m(new CudaModel());
  m->impl_ = std::move(impl);
  return m;
}

CudaModel::~CudaModel() = default;

const ModelConfig& CudaModel::config() const { return impl_->cfg; }
KvLayout CudaModel::kv_layout() const {
  KvLayout k;
  k.num_layers = static_cast<int32_t>(impl_->cfg.num_layers);
  k.num_kv_heads = static_cast<int32_t>(impl_->cfg.num_kv_heads);
  k.head_dim = static_cast<int32_t>(impl_->cfg.head_dim);
  k.page_size = kPageSize;
  return k;
}
int64_t CudaModel::num_pages() const { return impl_->num_pages; }
int64_t CudaModel::context_length() const { return impl_->max_context; }
int64_t CudaModel::weight_bytes() const { return impl_->weight_bytes; }
int64_t CudaModel::kv_pool_bytes() const { return impl_->pool_bytes; }
std::string CudaModel::memory_summary() const {
  return "weights " + mib(impl_->weight_bytes) + ", workspace " + mib(impl_->workspace_bytes) + ", KV pool " +
         mib(impl_->pool_bytes) + " (" + std::to_string(impl_->num_pages) + " pages of 16 entries)";
}
const std::vector<CompressionAuditLayer>& CudaModel::compression_audit() const { return impl_->audit; }
float CudaModel::last_step_ms() const { return impl_->last_ms; }
const CudaModel::StepTiming& CudaModel::last_step_timing() const { return impl_->timing; }

std::string CudaModel::op_profile() const { return impl_->ops.report(); }
void CudaModel::reset_op_profile() { impl_->ops.reset(); }
int64_t CudaModel::num_graphs() const { return static_cast<int64_t>(impl_->graphs.size()); }

}  // namespace adakv::cuda
