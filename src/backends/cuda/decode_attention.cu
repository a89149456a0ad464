// DecodeAttention: workspace, plan upload and launch (host code; kernels in decode_attention.cuh).
#include "backends/cuda/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "backends/cuda/cuda_check.h"
#include "backends/cuda/decode_attention_kernels.h"

namespace adakv::cuda {
namespace {

using decode_detail::DecodeParams;

size_t align16(size_t x) { return (x + 15) & ~size_t{15}; }

// The plan buffer (device and pinned host copy). A plan uses a prefix of it from `begin`: the
// fixed-size parts first, then the items it has, so that one copy covers what a plan uses. The
// warp kernel (v2) uses warp offsets | row merge | items; block items (v3) row merge | block items.
struct PlanLayout {
  size_t offsets = 0;  // int32 [max_warps + 1] (v2)
  size_t merge = 0;    // int2 [max_rows]
  size_t items = 0;    // int4 [max_items] (v2)
  size_t blocks = 0;   // int4 [2 (max_warps + max_items)] block items (heads, then the rest; v3)
  size_t begin = 0;    // the first byte a plan uses
  size_t end = 0;
};

PlanLayout plan_layout(int64_t max_warps, int64_t max_rows, int64_t max_items, bool block_items) {
  const size_t offsets = sizeof(int32_t) * static_cast<size_t>(max_warps + 1);
  const size_t merge = sizeof(int2) * static_cast<size_t>(max_rows);
  const size_t items = sizeof(int4) * static_cast<size_t>(max_items);
  const size_t blocks = 2 * sizeof(int4) * static_cast<size_t>(max_warps + max_items);
  PlanLayout l;
  if (block_items) {
    l.merge = 0;
    l.blocks = align16(merge);
    l.offsets = l.blocks + blocks;
    l.items = align16(l.offsets + offsets);
    l.end = l.items + items;
    l.begin = l.merge;
  } else {
    l.offsets = 0;
    l.merge = align16(offsets);
    l.items = align16(l.merge + merge);
    l.blocks = l.items + items;
    l.end = l.blocks + blocks;
    l.begin = l.offsets;
  }
  return l;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

cudaError_t occupancy(int head_dim, bool q_f32, int ppi, int* blocks, bool block_items) {
  return head_dim == 64 ? decode_detail::decode_attention_occupancy<64>(q_f32, ppi, blocks, block_items)
                        : decode_detail::decode_attention_occupancy<128>(q_f32, ppi, blocks, block_items);
}

}  // namespace

static_assert(sizeof(DecodeWorkItem) == sizeof(int4), "work items are read as int4");
static_assert(sizeof(DecodeRowMerge) == sizeof(int2), "row merge entries are read as int2");

Expected<std::unique_ptr<DecodeAttention>> DecodeAttention::create(const DecodeAttentionOptions& o) {
  return make(o, nullptr, 0);
}

Expected<std::unique_ptr<DecodeAttention>> DecodeAttention::make(const DecodeAttentionOptions& o,
                                                                 DecodeAttentionLayers* owner, int32_t index) {
  const std::string where = "decode attention: ";
  if (o.head_dim != 64 && o.head_dim != 128)
    return unimplemented(where + "head_dim " + std::to_string(o.head_dim) + " (supported: 64, 128)");
  if (o.num_kv_heads < 1 || o.num_qo_heads < o.num_kv_heads || o.num_qo_heads % o.num_kv_heads != 0)
    return invalid_argument(where + std::to_string(o.num_qo_heads) + " query heads do not split over " +
                            std::to_string(o.num_kv_heads) + " kv heads");
  const int32_t g = o.num_qo_heads / o.num_kv_heads;
  if (g > 8) return unimplemented(where + "group size " + std::to_string(g) + " (supported: 1..8)");
  if (o.q_dtype != DType::kBF16 && o.q_dtype != DType::kF32)
    return unimplemented(where + std::string("query dtype ") + dtype_name(o.q_dtype) + " (supported: BF16, F32)");
  if (o.pages_per_iter != 1 && o.pages_per_iter != 2 && o.pages_per_iter != 4)
    return invalid_argument(where + "pages_per_iter " + std::to_string(o.pages_per_iter) + " (supported: 1, 2, 4)");
  if (o.head_dim == 128 && o.pages_per_iter == 4)
    return unimplemented(where + "pages_per_iter 4 at head_dim 128 (it would spill registers)");
  if (o.max_rows < 1) return invalid_argument(where + "max_rows must be positive");
  if (o.prefetch_pages < 0 || o.prefetch_pages > 32)
    return invalid_argument(where + "prefetch_pages " + std::to_string(o.prefetch_pages) + " (supported: 0..32)");
  if (o.merge_warps != 0 && o.merge_warps != 4 && o.merge_warps != 8 && o.merge_warps != 16 && o.merge_warps != 32)
    return invalid_argument(where + "merge_warps " + std::to_string(o.merge_warps) + " (supported: 0, 4, 8, 16, 32)");
  if (o.merge_slices != 0 && o.merge_slices != 1 && o.merge_slices != 4)
    return invalid_argument(where + "merge_slices " + std::to_string(o.merge_slices) + " (supported: 0, 1, 4)");
  if (o.diagnostic_no_math && (o.head_dim != 128 || o.q_dtype != DType::kBF16 || !o.block_items))
    return unimplemented(where + "diagnostic_no_math needs head_dim 128, bf16 queries and block items");
  if (o.merge_slices > 1 && o.merge_warps != 0 && o.merge_warps != 4)
    return invalid_argument(where + "merge_slices " + std::to_string(o.merge_slices) + " with merge_warps " +
                            std::to_string(o.merge_warps) + " (slices split 4-warp blocks only)");

  std::unique_ptr<DecodeAttention> self(new DecodeAttention());
  self->options_ = o;
  self->group_size_ = g;

  int dev = 0, sms = 0, blocks = 0, major = 0;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  self->dependent_launch_ = major >= 9 && o.dependent_launch;
  ADAKV_CUDA_RETURN_IF_ERROR(occupancy(o.head_dim, o.q_dtype == DType::kF32, o.pages_per_iter, &blocks, o.block_items));
  if (blocks < 1) return internal_error(where + "the attention kernel cannot be resident on this device");
  int32_t warps_per_sm = blocks * kDecodeWarpsPerBlock;
  if (o.max_warps_per_sm > 0) warps_per_sm = std::min(warps_per_sm, o.max_warps_per_sm);
  self->device_warp_slots_ = sms * warps_per_sm;
  self->sms_ = sms;
  // Balanced plans use the device's warp slots; one-block-per-row plans 4 warps per row. Items:
  // at most one per non-empty row plus one per warp (balanced), or 4 per row.
  self->max_warps_ = std::max<int64_t>(self->device_warp_slots_, int64_t{kDecodeWarpsPerBlock} * o.max_rows);
  self->max_items_ = int64_t{self->device_warp_slots_} + int64_t{kDecodeWarpsPerBlock} * o.max_rows;

  const PlanLayout layout = plan_layout(self->max_warps_, o.max_rows, self->max_items_, o.block_items);
  self->plan_bytes_ = layout.end;
  self->owner_ = owner;
  self->owner_index_ = index;
  if (owner == nullptr) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&self->d_plan_, self->plan_bytes_));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMallocHost(&self->h_plan_, self->plan_bytes_));
    std::memset(self->h_plan_, 0, self->plan_bytes_);
    ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&self->upload_done_, cudaEventDisableTiming));
  }
  const size_t partial_floats = static_cast<size_t>(self->max_items_) * g;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&self->d_partial_o_, partial_floats * o.head_dim * sizeof(float)));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&self->d_partial_lse_, partial_floats * sizeof(float)));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&self->d_row_counters_, sizeof(int32_t) * static_cast<size_t>(o.max_rows)));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemset(self->d_row_counters_, 0, sizeof(int32_t) * static_cast<size_t>(o.max_rows)));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());  // the counters are zero before any stream uses them
  return Expected<std::unique_ptr<DecodeAttention>>(std::move(self));
}

DecodeAttention::~DecodeAttention() {
  // Errors here (a dead context at exit) have nowhere to go; the memory goes with the context.
  if (upload_done_ != nullptr) {
    cudaEventSynchronize(upload_done_);
    cudaEventDestroy(upload_done_);
  }
  if (owner_ == nullptr) {
    cudaFree(d_plan_);
    cudaFreeHost(h_plan_);
  }
  cudaFree(d_partial_o_);
  cudaFree(d_partial_lse_);
  cudaFree(d_row_counters_);
}

Status DecodeAttention::plan(std::span<const int32_t> row_lengths, std::span<const int32_t> row_page_offsets,
                             cudaStream_t stream) {
  const std::string where = "decode attention plan: ";
  if (static_cast<int64_t>(row_lengths.size()) > options_.max_rows)
    return invalid_argument(where + std::to_string(row_lengths.size()) + " rows, more than max_rows " +
                            std::to_string(options_.max_rows));
  if (!row_page_offsets.empty() && row_page_offsets.size() != row_lengths.size() &&
      row_page_offsets.size() != row_lengths.size() + 1)
    return invalid_argument(where + "row_page_offsets needs num_rows (or num_rows + 1) entries, got " +
                            std::to_string(row_page_offsets.size()));
  // The plan depends on the rows' page counts (and page-table offsets) only; the kernels take the
  // exact lengths from the view. Rows that grew within their pages keep the uploaded plan.
  bool same = plan_cached_ && stream == plan_stream_ && row_lengths.size() == plan_pages_.size() &&
              std::equal(row_page_offsets.begin(), row_page_offsets.end(), plan_offsets_.begin(), plan_offsets_.end());
  for (size_t r = 0; same && r < row_lengths.size(); ++r)
    same = row_lengths[r] >= 0 && (row_lengths[r] + kPageSize - 1) / kPageSize == plan_pages_[r];
  if (same) return Status::ok();
  plan_cached_ = false;
  ++builds_;
  // Block items: the slots are blocks (4 warps each), and a block's share is at least twice a
  // warp's minimum (so at least 2 pages per warp of the block).
  const DecodePlanOptions popt = effective_plan_options(options_, device_warp_slots_ / std::max<int32_t>(1, sms_));
  const int32_t slots =
      options_.block_items ? std::max<int32_t>(1, device_warp_slots_ / kDecodeWarpsPerBlock) : device_warp_slots_;
  ADAKV_ASSIGN_OR_RETURN(DecodePlan plan, decode_attention_plan(row_lengths, slots, popt));
  if (plan.num_warps > max_warps_ || static_cast<int64_t>(plan.items.size()) > max_items_)
    return internal_error(where + "plan exceeds the workspace (" + std::to_string(plan.items.size()) + " items, " +
                          std::to_string(plan.num_warps) + " warps)");
  plan_ = std::move(plan);
  merge_ = auto_merge(options_, plan_, sms_);
  const int32_t most = longest_split_row(plan_);
  if (options_.merge_warps > 0 || options_.merge_slices > 0) {
    merge_slices_ = std::max<int32_t>(1, options_.merge_slices);
    merge_warps_ = options_.merge_warps > 0 ? options_.merge_warps
                   : merge_slices_ > 1      ? 4
                                            : decode_detail::merge_warps_for(most);
  } else {
    const decode_detail::MergeShape shape =
        decode_detail::merge_shape_for(most, int64_t{plan_.num_rows} * group_size_, sms_);
    merge_warps_ = shape.warps;
    merge_slices_ = shape.slices;
  }

  // The previous upload must have left the staging buffer before it is rewritten.
  if (owner_ != nullptr) {
    ADAKV_RETURN_IF_ERROR(owner_->staging_free());
  } else {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(upload_done_));
  }
  const PlanLayout layout = plan_layout(max_warps_, options_.max_rows, max_items_, options_.block_items);
  size_t used_end = 0;  // the plan uses [layout.begin, used_end)
  auto* h = static_cast<char*>(h_plan_);
  std::memcpy(h + layout.merge, plan_.row_merge.data(), plan_.row_merge.size() * sizeof(DecodeRowMerge));
  if (options_.block_items) {
    // Block b's first item at index b (an empty head if it has none), the others after all heads,
    // linked in order: the kernel finds its first item with one load and the next with the current.
    items_absolute_ = !row_page_offsets.empty();
    int4* bi = reinterpret_cast<int4*>(h + layout.blocks);
    const int32_t nb = plan_.num_warps;
    int32_t extra = nb;
    for (int32_t b = 0; b < nb; ++b) {
      const int32_t first = plan_.warp_item_offsets[b], last = plan_.warp_item_offsets[b + 1];
      if (first == last) {
        bi[2 * b] = make_int4(0, 0, 0, 0);
        bi[2 * b + 1] = make_int4(-1, -1, 0, 0);
        continue;
      }
      int32_t at = b;
      for (int32_t i = first; i < last; ++i) {
        const DecodeWorkItem& it = plan_.items[i];
        const int32_t n = it.page_end - it.page_begin;
        const int32_t off = (items_absolute_ ? row_page_offsets[it.row] : 0) + it.page_begin;
        const int32_t next = i + 1 < last ? extra++ : -1;
        bi[2 * at] = make_int4(off, n, it.page_begin, it.row);
        bi[2 * at + 1] = make_int4(it.partial, next, 0, 0);
        at = next;
      }
    }
    used_end = layout.blocks + 2 * sizeof(int4) * static_cast<size_t>(extra);
  } else {
    std::memcpy(h + layout.offsets, plan_.warp_item_offsets.data(), plan_.warp_item_offsets.size() * sizeof(int32_t));
    std::memcpy(h + layout.items, plan_.items.data(), plan_.items.size() * sizeof(DecodeWorkItem));
    used_end = layout.items + plan_.items.size() * sizeof(DecodeWorkItem);
  }
  if (owner_ != nullptr) {
    owner_->staged(owner_index_, used_end);  // the owner's upload() sends it
  } else {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(d_plan_) + layout.begin, h + layout.begin,
                                               used_end - layout.begin, cudaMemcpyHostToDevice, stream));
    ADAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(upload_done_, stream));
  }
  plan_pages_.resize(row_lengths.size());
  for (size_t r = 0; r < row_lengths.size(); ++r) plan_pages_[r] = (row_lengths[r] + kPageSize - 1) / kPageSize;
  plan_offsets_.assign(row_page_offsets.begin(), row_page_offsets.end());
  plan_stream_ = stream;
  plan_cached_ = true;
  return Status::ok();
}

Status DecodeAttention::run(const PagedKvView& kv, const void* q, int64_t q_seq_stride, __nv_bfloat16* out,
                            int64_t out_seq_stride, float* lse, float softmax_scale, cudaStream_t stream) {
  const std::string where = "decode attention: ";
  if (kv.num_rows != plan_.num_rows)
    return invalid_argument(where + "view has " + std::to_string(kv.num_rows) + " rows, the plan " +
                            std::to_string(plan_.num_rows));
  if (kv.head_dim != options_.head_dim || kv.num_kv_heads != options_.num_kv_heads)
    return invalid_argument(where + "view shape (head_dim " + std::to_string(kv.head_dim) + ", kv heads " +
                            std::to_string(kv.num_kv_heads) + ") differs from the options");
  if (kv.num_rows % kv.num_kv_heads != 0)
    return invalid_argument(where + "rows are not a whole number of sequences");
  if (kv.page_stride < int64_t{kPageSize} * kv.head_dim || kv.page_stride % 8 != 0)
    return invalid_argument(where + "page_stride " + std::to_string(kv.page_stride) +
                            " is below a page or not a multiple of 8 elements");
  if (!aligned16(kv.k_pool) || !aligned16(kv.v_pool) || !aligned16(q) || !aligned16(out))
    return invalid_argument(where + "K/V pools, q and out must be 16-byte aligned");
  if (q_seq_stride % 8 != 0 || out_seq_stride % 8 != 0)
    return invalid_argument(where + "q and out sequence strides must be multiples of 8 elements");

  DecodeParams p;
  p.kv = kv;
  p.q = q;
  p.q_seq_stride = q_seq_stride;
  p.out = out;
  p.out_seq_stride = out_seq_stride;
  p.lse = lse;
  p.num_qo_heads = options_.num_qo_heads;
  p.group_size = group_size_;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;
  const PlanLayout layout = plan_layout(max_warps_, options_.max_rows, max_items_, options_.block_items);
  auto* d = static_cast<char*>(d_plan_);
  p.warp_item_offsets = reinterpret_cast<const int32_t*>(d + layout.offsets);
  p.row_merge = reinterpret_cast<const int2*>(d + layout.merge);
  p.items = reinterpret_cast<const int4*>(d + layout.items);
  p.num_warps = plan_.num_warps;
  if (options_.block_items) {
    p.block_items = reinterpret_cast<const int4*>(d + layout.blocks);
    p.items_absolute = items_absolute_ ? 1 : 0;
  }
  p.partial_o = d_partial_o_;
  p.partial_lse = d_partial_lse_;

  using decode_detail::MergeMode;
  const MergeMode mode = merge_ == DecodeMerge::kFused  ? MergeMode::kFused
                         : merge_ == DecodeMerge::kNone ? MergeMode::kNone
                                                        : MergeMode::kKernel;
  p.row_counters = mode == MergeMode::kFused ? d_row_counters_ : nullptr;
  p.trace_attn = trace_attn_;
  p.trace_merge = trace_merge_;

  const bool q_f32 = options_.q_dtype == DType::kF32;
  const int ppi = options_.pages_per_iter;
  const bool overlap = options_.block_items && options_.overlap_prologue && dependent_launch_;
  p.prefetch_pages = overlap ? options_.prefetch_pages : 0;
  p.no_math = options_.diagnostic_no_math ? 1 : 0;
  p.merge_floor = options_.diagnostic_merge_floor ? 1 : 0;
  const cudaError_t err =
      options_.head_dim == 64
          ? decode_detail::decode_attention_launch<64>(p, q_f32, ppi, dependent_launch_, mode, stream, overlap,
                                                       merge_warps_, merge_slices_)
          : decode_detail::decode_attention_launch<128>(p, q_f32, ppi, dependent_launch_, mode, stream, overlap,
                                                        merge_warps_, merge_slices_);
  ADAKV_CUDA_RETURN_IF_ERROR(err);
  return Status::ok();
}

Expected<std::unique_ptr<DecodeAttentionLayers>> DecodeAttentionLayers::create(const DecodeAttentionOptions& options,
                                                                               int32_t layers) {
  if (layers < 1) return invalid_argument("decode attention layers: need at least one layer");
  std::unique_ptr<DecodeAttentionLayers> self(new DecodeAttentionLayers());
  for (int32_t l = 0; l < layers; ++l) {
    ADAKV_ASSIGN_OR_RETURN(auto layer, DecodeAttention::make(options, self.get(), l));
    self->layers_.push_back(std::move(layer));
  }
  // Every layer has the same options, so the same layout: one slot each, 256-byte aligned.
  const DecodeAttention& first = *self->layers_.front();
  const PlanLayout layout = plan_layout(first.max_warps_, options.max_rows, first.max_items_, options.block_items);
  self->pitch_ = (first.plan_bytes_ + 255) & ~size_t{255};
  self->copy_begin_ = layout.begin;
  const size_t bytes = self->pitch_ * static_cast<size_t>(layers);
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&self->d_, bytes));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMallocHost(&self->h_, bytes));
  std::memset(self->h_, 0, bytes);
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&self->uploaded_, cudaEventDisableTiming));
  for (int32_t l = 0; l < layers; ++l) {
    DecodeAttention& a = *self->layers_[static_cast<size_t>(l)];
    a.d_plan_ = static_cast<char*>(self->d_) + self->pitch_ * static_cast<size_t>(l);
    a.h_plan_ = static_cast<char*>(self->h_) + self->pitch_ * static_cast<size_t>(l);
  }
  return Expected<std::unique_ptr<DecodeAttentionLayers>>(std::move(self));
}

DecodeAttentionLayers::~DecodeAttentionLayers() {
  if (uploaded_ != nullptr) {
    cudaEventSynchronize(uploaded_);
    cudaEventDestroy(uploaded_);
  }
  layers_.clear();
  cudaFree(d_);
  cudaFreeHost(h_);
}

Status DecodeAttentionLayers::staging_free() {
  if (in_flight_) {
    ADAKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(uploaded_));
    in_flight_ = false;
  }
  return Status::ok();
}

void DecodeAttentionLayers::staged(int32_t index, size_t end) {
  dirty_first_ = dirty_first_ < 0 ? index : std::min(dirty_first_, index);
  dirty_last_ = std::max(dirty_last_, index);
  dirty_end_ = std::max(dirty_end_, end);
}

Status DecodeAttentionLayers::upload(cudaStream_t stream) {
  if (dirty_first_ < 0) return Status::ok();
  // The staged slots and any clean ones between them (their staging equals their device copy).
  const size_t first = static_cast<size_t>(dirty_first_) * pitch_ + copy_begin_;
  ADAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(static_cast<char*>(d_) + first, pitch_, static_cast<char*>(h_) + first,
                                               pitch_, dirty_end_ - copy_begin_,
                                               static_cast<size_t>(dirty_last_ - dirty_first_ + 1),
                                               cudaMemcpyHostToDevice, stream));
  ADAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(uploaded_, stream));
  in_flight_ = true;
  dirty_first_ = dirty_last_ = -1;
  dirty_end_ = 0;
  return Status::ok();
}

}  // namespace adakv::cuda
